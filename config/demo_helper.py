# make demo, stage 2: the smaller German *helper* model (2 layers, width 128) on the German ELTeC novels; CLP reads
# only its tokenizer and input embeddings.
import os

exec(open(os.path.join(os.path.dirname(__file__), "demo_source.py")).read())
out_dir = "out/demo/helper"
data_dir = "out/demo/data-deu"
n_layer = 2
n_head = 2
n_embd = 128
max_tokens = 1_200_000
