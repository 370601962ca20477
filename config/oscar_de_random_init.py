# The study's random-init control: the same Pythia-410m body with small_init German embeddings
# (clp.py --random_init) instead of CLP. List it after the regime it should run, e.g.
#   python train.py config/oscar_de_baseline.py config/oscar_de_random_init.py
#   python train.py config/oscar_de_embedding_tuning.py config/oscar_de_random_init.py --out_dir=out/random_init_et
init_from = "out/pythia-410m-small_init-german"
out_dir = "out/oscar_de_random_init"
