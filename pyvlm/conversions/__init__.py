"""Checkpoint conversions: other formats read (GGUF), transformers-format
folders written, and the built demo checkpoint cached. Model code lives in
pyvlm/models; this package only produces the folders it loads."""
