"""pyvlm: a serving engine for vision-language models.

Importing this package loads no torch; `pyvlm.ops` loads the compiled
extension and exposes the ops (also reachable as torch.ops.pyvlm.*).
"""

__version__ = "0.1.0"
