# The study's "Accelerated Training Start": like embedding tuning, but nothing is frozen: the whole model trains at
# the embedding learning rate (1e-3) for the first 10% of the steps, then at 3e-4.
import os

exec(open(os.path.join(os.path.dirname(__file__), "oscar_de_embedding_tuning.py")).read())
out_dir = "out/oscar_de_accelerated_start"
freeze_transformer = False
