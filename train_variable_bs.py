"""
The study's variable-batch-size run: train.py with the embedding phase measured in tokens (a share of the data, not
of the steps), trained at a small batch (1 sequence, no accumulation: every sequence is an optimizer step; under
torchrun every process runs one), and each phase warming up over its own length. Everything else, the config files
and --key=value included, is train.py's.

    python train_variable_bs.py config/oscar_de_variable_batch_size.py
"""

import train
from model import run_cli

VARIABLE_BATCH_DEFAULTS = dict(
    phase_unit="tokens",
    embedding_tuning_frac=0.1,
    embedding_batch_size=1,
    embedding_gradient_accumulation_steps=1,
    warmup_relative_to="phase",
    embedding_warmup_frac=0.1,
    warmup_frac=0.1,
)

if __name__ == "__main__":
    run_cli(lambda argv: train.main(argv, defaults=VARIABLE_BATCH_DEFAULTS))
