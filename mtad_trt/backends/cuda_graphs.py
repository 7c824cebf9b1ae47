"""One CUDA-graph runner for the device backends (torch and TensorRT), docs/graph-contract.md §5.

A step of a given shape key (B, T, K, S-bucket) reads the same static buffers and cache addresses
every time, so its kernels are recorded once and replayed; prefill runs uncaptured, and a failed
capture falls back to plain runs for that key. The policy (warm-up, capture on second use, why
KV writes stay outside the graphs) is in docs/design.md. The capture mechanism is injected
(`Capturer`), so the bookkeeping is tested on CPU with a fake.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import torch

from mtad_trt.contract import Key, StepInputs

log = logging.getLogger("mtad_trt")

B = TypeVar("B")


class Replayable(Protocol):
    def replay(self) -> None: ...


class Capturer(Protocol):
    """How graphs are made: the real one wraps torch.cuda; tests pass a fake."""

    def warmup(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` once, uncaptured, and return its outputs."""
        ...

    def capture(self, fn: Callable[[], Any]) -> tuple[Replayable, Any]:
        """Record `fn`; return the graph and the (static) outputs a replay writes into."""
        ...


def flat_tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in flat_tensors(o)]
    return []


class TorchCudaCapturer:
    """torch.cuda graphs: warm-up and capture on one stream, one memory pool per runner.

    `stream` is the runner's own stream, on which the whole step runs (backends/device.py): the
    warm-up and the capture then happen on the stream later replays launch on (a replay goes to
    the current stream), lazily created per-stream state (cuBLAS workspaces) is made before the
    capture, and no cross-stream events are needed. Without one it keeps a side stream of its own
    and orders it against the caller's current stream.

    All graphs of a runner share a pool: they replay one at a time on one stream, and the outputs
    each graph returns stay referenced by the runner, so no later capture allocates over them. A
    replay may still overwrite another graph's outputs with its temporaries; that is harmless
    because a step's outputs are consumed (logits copied to the host, rows kept) before the
    engine's next step, as the ModelRunner protocol requires.
    """

    def __init__(self, device: torch.device | str | None = None, stream: torch.cuda.Stream | None = None) -> None:
        self.stream = stream if stream is not None else torch.cuda.Stream(device=device)
        self.pool = torch.cuda.graph_pool_handle()

    def warmup(self, fn: Callable[[], Any]) -> Any:
        current = torch.cuda.current_stream(self.stream.device)
        if current == self.stream:  # the runner's stream: already in order
            return fn()
        self.stream.wait_stream(current)  # the inputs were copied in on the current stream
        with torch.cuda.stream(self.stream):
            out = fn()
        current.wait_stream(self.stream)
        for t in flat_tensors(out):  # allocated on the side stream, read on the current one
            t.record_stream(current)
        return out

    def capture(self, fn: Callable[[], Any]) -> tuple[Replayable, Any]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            out = fn()
        return graph, out


@dataclass
class StaticInputs:
    """The small step inputs, at fixed device addresses (a graph reads them by address)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    logits_index: torch.Tensor
    sliding_mask: torch.Tensor | None = None  # graphs with sliding-window layers only

    @classmethod
    def alloc(cls, key: Key, device: torch.device, sliding: bool = False,
              zeros: Callable[..., torch.Tensor] | None = None) -> StaticInputs:
        """`zeros(shape, dtype, device)` allocates each buffer (TensorRT passes an aligned one)."""
        b, t, k, s = key
        z = zeros or (lambda shape, dtype, dev: torch.zeros(shape, dtype=dtype, device=dev))
        return cls(
            z((b, t), torch.int64, device),
            z((b, t), torch.int64, device),
            z((b, 1, t, s + t), torch.bool, device),
            z((b, k), torch.int64, device),
            z((b, 1, t, s + t), torch.bool, device) if sliding else None,
        )

    def load(self, inputs: StepInputs) -> None:
        """Copy a step's host arrays in (asynchronous on the current stream for CUDA)."""
        nb = self.input_ids.is_cuda
        for dst, src in zip(self.tensors(), inputs.arrays(), strict=True):
            dst.copy_(torch.from_numpy(np.asarray(src)), non_blocking=nb)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """In graph order (ModelSpec.step_names), as the wrapper takes them."""
        if self.sliding_mask is None:
            return (self.input_ids, self.position_ids, self.attention_mask, self.logits_index)
        return (self.input_ids, self.position_ids, self.attention_mask, self.sliding_mask, self.logits_index)


@dataclass
class _Slot(Generic[B]):
    buffers: B
    uses: int = 0
    state: str = "new"  # new | captured | failed
    graph: Replayable | None = None
    outputs: Any = None


def new_stats() -> dict[str, int]:
    return {
        "graphs_captured": 0,
        "graph_replays": 0,
        "warmup_runs": 0,
        "eager_runs": 0,  # decode-width steps that ran uncaptured (no graphs, failed capture, limit)
        "prefill_runs": 0,  # T above max_graph_tokens: never captured
        "capture_failures": 0,
    }


class GraphRunner(Generic[B]):
    """Per-key static buffers and graphs for one engine.

    `buffers(key, make)` hands out the key's static buffers (kept for the runner's life when the
    key may be captured, since a graph bakes their addresses in; a small bounded cache
    otherwise); `run(key, fn)` runs the step by the policy in the module docstring.
    `capturer=None` means no graphs at all (CPU): every step runs plainly.
    """

    def __init__(
        self,
        capturer: Capturer | None,
        max_graph_tokens: int,
        max_graphs: int = 64,
        max_eager_buffers: int = 8,
        warmup_runs: int = 1,
        name: str = "",
    ) -> None:
        self.capturer = capturer
        self.max_graph_tokens = max_graph_tokens
        self.max_graphs = max_graphs  # each graph holds device memory for its kernels' parameters: bound them
        self.max_eager_buffers = max_eager_buffers
        self.warmup_runs = warmup_runs
        self.name = name
        self.stats = new_stats()
        self._slots: dict[Key, _Slot[B]] = {}
        self._eager: dict[Key, B] = {}
        self._warned = False

    def graphable(self, key: Key) -> bool:
        return self.capturer is not None and key[1] <= self.max_graph_tokens

    def keeps(self, key: Key) -> bool:
        """Whether `key` holds a slot: its buffers are kept for good and a graph may bake them in."""
        return key in self._slots

    def buffers(self, key: Key, make: Callable[[], B]) -> B:
        slot = self._slots.get(key)
        if slot is not None:
            return slot.buffers
        if self.graphable(key) and self._room():
            slot = self._slots[key] = _Slot(make())
            return slot.buffers
        buf = self._eager.get(key)
        if buf is None:
            if len(self._eager) >= self.max_eager_buffers:  # prompt shapes come and go
                self._eager.clear()
            buf = self._eager[key] = make()
        return buf

    def _room(self) -> bool:
        """Whether a new key may get a slot; evicts the oldest never-captured one (a short prompt
        seen once) rather than let one-off shapes lock later decode shapes out of graphs."""
        if len(self._slots) < self.max_graphs:
            return True
        stale = next((k for k, s in self._slots.items() if s.state == "new"), None)
        if stale is None:
            return False
        del self._slots[stale]
        return True

    def run(self, key: Key, fn: Callable[[], Any]) -> Any:
        slot = self._slots.get(key)
        if slot is None or self.capturer is None:
            self.stats["prefill_runs" if key[1] > self.max_graph_tokens else "eager_runs"] += 1
            return fn()
        if slot.state == "captured":
            assert slot.graph is not None
            slot.graph.replay()
            self.stats["graph_replays"] += 1
            return slot.outputs
        if slot.state == "failed":
            self.stats["eager_runs"] += 1
            return fn()
        slot.uses += 1
        self.stats["warmup_runs"] += 1
        out = self.capturer.warmup(fn)  # also right before a capture: TensorRT wants one plain run per binding
        if slot.uses <= self.warmup_runs:
            return out
        try:
            slot.graph, slot.outputs = self.capturer.capture(fn)
        except Exception as e:  # any capture problem means "run this key uncaptured"
            slot.state = "failed"
            self.stats["capture_failures"] += 1
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
            log.log(level, "%s: CUDA graph capture failed for (B, T, K, S)=%s, running it uncaptured: %s: %s",
                    self.name or "engine", key, type(e).__name__, e)
            _recover_after_failed_capture()
            return out
        slot.state = "captured"
        self.stats["graphs_captured"] += 1
        return out  # a capture records without running; this step's result is the plain run's

    def captured_keys(self) -> list[Key]:
        return [k for k, s in self._slots.items() if s.state == "captured"]

    def clear(self) -> None:
        """Drop every graph and buffer (engine close)."""
        self._slots.clear()
        self._eager.clear()


def _recover_after_failed_capture() -> None:
    """Surface (and clear) a non-sticky CUDA error left by the failed capture, if CUDA is in use."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        try:
            torch.cuda.synchronize()
        except Exception as e:  # a sticky error: the next real step will report it properly
            log.debug("synchronize after failed capture: %s", e)
