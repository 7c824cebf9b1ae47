"""Continuous batching: requests join and leave a running batch at iteration boundaries.

One `step()` is one iteration for every running request:

1. cancelled requests leave; waiting requests take free rows (FIFO, lowest row first); the
   speculation policy sets this iteration's γ and B for the requests that did not fix them;
2. prefill: one bounded chunk of newcomers' prompts, packed into one call per model (at most
   `prefill_chunk` prompt tokens in all), apart from decode shapes;
3. decode: draft calls while any row still drafts (depth d of every row in one call), then one
   target call with every row's verify (or plain step);
4. every emitted token is checked for stop ids, max_new_tokens and stop strings; finished requests
   give their row back — the runners are reset (buckets shrink) only when no request runs.

A call that fails ends the requests in it, not the scheduler.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mtad_trt.batch import Batcher
from mtad_trt.decoders import DECODER_FNS, DecodeState
from mtad_trt.errors import CapacityError, MtadError, StepFailed
from mtad_trt.request import Detokenizer, Piece, Request
from mtad_trt.rows import Row
from mtad_trt.runner import ModelRunner

log = logging.getLogger("mtad_trt.scheduler")

PHASE_FIELDS = {"prefill": ("prefill_calls", "prefill_s"), "draft": ("draft_calls", "draft_s"),
                "target": ("target_calls", "verify_s")}


@dataclass
class Update:
    """What one step did to one request: new output (a Piece), and whether it is finished."""

    request: Request
    piece: Piece | None
    finished: bool


@dataclass
class StepInfo:
    """What the last step did, for metrics and the speculation policy."""

    rows: int = 0  # requests running during the step
    seconds: float = 0.0
    calls: list[tuple[str, str, int, int, float]] | None = None  # (role, phase, rows, T, seconds)


Policy = Callable[[list[Request], "Scheduler"], None]


class Scheduler:
    def __init__(
        self,
        target: ModelRunner,
        draft: ModelRunner | None,
        tokenizer,
        eos_ids: set[int],
        max_batch: int = 1,
        prefill_chunk: int = 256,
        policy: Policy | None = None,
    ) -> None:
        if max_batch < 1:
            raise MtadError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk < 1:
            raise MtadError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.runners = {"target": target, "draft": draft}
        self.batchers = {role: Batcher(r, max_batch) for role, r in self.runners.items() if r is not None}
        self.tokenizer, self.eos_ids = tokenizer, set(eos_ids)
        self.max_batch, self.prefill_chunk, self.policy = max_batch, prefill_chunk, policy
        self.free = list(range(max_batch))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._dropped: list[Request] = []  # cancelled before they started: reported by the next step
        self.last = StepInfo()

    # -- requests ------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        if req.decode.speculative and self.runners["draft"] is None:
            raise MtadError(f"decoder '{req.decode.decoder}' needs a draft model; none is loaded", param="decoder")
        self.waiting.append(req)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running or self._dropped)

    def admit(self) -> list[Request]:
        """Waiting requests take free rows (FIFO, lowest row first); returns those that started."""
        started = []
        while self.waiting and self.free:
            req = self.waiting.popleft()
            if req.cancelled.is_set():
                self._dropped.append(req)  # the next step reports it
                continue
            self._start(req)
            started.append(req)
        return started

    def abort(self, req: Request) -> None:
        """End a request now (its caller went away); the caller must be the thread that steps."""
        if req in self.waiting:
            self.waiting.remove(req)
        if not req.finished:
            self._finish(req, "cancelled")

    def _start(self, req: Request) -> None:
        req.row = self.free.pop(0)
        req.started = time.perf_counter()
        target = Row(self.runners["target"], req.row)
        draft = Row(self.runners["draft"], req.row) if req.decode.speculative else None
        req.state = DecodeState(target, draft, list(req.prompt_ids), req.sampling, req.decode, req.new_rng(),
                                req.stats, self.prefill_chunk)
        req.stats.prompt_tokens = len(req.prompt_ids)
        req.stats.finish_reason = "cancelled"
        req.stats.accepted_per_position = [0] * req.state.gamma
        req.detok = Detokenizer(self.tokenizer, req.sampling.stop)
        req.gen = DECODER_FNS[req.decode.decoder](req.state)
        req.call = None  # at a boundary: the first advance happens with everyone else's
        self.running.append(req)

    def _finish(self, req: Request, reason: str | None = None) -> None:
        if reason is not None:
            req.stats.finish_reason = reason
        req.finished = True
        req.stats.wall_s = time.perf_counter() - req.started if req.started else 0.0
        if req.gen is not None:
            req.gen.close()
        if req in self.running:
            self.running.remove(req)
            self.free.append(req.row)
            self.free.sort()
        req.call = None

    def _fail(self, req: Request, exc: Exception, updates: list[Update]) -> None:
        if not isinstance(exc, MtadError):
            log.error("request %s failed: %s: %s", req.id, type(exc).__name__, exc)
        req.error = exc
        self._finish(req, "error")
        updates.append(Update(req, None, True))

    # -- one iteration -------------------------------------------------------------------------
    def step(self) -> list[Update]:
        t0 = time.perf_counter()
        updates: list[Update] = []
        self.last = StepInfo(calls=[])
        for req in [r for r in self.waiting if r.cancelled.is_set()]:
            self.waiting.remove(req)
            self._dropped.append(req)
        for req in self._dropped:
            self._finish(req, "cancelled")
            updates.append(Update(req, None, True))
        self._dropped = []
        for req in [r for r in self.running if r.cancelled.is_set()]:
            self._finish(req, "cancelled")
            updates.append(Update(req, None, True))
        self.admit()
        if not self.running:
            return updates
        self.last.rows = len(self.running)
        if self.policy is not None:
            self.policy(self.running, self)
        for req in list(self.running):  # everyone at a boundary starts its next iteration
            if req.call is None:
                self._advance(req, None, updates)
        self._prefill_phase(updates)
        while self._phase("draft", prefill=False, updates=updates):
            pass
        self._phase("target", prefill=False, updates=updates)
        for req in list(self.running):
            self._collect(req, updates)
        if not self.running:
            for runner in self.runners.values():
                if runner is not None:
                    runner.reset()  # no sequence left: shrink back to the smallest bucket
        self.last.seconds = time.perf_counter() - t0
        return updates

    def _prefill_phase(self, updates: list[Update]) -> None:
        """One chunk per model, for as many newcomers (in arrival order) as the token budget allows."""
        budget = self.prefill_chunk
        chosen = []
        for req in self.running:
            call = req.call
            if call is not None and call.prefill and call.role == "target":
                if chosen and budget < len(call.tokens):
                    break
                chosen.append(req)
                budget -= len(call.tokens)
        self._run("target", chosen, "prefill", updates)
        self._run("draft", [r for r in self.running if r.call is not None and r.call.prefill
                            and r.call.role == "draft"], "prefill", updates)

    def _phase(self, role: str, prefill: bool, updates: list[Update]) -> bool:
        group = [r for r in self.running if r.call is not None and r.call.role == role and r.call.prefill == prefill]
        self._run(role, group, role, updates)
        return bool(group)

    def _run(self, role: str, group: list[Request], phase: str, updates: list[Update]) -> None:
        cap = self.runners[role].spec.max_seq_len if group else 0
        for req in list(group):  # a row that cannot fit fails alone, before the call
            row, call = req.state.row(role), req.call
            if max(row.n + len(call.tokens), call.slots) > cap:
                group.remove(req)
                self._fail(req, CapacityError(f"request needs more than the engine's {cap} KV slots"), updates)
        if not group:
            return
        t0 = time.perf_counter()
        try:
            logits = self.batchers[role].run([(r.state.row(role), r.call) for r in group])
        except Exception as e:  # noqa: BLE001 - a failed call ends its requests, not the server
            for req in group:
                self._fail(req, StepFailed(f"the {role} model's step failed: {type(e).__name__}: {e}"), updates)
            return
        dt = time.perf_counter() - t0
        width = max(len(r.call.tokens) for r in group)
        self.last.calls.append((role, phase, len(group), width, dt))
        calls_field, time_field = PHASE_FIELDS[phase]
        for req, lg in zip(group, logits, strict=True):
            st = req.stats
            setattr(st, calls_field, getattr(st, calls_field) + 1)
            setattr(st, time_field, getattr(st, time_field) + dt)
            self._advance(req, lg, updates)

    def _advance(self, req: Request, logits: np.ndarray | None, updates: list[Update]) -> None:
        try:
            req.call = req.gen.send(logits)
        except Exception as e:  # noqa: BLE001 - a decoder failure ends its request only
            self._fail(req, e, updates)

    def _collect(self, req: Request, updates: list[Update]) -> None:
        """Cut what the request emitted at its stop ids / max_new_tokens / stop strings; hand it out."""
        st, sp = req.stats, req.sampling
        chunk, req.state.emitted = req.state.emitted, []
        if not chunk:
            return
        stop_ids = set(sp.stop_token_ids) | (set() if sp.ignore_eos else self.eos_ids)
        out, done = [], False
        for tok in chunk:
            out.append(int(tok))
            if st.generated_tokens + len(out) >= sp.max_new_tokens:
                st.finish_reason, done = "length", True
            if int(tok) in stop_ids:
                st.finish_reason, done = "stop", True
            if done:
                break
        now = time.perf_counter()
        if st.generated_tokens == 0:
            st.ttft_s = now - req.started
        st.generated_tokens += len(out)
        st.wall_s = now - req.started
        req.output_ids += out
        text = req.detok.push(out)
        if req.detok.stopped:
            st.finish_reason, done = "stop", True
        elif done:
            text += req.detok.flush()
        if done:
            self._finish(req)
        updates.append(Update(req, Piece(out, text), done))
