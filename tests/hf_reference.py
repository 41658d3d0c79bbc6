"""transformers as the reference: greedy generation and prefill logits of a
LLaVA-OneVision, Qwen2-VL or Llama-3.2-Vision (mllama) checkpoint for prompt
ids that already hold the expanded image placeholders (pyvlm's request builder
makes them; the image-token counts themselves are checked against
transformers' processor in tests/multimodal; mllama keeps one <|image|> per
image). Shared by the parity tests and benchmarks/bench_offline.py."""

from typing import List, Optional, Sequence

import torch


def image_processor_for(processor_config: dict):
    """transformers' PIL LLaVA-OneVision image processor (the slow class on
    transformers versions before the PIL backends)."""
    try:
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil as processor_class)
    except ImportError:
        from transformers import LlavaOnevisionImageProcessor as processor_class

    kwargs = {k: v for k, v in processor_config.items()
              if k not in ("image_processor_type", "processor_class")}
    return processor_class(**kwargs)


class ReferenceInputs:
    """A family's transformers image inputs of ONE prompt:
    (prompt_ids, images, device, dtype) -> generate()/forward() kwargs."""


class LlavaOnevisionInputs(ReferenceInputs):
    """pixel_values, image_sizes and batch_num_images of ONE prompt's images."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, prompt_ids: List[int], images: Sequence, device, dtype) -> dict:
        if not images:
            return {}
        features = self.image_processor([list(images)], return_tensors="pt")
        return {"pixel_values": features["pixel_values"].to(device, dtype),
                "image_sizes": features["image_sizes"].to(device),
                "batch_num_images": features["batch_num_images"]}


class Qwen2VLInputs(ReferenceInputs):
    """pixel_values, image_grid_thw and mm_token_type_ids (which transformers
    5 needs to place M-RoPE positions) of one prompt's images.
    image_processor(images=..., return_tensors="pt") makes the pixels:
    transformers' PIL processor, or pyvlm_pixels (the same rows, made by
    pyvlm, for a machine whose Pillow resamples differently)."""

    def __init__(self, image_processor, image_token_id: int):
        self.image_processor, self.image_token_id = image_processor, image_token_id

    def __call__(self, prompt_ids: List[int], images: Sequence, device, dtype) -> dict:
        if not images:
            return {}
        features = self.image_processor(images=list(images), return_tensors="pt")
        token_types = (torch.tensor([prompt_ids]) == self.image_token_id).int()
        return {"pixel_values": features["pixel_values"].to(device, dtype),
                "image_grid_thw": features["image_grid_thw"].to(device),
                "mm_token_type_ids": token_types.to(device)}


class MllamaInputs(ReferenceInputs):
    """pixel_values, aspect_ratio_ids, aspect_ratio_mask and
    cross_attention_mask of ONE prompt (one sample holding all its images).
    The mask is built from the prompt ids as MllamaProcessor builds it
    (get_cross_attention_token_mask, then the dense [1, tokens, images,
    max_image_tiles] mask over each image's real tiles); generate() extends
    it to generated tokens by repeating the last row. image_processor:
    transformers' MllamaImageProcessorPil."""

    def __init__(self, image_processor, image_token_id: int):
        self.image_processor, self.image_token_id = image_processor, image_token_id

    def __call__(self, prompt_ids: List[int], images: Sequence, device, dtype) -> dict:
        if not images:
            return {}
        if list(prompt_ids).count(self.image_token_id) != len(images):
            raise ValueError(f"{len(images)} images for "
                             f"{list(prompt_ids).count(self.image_token_id)} image tokens")
        features = self.image_processor(images=[list(images)], return_tensors="pt")
        return {"pixel_values": features["pixel_values"].to(device, dtype),
                "aspect_ratio_ids": features["aspect_ratio_ids"].to(device),
                "aspect_ratio_mask": features["aspect_ratio_mask"].to(device),
                "cross_attention_mask": self.cross_attention_mask(
                    prompt_ids, features["num_tiles"]).to(device)}

    def cross_attention_mask(self, prompt_ids: List[int], num_tiles) -> torch.Tensor:
        """[1, len(prompt_ids), images, max_image_tiles] 0/1 (int64), as
        MllamaProcessor makes it; num_tiles: [[tiles of each image]]."""
        from transformers.models.mllama.processing_mllama import (
            convert_sparse_cross_attention_mask_to_dense, get_cross_attention_token_mask)

        sparse = get_cross_attention_token_mask(list(prompt_ids), self.image_token_id)
        dense = convert_sparse_cross_attention_mask_to_dense(
            [sparse], num_tiles, max_num_tiles=self.image_processor.max_image_tiles,
            length=len(prompt_ids))
        return torch.from_numpy(dense)


class MllamaPyvlmTiles:
    """An MllamaImageProcessorPil stand-in giving pyvlm's tiles (bit-exact
    with transformers' PIL processor under the Pillow CI runs), padded as
    transformers pads them; processor: pyvlm's torch-free mllama processor."""

    def __init__(self, processor):
        self.processor = processor
        self.max_image_tiles = processor.max_image_tiles

    def __call__(self, images, return_tensors="pt"):
        from pyvlm.models.mllama_pixels import mllama_pixel_values

        (images,) = images  # one sample holding all its images
        plans = self.processor.plan_prompt([(im.height, im.width) for im in images])
        tiles = mllama_pixel_values(images, plans)
        side = plans[0].tile_size
        pixels = torch.zeros(1, len(images), self.max_image_tiles, 3, side, side)
        for index, image_tiles in enumerate(tiles):
            pixels[0, index, :image_tiles.shape[0]] = image_tiles
        return {"pixel_values": pixels,
                "aspect_ratio_ids": torch.tensor([[plan.aspect_ratio_id for plan in plans]]),
                "aspect_ratio_mask": torch.tensor([[plan.aspect_ratio_mask for plan in plans]]),
                "num_tiles": [[plan.num_tiles for plan in plans]]}


def pyvlm_pixels(processor):
    """An image-processor stand-in giving pyvlm's Qwen2-VL pixel rows
    (bit-exact with transformers' PIL processor under the Pillow CI runs;
    processor: pyvlm's torch-free Qwen2-VL processor)."""
    from pyvlm.models.qwen2_vl_pixels import qwen2_vl_pixel_values

    def process(images, return_tensors="pt"):
        plans = processor.plan_prompt([(im.height, im.width) for im in images])
        return {"pixel_values": torch.cat(qwen2_vl_pixel_values(images, plans)),
                "image_grid_thw": torch.tensor([plan.grid_thw for plan in plans])}

    return process


def reference_inputs_for(files):
    """The transformers-side image inputs of a checkpoint's family
    (files: pyvlm.models.checkpoint.CheckpointFiles)."""
    if files.config.get("model_type") in ("qwen2_vl", "qwen2_5_vl"):
        from tests.multimodal.hf_qwen2_vl import hf_image_processor

        # The PIL processor, always: where torchvision is installed,
        # AutoImageProcessor picks the torchvision one, whose resize is not
        # Pillow's (and so not what pyvlm or a PIL-based client computes).
        return Qwen2VLInputs(hf_image_processor(**files.processor_config),
                             files.config["image_token_id"])
    model_type = files.config.get("model_type")
    if model_type == "mllama":
        from tests.multimodal.hf_mllama import hf_processor

        config = files.config
        return MllamaInputs(hf_processor(**files.processor_config),
                            config.get("image_token_index", config.get("image_token_id")))
    if "mm_vision_tower" in files.config:
        raise ValueError("an original-layout LLaVA checkpoint (mm_vision_tower): use the "
                         "reference inputs of its transformers-format twin")
    if model_type == "llava":
        return LlavaInputs(llava_image_processor(files.processor_config))
    if model_type == "llava_next":
        return LlavaNextInputs(llava_image_processor(files.processor_config))
    return LlavaOnevisionInputs(image_processor_for(files.processor_config))


def _inputs_of(image_inputs, prompt_ids, images, device, dtype) -> dict:
    if not isinstance(image_inputs, ReferenceInputs):
        # a bare LLaVA-OneVision image processor
        image_inputs = LlavaOnevisionInputs(image_inputs)
    return image_inputs(prompt_ids, images, device, dtype)


@torch.inference_mode()
def greedy_tokens(model, image_inputs, prompt_ids: List[int], images: Sequence,
                  max_new_tokens: int, eos_token_id: Optional[int] = None,
                  **generation_settings) -> List[int]:
    """transformers generate (greedy); eos None generates exactly max_new_tokens.
    image_inputs: reference_inputs_for(files), or a LLaVA-OneVision image processor.
    generation_settings: more GenerationConfig fields (e.g. repetition_penalty)."""
    from transformers import GenerationConfig

    device, dtype = model.device, model.dtype
    ids = torch.tensor([prompt_ids], device=device)
    if eos_token_id is None:
        # generate() fills an unset eos from the checkpoint's generation
        # config; an id past the LM head's rows is one it never samples.
        eos_token_id = model.get_output_embeddings().weight.shape[0]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                              eos_token_id=eos_token_id, pad_token_id=0, **generation_settings)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                         generation_config=config,
                         **_inputs_of(image_inputs, prompt_ids, images, device, dtype))
    return out[0, len(prompt_ids):].tolist()


@torch.inference_mode()
def prefill_logits(model, image_inputs, prompt_ids: List[int], images: Sequence) -> torch.Tensor:
    """Float32 logits of every prompt position, [len(prompt_ids), vocab]."""
    device, dtype = model.device, model.dtype
    ids = torch.tensor([prompt_ids], device=device)
    out = model(input_ids=ids, **_inputs_of(image_inputs, prompt_ids, images, device, dtype))
    return out.logits[0].float()


def qwen2_vl_processor(checkpoint_dir):
    """transformers' Qwen2-VL processor (chat template, image processor,
    placeholder expansion) for a checkpoint folder, without the video
    processor that needs torchvision."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    from tests.multimodal.hf_qwen2_vl import _NoVideoProcessor, hf_image_processor

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir))
    preprocessor = json.loads((Path(checkpoint_dir) / "preprocessor_config.json").read_text())
    return _NoVideoProcessor(image_processor=hf_image_processor(**preprocessor),
                             tokenizer=tokenizer, video_processor=None,
                             chat_template=tokenizer.chat_template)


def qwen2_vl_inputs(processor, prompt_text: str, images: Sequence) -> dict:
    """input_ids, pixel_values, image_grid_thw and mm_token_type_ids of one
    prompt as transformers' processor makes them."""
    return dict(processor(text=[prompt_text], images=list(images) or None, return_tensors="pt"))


# --- LLaVA-1.5 and LLaVA-NeXT -------------------------------------------------

def llava_image_processor(processor_config: dict):
    """transformers' PIL image processor that a LLaVA-1.5 / LLaVA-NeXT
    preprocessor_config.json names: CLIPImageProcessor (llava-hf's
    LLaVA-1.5), LlavaImageProcessor or LlavaNextImageProcessor."""
    import transformers

    name = processor_config.get("image_processor_type", "CLIPImageProcessor")
    processor_class = getattr(transformers, f"{name}Pil")
    ignored = ("image_processor_type", "processor_class", "aspect_ratio_setting")
    return processor_class(**{k: v for k, v in processor_config.items() if k not in ignored})


class LlavaInputs(ReferenceInputs):
    """pixel_values [images, 3, side, side] of ONE prompt's images (one
    tile each), made by the checkpoint's own PIL image processor."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, prompt_ids: List[int], images: Sequence, device, dtype) -> dict:
        if not images:
            return {}
        features = self.image_processor(images=list(images), return_tensors="pt")
        return {"pixel_values": features["pixel_values"].to(device, dtype)}


class LlavaNextInputs(ReferenceInputs):
    """pixel_values [images, max tiles, 3, side, side] (each image's base
    tile then its grid tiles, zero-padded to the most tiles, as
    LlavaNextProcessor pads them) and image_sizes [images, 2] (height,
    width) of ONE prompt's images."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, prompt_ids: List[int], images: Sequence, device, dtype) -> dict:
        if not images:
            return {}
        features = self.image_processor(images=list(images), return_tensors="pt")
        return {"pixel_values": features["pixel_values"].to(device, dtype),
                "image_sizes": features["image_sizes"].to(device)}


def cpu_prepare_of(engine):
    """The engine family's prepare_images on the CPU, in the engine's dtype:
    what its request builder runs, or (a GPU engine, which leaves it to the
    step) what the step runs, with the same pixels either way."""
    from pyvlm.entrypoints.startup import image_model_of, resolve_dtype
    from pyvlm.runner.deferred_images import defer_images

    if engine.builder.images.prepare is not defer_images:
        return engine.builder.images.prepare
    files = engine.state.files
    dtype = resolve_dtype(engine.config.model.dtype, files.config, "cuda")
    return image_model_of(files, dtype).prepare_images


class PyvlmLlavaPixels(ReferenceInputs):
    """LLaVA-1.5 / LLaVA-NeXT inputs for transformers made by pyvlm's
    processor of an engine's checkpoint on the CPU: the authors' pad and
    anyres rules (checked against them in tests/multimodal) for a twin, or
    pixels independent of the machine's Pillow (the GPU image's differs)."""

    def __init__(self, engine):
        self.processor = engine.builder.images.processor
        self.prepare = cpu_prepare_of(engine)

    def __call__(self, prompt_ids, images, device, dtype) -> dict:
        if not images:
            return {}
        plans = self.processor.plan_prompt([(im.height, im.width) for im in images])
        prepared = self.prepare(images, plans)
        tiles = [p.pixel_values.float() for p in prepared]
        if len(tiles[0]) == 1 and not getattr(plans[0], "best_resolution", None):
            return {"pixel_values": torch.cat(tiles).to(device, dtype)}
        width = max(len(t) for t in tiles)
        padded = torch.zeros(len(tiles), width, *tiles[0].shape[1:])
        for index, image_tiles in enumerate(tiles):
            padded[index, :len(image_tiles)] = image_tiles
        return {"pixel_values": padded.to(device, dtype),
                "image_sizes": torch.tensor([[im.height, im.width] for im in images])}
