"""Continuous batching: requests join and leave a running batch at iteration boundaries.

One `step()` is one iteration for every running request:

1. cancelled requests leave; waiting requests take free rows (FIFO, lowest row first); the
   speculation policy sets this iteration's γ and B for the requests that did not fix them;
2. prefill: one bounded chunk of newcomers' prompts, packed into one call per model (at most
   `prefill_chunk` prompt tokens in all), apart from decode shapes. A newcomer begins only when
   its first chunk fits this budget, and takes what the prefix cache holds of its prompt right
   then (so a prompt queued behind another with the same prefix reuses its blocks); each chunk's
   full prompt blocks go into the prefix cache as soon as they are computed;
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
from dataclasses import dataclass, field

import numpy as np

from mtad_trt.backends.rows import Row
from mtad_trt.backends.runner import ModelRunner
from mtad_trt.engine.batch import Batcher
from mtad_trt.engine.decoders import DECODER_FNS, DecodeState, decode_prompt
from mtad_trt.engine.prefix_cache import PrefixCache
from mtad_trt.engine.request import Detokenizer, Piece, Request
from mtad_trt.errors import CapacityError, MtadError, StepFailed

log = logging.getLogger("mtad_trt.engine.scheduler")

SCORED_CHUNK = 64  # prefill chunk of a request that wants prompt log-probs: logits [rows, 64, V] per call
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
    started: list[Request] = field(default_factory=list)  # requests that got a row in this step


@dataclass
class Iteration:
    """One pass of the driver loop: who started, and what the step did to each request."""

    started: list[Request]
    updates: list[Update]


# The speculation policy: sees the running requests and what the previous step did (its calls).
Policy = Callable[[list[Request], StepInfo], None]


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
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        if max_batch < 1:
            raise MtadError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk < 1:
            raise MtadError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.runners = {"target": target, "draft": draft}
        self.batchers = {role: Batcher(r, max_batch) for role, r in self.runners.items() if r is not None}
        self.tokenizer, self.eos_ids = tokenizer, set(eos_ids)
        self.max_batch, self.prefill_chunk, self.policy = max_batch, prefill_chunk, policy
        self.prefix_cache = prefix_cache
        self.free = list(range(max_batch))
        self._waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._dropped: list[Request] = []  # cancelled before they started: reported by the next step
        self.last = StepInfo()

    # -- requests ------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        if req.decode.speculative and self.runners["draft"] is None and req.sampling.max_new_tokens > 0:
            raise MtadError(f"decoder '{req.decode.decoder}' needs a draft model; none is loaded", param="decoder")
        self._waiting.append(req)

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self.running or self._dropped)

    @property
    def queued(self) -> int:
        """Requests added but not yet given a row."""
        return len(self._waiting)

    def drop_waiting(self) -> list[Request]:
        """Take every request that has no row yet out of the queue (a server shutting down)."""
        dropped = list(self._waiting)
        self._waiting.clear()
        return dropped

    def iterate(self, incoming: list[Request] = (), admitted: Callable[[list[Request]], None] | None = None
                ) -> Iteration:
        """The one driver loop body: add `incoming`, give free rows to waiting requests (telling
        `admitted` before the step runs, so a front end's gauges are right during it), step."""
        for req in incoming:
            self.add(req)
        started = self.admit()
        if admitted is not None and started:
            admitted(started)
        updates = self.step()
        return Iteration(started + self.last.started, updates)

    def admit(self) -> list[Request]:
        """Waiting requests take free rows (FIFO, lowest row first); returns those that started."""
        started = []
        while self._waiting and self.free:
            req = self._waiting.popleft()
            if req.cancelled.is_set():
                self._dropped.append(req)  # the next step reports it
                continue
            self._start(req)
            started.append(req)
        return started

    def abort(self, req: Request) -> None:
        """End a request now (its caller went away); the caller must be the thread that steps."""
        if req in self._waiting:
            self._waiting.remove(req)
        if not req.finished:
            self._finish(req, "cancelled")

    def _start(self, req: Request) -> None:
        req.row = self.free.pop(0)
        req.started = time.perf_counter()
        target = Row(self.runners["target"], req.row)
        draft = Row(self.runners["draft"], req.row) if req.decode.speculative and req.sampling.max_new_tokens else None
        # a prompt-scoring request's chunks return every row's logits: smaller chunks bound that buffer
        chunk = self.prefill_chunk if req.sampling.prompt_logprobs is None else min(self.prefill_chunk, SCORED_CHUNK)
        req.state = DecodeState(target, draft, list(req.prompt_ids), req.sampling, req.decode, req.new_rng(),
                                req.stats, chunk)
        req.stats.prompt_tokens = len(req.prompt_ids)
        req.stats.finish_reason = "cancelled"
        req.stats.accepted_per_position = [0] * req.state.gamma
        req.detok = Detokenizer(self.tokenizer, req.sampling.stop)
        scoring_only = req.sampling.max_new_tokens == 0
        req.gen = (decode_prompt if scoring_only else DECODER_FNS[req.decode.decoder])(req.state)
        req.call = None
        req.fresh = True  # its first advance waits for prefill budget (see _prefill_phase)
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
        previous, self.last = self.last, StepInfo(calls=[])
        for req in [r for r in self._waiting if r.cancelled.is_set()]:
            self._waiting.remove(req)
            self._dropped.append(req)
        for req in self._dropped:
            self._finish(req, "cancelled")
            updates.append(Update(req, None, True))
        self._dropped = []
        for req in [r for r in self.running if r.cancelled.is_set()]:
            self._finish(req, "cancelled")
            updates.append(Update(req, None, True))
        self.last.started = self.admit()
        if not self.running:
            return updates
        self.last.rows = len(self.running)
        if self.policy is not None:
            self.policy(self.running, previous)
        for req in list(self.running):  # everyone at a boundary starts its next iteration
            if req.call is None and not req.fresh:
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
        else:
            self._shrink()
        self.last.seconds = time.perf_counter() - t0
        return updates

    def _shrink(self) -> None:
        """At the boundary every row holds only committed tokens: a runner whose rows all fit in
        half of a smaller bucket moves down to it (the next steps read fewer slots; see
        `SlotCache.shrink`). Half, so a row that grows by a step or two does not bounce back."""
        for role, runner in self.runners.items():
            if runner is None:
                continue
            used = max((r.state.row(role).n for r in self.running
                        if role == "target" or r.state.draft is not None), default=0)
            if 2 * used < runner.bucket:  # else no smaller bucket can hold it: nothing to do this step
                runner.shrink(2 * used)

    def _prefill_phase(self, updates: list[Update]) -> None:
        """One chunk per model, for as many newcomers (in arrival order) as the token budget allows."""
        budget = self.prefill_chunk
        chosen = []
        for req in list(self.running):
            if req.fresh:
                first = self._begin(req)
                if first and self._prefix_in_flight(req):
                    continue  # another row is computing blocks of this prompt: take them when stored
                if first and chosen and budget < first:
                    break  # begins next iteration, with whatever the cache holds by then
                req.fresh = False
                self._book_lookup(req)
                self._advance(req, None, updates)
            call = req.call
            if call is not None and call.prefill and call.role == "target":
                if chosen and budget < len(call.tokens):
                    break
                chosen.append(req)
                budget -= len(call.tokens)
        self._run("target", chosen, "prefill", updates)
        drafts = [r for r in self.running if r.call is not None and r.call.prefill and r.call.role == "draft"]
        self._run("draft", drafts, "prefill", updates)
        if self.prefix_cache is not None:
            for req in {id(r): r for r in chosen + drafts}.values():
                for role in ("target", "draft"):
                    row = req.state.target if role == "target" else req.state.draft
                    if row is not None and not req.finished:
                        self.prefix_cache.store(req.prompt_ids, role, row)

    def _begin(self, req: Request) -> int:
        """Restore the cached prefix of a newcomer's prompt into its rows; return the size of its
        first prefill chunk (0 when nothing is left to prefill)."""
        st = req.state
        if self.prefix_cache is not None and req.sampling.prompt_logprobs is None:  # scoring needs every row
            rows = {"target": st.target, **({"draft": st.draft} if st.draft is not None else {})}
            st.cached = self.prefix_cache.restore(req.prompt_ids, rows)
        return min(st.prefill_chunk, max(0, len(req.prompt_ids) - 1 - st.cached))

    def _phase(self, role: str, prefill: bool, updates: list[Update]) -> bool:
        group = [r for r in self.running if r.call is not None and r.call.role == role and r.call.prefill == prefill]
        self._run(role, group, role, updates)
        return bool(group)

    def _run(self, role: str, group: list[Request], phase: str, updates: list[Update]) -> None:
        for req in list(group):  # a row that cannot fit fails alone, before the call
            try:
                req.state.row(role).fits(len(req.call.tokens), req.call.slots)
            except CapacityError as e:
                group.remove(req)
                self._fail(req, e, updates)
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

    def _prefix_in_flight(self, req: Request) -> bool:
        """Whether a running request is still prefilling full blocks this prompt shares with it
        (n choices of one prompt, identical prompts in one burst): this one waits for them to be
        stored rather than compute them a second time in the same call."""
        if self.prefix_cache is None or req.sampling.prompt_logprobs is not None:
            return False
        b, have, mine = self.prefix_cache.block_size, req.state.cached, np.asarray(req.prompt_ids[:-1])
        for other in self.running:
            if other is req or other.fresh or other.finished or other.state is None:
                continue
            theirs = np.asarray(other.prompt_ids[:-1])
            if other.state.target.n >= len(theirs):
                continue  # its prefill is done: whatever it shares is stored already
            m = min(len(mine), len(theirs))
            diff = np.flatnonzero(mine[:m] != theirs[:m])
            shared = (int(diff[0]) if diff.size else m) // b * b
            if shared > have:
                return True
        return False

    def _book_lookup(self, req: Request) -> None:
        req.stats.cached_tokens = req.state.cached
        if self.prefix_cache is not None:
            self.prefix_cache.count(len(req.prompt_ids), req.state.cached)

    def _advance(self, req: Request, logits: np.ndarray | None, updates: list[Update]) -> None:
        try:
            req.call = req.gen.send(logits)
        except Exception as e:  # noqa: BLE001 - a decoder failure ends its request only
            self._fail(req, e, updates)

    def _collect(self, req: Request, updates: list[Update]) -> None:
        """Cut what the request emitted at its stop ids / max_new_tokens / stop strings; hand it out."""
        st, sp = req.stats, req.sampling
        if sp.max_new_tokens == 0:  # scoring only: done once the prefill is (the decoder idles after it)
            if req.call is None and not req.fresh:
                st.finish_reason = "length"
                self._finish(req)
                updates.append(Update(req, Piece([], ""), True))
            return
        chunk, req.state.emitted = req.state.emitted, []
        lps, req.state.emitted_logprobs = req.state.emitted_logprobs, []
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
        if sp.logprobs is not None:
            req.output_logprobs += lps[: len(out)]
        text = req.detok.push(out)
        if req.detok.stopped:
            st.finish_reason, done = "stop", True
        elif done:
            text += req.detok.flush()
        if done:
            self._finish(req)
        updates.append(Update(req, Piece(out, text, lps[: len(out)] if sp.logprobs is not None else None), done))
