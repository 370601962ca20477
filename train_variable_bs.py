"""
The study's variable-batch-size run: train.py with the embedding phase measured in tokens (a share of the data, not
of the steps), trained at a small batch (1 sequence, no accumulation: every sequence is an optimizer step; under
torchrun every process runs one), and each phase warming up over its own length. Everything else, the config files
and --key=value included, is train.py's.

    python train_variable_bs.py config/oscar_de_variable_batch_size.py
"""

import os

import train
from common import run_cli
from configurator import read_config_file

VARIABLE_BATCH_DEFAULTS = read_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "config",
                                                         "variable_batch_size.py"))

if __name__ == "__main__":
    run_cli(lambda argv: train.main(argv, defaults=VARIABLE_BATCH_DEFAULTS))
