# The study's random-init control: the baseline regime from the same Pythia-410m body with small_init German
# embeddings (clp.py --random_init, `make init-random`) instead of CLP. Another regime from the random-init start:
#   python train.py config/oscar_de_embedding_tuning.py --init_from=out/pythia-410m-small_init-german --out_dir=...
import os

exec(open(os.path.join(os.path.dirname(__file__), "oscar_de_baseline.py")).read())
init_from = "out/pythia-410m-small_init-german"
out_dir = "out/oscar_de_random_init"
