# make demo, stage 4: a German target (the source's architecture, the helper's tokenizer) trained on the German
# ELTeC novels. Every variant gets the same token budget; the demo sets init_from and the phase keys per variant:
#   python train.py config/demo_target.py --init_from=out/demo/init-clp --out_dir=out/demo/runs/clp
#   python train.py config/demo_target.py --init_from=out/demo/init-clp --embedding_tuning_frac=0.1 ...
import os

exec(open(os.path.join(os.path.dirname(__file__), "demo_source.py")).read())
out_dir = "out/demo/runs/clp"
data_dir = "out/demo/data-deu"
init_from = "out/demo/init-clp"
max_tokens = 500_000
eval_interval = 20
eval_iters = 8
embedding_learning_rate = 3e-3
embedding_warmup_frac = 0.01
