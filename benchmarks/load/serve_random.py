"""Serves a random-weight model of a real shape, built in memory (no
download), behind the real server: the load tools' GPU mode.

  python benchmarks/load/serve_random.py llava-onevision-7b --device cuda --port 30000 [flags]

The model is built as benchmarks/bench_offline.py builds it (transformers'
random model of the shape on the device, copied into pyvlm's model; a small
checkpoint folder supplies the config, tokenizer and preprocessor), then
`python -m pyvlm`'s own Launcher serves it with every server flag given.
Shapes: llava-onevision-7b, qwen2-vl-7b (Qwen/Qwen2-VL-7B-Instruct),
llama-3.2-11b-vision (meta-llama/Llama-3.2-11B-Vision-Instruct), llava-1.5-7b
(llava-hf/llava-1.5-7b-hf) and llava-next-7b (llava-hf/llava-v1.6-mistral-
7b-hf). Each "-narrow" variant keeps the real vocabulary, tokenizer, image
tokens and image preprocessing (anyres tiles; Qwen2-VL's 14-pixel patches, 2
frames, 2x2 merge; Llama-3.2-Vision's four 560-pixel tiles of 14-pixel
patches; CLIP's 336-pixel tiles of 14-pixel patches) with tiny widths and
depths, so this path runs on a CPU too.
"""

import logging
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import List

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# Tiny widths and depths; vocabulary, image size and patch size stay the 7B's.
NARROW_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)
NARROW_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2)
# Qwen2-VL: head_dim 16, so the M-RoPE sections must sum to 8; the merger
# projects to the text width (vision hidden_size).
NARROW_QWEN2_VL_TEXT = dict(NARROW_TEXT, rope_parameters={
    "rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]})
NARROW_QWEN2_VL_VISION = dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2,
                              hidden_size=NARROW_TEXT["hidden_size"])
# Llama-3.2-Vision: 4 decoder layers of which 2 cross-attend (the real one
# cross-attends every fifth); the tower's 2 local + 1 global layers, its
# output the last local state and one intermediate one (hidden x 2).
NARROW_MLLAMA_TEXT = dict(NARROW_TEXT, num_hidden_layers=4, cross_attention_layers=[1, 3])
NARROW_MLLAMA_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_global_layers=1, attention_heads=2,
                            intermediate_layers_indices=[0], vision_output_dim=64)
# LLaVA-1.5: Vicuna (Llama 2) keeps one K/V head per query head; the CLIP
# tower is read at layer -2, so pyvlm builds 2 of its 3 layers.
NARROW_VICUNA_TEXT = dict(NARROW_TEXT, num_key_value_heads=NARROW_TEXT["num_attention_heads"])
NARROW_CLIP_VISION = dict(NARROW_VISION, num_hidden_layers=3, projection_dim=32)
BASE_SHAPES = {"llava-onevision-7b": ("llava_onevision_7b_config", NARROW_TEXT, NARROW_VISION),
               "qwen2-vl-7b": ("qwen2_vl_7b_config", NARROW_QWEN2_VL_TEXT, NARROW_QWEN2_VL_VISION),
               "llama-3.2-11b-vision": ("llama_3_2_11b_vision_config", NARROW_MLLAMA_TEXT,
                                        NARROW_MLLAMA_VISION),
               "llava-1.5-7b": ("llava_1_5_7b_config", NARROW_VICUNA_TEXT, NARROW_CLIP_VISION),
               "llava-next-7b": ("llava_next_7b_config", NARROW_TEXT, NARROW_CLIP_VISION)}
SHAPES = tuple(name + suffix for name in BASE_SHAPES for suffix in ("", "-narrow"))


def config_for(shape: str):
    """The transformers config of a shape (SHAPES)."""
    from benchmarks.offline import random_models

    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    builder, narrow_text, narrow_vision = BASE_SHAPES[shape.removesuffix("-narrow")]
    config = getattr(random_models, builder)()
    if not shape.endswith("-narrow"):
        return config
    values = config.to_dict()
    values["text_config"].update(narrow_text)
    values["text_config"].pop("layer_types", None)  # one per layer: derived again
    values["vision_config"].update(narrow_vision)
    return type(config).from_dict(values)


def build_model(shape: str, device: str, folder: Path):
    """pyvlm's model of the shape with random weights on the device; writes
    the checkpoint metadata into folder."""
    import torch

    from benchmarks.offline.random_models import (pyvlm_model_from, random_hf_model,
                                                  write_checkpoint_metadata)

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    config = config_for(shape)
    write_checkpoint_metadata(folder, config)
    hf = random_hf_model(config, device, dtype)
    model = pyvlm_model_from(hf, device, dtype)
    del hf  # one copy of the weights is enough
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return model


def launcher_for(args, model):
    """`python -m pyvlm`'s Launcher serving a model already in memory."""
    from pyvlm import Engine
    from pyvlm.server.launch import Launcher

    return Launcher(args, make_engine=lambda a: Engine(loaded_model=model, **a.engine_kwargs()))


def serve(args, model) -> int:
    from pyvlm.server.launch import run_loop

    return run_loop(launcher_for(args, model).run())


def main(argv: List[str]) -> int:
    from pyvlm.cli import build_server_parser
    from pyvlm.server.args import server_args_from

    if not argv or argv[0].startswith("-"):
        raise SystemExit(f"usage: serve_random.py SHAPE [server flags]; SHAPE in {SHAPES}")
    shape, flags = argv[0], argv[1:]
    args = server_args_from(build_server_parser().parse_args(flags))
    logging.basicConfig(level=args.log_level.upper(), format="[%(asctime)s] %(message)s")
    device = "cuda" if args.device == "auto" else args.device
    with tempfile.TemporaryDirectory(prefix=f"pyvlm-{shape}-") as folder:
        logging.info("building a random-weight %s on %s", shape, device)
        model = build_model(shape, device, Path(folder))
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        args = replace(args, model=folder, device=device, dtype=dtype,
                       served_model_name=args.served_model_name or shape)
        return serve(args, model)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
