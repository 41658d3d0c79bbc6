"""pyvlm: a serving engine for vision-language models.

Importing this package loads no torch; `pyvlm.ops` loads the compiled
extension and exposes the ops (also reachable as torch.ops.pyvlm.*), and
`pyvlm.Engine` (loaded on first use) runs models offline.
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name == "Engine":
        from pyvlm.entrypoints.engine import Engine

        return Engine
    raise AttributeError(f"module 'pyvlm' has no attribute {name!r}")
