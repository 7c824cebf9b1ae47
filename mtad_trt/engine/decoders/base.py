"""What every decoder shares: the call a decoder asks for, and the state it decodes in.

A decoder is a generator per request: it yields a `Call` (which tokens to feed to which model,
with which parents, cache ancestors and logits rows), is sent back that call's logits [K, V],
keeps the K/V rows it wants, and appends what it emits to `state.emitted`; it yields None at the
end of each iteration (the boundary where requests join, leave, and the speculation policy may
change γ and B). It never calls a model and never decides when to stop: the scheduler packs the calls of many requests into one model
call per phase, and scans every emitted token for stop ids and max_new_tokens. That is what lets
rows join and leave a running batch between iterations, and a caller cancel between them.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mtad_trt.backends.rows import Row
from mtad_trt.engine.logprobs import TokenLogprob, token_logprobs
from mtad_trt.engine.params import DecodeParams, SamplingParams
from mtad_trt.engine.stats import Stats


@dataclass
class Call:
    """One request's part of one model call (docs/graph-contract.md §3: every feed is a forest)."""

    role: str  # "target" | "draft"
    tokens: Sequence[int] | np.ndarray
    parents: Sequence[int] | None = None  # within-block parents (-1: child of the committed prefix)
    cache_ancestors: Sequence[Sequence[int]] | None = None  # extra visible scratch slots per root token
    logits_rows: Sequence[int] | None = None  # default: the last token
    slots: int = 0  # slots in use after this call's keep, when more than n + T (scratch slots)
    prefill: bool = False  # a prompt chunk: packed with other prefills, never with decode/verify

    @property
    def rows(self) -> list[int]:
        return [len(self.tokens) - 1] if self.logits_rows is None else list(self.logits_rows)


@dataclass
class DecodeState:
    """What one request decodes with: its rows on each model, settings, RNG and statistics.

    `gamma` / `beam_width` are this iteration's shape; the speculation policy may move them between
    iterations when the request did not fix them (0 = a plain target step, no speculation).
    """

    target: Row
    draft: Row | None
    prompt: list[int]
    sampling: SamplingParams
    decode: DecodeParams
    rng: np.random.Generator
    stats: Stats
    prefill_chunk: int = 256
    gamma: int = field(init=False)
    beam_width: int = field(init=False)
    cached: int = 0  # prompt tokens already in every row's cache (restored from the prefix cache)
    emitted: list[int] = field(default_factory=list)  # tokens emitted, not yet taken by the scheduler
    emitted_logprobs: list[TokenLogprob] = field(default_factory=list)  # theirs, when sampling.logprobs is set
    prompt_logprobs: list[TokenLogprob | None] | None = None  # set once the prefill is done, when asked
    last_accepted: int = 0  # drafted tokens the last round accepted (the speculation policy learns from it)

    def __post_init__(self) -> None:
        self.gamma = self.decode.gamma if self.decode.speculative else 0
        self.beam_width = self.decode.beam_width

    def emit(self, tokens: list[int], logits: Any, rows: Sequence[int]) -> None:
        """Hand out `tokens`, token i sampled from the target's logits row `rows[i]` (the rows
        give each token's log-probability when the request asked for them)."""
        self.emitted += tokens
        sp = self.sampling
        if sp.logprobs is not None:
            processed = sp if sp.logprobs_mode == "processed" else None
            self.emitted_logprobs += token_logprobs(logits, rows, tokens, sp.logprobs, processed)

    def row(self, role: str) -> Row:
        row = self.target if role == "target" else self.draft
        assert row is not None, f"no {role} row"
        return row


Decoder = Generator[Call | None, np.ndarray | None, None]
DecoderFn = Callable[[DecodeState], Decoder]


def prefill(state: DecodeState, roles: Sequence[str], tokens: Sequence[int],
            score: Sequence[int] | None = None) -> Decoder:
    """Feed `tokens` to each role as committed text, in chunks of `prefill_chunk` (prefill calls).

    Chunks alternate between the roles, so both caches advance together and a long prompt costs
    running rows one bounded chunk per scheduler step, not one long stall. With `score` (the
    tokens that follow each of `tokens`), the target's chunks return every row's logits and the
    log-probability of each next token is appended to `state.prompt_logprobs`.
    """
    c = max(1, state.prefill_chunk)
    for start in range(0, len(tokens), c):
        chunk = list(tokens[start : start + c])
        for role in roles:
            if score is not None and role == "target":
                logits = yield Call(role, chunk, prefill=True, logits_rows=range(len(chunk)))
                state.prompt_logprobs += token_logprobs(logits, range(len(chunk)), score[start : start + len(chunk)],
                                                        state.sampling.prompt_logprobs or 0)
            else:
                yield Call(role, chunk, prefill=True)
            state.row(role).commit_chain(len(chunk))


def prefill_prompt(state: DecodeState, roles: Sequence[str]) -> Decoder:
    """The prompt but its last token (whose logits start decoding), after what the prefix cache
    already restored into the rows (`state.cached`)."""
    tokens = state.prompt[state.cached : -1]
    if state.sampling.prompt_logprobs is None:
        yield from prefill(state, roles, tokens)
        return
    state.prompt_logprobs = [None]  # the first prompt token has no context (never restored from the cache)
    yield from prefill(state, roles, tokens, score=state.prompt[state.cached + 1 :])


def decode_prompt(state: DecodeState) -> Decoder:
    """No generation (max_new_tokens = 0): the prompt's prefill alone, for its log-probabilities."""
    state.stats.decoder = "ar"
    yield from prefill_prompt(state, ["target"])
    while True:
        yield None


def catch_up(state: DecodeState, pending: list[int], limit: int = 8) -> Decoder:
    """Commit all but the last of many pending draft tokens as prefill chunks (after plain steps
    while speculation was off), so the next draft call stays decode-sized."""
    if len(pending) > limit:
        yield from prefill(state, ["draft"], pending[:-1])
        del pending[:-1]


def count_accepted(state: DecodeState, n: int) -> None:
    """Book one round of depth state.gamma that accepted n drafted tokens."""
    state.last_accepted = n
    stats = state.stats
    stats.iterations += 1
    stats.draft_positions += state.gamma
    stats.gamma = max(stats.gamma, state.gamma)
    stats.accepted_tokens += n
    if len(stats.accepted_per_position) < n:
        stats.accepted_per_position += [0] * (n - len(stats.accepted_per_position))
    for i in range(n):
        stats.accepted_per_position[i] += 1
