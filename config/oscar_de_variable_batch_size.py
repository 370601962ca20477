# The study's variable batch size (run with train_variable_bs.py): 10% of the training *data* goes to the embedding
# phase at batch 1 without accumulation (one sequence per optimizer step; under torchrun one per process), the other
# 90% to the full phase at 16 x 4 = 64 sequences per step; each phase warms up over 10% of its own steps.
import os

exec(open(os.path.join(os.path.dirname(__file__), "oscar_de_embedding_tuning.py")).read())
exec(open(os.path.join(os.path.dirname(__file__), "variable_batch_size.py")).read())
out_dir = "out/oscar_de_variable_batch_size"
batch_size = 16
gradient_accumulation_steps = 4
