# The study's variable batch size, the keys alone (train_variable_bs.py's defaults; oscar_de_variable_batch_size.py
# applies them to the embedding-tuning regime): the embedding phase measured in tokens (10% of the training data) at
# batch 1 without accumulation (every sequence an optimizer step; under torchrun one per process), and each phase
# warming up over 10% of its own steps.
phase_unit = "tokens"
embedding_tuning_frac = 0.1
embedding_batch_size = 1
embedding_gradient_accumulation_steps = 1
warmup_relative_to = "phase"
embedding_warmup_frac = 0.1
warmup_frac = 0.1
