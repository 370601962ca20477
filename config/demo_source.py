# make demo, stage 2: the English *source* model, pre-trained from scratch on the English ELTeC novels
# (4 layers, width 256, 5.3M parameters with a 4,096-token BPE). Also runs alone once the demo has made its data:
#   python train.py config/demo_source.py
out_dir = "out/demo/source"
data_dir = "out/demo/data-eng"
init_from = "scratch"
n_layer = 4
n_head = 4
n_embd = 256
block_size = 128
batch_size = 16
gradient_accumulation_steps = 1
max_tokens = 1_600_000
learning_rate = 1e-3
min_lr = 1e-4
warmup_frac = 0.02
lr_schedule = "cosine"
eval_interval = 100
eval_iters = 16
dtype = "auto"  # bfloat16 on a GPU that has it, float32 on a CPU (bf16 autocast is ~17x slower without native bf16)
