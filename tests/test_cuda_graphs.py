"""CUDA-graph runner bookkeeping with a fake capture (CPU), the torch backend's graph path end to
end with that fake, and real CUDA graphs on a GPU (replay == eager over many steps)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from test_torch_backend import assert_same_logits, build_tiny_engine, drive

import mtad_trt.backends.device as device
import mtad_trt.backends.torch_backend as torch_backend
from mtad_trt.backends.cuda_graphs import GraphRunner, StaticInputs, flat_tensors
from mtad_trt.backends.rows import Row
from mtad_trt.backends.runner import StepInputs
from mtad_trt.backends.torch_backend import TorchRunner


class FakeGraph:
    """Replays by re-running the function and copying into the outputs captured first — what a
    CUDA graph does to its static output tensors."""

    def __init__(self, fn: Callable[[], Any], outputs: Any, log: list) -> None:
        self.fn, self.outputs, self.log = fn, outputs, log

    def replay(self) -> None:
        self.log.append("replay")
        for old, new in zip(flat_tensors(self.outputs), flat_tensors(self.fn()), strict=True):
            if old is not new:
                old.copy_(new)


class FakeCapturer:
    def __init__(self, fail: Callable[[], bool] = lambda: False) -> None:
        self.log: list[str] = []
        self.fail = fail

    def warmup(self, fn: Callable[[], Any]) -> Any:
        self.log.append("warmup")
        return fn()

    def capture(self, fn: Callable[[], Any]) -> tuple[FakeGraph, Any]:
        self.log.append("capture")
        if self.fail():
            raise RuntimeError("operation not permitted when stream is capturing")
        out = fn()
        return FakeGraph(fn, out, self.log), out


def counter() -> tuple[Callable[[], torch.Tensor], list[int]]:
    calls = [0]

    def fn() -> torch.Tensor:
        calls[0] += 1
        return torch.full((2,), float(calls[0]))

    return fn, calls


def test_policy_warmup_then_capture_then_replay() -> None:
    cap = FakeCapturer()
    runner: GraphRunner[str] = GraphRunner(cap, max_graph_tokens=4)
    key = (1, 2, 2, 128)
    fn, calls = counter()
    assert runner.buffers(key, lambda: "bufs") == "bufs"
    out1 = runner.run(key, fn)  # first use: warm-up only
    out2 = runner.run(key, fn)  # second: a plain run right before the capture; its result is the step's
    out3 = runner.run(key, fn)  # replays from now on
    out4 = runner.run(key, fn)
    assert cap.log == ["warmup", "warmup", "capture", "replay", "replay"]
    assert (out1[0], out2[0]) == (1, 2) and out3 is out4 and out4[0] == 5
    assert runner.stats["graphs_captured"] == 1 and runner.stats["graph_replays"] == 2
    assert runner.stats["warmup_runs"] == 2 and runner.captured_keys() == [key]


def test_prefill_is_never_captured_and_buffers_are_bounded() -> None:
    cap = FakeCapturer()
    runner: GraphRunner[object] = GraphRunner(cap, max_graph_tokens=4, max_eager_buffers=2)
    fn, _ = counter()
    made = []

    def make() -> object:
        made.append(object())
        return made[-1]

    for _ in range(3):
        runner.buffers((1, 50, 1, 128), make)
        runner.run((1, 50, 1, 128), fn)
    assert cap.log == [] and runner.stats["prefill_runs"] == 3
    assert len(made) == 1  # the same prefill shape reuses its buffers
    for t in (60, 70, 80):  # new prompt lengths: the bounded cache is cleared, never grows past 2
        runner.buffers((1, t, 1, 128), make)
    assert len(runner._eager) <= 2
    b1 = runner.buffers((1, 1, 1, 128), make)
    assert runner.buffers((1, 1, 1, 128), make) is b1  # graph keys keep theirs for good
    assert runner.buffers((1, 1, 1, 256), make) is not b1  # S bucket is part of the key


def test_capture_failure_falls_back_logged_once(caplog) -> None:
    cap = FakeCapturer(fail=lambda: True)
    runner: GraphRunner[None] = GraphRunner(cap, max_graph_tokens=8, name="fake")
    fn, calls = counter()
    with caplog.at_level(logging.DEBUG, logger="mtad_trt"):
        for key in ((1, 1, 1, 128), (1, 5, 5, 128)):
            runner.buffers(key, lambda: None)
            for _ in range(4):
                assert runner.run(key, fn) is not None
    assert runner.stats["capture_failures"] == 2
    assert runner.stats["warmup_runs"] == 4 and runner.stats["eager_runs"] == 4  # per key: 2 warm-ups, 2 plain runs
    assert cap.log.count("capture") == 2  # a failed key is not retried
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "capture failed" in warnings[0].getMessage()
    assert calls[0] == 8  # every step ran exactly once (the failing capture never reached fn)


def test_graph_limit_and_no_capturer() -> None:
    cap = FakeCapturer()
    runner: GraphRunner[None] = GraphRunner(cap, max_graph_tokens=8, max_graphs=1)
    fn, _ = counter()
    for key in ((1, 1, 1, 128), (1, 2, 1, 128)):
        runner.buffers(key, lambda: None)
        for _ in range(3):
            runner.run(key, fn)
    assert runner.captured_keys() == [(1, 1, 1, 128)] and runner.stats["eager_runs"] == 3  # over the limit
    # one-off shapes (short prompts) warmed once do not lock a repeating decode shape out of graphs
    roomy: GraphRunner[None] = GraphRunner(FakeCapturer(), max_graph_tokens=8, max_graphs=2)
    for key in ((1, 3, 1, 128), (1, 4, 1, 128), (1, 1, 1, 256), (1, 1, 1, 256), (1, 1, 1, 256)):
        roomy.buffers(key, lambda: None)
        roomy.run(key, fn)
    assert roomy.captured_keys() == [(1, 1, 1, 256)] and len(roomy._slots) == 2
    plain: GraphRunner[None] = GraphRunner(None, max_graph_tokens=8)
    plain.buffers((1, 1, 1, 128), lambda: None)
    plain.run((1, 1, 1, 128), fn)
    assert plain.stats["eager_runs"] == 1 and plain.stats["graphs_captured"] == 0


def test_static_inputs_load() -> None:
    key = (1, 2, 1, 3)
    bufs = StaticInputs.alloc(key, torch.device("cpu"))
    ptrs = [t.data_ptr() for t in bufs.tensors()]
    mask = np.zeros((1, 1, 2, 5), bool)
    mask[0, 0, :, 4] = True
    bufs.load(StepInputs(np.array([[7, 8]]), np.array([[3, 4]]), mask, np.array([[1]])))
    assert bufs.input_ids.tolist() == [[7, 8]] and bufs.attention_mask.sum() == 2
    assert [t.data_ptr() for t in bufs.tensors()] == ptrs  # copied in place: the addresses a graph saw


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_engine(tmp_path_factory.mktemp("tiny_graphs"), export=False)


def test_torch_engine_graph_path_with_fake_capture(tiny) -> None:
    """The static-buffer + replay path of the torch backend, on CPU: same logits as plain runs."""
    folder, manifest = tiny
    plain = drive(TorchRunner.from_folder(folder, manifest, "target"))
    cap = FakeCapturer()
    engine = TorchRunner.from_folder(folder, manifest, "target", capturer=cap, max_decode_tokens=4)
    graphed = drive(engine) + drive_more(engine)
    assert_same_logits(graphed[: len(plain)], plain, tol=1e-6)
    stats = engine.graph_stats
    assert stats["graph_replays"] > 0 and stats["prefill_runs"] == 2 and stats["capture_failures"] == 0
    eager = TorchRunner.from_folder(folder, manifest, "target")
    drive(eager)
    assert_same_logits(graphed[len(plain) :], drive_more(eager), tol=1e-6)


def test_torch_runner_works_on_its_own_stream(tiny, monkeypatch) -> None:
    """The model call and every cache write (reserve, keep, move) are issued with the runner's
    stream current, never the caller's (on CUDA: never the legacy default stream)."""
    active: list[Any] = []

    @contextlib.contextmanager
    def recording(stream: Any) -> Iterator[None]:
        active.append(stream)
        try:
            yield
        finally:
            active.pop()

    monkeypatch.setattr(device, "on_stream", recording)
    monkeypatch.setattr(torch_backend, "on_stream", recording)
    folder, manifest = tiny
    engine = TorchRunner.from_folder(folder, manifest, "target")
    assert engine.stream.cuda_stream != 0 and engine.host.stream is engine.stream
    seen: list[tuple[str, list]] = []

    def spy(obj: Any, name: str) -> None:
        real = getattr(obj, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            seen.append((name, list(active)))
            return real(*args, **kwargs)

        monkeypatch.setattr(obj, name, call)

    for name in ("reserve", "keep", "move"):
        spy(engine.cache, name)
    spy(engine.wrapper, "forward")
    drive(engine)
    assert {n for n, _ in seen} == {"reserve", "keep", "move", "forward"}
    assert all(streams == [engine.stream] for _, streams in seen), seen


def drive_more(engine, steps: int = 24) -> list[np.ndarray]:
    """Many decode steps of a few fixed shapes with changing positions, masks and cache slots —
    the pattern graphs are for. Starts a new sequence on the engine."""
    engine.reset()
    rng = np.random.default_rng(1)
    seq = Row(engine)
    out = [seq.forward(rng.integers(0, 300, 9)).copy()]
    seq.commit_chain(9)
    for i in range(steps):
        if i % 3 == 2:  # a 3-token tree: two siblings under one node, first sibling accepted
            out.append(seq.forward(rng.integers(0, 300, 3), parents=[-1, 0, 0], logits_rows=[0, 1, 2]).copy())
            seq.keep([0, 1], [seq.n, seq.n + 1])
            seq.n += 2
        else:
            out.append(seq.forward(rng.integers(0, 300, 1)).copy())
            seq.commit_chain(1)
    return out


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
def test_cuda_graph_replay_matches_eager(tiny) -> None:
    folder, manifest = tiny
    eager = TorchRunner.from_folder(folder, manifest, "target", device="cuda", cuda_graphs=False)
    graphed = TorchRunner.from_folder(folder, manifest, "target", device="cuda", max_decode_tokens=8)
    want = drive(eager) + drive_more(eager, steps=60)
    got = drive(graphed) + drive_more(graphed, steps=60)
    assert_same_logits(got, want, tol=1e-4)
    stats = graphed.graph_stats
    assert stats["capture_failures"] == 0, stats
    assert stats["graphs_captured"] >= 2 and stats["graph_replays"] > 40, stats


@pytest.mark.gpu
@gpu
def test_cuda_work_runs_on_the_runner_stream(tiny) -> None:
    folder, manifest = tiny
    engine = TorchRunner.from_folder(folder, manifest, "target", device="cuda", max_decode_tokens=8)
    streams = []
    real = engine.wrapper.forward

    def forward(*args: Any) -> Any:
        streams.append(torch.cuda.current_stream())
        return real(*args)

    engine.wrapper.forward = forward
    drive(engine)
    assert streams and all(s == engine.stream for s in streams)
    assert engine.stream != torch.cuda.default_stream() and engine.stream.cuda_stream != 0
