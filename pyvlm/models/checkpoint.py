"""Finding a checkpoint and reading what it holds (torch is imported lazily).

A checkpoint is a Hugging Face model folder: config.json, safetensors weights
(one model.safetensors or shards listed in model.safetensors.index.json), the
tokenizer files, the image processor's settings and a chat template. Both the
transformers-5 layout and the older llava-hf hub layout are read.
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

logger = logging.getLogger("pyvlm.checkpoint")

# What a snapshot download fetches: weights, configs, tokenizer and templates
# (no .bin/.pt/.gguf duplicates of the weights).
HUB_ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer*", "*.model",
                      "*.tiktoken", "merges.txt", "vocab.txt"]
PYTORCH_WEIGHT_PATTERNS = ["pytorch_model*.bin"]

# SGLang's rule for dtype "auto" on GPU: a float32 checkpoint runs in half
# precision (float16, except Gemma which overflows in float16 -> bfloat16).
_DTYPE_NAMES = {"float32": "float32", "float": "float32", "fp32": "float32",
                "float16": "float16", "half": "float16", "fp16": "float16",
                "bfloat16": "bfloat16", "bf16": "bfloat16"}


class CheckpointError(Exception):
    """A checkpoint cannot be found or read; the message is one line for the user."""


def resolve_checkpoint(model: str, revision: Optional[str] = None) -> Path:
    """The local folder of `model`: a directory as is, else a hub snapshot.

    A hub id is fetched with huggingface_hub.snapshot_download (or found in its
    cache when offline). Raises CheckpointError when neither works.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if _looks_like_path(model):  # hub ids are "name" or "org/name"
        raise CheckpointError(f"model {model!r} is neither a local directory nor reachable "
                              "on the Hugging Face hub (no such directory)")
    try:
        return Path(_snapshot_download(model, revision))
    except Exception as error:  # hub errors come in many types; all mean "not reachable"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"model {model!r} is neither a local directory nor reachable on the "
            f"Hugging Face hub ({type(error).__name__}: {reason})") from None


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model


def _snapshot_download(repo_id: str, revision: Optional[str]) -> str:
    """The repository's configs, tokenizer and safetensors; its PyTorch .bin
    shards only when it has no safetensors (older LLaVA repositories)."""
    from huggingface_hub import snapshot_download

    folder = snapshot_download(repo_id=repo_id, revision=revision,
                               allow_patterns=HUB_ALLOW_PATTERNS)
    if any(Path(folder).glob("*.safetensors")):
        return folder
    return snapshot_download(repo_id=repo_id, revision=revision,
                             allow_patterns=HUB_ALLOW_PATTERNS + PYTORCH_WEIGHT_PATTERNS)


@dataclass(frozen=True)
class CheckpointFiles:
    """What a checkpoint folder holds, read once (configs as dicts; weights as paths).

    weight_files: the safetensors files in shard order. processor_config: the
    image processor's settings ({} when there are none). chat_template: the
    Jinja text, or None when the checkpoint ships none.
    """

    root: Path
    config: Dict[str, Any]
    weight_files: Tuple[Path, ...]
    tokenizer_dir: Path
    processor_config: Dict[str, Any] = field(default_factory=dict)
    chat_template: Optional[str] = None
    generation_config: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dir(cls, root: Path, tokenizer_dir: Optional[Path] = None,
                 needs_weights: bool = True) -> "CheckpointFiles":
        """Reads the folder; raises CheckpointError when config or (with
        needs_weights) weights are missing."""
        root = Path(root)
        config = _read_config(root)  # first: a folder without one is no checkpoint at all
        weight_files = find_weight_files(root) if needs_weights else ()
        return cls(root=root, config=config, weight_files=weight_files,
                   tokenizer_dir=Path(tokenizer_dir) if tokenizer_dir else root,
                   processor_config=read_processor_config(root),
                   chat_template=read_chat_template(root),
                   generation_config=_read_json(root / "generation_config.json") or {})

    @property
    def architectures(self) -> Tuple[str, ...]:
        return tuple(self.config.get("architectures") or ())


def load_checkpoint_files(model: str, revision: Optional[str] = None,
                          tokenizer_path: Optional[str] = None,
                          needs_weights: bool = True) -> CheckpointFiles:
    """resolve_checkpoint + CheckpointFiles.from_dir (tokenizer from its own path if given)."""
    tokenizer_dir = resolve_checkpoint(tokenizer_path) if tokenizer_path else None
    return CheckpointFiles.from_dir(resolve_checkpoint(model, revision), tokenizer_dir,
                                    needs_weights)


def _read_json(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from None


def _read_config(root: Path) -> dict:
    config = _read_json(root / "config.json")
    if config is None:
        raise CheckpointError(f"{root} has no config.json: not a Hugging Face checkpoint")
    return config


def find_weight_files(root: Path) -> Tuple[Path, ...]:
    """The safetensors files: the shards named by the index, or model.safetensors."""
    indexed = _indexed_shards(root, "model.safetensors.index.json")
    if indexed is not None:
        return indexed
    if (root / "model.safetensors").is_file():
        return (root / "model.safetensors",)
    found = tuple(sorted(root.glob("*.safetensors")))
    return found or find_pytorch_weight_files(root)


def _indexed_shards(root: Path, index_name: str) -> Optional[Tuple[Path, ...]]:
    """The shards an index file names (None without the index); CheckpointError
    for shards it names that are missing."""
    index = _read_json(root / index_name)
    if index is None:
        return None
    names = sorted(set(index["weight_map"].values()))
    missing = [name for name in names if not (root / name).is_file()]
    if missing:
        raise CheckpointError(f"{root}: shards listed in the index are missing: {missing}")
    return tuple(root / name for name in names)


def find_pytorch_weight_files(root: Path) -> Tuple[Path, ...]:
    """PyTorch pickles (pytorch_model*.bin), as older checkpoints such as
    liuhaotian/llava-v1.5-7b ship them; read with torch.load(weights_only)."""
    indexed = _indexed_shards(root, "pytorch_model.bin.index.json")
    if indexed is not None:
        return indexed
    found = tuple(sorted(root.glob("pytorch_model*.bin")))
    if not found:
        raise CheckpointError(f"{root} has no weights (model*.safetensors or pytorch_model*.bin)")
    return found


def read_processor_config(root: Path) -> dict:
    """preprocessor_config.json, else processor_config.json's image_processor entry."""
    config = _read_json(root / "preprocessor_config.json")
    if config is not None:
        return config
    processor = _read_json(root / "processor_config.json") or {}
    return dict(processor.get("image_processor") or {})


def read_chat_template(root: Path) -> Optional[str]:
    """chat_template.jinja, else chat_template.json, processor_config.json or
    tokenizer_config.json's chat_template (the "default" one of a named list)."""
    jinja = root / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        template = _template_entry((_read_json(root / name) or {}).get("chat_template"))
        if template:
            return template
    return None


def _template_entry(value: Any) -> Optional[str]:
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        by_name = {entry.get("name"): entry.get("template") for entry in value}
        return by_name.get("default")
    return value if isinstance(value, str) else None


# --- dtype and device ----------------------------------------------------------

def resolve_device(device: str = "auto") -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; "cuda:N" and "cpu" as given."""
    if device != "auto":
        if device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"unknown device {device!r} (expected auto, cpu or cuda)")
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def checkpoint_dtype_name(config: dict) -> str:
    """The dtype the weights were saved in, per config.json (float32 if unsaid)."""
    for scope in (config, config.get("text_config") or {}):
        name = scope.get("dtype") or scope.get("torch_dtype")
        if isinstance(name, str):
            return _DTYPE_NAMES.get(name.replace("torch.", ""), "float32")
    return "float32"


def resolve_dtype_name(dtype: str, config: dict, device: str) -> str:
    """The dtype name the model runs in (see resolve_dtype)."""
    dtype = dtype.lower().replace("torch.", "")
    if dtype != "auto":
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r} (expected auto, float32, float16 or bfloat16)")
        return _DTYPE_NAMES[dtype]
    if not device.startswith("cuda"):
        return "float32"  # CPU kernels are fastest and exact in float32
    saved = checkpoint_dtype_name(config)
    if saved != "float32":
        return saved
    return "bfloat16" if _model_type(config).startswith("gemma") else "float16"


def resolve_dtype(dtype: str, config: dict, device: str):
    """The torch.dtype to run in. "auto": float32 on CPU; on CUDA the checkpoint's
    dtype, except that float32 checkpoints run in float16 (bfloat16 for Gemma),
    as SGLang does."""
    import torch

    return getattr(torch, resolve_dtype_name(dtype, config, device))


def _model_type(config: dict) -> str:
    return str((config.get("text_config") or {}).get("model_type") or config.get("model_type") or "")
