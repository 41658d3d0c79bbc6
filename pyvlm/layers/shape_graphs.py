"""CUDA graphs of a module's forward per input shape, for vision towers.

A tower's forward over one image takes a few hundred short kernels (the
Qwen2-VL tower: 32 blocks of about a dozen) whose host launch time exceeds
their device time for an image of ordinary size, so the device idles
between them and the time to first token grows. The tower's shapes depend
only on its images' patch grids, and images of one size recur (a camera's,
a client's resize), so a graph captured for a key (the grids) replays every
later call with that key in one launch.

ShapeGraphs.run(key, inputs, prepare, body) computes body(inputs, prepare()):
- eagerly while graphs are off (CPU, --disable-cuda-graph,
  --vision-cuda-graphs 0), for inputs
  above max_rows, and the first time a key is seen (a size seen once is
  not worth a capture);
- the second time, it captures body over a static copy of the inputs and
  the metadata prepare() built for that key (kept with the graph: the
  graph reads those tensors at their captured addresses);
- then each call copies the inputs into the static buffer, replays, and
  returns a clone of the output (the graphs share one memory pool, so the
  next replay of another key may overwrite this one's output, and the
  encoder cache keeps outputs across steps).
At most max_graphs are kept (least recently used dropped). A capture that
fails (out of memory, an op that cannot be captured) turns graphs off for
good and the call runs eagerly. `emulate` runs the same static-buffer path
eagerly without a graph (CPU tests of the key, eviction and buffer logic).
"""

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional

import torch

from pyvlm import ops

logger = logging.getLogger("pyvlm.runner")

MAX_SEEN_KEYS = 1024  # keys remembered as seen once (least recent forgotten)


@dataclass
class _Captured:
    static_inputs: torch.Tensor
    metadata: Any
    graph: Optional[torch.cuda.CUDAGraph]
    output: Optional[torch.Tensor]  # the graph's output buffer (None when emulated)


class ShapeGraphs:
    """Per-key CUDA graphs of one function (module docstring). Off until
    enable() is called."""

    def __init__(self):
        self.enabled = False
        self.emulate = False
        self.max_graphs = 0
        self.max_rows = 0
        self.num_captures = self.num_replays = 0
        self._graphs: "OrderedDict[Hashable, _Captured]" = OrderedDict()
        self._seen: "OrderedDict[Hashable, None]" = OrderedDict()
        self._pool = None

    def enable(self, max_graphs: int, max_rows: int, emulate: bool = False) -> None:
        """Captures up to max_graphs keys whose inputs have at most max_rows rows."""
        self.enabled = max_graphs > 0 and max_rows > 0
        self.max_graphs, self.max_rows, self.emulate = max_graphs, max_rows, emulate

    def run(self, key: Hashable, inputs: torch.Tensor, prepare: Callable[[], Any],
            body: Callable[[torch.Tensor, Any], torch.Tensor]) -> torch.Tensor:
        """body(inputs, prepare()), through the key's graph where one applies."""
        if not self._may_graph(inputs):
            return body(inputs, prepare())
        captured = self._graphs.get(key)
        if captured is None:
            if not self._seen_before(key):
                return body(inputs, prepare())
            captured = self._capture(key, inputs, prepare, body)
            if captured is None:
                return body(inputs, prepare())
        self._graphs.move_to_end(key)
        return self._replay(captured, inputs, body)

    def _may_graph(self, inputs: torch.Tensor) -> bool:
        return (self.enabled and inputs.shape[0] <= self.max_rows
                and (self.emulate or inputs.is_cuda))

    def _seen_before(self, key: Hashable) -> bool:
        """Whether key was seen before; remembers it either way."""
        if key in self._seen:
            self._seen.move_to_end(key)
            return True
        self._seen[key] = None
        if len(self._seen) > MAX_SEEN_KEYS:
            self._seen.popitem(last=False)
        return False

    def _replay(self, captured: _Captured, inputs: torch.Tensor,
                body: Callable[[torch.Tensor, Any], torch.Tensor]) -> torch.Tensor:
        captured.static_inputs.copy_(inputs)
        self.num_replays += 1
        if captured.graph is None:
            return body(captured.static_inputs, captured.metadata).clone()
        captured.graph.replay()
        return captured.output.clone()

    def _capture(self, key: Hashable, inputs: torch.Tensor, prepare: Callable[[], Any],
                 body: Callable[[torch.Tensor, Any], torch.Tensor]) -> Optional[_Captured]:
        # The static buffer and the metadata are allocated here, outside the
        # graph's pool: other keys' replays reuse the pool's blocks.
        static_inputs, metadata = inputs.clone(), prepare()
        record = self._record_emulated if self.emulate else self._record
        try:
            graph, output = record(static_inputs, metadata, body)
        except Exception:  # noqa: BLE001 — any failure means: no graphs, run eagerly
            logger.warning("vision tower CUDA graphs turned off: capturing one failed",
                           exc_info=True)
            self.enabled = False
            self._graphs.clear()
            return None
        captured = self._graphs[key] = _Captured(static_inputs, metadata, graph, output)
        self.num_captures += 1
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return captured

    def _record_emulated(self, static_inputs: torch.Tensor, metadata: Any,
                         body: Callable[[torch.Tensor, Any], torch.Tensor]):
        """No graph: replays run body over the static buffers eagerly."""
        return None, None

    def _record(self, static_inputs: torch.Tensor, metadata: Any,
                body: Callable[[torch.Tensor, Any], torch.Tensor]):
        """(graph, output) of body over the static inputs, after a warm-up
        run on the capture stream (lazy workspaces and kernel plans)."""
        device = static_inputs.device
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with ops.index_checks(False), torch.cuda.stream(stream):  # checks sync: not capturable
            body(static_inputs, metadata)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with ops.index_checks(False), torch.cuda.graph(graph, pool=self._pool, stream=stream,
                                                       capture_error_mode="thread_local"):
            output = body(static_inputs, metadata)
        return graph, output


def enable_shape_graphs(model: torch.nn.Module, max_graphs: int, max_rows: int,
                        emulate: bool = False) -> int:
    """Enables every ShapeGraphs a module of model holds (as `shape_graphs`);
    returns how many."""
    found = [m.shape_graphs for m in model.modules()
             if isinstance(getattr(m, "shape_graphs", None), ShapeGraphs)]
    for graphs in found:
        graphs.enable(max_graphs, max_rows, emulate)
    return len(found)
