"""The runtime's client surface for front ends (the HTTP server, a Ray replica): a thread that runs
a Pipeline's scheduler, and four calls into it — `info`, `prepare`, `submit`, `cancel`.

Everything that decides what a request may be or how it runs stays in the runtime: a front end
parses its own protocol, tokenizes with its own `Encoder`, asks `prepare` to validate and fit the
settings, and `submit`s. Requests join the running batch at the next iteration; the runtime
thread reports back through each request's `Sink`, and what happened through an optional
`Observer` (the server's Prometheus metrics): the runtime never touches a front end's objects.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from mtad_trt.engine.request import Piece, Request, join_pieces
from mtad_trt.engine.scheduler import Update
from mtad_trt.engine.stats import Stats
from mtad_trt.errors import Busy, MtadError, ShuttingDown
from mtad_trt.pipeline import Encoder, ModelInfo, Pipeline

log = logging.getLogger("mtad_trt.client")


class Sink(Protocol):
    """Where a submitted request's results go; called from the runtime thread."""

    def piece(self, piece: Piece) -> None: ...

    def done(self, stats: Stats) -> None: ...

    def error(self, exc: Exception) -> None: ...


class Observer(Protocol):
    """What the runtime reports (queue depth, starts, tokens, ends, iterations)."""

    def waiting(self, n: int) -> None: ...

    def started(self, handle: Handle) -> None: ...

    def tokens(self, handle: Handle, count: int, now: float) -> None: ...

    def finished(self, handle: Handle) -> None: ...

    def dropped(self, handle: Handle) -> None:
        """A request cancelled before it started."""
        ...

    def iteration(self, rows: int, seconds: float) -> None: ...

    def model_calls(self, calls: list[tuple[str, str, int, int, float]]) -> None:
        """The iteration's model calls: (role, phase, rows, T, seconds) each (where the time went)."""
        ...


@dataclass(eq=False)
class Handle:
    """A submitted request: what a front end holds to follow or cancel it."""

    request: Request
    sink: Sink
    streaming: bool = True  # False: the sink wants the whole text once, at the end
    held: list[Piece] = field(default_factory=list)
    reported: bool = False  # the observer was told it started

    @property
    def stats(self) -> Stats:
        return self.request.stats


class RuntimeClient:
    """The only thread that steps the Pipeline's scheduler (continuous batching of up to
    `pipeline.max_batch` requests; at most `max_queue` more wait for a row)."""

    def __init__(self, pipeline: Pipeline, max_queue: int = 64, observer: Observer | None = None) -> None:
        if max_queue < 1:
            raise MtadError(f"max_queue must be >= 1, got {max_queue}")
        self.pipeline, self.max_queue, self.observer = pipeline, max_queue, observer
        self._incoming: list[Handle] = []
        self._handles: dict[int, Handle] = {}  # id(request) -> handle, for every submitted request
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- what a front end may ask -------------------------------------------------------------
    def info(self) -> ModelInfo:
        return self.pipeline.info()

    @property
    def capacity(self) -> int:
        """Requests this runtime accepts at once: running rows + queue (what a router may send)."""
        return self.pipeline.max_batch + self.max_queue

    def encoder(self) -> Encoder:
        return self.pipeline.encoder()

    def prepare(self, prompt_ids: list[int], default_max_new_tokens: int | None = None,
                defaults: dict | None = None, **settings) -> Request:
        return self.pipeline.prepare(prompt_ids, default_max_new_tokens, defaults, **settings)

    def submit(self, request: Request, sink: Sink, streaming: bool = True) -> Handle:
        """Queue a prepared request; raises Busy (queue full) or ShuttingDown."""
        return self.submit_many([(request, sink)], streaming)[0]

    def submit_many(self, items: list[tuple[Request, Sink]], streaming: bool = True) -> list[Handle]:
        """Queue prepared requests all or none (a request's n choices or list of prompts): raises
        Busy when they do not all fit the queue, and then none of them was queued — none can have
        started in a batch row meanwhile, as one-by-one submission with cancel-back allowed."""
        self.start()
        handles = [Handle(request, sink, streaming) for request, sink in items]
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            waiting = self._waiting()
            if waiting + len(handles) > self.max_queue:
                need = "" if len(handles) == 1 else f"; this request needs {len(handles)} places"
                raise Busy(f"the request queue is full ({waiting} of {self.max_queue} waiting{need}); retry later")
            self._incoming.extend(handles)
            for handle in handles:
                self._handles[id(handle.request)] = handle
            self._report_waiting()
            self._cond.notify()
        return handles

    def cancel(self, handle: Handle) -> None:
        """Thread-safe: drop a waiting request, or end a running one at the next iteration."""
        handle.request.cancelled.set()
        with self._cond:
            if handle in self._incoming:
                self._incoming.remove(handle)
                self._handles.pop(id(handle.request), None)
                self._report_waiting()
                if self.observer:
                    self.observer.dropped(handle)
            self._cond.notify()

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def died(self) -> bool:
        """Started and no longer running while not asked to stop (a bug; /health reports it)."""
        return self._thread is not None and not self._thread.is_alive() and not self._stopping

    @property
    def running(self) -> int:
        return len(self.pipeline.scheduler.running)

    def start(self) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mtad-trt-runtime", daemon=True)
                self._thread.start()

    def stop(self, timeout_s: float) -> None:
        """Refuse queued requests (ShuttingDown), let the running ones finish within timeout_s, then cancel them."""
        with self._cond:
            self._stopping = True
            pending = list(self._incoming)
            self._incoming.clear()
            waiting = self.pipeline.scheduler.drop_waiting()
            self._report_waiting()
            self._cond.notify_all()
        for handle in pending + [self._handles.pop(id(r)) for r in waiting if id(r) in self._handles]:
            handle.sink.error(ShuttingDown("the server is shutting down"))
        if self._thread is None:
            return
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("cancelling the running requests: drain timeout reached")
            for handle in list(self._handles.values()):
                handle.request.cancelled.set()
            self._thread.join(5.0)

    # -- the runtime thread --------------------------------------------------------------------
    def _waiting(self) -> int:
        return len(self._incoming) + self.pipeline.scheduler.queued

    def _report_waiting(self) -> None:
        if self.observer:
            self.observer.waiting(self._waiting())

    def _run(self) -> None:
        sched = self.pipeline.scheduler
        while True:
            with self._cond:
                while not self._incoming and not sched.busy and not self._stopping:
                    self._cond.wait()
                if self._stopping and not sched.busy and not self._incoming:
                    return
                for handle in self._incoming:  # under the lock: the queue count never misses them
                    sched.add(handle.request)
                self._incoming.clear()
            try:
                it = sched.iterate(admitted=self._admitted)
                now = time.perf_counter()
                for req in it.started:
                    self._report_started(req)
                with self._cond:
                    self._report_waiting()
                for update in it.updates:
                    self._deliver(update, now)
                if self.observer and sched.last.rows:
                    self.observer.iteration(sched.last.rows, sched.last.seconds)
                    self.observer.model_calls(sched.last.calls or [])
            except BaseException as e:  # never let the thread die, nor a front end wait forever
                log.exception("runtime thread failed")
                for req in list(sched.running):
                    sched.abort(req)
                    req.error = e if isinstance(e, Exception) else RuntimeError(repr(e))
                    self._deliver(Update(req, None, True), time.perf_counter())

    def _admitted(self, started: list[Request]) -> None:
        """Before the step runs: the gauges show the newcomers as running while it does."""
        for req in started:
            self._report_started(req)
        with self._cond:
            self._report_waiting()

    def _report_started(self, req: Request) -> None:
        handle = self._handles.get(id(req))
        if handle is not None and req.started and not handle.reported and self.observer:
            handle.reported = True
            self.observer.started(handle)

    def _deliver(self, update: Update, now: float) -> None:
        req = update.request
        handle = self._handles.get(id(req))
        if handle is None:
            return
        obs, piece = self.observer, update.piece
        if not req.started:  # cancelled while waiting in the scheduler
            self._handles.pop(id(req), None)
            if obs:
                obs.dropped(handle)
            return
        if piece is not None:
            if piece.token_ids and obs:
                obs.tokens(handle, len(piece.token_ids), now)
            if handle.streaming:
                handle.sink.piece(piece)
            else:
                handle.held.append(piece)
        if not update.finished:
            return
        self._handles.pop(id(req), None)
        if handle.held:
            handle.sink.piece(join_pieces(handle.held))
        if obs:
            obs.finished(handle)
        if req.error is not None:
            handle.sink.error(req.error)
        else:
            handle.sink.done(req.stats)
