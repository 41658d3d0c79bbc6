"""Brings an engine up: checkpoint -> model -> KV pool -> runner ->
scheduler -> engine thread, and the request builder that feeds it."""

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from pyvlm.config import EngineConfig
from pyvlm.engine.detokenizer import detokenizer_factory
from pyvlm.engine.scheduler import Scheduler
from pyvlm.entrypoints.request_builder import RequestBuilder
from pyvlm.entrypoints.worker import EngineLoop
from pyvlm.multimodal.llava_onevision import LlavaOnevisionImageConfig
from pyvlm.runner.checkpoint import CheckpointFiles, load_checkpoint_files, resolve_device, resolve_dtype
from pyvlm.runner.encoder_cache import EncoderCache, VisionBatcher
from pyvlm.runner.kv_pool import KVPool, KVShape, pool_num_pages
from pyvlm.runner.llava_onevision_encoder import make_llava_onevision_encoder
from pyvlm.runner.model_runner import ModelRunner

logger = logging.getLogger("pyvlm.engine")

DEMO_BANNER = ("Serving the demo model: SmolLM2-135M-Instruct with a random-weight SigLIP "
               "vision tower. It answers text questions; what it says about images is meaningless.")


@dataclass
class EngineState:
    """Everything a running engine holds."""

    files: CheckpointFiles
    tokenizer: object
    model: torch.nn.Module
    runner: ModelRunner
    scheduler: Scheduler
    builder: RequestBuilder
    loop: EngineLoop
    context_length: int
    is_demo: bool

    def flush_cache(self) -> bool:
        if not self.scheduler.flush_cache():
            return False
        self.runner.free_encoder_cache()
        return True


def checkpoint_for(config: EngineConfig) -> CheckpointFiles:
    if config.model.model is None:
        from pyvlm.models.demo import demo_checkpoint_dir

        return load_checkpoint_files(str(demo_checkpoint_dir()))
    return load_checkpoint_files(config.model.model, tokenizer_path=config.model.tokenizer_path)


def _text_config(hf_config: dict) -> dict:
    return hf_config.get("text_config") or hf_config


def context_length_of(config: EngineConfig, files: CheckpointFiles) -> int:
    limit = _text_config(files.config).get("max_position_embeddings", 4096)
    return config.model.context_length or limit


def eos_token_ids(tokenizer, files: CheckpointFiles) -> set:
    """EOS of the tokenizer, the generation config and the model config."""
    ids = set()
    for value in (tokenizer.eos_token_id, files.generation_config.get("eos_token_id"),
                  _text_config(files.config).get("eos_token_id")):
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    return ids


def load_tokenizer(files: CheckpointFiles):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(files.tokenizer_dir))


def image_token_of(model, tokenizer):
    token_id = getattr(model, "image_token_id", None)
    if token_id is None:
        return None, None
    return tokenizer.convert_ids_to_tokens(token_id), token_id


def build_runner(config: EngineConfig, files: CheckpointFiles, device, dtype, model=None):
    if model is None:
        from pyvlm.models.loader import load_model

        model = load_model(files, dtype, device)
    shape = KVShape(model.num_layers, model.num_kv_heads, model.head_dim, dtype)
    num_pages = pool_num_pages(shape, config.cache.page_size, device,
                               config.cache.max_total_tokens, config.cache.mem_fraction_static)
    pool = KVPool(shape, num_pages, config.cache.page_size, device)
    vision = None
    if hasattr(model, "embed_images"):
        vision = VisionBatcher(make_llava_onevision_encoder(model, device, dtype),
                               EncoderCache(config.cache.encoder_cache_size))
    return model, ModelRunner(model, pool, device, vision, index_checks_for(config, device))


def index_checks_for(config: EngineConfig, device: torch.device) -> bool:
    """The engine thread's index-check setting (ModelConfig.check_indices;
    None: on for CPU, off for CUDA)."""
    if config.model.check_indices is not None:
        return config.model.check_indices
    return device.type != "cuda"


def start_engine(config: EngineConfig, loaded_model=None) -> EngineState:
    """loaded_model: a pyvlm model already on the device (benchmarks build
    random-weight models in memory); the checkpoint folder still supplies the
    config, tokenizer and processor settings."""
    files = checkpoint_for(config)
    device = torch.device(resolve_device(config.model.device))
    dtype = resolve_dtype(config.model.dtype, files.config, device.type)
    if loaded_model is not None:
        dtype = next(loaded_model.parameters()).dtype
    tokenizer = load_tokenizer(files)
    model, runner = build_runner(config, files, device, dtype, loaded_model)
    context_length = context_length_of(config, files)
    scheduler = Scheduler(config.scheduler, config.cache, runner.num_pages, context_length,
                          detokenizer_factory(tokenizer))
    image_token, image_token_id = image_token_of(model, tokenizer)
    image_config = None
    if image_token_id is not None:
        image_config = LlavaOnevisionImageConfig.from_hf_configs(files.processor_config, files.config)
    builder = RequestBuilder(tokenizer, files.chat_template, image_token, image_token_id,
                             image_config, eos_token_ids(tokenizer, files),
                             config.scheduler.random_seed)
    logger.info("Engine ready: %s on %s (%s), context length %d, KV pool %d tokens",
                files.root.name, device, str(dtype).replace("torch.", ""), context_length,
                runner.num_pages * runner.page_size)
    if config.model.model is None:
        logger.info(DEMO_BANNER)
    return EngineState(files, tokenizer, model, runner, scheduler, builder,
                       EngineLoop(scheduler, runner), context_length,
                       is_demo=config.model.model is None)
