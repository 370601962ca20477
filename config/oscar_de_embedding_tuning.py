# The study's "Embedding Tuning": the first 10% of the steps train only the token embeddings (input and output, the
# transformer frozen) at 1e-3, then the full model at 3e-4; each phase warms up (1% of the run) and decays on its own.
import os

exec(open(os.path.join(os.path.dirname(__file__), "oscar_de_baseline.py")).read())
out_dir = "out/oscar_de_embedding_tuning"
embedding_tuning_frac = 0.1
phase_unit = "steps"
embedding_learning_rate = 1e-3
embedding_warmup_frac = 0.01
embedding_lr_schedule = "cosine"
warmup_frac = 0.01
freeze_transformer = True
train_output_embeddings = True
