# The study's embedding-tuning regime from a modern source: Qwen2.5-0.5B (Llama family: grouped-query attention,
# SwiGLU, one tied matrix for the embedding and the head) with CLP German embeddings from the study's helper. The
# embedding phase trains that one matrix. Build its init with the source named:
#   make train CONFIG=config/oscar_de_embedding_tuning_qwen.py SOURCE_MODEL=Qwen/Qwen2.5-0.5B
# Llama-3.2-1B likewise: SOURCE_MODEL=meta-llama/Llama-3.2-1B and ARGS=--init_from=out/Llama-3.2-1B-clp-german.
import os

exec(open(os.path.join(os.path.dirname(__file__), "oscar_de_embedding_tuning.py")).read())
out_dir = "out/oscar_de_embedding_tuning_qwen"
init_from = "out/Qwen2.5-0.5B-clp-german"
