"""The paged KV pool: per layer a key and a value cache of shape
[num_pages, page_size, num_kv_heads, head_dim], sized from a token budget
(CPU: --max-total-tokens, default from available RAM) or from a fraction of
the GPU memory (--mem-fraction-static).

Cross-attention families (Llama-3.2-Vision) keep their images' K/V in the
same pages: the pool is one tensor [2, num_slices, num_pages, page_size,
kv_heads, head_dim]; self-attention layer i reads slice i of every page,
and cross-attention layer c reads slices [c * r, (c + 1) * r) of the pages
an image holds, viewed as r * num_pages blocks of page_size rows (r =
num_slices // num_cross_layers). A page thus holds page_size text tokens
of every self-attention layer, or r * page_size image rows of every
cross-attention layer: one allocator and one budget serve both, and an
image costs its rows x the cross-attention layers, not x every layer.
"""

import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch


# CPU default: a quarter of the available RAM, at most this many tokens.
MAX_DEFAULT_CPU_TOKENS = 1 << 17


@dataclass(frozen=True)
class KVShape:
    """num_layers: every decoder layer; cross_layers: the indices of those
    that cross-attend to image K/V (empty for token-merging families)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    cross_layers: Tuple[int, ...] = ()

    @property
    def num_self_layers(self) -> int:
        return self.num_layers - len(self.cross_layers)

    @property
    def num_slices(self) -> int:
        """Per-layer slices a page holds (see the module docstring)."""
        return max(self.num_self_layers, len(self.cross_layers))

    @property
    def slices_per_cross_layer(self) -> int:
        return self.num_slices // len(self.cross_layers) if self.cross_layers else 0

    @property
    def bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_slices * self.num_kv_heads * self.head_dim * itemsize


def available_ram_bytes() -> int:
    """MemAvailable from /proc/meminfo, else total physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cpu_token_budget(shape: KVShape, max_total_tokens: Optional[int]) -> int:
    if max_total_tokens:
        return max_total_tokens
    by_ram = available_ram_bytes() // 4 // shape.bytes_per_token
    return int(min(by_ram, MAX_DEFAULT_CPU_TOKENS))


def gpu_token_budget(shape: KVShape, mem_fraction_static: float, device: torch.device,
                     reserved_bytes: int = 0) -> int:
    """Tokens that fit in mem_fraction_static of the card, minus what is
    already used (the weights, loaded before the pool) and reserved_bytes
    (what steps need beside the pool: pyvlm.runner.memory_profile)."""
    free, total = torch.cuda.mem_get_info(device)
    return token_budget(total, total - free, mem_fraction_static, reserved_bytes,
                        shape.bytes_per_token)


def token_budget(total: int, used: int, mem_fraction_static: float, reserved_bytes: int,
                 bytes_per_token: int) -> int:
    """The KV pool's tokens: mem_fraction_static of `total` bytes, less the
    bytes `used` and `reserved_bytes`; a RuntimeError when nothing is left."""
    budget = int(total * mem_fraction_static) - used - reserved_bytes
    if budget < bytes_per_token:
        raise RuntimeError(
            f"--mem-fraction-static {mem_fraction_static} leaves no room for the KV cache: "
            f"{used / 2**30:.1f} GiB of {total / 2**30:.1f} GiB is in use and steps need "
            f"{reserved_bytes / 2**30:.1f} GiB more (activations, CUDA graphs, encoder cache)")
    return budget // bytes_per_token


class KVPool:
    """Allocates the caches once; pages are handed out by the scheduler.

    The memory is left uninitialised (on CPU the OS then commits it as pages
    are used): attention reads only the slots a sequence has written.
    """

    def __init__(self, shape: KVShape, num_pages: int, page_size: int, device: torch.device):
        if num_pages < 1:
            raise ValueError("the KV pool needs at least one page")
        self.shape, self.num_pages, self.page_size = shape, num_pages, page_size
        self.storage = torch.empty((2, shape.num_slices, num_pages, page_size,
                                    shape.num_kv_heads, shape.head_dim),
                                   dtype=shape.dtype, device=device)
        self.caches: List[Tuple[torch.Tensor, torch.Tensor]] = [
            self._layer_cache(index) for index in range(shape.num_layers)]

    def _layer_cache(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Layer index's (key, value) caches, views of the storage."""
        cross = self.shape.cross_layers
        if index not in cross:
            slot = index - sum(c < index for c in cross)
            return self.storage[0, slot], self.storage[1, slot]
        per_layer = self.shape.slices_per_cross_layer
        first = cross.index(index) * per_layer
        dims = (per_layer * self.num_pages, self.page_size, self.shape.num_kv_heads,
                self.shape.head_dim)
        return (self.storage[0, first:first + per_layer].reshape(dims),
                self.storage[1, first:first + per_layer].reshape(dims))

    @property
    def num_tokens(self) -> int:
        return self.num_pages * self.page_size

    @property
    def image_rows_per_page(self) -> int:
        """Image K/V rows one page holds (0: no cross-attention layers)."""
        return self.shape.slices_per_cross_layer * self.page_size

    def num_image_blocks(self, num_rows: int) -> int:
        """How many blocks image_blocks gives for an image of num_rows rows:
        its whole pages, each slices_per_cross_layer blocks (more than
        num_rows / page_size when the last page is part empty)."""
        if not self.shape.cross_layers:
            return 0
        return -(-num_rows // self.image_rows_per_page) * self.shape.slices_per_cross_layer

    def image_blocks(self, pages) -> List[int]:
        """The page_size-row blocks of an image's pages in a cross-attention
        layer's cache view, in row order (row r lives in block r // page_size)."""
        per_layer = self.shape.slices_per_cross_layer
        return [part * self.num_pages + page for page in pages for part in range(per_layer)]


def pool_num_pages(shape: KVShape, page_size: int, device: torch.device,
                   max_total_tokens: Optional[int], mem_fraction_static: float,
                   reserved_bytes: int = 0) -> int:
    if device.type == "cuda" and not max_total_tokens:
        tokens = gpu_token_budget(shape, mem_fraction_static, device, reserved_bytes)
    else:
        tokens = cpu_token_budget(shape, max_total_tokens)
    return max(1, tokens // page_size)
