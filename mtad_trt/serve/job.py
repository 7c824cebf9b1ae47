"""The channel between the runtime thread and a request's handler on the event loop.

A `Job` is the runtime's `Sink` for one request: the runtime thread appends events to a locked
list and wakes the event loop only when that list goes from empty to non-empty; the handler takes
everything pending at once. So when the runtime outruns the loop (fast steps, many tokens),
rounds coalesce into fewer wake-ups and socket writes instead of piling up one callback each.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from mtad_trt.client import Handle, RuntimeClient
from mtad_trt.engine.stats import Stats
from mtad_trt.pipeline import Piece


@dataclass(eq=False)
class Job:
    """Events: ("piece", Piece) | ("done", Stats) | ("error", exception)."""

    loop: asyncio.AbstractEventLoop
    handle: Handle | None = None  # set once submitted
    finished: bool = False  # set by the handler once "done" or "error" arrived
    _pending: list[tuple[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ready: asyncio.Event = field(default_factory=asyncio.Event)

    # -- client.Sink (runtime thread) ----------------------------------------------------------
    def piece(self, piece: Piece) -> None:
        self._emit("piece", piece)

    def done(self, stats: Stats) -> None:
        self._emit("done", stats)

    def error(self, exc: Exception) -> None:
        self._emit("error", exc)

    def _emit(self, kind: str, value: Any) -> None:
        with self._lock:
            self._pending.append((kind, value))
            wake = len(self._pending) == 1
        if wake:
            try:
                self.loop.call_soon_threadsafe(self._ready.set)
            except RuntimeError:  # the loop is closed: nobody listens any more
                if self.handle is not None:
                    self.handle.cancelled.set()

    # -- the handler (event loop) -------------------------------------------------------------
    async def take(self) -> list[tuple[str, Any]]:
        """Wait for, and return, every event emitted so far."""
        while True:
            with self._lock:
                if self._pending:
                    batch, self._pending = self._pending, []
                    return batch
                self._ready.clear()  # under the lock: an emit after this sets it again
            await self._ready.wait()

    async def events(self, client: RuntimeClient) -> AsyncIterator[list[Piece]]:
        """The pieces in batches as they arrive; raises the runtime's error; cancels the request
        if the consumer goes away first."""
        try:
            while not self.finished:
                pieces = []
                for kind, value in await self.take():
                    if kind == "piece":
                        pieces.append(value)
                    elif kind == "error":
                        self.finished = True
                        if pieces:
                            yield pieces
                        raise value
                    else:
                        self.finished = True
                if pieces:
                    yield pieces
        finally:
            if not self.finished and self.handle is not None:
                client.cancel(self.handle)
