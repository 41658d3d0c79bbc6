"""Vision towers shared by the VLM families (one file per tower family):
SigLIP (siglip.py), the Qwen2-VL ViT (qwen2_vl.py) and Qwen2.5-VL's
windowed ViT (qwen2_5_vl.py). Each takes every image of a step in one call.
"""
