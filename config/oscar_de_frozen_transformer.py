# The study's "Frozen Transformer Layers": the whole run is the embedding phase (only embed_in and embed_out train),
# at 1e-3 with a 1% warmup and a cosine decay.
import os

exec(open(os.path.join(os.path.dirname(__file__), "oscar_de_embedding_tuning.py")).read())
out_dir = "out/oscar_de_frozen_transformer"
embedding_tuning_frac = 1.0
