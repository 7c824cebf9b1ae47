"""A request: what was asked (prompt, settings), and everything it owns while it runs.

Each request owns its RNG (so a fixed seed gives the same output whatever runs beside it), its
statistics, its decoder state machine and its detokenizer. The scheduler gives it a batch row
while it runs and takes the row back when it finishes.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mtad_trt.engine.decoders.base import Call, Decoder, DecodeState
from mtad_trt.engine.logprobs import TokenLogprob
from mtad_trt.engine.params import DecodeParams, SamplingParams, settings_dict
from mtad_trt.engine.stats import Stats

_ids = itertools.count()


@dataclass
class Piece:
    """One streamed increment: new token ids and the text they complete."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked for them


def join_pieces(pieces: list[Piece]) -> Piece:
    """Several pieces as one (what a non-streaming caller gets at the end)."""
    lps = None if any(p.logprobs is None for p in pieces) else [lp for p in pieces for lp in p.logprobs]
    return Piece([t for p in pieces for t in p.token_ids], "".join(p.text for p in pieces), lps)


class Detokenizer:
    """Incremental text of a growing token list, cut before the first stop string.

    Text is handed out only when it is final: characters that might still become the start of a
    stop string are held back, and so is an incomplete UTF-8 sequence (decoded as U+FFFD).
    """

    def __init__(self, tokenizer, stops: tuple[str, ...]) -> None:
        self.tokenizer, self.stops = tokenizer, tuple(s for s in stops if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0
        self.parts: list[str] = []  # the text handed out so far
        self.stopped = False  # a stop string appeared: the text ends before it

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, ids: list[int]) -> str:
        """Add tokens; return the text that became final."""
        self.ids.extend(ids)
        text = self._text()
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._take(text, min(hits))
        safe = len(text) - self.hold if self.stops else len(text)
        if text.endswith("\ufffd"):  # wait for the sequence's other bytes
            safe = min(safe, len(text) - 1)
        return self._take(text, safe)

    def flush(self) -> str:
        """The rest of the text, once no more tokens come (not after a stop string)."""
        return "" if self.stopped else self._take(self._text(), None)

    def _take(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        if end <= self.sent:
            return ""
        out, self.sent = text[self.sent : end], end
        self.parts.append(out)
        return out

    @property
    def text(self) -> str:
        return "".join(self.parts)


@dataclass(eq=False)
class Request:
    """A request whose settings were validated and fitted (`Pipeline.prepare`)."""

    prompt_ids: list[int]
    sampling: SamplingParams
    decode: DecodeParams
    fixed: frozenset[str] = frozenset()  # settings the caller gave: the speculation policy leaves them
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    stats: Stats = field(default_factory=Stats)
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # set while it runs (the scheduler's)
    started: float = 0.0
    row: int | None = None
    state: DecodeState | None = None
    gen: Decoder | None = None
    call: Call | None = None
    fresh: bool = False  # has a row but has not begun: the prefix cache is looked up when its prefill can run
    detok: Detokenizer | None = None
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output id, when asked
    finished: bool = False
    error: Exception | None = None

    @property
    def settings(self) -> dict[str, Any]:
        return settings_dict(self.sampling, self.decode)

    @property
    def prompt_logprobs(self) -> list[TokenLogprob | None] | None:
        """Every prompt token's log-probability (the first None), once the prefill is done, when
        the request asked for them (`prompt_logprobs`); else None."""
        return self.state.prompt_logprobs if self.state is not None else None

    @property
    def queue_s(self) -> float:
        return max(0.0, self.started - self.arrived) if self.started else 0.0

    def new_rng(self) -> np.random.Generator:
        return np.random.default_rng(self.sampling.seed)
