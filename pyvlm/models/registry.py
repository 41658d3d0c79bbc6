"""Model families by the checkpoint's `architectures`: one line each.

A family is a torch-free image processor (pyvlm/multimodal/<family>.py,
the contract in pyvlm/multimodal/processor.py) and a model class
(pyvlm/models/<family>.py, the contract in pyvlm/models/README.md). Both
are named by "module:Class" and imported only when a checkpoint needs
them, so importing the registry imports no model (and no torch).
"""

import importlib
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple


@dataclass(frozen=True)
class Family:
    """processor: "module:Class" under pyvlm.multimodal, a class with
    from_hf_configs(preprocessor_config, model_config); None for a model
    without images. model: "module:Class" under pyvlm.models."""

    processor: Optional[str]
    model: str


FAMILIES = {
    "LlavaOnevisionForConditionalGeneration": Family(
        "llava_onevision:LlavaOnevisionImageConfig",
        "llava_onevision:LlavaOnevisionForConditionalGeneration"),
    "Qwen2VLForConditionalGeneration": Family(
        "qwen2_vl:Qwen2VLImageConfig", "qwen2_vl:Qwen2VLForConditionalGeneration"),
    "Qwen2_5_VLForConditionalGeneration": Family(
        "qwen2_vl:Qwen2VLImageConfig", "qwen2_vl:Qwen2_5_VLForConditionalGeneration"),
    "LlavaForConditionalGeneration": Family(
        "llava:LlavaImageConfig", "llava:LlavaForConditionalGeneration"),
    "LlavaNextForConditionalGeneration": Family(
        "llava_next:LlavaNextImageConfig", "llava_next:LlavaNextForConditionalGeneration"),
    "MllamaForConditionalGeneration": Family(
        "mllama:MllamaImageConfig", "mllama:MllamaForConditionalGeneration"),
}


# Checkpoint layouts read as one of the families above, by architecture:
# "module:function" under pyvlm.conversions, taking (files, tokenizer,
# vision_tower_path) and returning the files in the family's layout.
LAYOUT_CONVERSIONS = {
    architecture: "llava_original:to_transformers_layout"
    for architecture in ("LlavaLlamaForCausalLM", "LlavaMistralForCausalLM",
                         "LlavaQwenForCausalLM")
}


def supported_architectures() -> List[str]:
    return sorted(set(FAMILIES) | set(LAYOUT_CONVERSIONS))


def layout_conversion_for(architectures: Sequence[str]) -> Optional[Any]:
    """The function reading a checkpoint of another layout as a family's
    (LAYOUT_CONVERSIONS), or None for a family's own layout."""
    for architecture in architectures or ():
        if architecture in LAYOUT_CONVERSIONS:
            return _imported("pyvlm.conversions", LAYOUT_CONVERSIONS[architecture])
    return None


def family_for(architectures: Sequence[str]) -> Tuple[str, Family]:
    """(architecture, family) of the first supported architecture;
    ValueError naming the supported ones otherwise."""
    for architecture in architectures or ():
        if architecture in FAMILIES:
            return architecture, FAMILIES[architecture]
    raise ValueError(f"unsupported model architectures {list(architectures or [])}; "
                     f"pyvlm supports: {', '.join(supported_architectures())}")


def _imported(package: str, name: str) -> Any:
    module_name, class_name = name.split(":")
    return getattr(importlib.import_module(f"{package}.{module_name}"), class_name)


def model_class_for(architectures: Sequence[str]) -> type:
    """The model class serving these architectures."""
    return _imported("pyvlm.models", family_for(architectures)[1].model)


def image_processor_for(architectures: Sequence[str], preprocessor_config: Mapping,
                        model_config: Mapping) -> Any:
    """The family's torch-free image processor built from the checkpoint's
    preprocessor_config.json and config.json contents (None: no images)."""
    processor = family_for(architectures)[1].processor
    if processor is None:
        return None
    return _imported("pyvlm.multimodal", processor).from_hf_configs(preprocessor_config,
                                                                    model_config)
