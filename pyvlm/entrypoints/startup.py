"""Brings an engine up in two parts. The front (the caller's process):
checkpoint files, tokenizer, context length, chat template and the request
builder, and no weights. The core: model -> KV pool -> runner -> scheduler,
run by a StepLoop on a thread of the caller's process (engine_process
"thread"), or in an engine process of its own ("process", the default on
CUDA; pyvlm/entrypoints/engine_core.py), which a CoreClient drives."""

import logging
from dataclasses import dataclass, replace
from typing import Any, Dict, Optional, Union

import torch

from pyvlm.chat import ChatTemplate, resolve_template
from pyvlm.config import EngineConfig, SchedulerConfig
from pyvlm.scheduling.detokenizer import detokenizer_factory
from pyvlm.scheduling.scheduler import Scheduler
from pyvlm.entrypoints.image_budget import ImageBudget
from pyvlm.entrypoints.request_builder import ImageInputs, RequestBuilder
from pyvlm.entrypoints.sampling import generation_defaults
from pyvlm.entrypoints.step_loop import StepLoop
from pyvlm.layers.shape_graphs import enable_shape_graphs
from pyvlm.layers.tensor_parallel import (SINGLE_RANK, TensorParallelGroup, building_with,
                                          current_group)
from pyvlm.models.registry import image_processor_for, layout_conversion_for
from pyvlm.multimodal.media import MediaPolicy
from pyvlm.models.checkpoint import (CheckpointError, CheckpointFiles, load_checkpoint_files,
                                     resolve_device, resolve_dtype)
from pyvlm.runner.deferred_images import defer_images
from pyvlm.runner.encoder_cache import EncoderCache, VisionBatcher
from pyvlm.runner.image_shares import ImageShares
from pyvlm.runner.kv_pool import KVPool, KVShape, pool_num_pages
from pyvlm.runner.memory_profile import measure_step_memory
from pyvlm.runner.model_runner import ModelRunner, step_stream_for
from pyvlm.runner.tower_stream import tower_side_stream

logger = logging.getLogger("pyvlm.engine")



@dataclass
class CoreState:
    """The engine core: what runs steps (on the engine thread of the
    caller's process, or in the engine process). Its methods named in
    CORE_COMMANDS run between steps, wherever the core is."""

    model: torch.nn.Module
    runner: ModelRunner
    scheduler: Scheduler

    def flush_cache(self) -> bool:
        if not self.scheduler.flush_cache():
            return False
        self.runner.free_encoder_cache()
        return True

    def stats(self) -> Dict[str, float]:
        return {**self.scheduler.stats(), **self.runner.step_path_stats()}


CORE_COMMANDS = ("flush_cache", "stats")


@dataclass(frozen=True)
class CoreSpec:
    """What the core is built from (plain data: the engine process gets it
    pickled): the checkpoint in its family's layout and the tokenizer the
    front loaded (a layout conversion may have extended it), so both
    processes see the same files and tokens."""

    config: EngineConfig
    files: CheckpointFiles
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    context_length: int


@dataclass
class EngineState:
    """Everything the caller's process holds of a running engine. core is
    None when the core runs in the engine process: step_loop is then its
    CoreClient (the StepLoop interface), and model, runner and scheduler
    are out of reach."""

    files: CheckpointFiles
    tokenizer: object
    builder: RequestBuilder
    step_loop: Union[StepLoop, Any]
    context_length: int
    is_demo: bool
    sampling_defaults: Dict[str, Any]  # from generation_config.json, for unset request fields
    chat_template: ChatTemplate  # the one template Engine messages and the server render with
    core: Optional[CoreState] = None

    @property
    def model(self) -> torch.nn.Module:
        return self._in_process_core().model

    @property
    def runner(self) -> ModelRunner:
        return self._in_process_core().runner

    @property
    def scheduler(self) -> Scheduler:
        return self._in_process_core().scheduler

    def _in_process_core(self) -> CoreState:
        if self.core is None:
            raise AttributeError("the model, runner and scheduler live in the engine process "
                                 "(engine_process='process'); start the engine with "
                                 "engine_process='thread' to reach them")
        return self.core


def checkpoint_for(config: EngineConfig) -> CheckpointFiles:
    """The checkpoint's files, with --rope-scaling applied to its config."""
    if config.model.model is None:
        from pyvlm.conversions.demo import demo_checkpoint_dir

        files = load_checkpoint_files(str(demo_checkpoint_dir()))
    else:
        files = load_checkpoint_files(config.model.model,
                                      tokenizer_path=config.model.tokenizer_path,
                                      needs_weights=config.model.load_format != "dummy")
    if config.model.rope_scaling is None:
        return files
    return replace(files, config=with_rope_scaling(files.config, config.model.rope_scaling))


def _text_config(hf_config: dict) -> dict:
    return hf_config.get("text_config") or hf_config


def with_rope_scaling(hf_config: dict, rope_scaling: Dict[str, Any]) -> dict:
    """config.json contents whose text model uses rope_scaling (merged over
    its rope parameters, rope_theta kept) and whose max_position_embeddings
    grows by rope_scaling["factor"] (the original is kept as
    original_max_position_embeddings, as rope scaling configs name it)."""
    text = dict(_text_config(hf_config))
    params = dict(text.get("rope_parameters") or {})
    params.setdefault("rope_theta", text.get("rope_theta", 10000.0))
    params.update({k: v for k, v in (text.pop("rope_scaling", None) or {}).items()
                   if k not in params})
    if {"rope_type", "type"} & set(rope_scaling):  # a new type: the old one's name goes
        params.pop("type", None)
        params.pop("rope_type", None)
    params.update(rope_scaling)
    original = int(text.get("max_position_embeddings", 4096))
    params.setdefault("original_max_position_embeddings", original)
    text["rope_parameters"] = params
    text["max_position_embeddings"] = int(original * float(rope_scaling.get("factor", 1.0)))
    if "text_config" in hf_config:
        return dict(hf_config, text_config=text)
    return text


def context_length_of(config: EngineConfig, files: CheckpointFiles) -> int:
    """--context-length, clamped to the positions the model supports (its
    rotary table ends there: beyond it outputs would be silently wrong);
    --rope-scaling extends what the model supports."""
    text = _text_config(files.config)
    limit = int(text.get("max_position_embeddings", 4096))
    window = text.get("sliding_window") if text.get("model_type") == "mistral" else None
    if window and window < limit:
        # pyvlm's attention is full: within the window that is what sliding-
        # window attention computes; past it, it would not be.
        logger.warning("Mistral's sliding window of %d tokens bounds the context length "
                       "(max_position_embeddings %d): longer prompts are refused", window, limit)
        limit = int(window)
    asked = config.model.context_length
    if asked is None:
        return limit
    if asked > limit:
        logger.warning("--context-length %d is more than the %d positions the model supports; "
                       "using %d (pass --rope-scaling to extend the model's positions)",
                       asked, limit, limit)
        return limit
    return asked


def eos_token_ids(tokenizer, files: CheckpointFiles) -> set:
    """EOS of the tokenizer, the generation config and the model config."""
    ids = set()
    for value in (tokenizer.eos_token_id, files.generation_config.get("eos_token_id"),
                  _text_config(files.config).get("eos_token_id")):
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    return ids


def prompt_vocab_size(files: CheckpointFiles, images: Optional[ImageInputs]) -> Optional[int]:
    """Token ids a prompt may hold: the text vocabulary, and the image token
    where it lies past it (Llama-3.2-Vision's <|image|> is id vocab_size,
    an embedding row beyond the LM head's vocabulary)."""
    vocab_size = _text_config(files.config).get("vocab_size")
    if vocab_size is None or images is None:
        return vocab_size
    return max(vocab_size, images.image_token_id + 1)


def in_family_layout(files: CheckpointFiles, tokenizer,
                     vision_tower_path: Optional[str] = None) -> CheckpointFiles:
    """The checkpoint read in its family's layout: the registry's layout
    conversion for its architecture, if any (it may extend the tokenizer,
    e.g. with an image placeholder); otherwise the files as they are."""
    convert = layout_conversion_for(files.architectures)
    return files if convert is None else convert(files, tokenizer, vision_tower_path)


def load_tokenizer(files: CheckpointFiles):
    """The checkpoint's tokenizer; CheckpointError naming --tokenizer-path
    when its folder has none (some checkpoints keep it elsewhere)."""
    from transformers import AutoTokenizer

    folder = files.tokenizer_dir
    if not any(folder.glob("tokenizer*")) and not (folder / "vocab.json").is_file():
        raise CheckpointError(f"{folder} has no tokenizer files (tokenizer.json, "
                              "tokenizer.model, tokenizer_config.json); pass --tokenizer-path "
                              "with the folder or hub id that holds them")
    return AutoTokenizer.from_pretrained(str(folder))


def image_inputs_for(model, tokenizer, files: CheckpointFiles, dtype,
                     mm_processor_kwargs=None, device=torch.device("cpu")
                     ) -> Optional[ImageInputs]:
    """The model's image token, its family's image processor (launch
    overrides applied) and preprocessing; None for a text-only model. A
    model taking images has image_token_id, prepare_images and
    encode_prepared (pyvlm/models/README.md). On a GPU (device) the
    request keeps the decoded pixels and the step preprocesses them there
    (pyvlm/runner/deferred_images.py); on a CPU the request is built with
    the tower's inputs, off the engine's thread."""
    token_id = getattr(model, "image_token_id", None)
    if token_id is None:
        return None
    processor = image_processor_for(files.architectures, files.processor_config, files.config)
    processor = processor.with_overrides(mm_processor_kwargs)
    prepare = defer_images if prepares_images_in_step(device) else model.prepare_images
    return ImageInputs(processor.placeholder_text(tokenizer.convert_ids_to_tokens(token_id)),
                       token_id, processor, prepare,
                       bytes_per_value=torch.empty((), dtype=dtype).element_size())


def prepares_images_in_step(device) -> bool:
    """Whether the step preprocesses images (on the model's device) rather
    than the request builder: on a GPU, where it is faster and frees the
    front's threads."""
    return torch.device(device).type == "cuda"


def chat_template_for(config: EngineConfig, files: CheckpointFiles, tokenizer,
                      image_token: Optional[str]) -> ChatTemplate:
    """The chat template of this engine, for Engine.generate(messages=...)
    and the server alike: chat_template (--chat-template: a named template
    or a Jinja file), else the checkpoint's Jinja template, else the
    architecture's default (pyvlm.chat.resolve_template). Jinja templates
    emit image_token for an image and read the tokenizer's special tokens.
    Raises ChatTemplateError (a bad chat_template, or none to be found)."""
    checkpoint_template = files.chat_template or getattr(tokenizer, "chat_template", None)
    special_tokens = {k: str(v) for k, v in tokenizer.special_tokens_map.items()
                      if isinstance(v, str)}
    return resolve_template(
        config.model.chat_template,
        checkpoint_template if isinstance(checkpoint_template, str) else None,
        list(files.config.get("architectures") or []), image_token=image_token or "<image>",
        template_vars=special_tokens, text_config=files.config.get("text_config"))


def media_policy_of(config: EngineConfig) -> MediaPolicy:
    media = config.media
    return MediaPolicy(allowed_local_media_path=media.allowed_local_media_path,
                       allow_private_urls=media.allow_private_media_urls,
                       max_pixels=media.max_image_pixels)


def build_runner(config: EngineConfig, files: CheckpointFiles, device, dtype,
                 context_length: int, model=None):
    """The model (loaded unless given), its KV pool sized to what the card
    leaves once a step's own needs are measured, and the runner over both."""
    if model is None:
        from pyvlm.models.loader import load_model

        model = load_model(files, dtype, device, load_format=config.model.load_format)
    shape = KVShape(model.num_layers, model.num_kv_heads, model.head_dim, dtype,
                    tuple(getattr(model, "cross_attention_layers", ())))
    step_memory = measure_step_memory(
        model, shape, config.cache.page_size, device, config.scheduler.max_prefill_tokens,
        context_length, decode_graph_batch_limit(config, device), config.cache.encoder_cache_bytes,
        prefill_graph_token_limit(config, device), takes_vision_side_stream(config, device))
    num_pages = least_over_ranks(pool_num_pages(
        shape, config.cache.page_size, device, config.cache.max_total_tokens,
        config.cache.mem_fraction_static, step_memory.total), device)
    pool = KVPool(shape, num_pages, config.cache.page_size, device)
    logger.info("KV cache: %d pages x %d tokens, %.2f GiB", num_pages, config.cache.page_size,
                num_pages * config.cache.page_size * shape.bytes_per_token / 2**30)
    vision = None
    if getattr(model, "image_token_id", None) is not None:
        rows_of = getattr(model, "encoder_rows_of", None)
        side_stream = (tower_side_stream(device, config.runner.vision_tower_sms)
                       if takes_vision_side_stream(config, device) else None)
        vision = VisionBatcher(model.encode_prepared, EncoderCache(config.cache.encoder_cache_bytes),
                               rows_of, model.prepare_images, device,
                               image_shares_for(config, model, rows_of, dtype, device),
                               side_stream)
    runner = ModelRunner(model, pool, device, vision, index_checks_for(config, device),
                         step_stream_for(vision))
    runner.step_memory = step_memory
    return model, runner


def image_shares_for(config: EngineConfig, model, rows_of, dtype,
                     device) -> Optional[ImageShares]:
    """How the tensor-parallel ranks split a step's images (each encodes its
    share: mm_encoder_tp_mode "data"); None with one rank or a sharded
    tower ("weights": every rank runs every image through its slice)."""
    group = current_group()
    if group.size == 1 or shards_towers(config):
        return None
    return ImageShares(group, rows_of or (lambda item: item.length),
                       model.language_model.shape.hidden_size, dtype, device)


def takes_vision_side_stream(config: EngineConfig, device: torch.device) -> bool:
    """Whether the tower runs on a stream of its own (--vision-side-stream):
    on CUDA with one rank (tensor-parallel ranks exchange a tower's rows or
    partial sums on the step's stream)."""
    return (config.runner.vision_side_stream and device.type == "cuda"
            and current_group().size == 1)


def shards_towers(config: EngineConfig) -> bool:
    """Whether the ranks split the vision tower's layers (mm_encoder_tp_mode
    "weights") rather than its images ("data")."""
    mode = config.parallel.mm_encoder_tp_mode
    if mode not in ("data", "weights"):
        raise ValueError(f"mm_encoder_tp_mode must be data or weights, not {mode!r}")
    return mode == "weights"


def least_over_ranks(value: int, device: torch.device) -> int:
    """The smallest of the tensor-parallel ranks' values (value itself on
    one rank): rank 0 schedules pages that every rank's pool must hold, and
    free memory differs between GPUs."""
    group = current_group()
    if group.size == 1:
        return value
    import torch.distributed as dist

    least = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(least, op=dist.ReduceOp.MIN, group=group.process_group)
    return int(least.item())


def scheduler_config_for(config: EngineConfig, device: torch.device) -> SchedulerConfig:
    """The scheduler's settings with overlap scheduling resolved: unset, it
    is on for CUDA, where the host's work then hides behind the device's."""
    if config.scheduler.overlap_schedule is not None:
        return config.scheduler
    return replace(config.scheduler, overlap_schedule=device.type == "cuda")


def decode_graph_batch_limit(config: EngineConfig, device: torch.device) -> int:
    """The largest decode batch captured in a CUDA graph; 0: none (CPU,
    --disable-cuda-graph)."""
    if device.type != "cuda" or config.runner.disable_cuda_graph:
        return 0
    return min(config.runner.cuda_graph_max_bs, config.scheduler.max_running_requests)


def prefill_graph_token_limit(config: EngineConfig, device: torch.device) -> int:
    """The most tokens of a step run through the piecewise CUDA graphs; 0:
    none (CPU, --disable-cuda-graph, --piecewise-cuda-graph-max-tokens 0)."""
    if device.type != "cuda" or config.runner.disable_cuda_graph:
        return 0
    return config.runner.piecewise_cuda_graph_max_tokens


# The largest vision-tower call (patch rows) kept as a CUDA graph: a graph's
# activations stay in the graphs' shared memory pool, about 25 MB per 1,000
# rows for the Qwen2-VL tower's widest layer (~0.2 GB at most), outside the
# KV pool's budget: in what --mem-fraction-static leaves of the card.
VISION_GRAPH_MAX_ROWS = 8192


def vision_graph_count(config: EngineConfig, device: torch.device) -> int:
    """How many vision-tower CUDA graphs to keep; 0: none (CPU,
    --disable-cuda-graph, --vision-cuda-graphs 0, or the tower on a green
    context's stream: --vision-tower-sms)."""
    if device.type != "cuda" or config.runner.disable_cuda_graph:
        return 0
    if takes_vision_side_stream(config, device) and config.runner.vision_tower_sms:
        return 0  # graphs replayed on a green context's stream: not yet run on a GPU
    return config.runner.vision_cuda_graphs


def index_checks_for(config: EngineConfig, device: torch.device) -> bool:
    """The engine thread's index-check setting (ModelConfig.check_indices;
    None: on for CPU, off for CUDA)."""
    if config.model.check_indices is not None:
        return config.model.check_indices
    return device.type != "cuda"


def uses_engine_process(config: EngineConfig, device: torch.device,
                        has_loaded_model: bool = False) -> bool:
    """Whether the core runs in its own process (RunnerConfig.engine_process;
    "auto": on CUDA, where the step's host work then never shares a GIL
    with the HTTP front, tokenization and image preprocessing, unless a
    model loaded in this process is given). A loaded model with "process"
    is a ValueError: its weights cannot move to another process."""
    mode = config.runner.engine_process
    if mode not in ("auto", "process", "thread"):
        raise ValueError(f"engine_process must be auto, process or thread, not {mode!r}")
    if config.parallel.tp_size > 1:
        return _tensor_parallel_uses_engine_process(mode, has_loaded_model)
    if has_loaded_model and mode == "process":
        raise ValueError("a loaded_model runs in this process: engine_process='process' "
                         "cannot take one (use engine_process='thread' or 'auto')")
    if has_loaded_model:
        return False
    return mode == "process" or (mode == "auto" and device.type == "cuda")


def _tensor_parallel_uses_engine_process(mode: str, has_loaded_model: bool) -> bool:
    """tp_size > 1: rank 0 is an engine process, which starts the other
    ranks; neither a thread nor a model loaded in the caller's process can
    be one."""
    if mode == "thread":
        raise ValueError("tensor parallelism (tp_size > 1) runs the engine core in an engine "
                         "process (rank 0, which starts the other ranks): "
                         "engine_process='thread' cannot; use 'process' or 'auto'")
    if has_loaded_model:
        raise ValueError("a loaded_model lives in this process and cannot be split over "
                         "tensor-parallel ranks (tp_size > 1): load it from its checkpoint")
    return True


def start_engine(config: EngineConfig, loaded_model=None) -> EngineState:
    """loaded_model: a pyvlm model already on the device (benchmarks build
    random-weight models in memory); the checkpoint folder still supplies the
    config, tokenizer and processor settings. Its core runs on a thread of
    this process. dp_size > 1: replicas behind a Router (start_replicas)."""
    device = torch.device(resolve_device(config.model.device))
    if config.parallel.dp_size > 1:
        return start_replicas(config, device, loaded_model)
    own_process = uses_engine_process(config, device, loaded_model is not None)
    spec = core_spec_for(config, device, loaded_model)
    if not own_process:
        core = start_core(spec, loaded_model)
        return front_state(spec, core.model, StepLoop(core.scheduler, core.runner), core)
    from pyvlm.entrypoints.core_client import CoreClient

    return front_over(spec, CoreClient(spec))  # the engine process loads the weights meanwhile


def start_replicas(config: EngineConfig, device: torch.device, loaded_model=None
                   ) -> EngineState:
    """dp_size engine replicas, each an engine process with its own device
    and KV cache, started at once, behind a Router (the step-loop
    interface: pyvlm/entrypoints/replicas.py). ValueError if they cannot
    be (replica_spec.check_data_parallel)."""
    from pyvlm.entrypoints.core_client import CoreClient
    from pyvlm.entrypoints.replica_spec import check_data_parallel, replica_spec
    from pyvlm.entrypoints.replicas import Router

    check_data_parallel(config, device, loaded_model is not None)
    spec = core_spec_for(config, device)
    router = Router(lambda index: CoreClient(replica_spec(spec, index)),
                    config.parallel.dp_size)
    return front_over(spec, router)


def front_over(spec: CoreSpec, step_loop) -> EngineState:
    """The front over a step loop whose engine processes are starting (a
    CoreClient, or a Router of them), built while they load; waits until
    they serve, and stops them if anything fails."""
    try:
        state = front_state(spec, image_model_of(spec.files, spec.dtype), step_loop)
        step_loop.wait_ready()
    except BaseException:
        step_loop.stop()
        raise
    return state


def core_spec_for(config: EngineConfig, device: torch.device, loaded_model=None) -> CoreSpec:
    """The checkpoint files (in their family's layout), tokenizer, dtype
    and context length: what both parts are built from."""
    files = checkpoint_for(config)
    dtype = resolve_dtype(config.model.dtype, files.config, device.type)
    if loaded_model is not None:
        dtype = next(loaded_model.parameters()).dtype
    tokenizer = load_tokenizer(files)
    files = in_family_layout(files, tokenizer, config.model.vision_tower_path)
    return CoreSpec(config, files, tokenizer, device, dtype, context_length_of(config, files))


def start_core(spec: CoreSpec, loaded_model=None, log_settings=None) -> CoreState:
    """Model (loaded_model, or the checkpoint's weights), KV pool, runner
    and scheduler on spec.device. With tp_size > 1 (in the engine process)
    this process is rank 0: it starts the other ranks first, each builds
    its share of the model as this one does, and the runner mirrors every
    step to them (pyvlm/entrypoints/tensor_parallel_ranks.py; log_settings:
    the engine process's, for the workers)."""
    config = spec.config
    ranks = None
    if config.parallel.tp_size > 1:
        from pyvlm.entrypoints.tensor_parallel_ranks import TensorParallelRanks

        ranks = TensorParallelRanks(spec, log_settings)
        spec = replace(spec, device=ranks.device)
    try:
        model, runner = build_rank_runner(spec, ranks.groups.tensor_parallel_group()
                                          if ranks else SINGLE_RANK, loaded_model)
    except BaseException:
        if ranks is not None:
            ranks.stop()
        raise
    if ranks is not None:
        from pyvlm.entrypoints.tensor_parallel_runner import TensorParallelRunner

        runner = TensorParallelRunner(runner, ranks)
        logger.info("Engine ranks: %s", ranks.describe())
    scheduler = Scheduler(scheduler_config_for(config, spec.device), config.cache,
                          runner.num_pages, spec.context_length,
                          detokenizer_factory(spec.tokenizer), runner.image_rows_per_page,
                          runner.images_ready if getattr(runner, "encodes_asynchronously", False)
                          else None)
    logger.info("Engine loaded: %s on %s (%s), context length %d, KV pool %d tokens%s",
                spec.files.root.name, spec.device, str(spec.dtype).replace("torch.", ""),
                spec.context_length, runner.num_pages * runner.page_size,
                f", tensor parallel over {ranks.size} ranks" if ranks else "")
    return CoreState(model, runner, scheduler)


def build_rank_runner(spec: CoreSpec, group: TensorParallelGroup = SINGLE_RANK,
                      loaded_model=None):
    """The model built to split over `group` (each tensor-parallel rank
    calls this with its own), its runner, and the runner's decode CUDA
    graphs. Every rank must make the same calls in the same order (their
    collectives meet): the same config gives every rank the same graph
    sizes, and build_runner agrees on one page count."""
    config, device = spec.config, spec.device
    sharded_tower = shards_towers(config)
    with building_with(group, sharded_tower):
        model, runner = build_runner(config, spec.files, device, spec.dtype,
                                     spec.context_length, loaded_model)
        runner.capture_decode_graphs(decode_graph_batch_limit(config, device),
                                     spec.context_length)
        runner.capture_prefill_graphs(prefill_graph_token_limit(config, device))
        # (A sharded tower's graphs would capture its all-reduces: not yet
        # run on a GPU, so a sharded tower runs eagerly.)
        tower_graphs = 0 if group.size > 1 and sharded_tower else \
            vision_graph_count(config, device)
        enable_shape_graphs(model, tower_graphs, VISION_GRAPH_MAX_ROWS)
    return model, runner


def image_model_of(files: CheckpointFiles, dtype: torch.dtype) -> torch.nn.Module:
    """The checkpoint's model class built on the meta device (no memory, no
    weights): what the front needs of the model (image_token_id,
    prepare_images, which run on the CPU) when the weights live in the
    engine process."""
    from pyvlm.models.loader import build_hf_config, construct_model, set_config_dtype
    from pyvlm.models.registry import model_class_for

    hf_config = build_hf_config(files.config)
    set_config_dtype(hf_config, dtype)
    return construct_model(model_class_for(files.architectures), hf_config, dtype, "meta")


def front_state(spec: CoreSpec, image_model, step_loop, core: Optional[CoreState] = None
                ) -> EngineState:
    """The caller's part of the engine: image inputs (from image_model),
    chat template and request builder over step_loop."""
    config, files, tokenizer = spec.config, spec.files, spec.tokenizer
    images = image_inputs_for(image_model, tokenizer, files, spec.dtype,
                              config.media.mm_processor_kwargs, spec.device)
    chat_template = chat_template_for(config, files, tokenizer,
                                      images.placeholder if images else None)
    builder = RequestBuilder(tokenizer, chat_template, eos_token_ids(tokenizer, files),
                             images, media_policy_of(config), spec.context_length,
                             config.scheduler.random_seed,
                             ImageBudget(config.media.max_pending_image_bytes),
                             prompt_vocab_size(files, images))
    if config.model.model is None:
        from pyvlm.conversions.demo import DEMO_BANNER

        logger.info(DEMO_BANNER)
    return EngineState(files, tokenizer, builder, step_loop, spec.context_length,
                       is_demo=config.model.model is None,
                       sampling_defaults=generation_defaults(files.generation_config),
                       chat_template=chat_template, core=core)
