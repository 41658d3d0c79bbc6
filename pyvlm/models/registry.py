"""Which pyvlm class serves a checkpoint's `architectures` (imports lazily)."""

import importlib
from typing import List, Sequence

# HF architecture name -> (module under pyvlm.models, class name)
MODELS = {
    "LlavaOnevisionForConditionalGeneration": ("llava_onevision",
                                               "LlavaOnevisionForConditionalGeneration"),
}


def supported_architectures() -> List[str]:
    return sorted(MODELS)


def model_class_for(architectures: Sequence[str]) -> type:
    """The class of the first supported architecture; ValueError naming the
    supported ones otherwise."""
    for arch in architectures or ():
        if arch in MODELS:
            module_name, class_name = MODELS[arch]
            module = importlib.import_module(f"pyvlm.models.{module_name}")
            return getattr(module, class_name)
    raise ValueError(f"unsupported model architectures {list(architectures or [])}; "
                     f"pyvlm supports: {', '.join(supported_architectures())}")
