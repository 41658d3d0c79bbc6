"""Vision towers shared by the VLM families (one file per tower family):
SigLIP (siglip.py), the Qwen2-VL ViT (qwen2_vl.py), Qwen2.5-VL's windowed
ViT (qwen2_5_vl.py) and Llama-3.2-Vision's tiled encoder (mllama.py, not yet
served: its family is not registered). Each takes every image of a step in
one call.
"""
