"""transformers' side of benchmarks/bench_e2e_gpu.py: the
same prompts the pyvlm server builds, through transformers' own processor,
and `generate` timed three ways (TTFT of one image, batch-1 decode, batched
throughput with distinct images).

Inputs are prepared outside the timings (tokenizing, resizing, normalising
and the copy to the device; that time is reported beside, preprocess_s): a
timing covers generate alone: the vision tower, prefill and the decode
steps. generate runs eagerly with its default DynamicCache and SDPA.
"""

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from transformers.generation.streamers import BaseStreamer

from benchmarks.bench_serving import PROMPT
from benchmarks.offline.roofline import (QWEN_VL_TYPES, TowerAttention, qwen_tower_attention,
                                         tiled_tower_attention)


def chat_messages(index: int) -> List[dict]:
    """The chat benchmarks/bench_serving.py sends: one image, one sentence."""
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"image-{index}"}},
        {"type": "text", "text": PROMPT.format(index=index)}]}]


def server_prompt_texts(folder: Path, count: int) -> List[str]:
    """The prompt texts pyvlm's server renders for chat_messages(i), i <
    count, on the checkpoint in folder (its chat template, else the
    family's default)."""
    from transformers import AutoTokenizer

    from pyvlm.chat import resolve_template
    from pyvlm.models.checkpoint import CheckpointFiles
    from pyvlm.models.registry import image_processor_for

    files = CheckpointFiles.from_dir(folder)
    token_id = files.config.get("image_token_id", files.config.get("image_token_index"))
    token = AutoTokenizer.from_pretrained(str(folder)).convert_ids_to_tokens(token_id)
    processor = image_processor_for(files.architectures, files.processor_config, files.config)
    template = resolve_template(None, files.chat_template, files.architectures,
                                image_token=processor.placeholder_text(token),
                                text_config=files.config.get("text_config"))
    return [template.render(chat_messages(i)).text for i in range(count)]


class MllamaInputs:
    """Llama-3.2-Vision's generate inputs as transformers' MllamaProcessor
    builds them, from the server's prompt text: the tokenizer with its
    special tokens (Llama 3's BOS, as pyvlm's server tokenizes a chat;
    MllamaProcessor would add a second BOS to a text without one), the
    MllamaImageProcessorPil tiles (pixel_values [B, 1, 4, 3, 560, 560],
    aspect_ratio_ids, aspect_ratio_mask) and processing_mllama's
    cross-attention mask [B, seq, 1, 4] (each <|image|> attends from its
    position on, over its real tiles)."""

    def __init__(self, image_processor, tokenizer, image_token_id: int):
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.image_token_id = image_token_id

    def __call__(self, text: Sequence[str], images: Sequence, padding=True,
                 return_tensors="pt"):
        from transformers import BatchFeature
        from transformers.models.mllama.processing_mllama import (
            convert_sparse_cross_attention_mask_to_dense, get_cross_attention_token_mask)

        tokens = self.tokenizer(list(text), padding=padding)
        pixels = self.image_processor([[image] for image in images], return_tensors="pt")
        num_tiles = pixels.pop("num_tiles")
        spans = [get_cross_attention_token_mask(ids, self.image_token_id)
                 for ids in tokens["input_ids"]]
        mask = convert_sparse_cross_attention_mask_to_dense(
            spans, num_tiles, self.image_processor.max_image_tiles,
            length=max(len(ids) for ids in tokens["input_ids"]))
        return BatchFeature({**tokens, **pixels, "cross_attention_mask": mask},
                            tensor_type=return_tensors)


def hf_processor(folder: Path, config):
    """transformers' processor of the family (PIL image processor, tokenizer,
    placeholder expansion), without a video processor: those need
    torchvision, and so does AutoImageProcessor in transformers 5.17."""
    import json

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.padding_side = "left"  # batched generate appends on the right
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    if config.model_type == "mllama":
        from tests.multimodal.hf_mllama import hf_processor as mllama_image_processor

        return MllamaInputs(mllama_image_processor(**preprocessor), tokenizer,
                            config.image_token_index)
    if config.model_type in LLAVA_PROCESSORS:
        return llava_processor(preprocessor, tokenizer, config)
    if config.model_type == "qwen2_vl":
        from tests.multimodal.hf_qwen2_vl import _NoVideoProcessor, hf_image_processor

        return _NoVideoProcessor(image_processor=hf_image_processor(**preprocessor),
                                 tokenizer=tokenizer, video_processor=None)
    from tests.hf_reference import image_processor_for
    from tests.multimodal.hf_llava_onevision import _NoVideoProcessor

    vision = config.vision_config
    return _NoVideoProcessor(image_processor=image_processor_for(preprocessor),
                             tokenizer=tokenizer, video_processor=None,
                             vision_feature_select_strategy=config.vision_feature_select_strategy,
                             num_image_tokens=(vision.image_size // vision.patch_size) ** 2,
                             vision_aspect_ratio=config.vision_aspect_ratio)


# model_type -> transformers' processor of LLaVA-1.5 / LLaVA-NeXT
LLAVA_PROCESSORS = {"llava": "LlavaProcessor", "llava_next": "LlavaNextProcessor"}


def llava_processor(preprocessor: dict, tokenizer, config):
    """LlavaProcessor / LlavaNextProcessor over the checkpoint's PIL image
    processor (CLIPImageProcessorPil, LlavaNextImageProcessorPil), set as
    llava-hf's processor_config.json sets it: each <image> expands to the
    CLIP features the model keeps (576 per tile; NeXT: base tile, then the
    unpadded grid with a newline per row), the CLS row counted then dropped
    ("default" strategy, num_additional_image_tokens 1)."""
    import transformers

    from tests.hf_reference import llava_image_processor

    processor_class = getattr(transformers, LLAVA_PROCESSORS[config.model_type])
    return processor_class(image_processor=llava_image_processor(preprocessor),
                           tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
                           vision_feature_select_strategy=config.vision_feature_select_strategy,
                           num_additional_image_tokens=1)


@dataclass(frozen=True)
class PromptShape:
    """What prompts cost the model: tokens (of the longest row), the patch
    rows the vision tower runs over, the segments its attention runs within
    (tower_attention) and the cross-attention K/V rows of the images
    (mllama; 0 for the others), all rows together."""

    num_prompt_tokens: int
    num_tower_tokens: int
    tower_attention: TowerAttention
    num_image_rows: int = 0


def shape_of(features, config) -> PromptShape:
    """The PromptShape of a processor's output."""
    return PromptShape(features["input_ids"].shape[1], tower_tokens(features, config),
                       tower_attention(features, config), image_rows(features, config))


def prompt_shape(folder: Path, config, image) -> PromptShape:
    """The shape of the benchmark's prompt with one image, by transformers'
    processor alone (no model needed)."""
    processor = hf_processor(folder, config)
    features = processor(text=server_prompt_texts(folder, 1), images=[image], padding=True,
                         return_tensors="pt")
    return shape_of(features, config)


@dataclass
class Batch:
    """generate's keyword inputs of some prompts, already on the device."""

    inputs: Dict[str, torch.Tensor]
    shape: PromptShape

    @property
    def size(self) -> int:
        return self.inputs["input_ids"].shape[0]


def make_batch(processor, texts: Sequence[str], images: Sequence, model) -> Batch:
    """One image per text; left padding when the prompts differ in length."""
    features = processor(text=list(texts), images=list(images), padding=True,
                         return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in features.items() if torch.is_tensor(v)}
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    for key, value in features.items():
        inputs.setdefault(key, value)  # e.g. batch_num_images, a list
    return Batch(inputs, shape_of(features, model.config))


def tower_tokens(features, config) -> int:
    """Qwen2-VL: one pixel row per patch; LLaVA-OneVision: every tile is a
    full SigLIP image of (image_size / patch_size)^2 patches; Llama-3.2-
    Vision: every tile slot of pixel_values (transformers runs all
    max_num_tiles, padding ones too) of its patches + the class token,
    padded to a multiple of 8 (MllamaVisionModel's num_padding_patches);
    LLaVA-1.5 / NeXT: each real tile's CLIP patches + the class token (577
    rows of a 336-pixel tile)."""
    pixels = features["pixel_values"]
    if config.model_type in QWEN_VL_TYPES:
        return pixels.shape[0]
    vision = config.vision_config
    num_patches = (vision.image_size // vision.patch_size) ** 2
    if config.model_type == "mllama":
        return pixels.shape[:3].numel() * -(-(num_patches + 1) // 8) * 8
    if config.model_type in LLAVA_PROCESSORS:
        return llava_num_tiles(features, config) * (num_patches + 1)
    return pixels.shape[0] * pixels.shape[1] * num_patches


def tower_attention(features, config) -> TowerAttention:
    """The segments the tower's attention runs within over the features'
    images (benchmarks/offline/roofline.py): Qwen2-VL / Qwen2.5-VL by each
    image's patch grid, Llama-3.2-Vision by each image's real tiles, LLaVA
    by the tiles the tower runs (as tower_tokens counts them)."""
    if config.model_type in QWEN_VL_TYPES:
        return qwen_tower_attention(config, features["image_grid_thw"].tolist())
    if config.model_type == "mllama":
        tiles = features["aspect_ratio_mask"].flatten(0, 1).sum(-1).tolist()
        return tiled_tower_attention(config, [n for n in tiles if n])
    if config.model_type in LLAVA_PROCESSORS:
        return tiled_tower_attention(config, [llava_num_tiles(features, config)])
    pixels = features["pixel_values"]
    return tiled_tower_attention(config, [pixels.shape[1]] * pixels.shape[0])


def llava_num_tiles(features, config) -> int:
    """Tiles the CLIP tower runs: one per LLaVA-1.5 image; LLaVA-NeXT: the
    base tile + the grid of each image (transformers drops the padding
    tiles of a batch before its tower, as image_size_to_num_patches says)."""
    if config.model_type == "llava":
        return features["pixel_values"].shape[0]
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return sum(image_size_to_num_patches(size, config.image_grid_pinpoints,
                                         config.vision_config.image_size)
               for size in features["image_sizes"].tolist())


def image_rows(features, config) -> int:
    """Rows of image K/V that cross-attention reads (Llama-3.2-Vision: the
    real tiles' patches + class token each); 0 for the families whose image
    tokens sit in the prompt."""
    if config.model_type != "mllama":
        return 0
    vision = config.vision_config
    num_tiles = int(features["aspect_ratio_mask"].sum())
    return num_tiles * ((vision.image_size // vision.patch_size) ** 2 + 1)


def _sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


class TokenClock(BaseStreamer):
    """A generate streamer noting when each generated token reaches the host
    (generate puts the prompt first, then each step's tokens; its stop check
    waits for the device every step, so the times are the steps' ends)."""

    def __init__(self):
        super().__init__()
        self.times: List[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass

    @property
    def tokens_per_s_after_first(self) -> float:
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


@torch.inference_mode()
def timed_generate(model, batch: Batch, num_new_tokens: int, pad_token_id: int,
                   streamer: Optional[TokenClock] = None) -> float:
    """Seconds of one greedy generate of exactly num_new_tokens per row (the
    model's generation_config must have no EOS: see measure)."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=num_new_tokens, do_sample=False,
                              pad_token_id=pad_token_id)
    _sync(model)
    start = time.perf_counter()
    out = model.generate(**batch.inputs, generation_config=config, streamer=streamer)
    _sync(model)
    seconds = time.perf_counter() - start
    num_prompt_tokens = batch.shape.num_prompt_tokens
    if out.shape[1] != num_prompt_tokens + num_new_tokens:
        raise RuntimeError(f"generate made {out.shape[1] - num_prompt_tokens} tokens, "
                           f"not {num_new_tokens}")
    return seconds


@dataclass
class TransformersResults:
    ttft_s: List[float]
    decode_tokens_per_s: float
    batched_tokens_per_s: Dict[int, Optional[float]]  # batch -> output tok/s (None: OOM)
    preprocess_s: List[float]  # processor + copy to the device of each TTFT input (not timed)
    shape: PromptShape  # of one prompt with its image

    @property
    def best_batch(self) -> Optional[int]:
        done = {b: t for b, t in self.batched_tokens_per_s.items() if t is not None}
        return max(done, key=done.get) if done else None


def measure(model, folder: Path, images: Sequence, num_ttft: int, decode_tokens: int,
            batch_sizes: Sequence[int], output_tokens: int) -> TransformersResults:
    """TTFT (generate of one token) of num_ttft single images, batch-1 decode
    tokens/s after the first token (TokenClock) and output tokens/s of each
    batch size (distinct images, output_tokens each). EOS is switched off in
    model.generation_config (ignore_eos, as the server is asked for): a
    min_new_tokens processor would cost transformers a vocabulary-wide
    isin per step."""
    model.generation_config.eos_token_id = None
    processor = hf_processor(folder, model.config)
    pad = processor.tokenizer.pad_token_id
    texts = server_prompt_texts(folder, max(num_ttft, *batch_sizes))
    singles, preprocess = [], []
    for i in range(num_ttft):
        start = time.perf_counter()
        singles.append(make_batch(processor, [texts[i]], [images[i]], model))
        preprocess.append(time.perf_counter() - start)
    timed_generate(model, singles[0], 2, pad)  # warm-up: kernels, allocator
    ttft = [timed_generate(model, one, 1, pad) for one in singles]
    clock = TokenClock()
    timed_generate(model, singles[0], decode_tokens, pad, clock)
    batched = {b: batched_tokens_per_s(model, processor, texts[:b], images[:b], output_tokens, pad)
               for b in batch_sizes}
    return TransformersResults(ttft, clock.tokens_per_s_after_first, batched, preprocess,
                               singles[0].shape)


def batched_tokens_per_s(model, processor, texts, images, output_tokens: int,
                         pad: int) -> Optional[float]:
    """Output tokens/s of one batched generate (after a 2-token warm-up at
    the same batch); None when the device runs out of memory."""
    try:
        batch = make_batch(processor, texts, images, model)
        timed_generate(model, batch, 2, pad)
        return batch.size * output_tokens / timed_generate(model, batch, output_tokens, pad)
    except torch.OutOfMemoryError:
        return None
    finally:
        batch = None
        if model.device.type == "cuda":
            torch.cuda.empty_cache()


def median_ms(seconds: Sequence[float]) -> float:
    return statistics.median(seconds) * 1e3
