"""LLaVA checkpoints as their authors published them (haotian-liu's LLaVA
repository: liuhaotian/llava-v1.5-*, llava-v1.6-*; lmms-lab's
llama3-llava-next-8b and llava-onevision-qwen2-*), read as the transformers
layout pyvlm's LLaVA families load. Plain dict work, no torch: the result
is a CheckpointFiles whose config.json is the transformers one.

- architectures LlavaLlamaForCausalLM / LlavaMistralForCausalLM /
  LlavaQwenForCausalLM: a flat text config plus mm_* keys;
- image_aspect_ratio picks the family: "pad" (or none) is LLaVA-1.5,
  "anyres" LLaVA-NeXT, "anyres_max_N" LLaVA-OneVision;
- mm_vision_tower names the vision tower: its weights are inside the
  checkpoint (model.vision_tower.vision_tower.*) or in the folder or hub
  repository it names (--vision-tower-path overrides it); its config and
  image processor come from that folder, or, for the towers the released
  checkpoints name, from the copies below;
- the prompt writes "<image>", which the authors' tokenizers lack: it is
  added as a special token and its id becomes image_token_index (an id at
  or past the vocabulary; the model clamps it before embedding, the image's
  rows replace it).
"""

import json
import re
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from pyvlm.models.checkpoint import (CheckpointError, CheckpointFiles, find_weight_files,
                                     read_processor_config, resolve_checkpoint)
from pyvlm.multimodal.llava_configs import repo_pinpoints

IMAGE_TOKEN = "<image>"
BACKBONES = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral",
             "LlavaQwenForCausalLM": "qwen2"}
TOWER_PREFIX = "model.vision_tower.vision_tower."

# config.json / preprocessor_config.json of the towers the released
# checkpoints name (openai/clip-vit-large-patch14-336, google/siglip-so400m-
# patch14-384), for serving them without a download.
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
KNOWN_TOWERS: Dict[str, Tuple[dict, dict]] = {
    "openai/clip-vit-large-patch14-336": (
        dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
             num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
             hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768),
        dict(image_processor_type="CLIPImageProcessor", size={"shortest_edge": 336},
             crop_size={"height": 336, "width": 336}, do_resize=True, do_center_crop=True,
             do_rescale=True, rescale_factor=1 / 255, do_normalize=True, resample=3,
             image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)),
    "google/siglip-so400m-patch14-384": (
        dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
             num_hidden_layers=27, num_attention_heads=16, image_size=384, patch_size=14,
             hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
        dict(image_processor_type="SiglipImageProcessor", size={"height": 384, "width": 384},
             do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
             resample=3, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])),
}


def to_transformers_layout(files: CheckpointFiles, tokenizer,
                           vision_tower_path: Optional[str] = None) -> CheckpointFiles:
    """The checkpoint as transformers would lay it out (module docstring);
    "<image>" is added to the tokenizer when it lacks it. CheckpointError
    names what is missing and the flag that supplies it."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = files.config
    backbone = _backbone(config)
    tower_name = vision_tower_path or config.get("mm_vision_tower") or config.get("vision_tower")
    if not tower_name:
        raise CheckpointError(f"{files.root.name}: config.json names no mm_vision_tower; pass "
                              "--vision-tower-path DIR_OR_HUB_ID")
    tower_inside = any(name.startswith(TOWER_PREFIX) for name in weight_names(files.weight_files))
    # no weight files at all: --load-format dummy, which needs no tower weights either
    needs_tower_weights = bool(files.weight_files) and not tower_inside
    tower_config, tower_processor, tower_files = _tower(tower_name, needs_tower_weights,
                                                        files.root.name)
    converted = transformers_config(config, backbone, tower_config, image_token_id)
    processor = processor_config(config, tower_processor, converted)
    return replace(files, config=converted, processor_config=processor,
                   weight_files=files.weight_files + tower_files)


def _backbone(config: Mapping[str, Any]) -> str:
    for architecture in config.get("architectures") or ():
        if architecture in BACKBONES:
            return BACKBONES[architecture]
    raise CheckpointError(f"not an original LLaVA layout: {config.get('architectures')}")


def transformers_config(config: Mapping[str, Any], backbone: str, tower_config: dict,
                        image_token_id: int) -> dict:
    """The LlavaConfig / LlavaNextConfig / LlavaOnevisionConfig dict."""
    _check_projector(config)
    aspect = config.get("image_aspect_ratio") or "pad"
    text = {k: v for k, v in config.items() if not k.startswith("mm_") and k not in _NOT_TEXT}
    text["model_type"] = backbone
    layer, strategy = _feature_selection(config, tower_config)
    common = dict(text_config=text, vision_config=tower_config,
                  image_token_index=image_token_id,
                  vision_feature_layer=layer, vision_feature_select_strategy=strategy,
                  projector_hidden_act="gelu", multimodal_projector_bias=True,
                  tie_word_embeddings=bool(config.get("tie_word_embeddings", False)))
    if aspect in ("pad", "square", "resize"):
        return dict(common, model_type="llava", architectures=["LlavaForConditionalGeneration"])
    pinpoints = grid_pinpoints(config.get("image_grid_pinpoints"), tower_config["image_size"])
    if aspect == "anyres":
        # processed by the repository's rules (processor_config's
        # anyres_rules), which read the pinpoints as written: (width, height)
        return dict(common, model_type="llava_next",
                    image_grid_pinpoints=[[w, h] for h, w in pinpoints],
                    architectures=["LlavaNextForConditionalGeneration"])
    if re.fullmatch(r"anyres_max_\d+", aspect):
        return dict(common, model_type="llava_onevision", image_grid_pinpoints=pinpoints,
                    vision_aspect_ratio=aspect,
                    architectures=["LlavaOnevisionForConditionalGeneration"])
    raise CheckpointError(f"image_aspect_ratio {aspect!r} is not supported "
                          "(pad, anyres, anyres_max_N)")


_NOT_TEXT = {"architectures", "image_aspect_ratio", "image_grid_pinpoints", "image_crop_resolution",
             "image_split_resolution", "tokenizer_model_max_length", "tokenizer_padding_side",
             "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "use_mm_proj", "vision_tower",
             "unfreeze_mm_vision_tower", "pos_skipping_range", "vision_tower_pretrained"}


def _feature_selection(config: Mapping[str, Any], tower_config: Mapping[str, Any]):
    """(vision_feature_layer, vision_feature_select_strategy). The CLIP
    tower reads mm_vision_select_layer, and "patch" drops the class token;
    the LLaVA-NeXT repository's SigLIP tower ignores both: it deletes its
    last encoder layer and returns every patch of the layer before."""
    if tower_config.get("model_type") == "siglip_vision_model":
        return -2, "full"
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise CheckpointError(f"mm_vision_select_feature {feature!r} (supported: patch, cls_patch)")
    return config.get("mm_vision_select_layer", -2), "default" if feature == "patch" else "full"


def _check_projector(config: Mapping[str, Any]) -> None:
    projector = config.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise CheckpointError(f"mm_projector_type {projector!r} is not supported (mlp2x_gelu)")
    if config.get("mm_use_im_start_end"):
        raise CheckpointError("mm_use_im_start_end checkpoints are not supported")
    merge = config.get("mm_patch_merge_type", "flat")
    aspect = config.get("image_aspect_ratio") or "pad"
    if aspect.startswith("anyres") and not merge.startswith("spatial_unpad"):
        raise CheckpointError(f"mm_patch_merge_type {merge!r} with {aspect} (supported: "
                              "spatial_unpad)")


def grid_pinpoints(value: Any, tile_size: int) -> List[List[int]]:
    """image_grid_pinpoints as transformers reads them, [[height, width], ...]:
    the repository writes (width, height) pairs, as a list, its string, or
    "(1x1),...,(6x6)", every grid of that range (llava_configs.repo_pinpoints)."""
    try:
        return [[height, width] for width, height in repo_pinpoints(value, tile_size)]
    except (ValueError, SyntaxError, IndexError) as error:
        raise CheckpointError(f"image_grid_pinpoints {value!r}: {error}") from None


def processor_config(config: Mapping[str, Any], tower_processor: dict, converted: dict) -> dict:
    """The family processor's preprocessor_config.json: the tower's image
    processor, with the original code's rule for image_aspect_ratio."""
    processor = dict(tower_processor)
    if converted["model_type"] == "llava":
        # the LLaVA repository's expand2square before the CLIP processor
        processor["pad_to_square"] = (config.get("image_aspect_ratio") or "pad") == "pad"
        return processor
    if converted["model_type"] == "llava_next":
        # the repository's process_anyres_image and unpad_image (its
        # pinpoint order and int() rounding); the pinpoints as it writes them
        processor["anyres_rules"] = "llava_repo"
        processor["image_grid_pinpoints"] = converted["image_grid_pinpoints"]
        return processor
    processor["image_grid_pinpoints"] = converted["image_grid_pinpoints"]
    return processor


# --- the vision tower ---------------------------------------------------------

def _tower(name: str, needs_weights: bool, checkpoint: str) -> Tuple[dict, dict, Tuple[Path, ...]]:
    """(vision config, image processor config, weight files to add)."""
    folder = _tower_folder(name, needs_weights, checkpoint)
    if folder is None:
        config, processor = KNOWN_TOWERS[name]
        return dict(config), dict(processor), ()
    config = _read_tower_config(folder)
    processor = read_processor_config(folder) or dict(KNOWN_TOWERS.get(name, ({}, {}))[1])
    return config, processor, find_weight_files(folder) if needs_weights else ()


def _tower_folder(name: str, needs_weights: bool, checkpoint: str) -> Optional[Path]:
    if Path(name).is_dir():
        return Path(name)
    if not needs_weights and name in KNOWN_TOWERS:
        return None
    try:
        return resolve_checkpoint(name)
    except Exception as error:  # offline, unknown repository, ...
        raise CheckpointError(
            f"{checkpoint}: the vision tower {name!r} (mm_vision_tower) could not be found "
            f"({error}); pass --vision-tower-path with a local copy of it") from None


def _read_tower_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"vision tower folder {folder} has no config.json")
    config = json.loads(path.read_text())
    vision = config.get("vision_config") if "vision_config" in config else config
    vision = dict(vision)
    vision.setdefault("model_type", _vision_model_type(config))
    return vision


def _vision_model_type(config: Mapping[str, Any]) -> str:
    model_type = config.get("model_type", "")
    return {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}.get(model_type,
                                                                             model_type)


def weight_names(weight_files: Sequence[Path]) -> List[str]:
    """Tensor names of the weight files: safetensors headers, or a .bin
    shard's index (pytorch_model.bin.index.json) when it has one."""
    names = []
    for path in weight_files:
        names.extend(_safetensors_names(path) if path.suffix != ".bin" else _bin_names(path))
    return names


def _safetensors_names(path: Path) -> List[str]:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return [name for name in header if name != "__metadata__"]


def _bin_names(path: Path) -> List[str]:
    index = path.parent / "pytorch_model.bin.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [name for name, shard in weight_map.items() if shard == path.name]
    import torch  # a lone .bin file: its names are inside the pickle

    return list(torch.load(str(path), map_location="cpu", weights_only=True, mmap=True))
