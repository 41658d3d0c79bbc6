"""The model runner side: the model runner, the KV pool, the vision encoder cache, sampling.

torch starts here (the layers above, scheduling/multimodal/chat/http/server, import none).
"""
