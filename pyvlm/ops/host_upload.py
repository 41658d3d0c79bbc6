"""A step's host-side index and parameter lists, moved to the device in one
copy per dtype.

`torch.tensor(list, device="cuda")` copies from pageable memory, which
blocks the host until the GPU has finished every earlier kernel: a dozen of
them per step serialise the CPU and the GPU. A `HostUpload` gathers the
lists of a step (token ids, positions, slots, block tables, sampling
parameters), packs them per dtype into one pinned buffer and starts one
asynchronous copy per dtype; the CUDA caching host allocator keeps a pinned
block alive until its copy has run, so nothing waits.

    upload = HostUpload()
    ids = upload.add([1, 2, 3], torch.int64)
    table = upload.add([[4, 5], [6, 0]], torch.int32)   # rows of equal length
    upload.to(device)
    ids.tensor, table.tensor                              # device tensors
"""

import array
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch


class Pending:
    """A tensor of a HostUpload; `tensor` is set by HostUpload.to()."""

    __slots__ = ("shape", "offset", "tensor")

    def __init__(self, shape: Tuple[int, ...], offset: int):
        self.shape, self.offset = shape, offset
        self.tensor: Optional[torch.Tensor] = None


class HostUpload:
    """Collects lists (flat, or rows of equal length) and CPU tensors per
    dtype; to(device) uploads each dtype's values with one copy and
    resolves every Pending."""

    def __init__(self):
        # per dtype: the values as parts, CPU tensors and Python lists (the
        # last part, while it is a list, takes the next list's numbers)
        self._parts: Dict[torch.dtype, List] = {}
        self._sizes: Dict[torch.dtype, int] = {}
        self._pending: Dict[torch.dtype, List[Pending]] = {}

    def add(self, values: Union[Sequence, torch.Tensor], dtype: torch.dtype) -> Pending:
        """values: numbers, a list of equal-length lists (a 2-D tensor), or a
        CPU tensor (index lists built with torch ops rather than number by
        number: a step's thousands of image rows)."""
        if isinstance(values, torch.Tensor):
            shape = tuple(values.shape)
            self._parts.setdefault(dtype, []).append(values.reshape(-1))
        else:
            flat = self._list_part(dtype)
            if values and isinstance(values[0], (list, tuple)):
                shape = (len(values), len(values[0]))
                for row in values:
                    if len(row) != shape[1]:
                        raise ValueError("the rows of a 2-D upload must have equal lengths")
                    flat.extend(row)
            else:
                shape = (len(values),)
                flat.extend(values)
        offset = self._sizes.get(dtype, 0)
        self._sizes[dtype] = offset + _numel(shape)
        pending = Pending(shape, offset)
        self._pending.setdefault(dtype, []).append(pending)
        return pending

    def _list_part(self, dtype: torch.dtype) -> List:
        parts = self._parts.setdefault(dtype, [])
        if not parts or isinstance(parts[-1], torch.Tensor):
            parts.append([])
        return parts[-1]

    def to(self, device: torch.device) -> None:
        """One host-to-device copy per dtype, asynchronous on CUDA."""
        device = torch.device(device)
        for dtype, parts in self._parts.items():
            host = [part.to(dtype) if isinstance(part, torch.Tensor)
                    else _list_tensor(part, dtype) for part in parts]
            # (cat copies: the device tensors never alias a caller's tensor)
            alone = len(host) == 1 and isinstance(parts[0], list)
            flat = to_device_async(host[0] if alone else torch.cat(host), device)
            for pending in self._pending[dtype]:
                n = _numel(pending.shape)
                pending.tensor = flat[pending.offset:pending.offset + n].view(pending.shape)


# array.array type codes of the dtypes whose C type has the dtype's size here
_ARRAY_CODES = {dtype: code for code, dtype in (("q", torch.int64), ("i", torch.int32),
                                                ("f", torch.float32), ("d", torch.float64))
                if array.array(code).itemsize == dtype.itemsize}


def _list_tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
    """torch.tensor(values, dtype=dtype), through array.array where the dtype
    has a C type: 3.5x faster for the ~13,000 numbers of a 64-request step's
    block tables (benchmarks/RESULTS.md). A value array.array refuses (a
    float in an integer list, an integer out of range) takes torch.tensor's
    way, with its result or its error."""
    code = _ARRAY_CODES.get(dtype)
    if code is not None and values:
        try:
            return torch.frombuffer(array.array(code, values), dtype=dtype)
        except (TypeError, OverflowError):
            pass
    return torch.tensor(values, dtype=dtype)


def _numel(shape: Tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def to_device_async(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on device without a host wait: on CUDA through pinned
    memory, copied asynchronously (a pageable copy that is not
    non_blocking waits for the stream's queued work: the step in flight,
    or the towers queued on the vision side stream)."""
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class HostCopies:
    """Device tensors on their way to the host: the copies are queued on the
    stream behind the work that makes them; wait() blocks once, for all."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self._on_cuda = bool(tensors) and tensors[0].device.type == "cuda"
        if not self._on_cuda:
            self._hosts = [t.cpu() for t in tensors]
            return
        self._hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for host, t in zip(self._hosts, tensors):
            host.copy_(t, non_blocking=True)
        self._done = torch.cuda.Event()
        self._done.record(torch.cuda.current_stream(tensors[0].device))

    def wait(self) -> List[torch.Tensor]:
        if self._on_cuda:
            self._done.synchronize()
        return self._hosts
