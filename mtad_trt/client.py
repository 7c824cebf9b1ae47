"""The runtime's client surface for front ends (the HTTP server, a Ray replica): a thread that owns
the Pipeline, and four calls into it — `info`, `prepare`, `submit`, `cancel`.

Everything that decides what a request may be or how it runs stays in the runtime: a front end
parses its own protocol, tokenizes with its own `Encoder`, asks `prepare` to validate and fit the
settings, and `submit`s. The runtime thread reports back through the request's `Sink`, and what
happened to requests through an optional `Observer` (the server's Prometheus metrics): the
runtime never touches a front end's objects.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from mtad_trt.errors import Busy, MtadError, ShuttingDown
from mtad_trt.pipeline import Encoder, ModelInfo, Piece, Pipeline, Request
from mtad_trt.stats import Stats

log = logging.getLogger("mtad_trt.client")


class Sink(Protocol):
    """Where a submitted request's results go; called from the runtime thread."""

    def piece(self, piece: Piece) -> None: ...

    def done(self, stats: Stats) -> None: ...

    def error(self, exc: Exception) -> None: ...


class Observer(Protocol):
    """What the runtime reports about requests (queue depth, starts, tokens, ends)."""

    def waiting(self, n: int) -> None: ...

    def started(self, handle: Handle) -> None: ...

    def tokens(self, handle: Handle, count: int, now: float) -> None: ...

    def finished(self, handle: Handle) -> None: ...

    def dropped(self, handle: Handle) -> None:
        """A request cancelled before it started."""
        ...


@dataclass(eq=False)
class Handle:
    """A submitted request: what a front end holds to follow or cancel it."""

    request: Request
    sink: Sink
    streaming: bool = True  # False: the sink wants the whole text once, at the end
    stats: Stats = field(default_factory=Stats)
    arrived: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def queue_s(self) -> float:
        return max(0.0, self.started - self.arrived) if self.started else 0.0


class RuntimeClient:
    """The only thread that touches the Pipeline; runs submitted requests one at a time, FIFO."""

    def __init__(self, pipeline: Pipeline, max_queue: int = 64, observer: Observer | None = None) -> None:
        if max_queue < 1:
            raise MtadError(f"max_queue must be >= 1, got {max_queue}")
        self.pipeline, self.max_queue, self.observer = pipeline, max_queue, observer
        self._jobs: deque[Handle] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.running: Handle | None = None
        self._thread: threading.Thread | None = None

    # -- what a front end may ask -------------------------------------------------------------
    def info(self) -> ModelInfo:
        return self.pipeline.info()

    def encoder(self) -> Encoder:
        return self.pipeline.encoder()

    def prepare(self, prompt_ids: list[int], default_max_new_tokens: int | None = None, **settings) -> Request:
        return self.pipeline.prepare(prompt_ids, default_max_new_tokens, **settings)

    def submit(self, request: Request, sink: Sink, streaming: bool = True) -> Handle:
        """Queue a prepared request; raises Busy (queue full) or ShuttingDown."""
        self.start()
        handle = Handle(request, sink, streaming)
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._jobs) >= self.max_queue:
                raise Busy(f"the request queue is full ({self.max_queue} waiting); retry later")
            self._jobs.append(handle)
            self._report_waiting()
            self._cond.notify()
        return handle

    def cancel(self, handle: Handle) -> None:
        """Thread-safe: drop a waiting request, or make the running one stop after its current round."""
        handle.cancelled.set()
        with self._cond:
            with contextlib.suppress(ValueError):
                self._jobs.remove(handle)
                self._report_waiting()
                if self.observer:
                    self.observer.dropped(handle)

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def died(self) -> bool:
        """Started and no longer running while not asked to stop (a bug; /health reports it)."""
        return self._thread is not None and not self._thread.is_alive() and not self._stopping

    def start(self) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mtad-trt-runtime", daemon=True)
                self._thread.start()

    def stop(self, timeout_s: float) -> None:
        """Refuse queued requests (ShuttingDown), let the running one finish within timeout_s, then cancel it."""
        with self._cond:
            self._stopping = True
            pending = list(self._jobs)
            self._jobs.clear()
            self._report_waiting()
            self._cond.notify_all()
        for handle in pending:
            handle.sink.error(ShuttingDown("the server is shutting down"))
        if self._thread is None:
            return
        self._thread.join(timeout_s)
        running = self.running
        if self._thread.is_alive() and running is not None:
            log.warning("cancelling the running request: drain timeout reached")
            running.cancelled.set()
            self._thread.join(5.0)

    # -- the runtime thread --------------------------------------------------------------------
    def _report_waiting(self) -> None:
        if self.observer:
            self.observer.waiting(len(self._jobs))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if not self._jobs:
                    return
                handle = self._jobs.popleft()
                self._report_waiting()
                self.running = handle
            try:
                if handle.cancelled.is_set():
                    if self.observer:
                        self.observer.dropped(handle)
                else:
                    self._execute(handle)
            except BaseException as e:  # never let the thread die, nor a front end wait forever
                log.exception("runtime thread failed")
                handle.sink.error(e if isinstance(e, Exception) else RuntimeError(repr(e)))
            finally:
                self.running = None

    def _execute(self, handle: Handle) -> None:
        obs = self.observer
        handle.started = time.perf_counter()
        if obs:
            obs.started(handle)
        held: list[Piece] = []  # non-streaming: waking the front end per round would only cost time
        gen = None
        try:
            gen = self.pipeline.stream_request(handle.request, handle.stats)
            for piece in gen:
                if piece.token_ids and obs:
                    obs.tokens(handle, len(piece.token_ids), time.perf_counter())
                if handle.streaming:
                    handle.sink.piece(piece)
                else:
                    held.append(piece)
                if handle.cancelled.is_set():
                    break
            if held:
                handle.sink.piece(Piece([t for p in held for t in p.token_ids], "".join(p.text for p in held)))
        except Exception as e:
            if not isinstance(e, MtadError):
                log.exception("generation failed")
            handle.sink.error(e)
            return
        finally:
            if gen is not None:
                gen.close()  # cancels the generation if we broke out early
            if obs:
                obs.finished(handle)
        handle.sink.done(handle.stats)
