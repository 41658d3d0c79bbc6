"""The model runner side: checkpoints, the KV pool, vision batching, sampling.

torch starts here (the layers above, engine/chat/http/server, import none).
"""
