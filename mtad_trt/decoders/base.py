"""What every decoder shares: statistics, and the driver that turns a decoder into output.

A decoder is a generator over engine sequences that yields the tokens each iteration emits (one
for `ar`, n+1 for the speculative ones). It never decides when to stop: the driver scans every
emitted token for EOS / stop ids, truncates at max_new_tokens, and closes the generator. That
fixes the reference code's overshoot (spec/mtad.md §2.4) in one place for all decoders, and
lets a caller (the server) cancel between iterations just by closing the iterator.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from mtad_trt.params import DecodeParams, SamplingParams
from mtad_trt.sequence import Sequence


@dataclass
class Stats:
    decoder: str = "ar"
    gamma: int = 0
    beam_width: int = 0
    target_calls: int = 0  # including the prefill / first verify
    draft_calls: int = 0
    drafted_tokens: int = 0  # tokens put before the target for verification (B*γ for mmtad)
    accepted_tokens: int = 0
    iterations: int = 0  # draft+verify rounds
    accepted_per_position: list[int] = field(default_factory=list)  # rounds that accepted >= i+1 tokens
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0
    prefill_s: float = 0.0  # ar: the prompt step; speculative: first round's target call
    draft_s: float = 0.0
    verify_s: float = 0.0
    wall_s: float = 0.0
    finish_reason: str = ""  # "stop" (EOS/stop id/stop string) | "length" | "cancelled"

    @property
    def acceptance_rate(self) -> float:
        """Accepted / (rounds * γ), the paper's definition (not divided by B*γ for MMTAD)."""
        return self.accepted_tokens / (self.iterations * self.gamma) if self.iterations and self.gamma else 0.0

    @property
    def tokens_per_target_call(self) -> float:
        return self.generated_tokens / self.target_calls if self.target_calls else 0.0

    @property
    def other_s(self) -> float:
        return max(0.0, self.wall_s - self.prefill_s - self.draft_s - self.verify_s)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            acceptance_rate=self.acceptance_rate,
            tokens_per_target_call=self.tokens_per_target_call,
            other_s=self.other_s,
            tokens_per_s=self.tokens_per_s,
        )
        return d


class Timer:
    """Adds elapsed wall time to one Stats field: `with Timer(stats, "draft_s"): ...`."""

    __slots__ = ("stats", "field", "t0")

    def __init__(self, stats: Stats, field_name: str) -> None:
        self.stats, self.field = stats, field_name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc) -> None:
        setattr(self.stats, self.field, getattr(self.stats, self.field) + time.perf_counter() - self.t0)


DecoderFn = Callable[..., Iterator[list[int]]]


def drive(
    decoder: DecoderFn,
    target: Sequence,
    draft: Sequence | None,
    prompt: list[int],
    sp: SamplingParams,
    dp: DecodeParams,
    stats: Stats,
    stop_ids: set[int],
) -> Iterator[list[int]]:
    """Run a decoder; yield emitted token chunks, cut at the first stop id and at max_new_tokens.

    Stop ids are emitted (like an EOS in a chat transcript) but nothing after them.
    """
    rng = np.random.default_rng(sp.seed)
    t0 = time.perf_counter()
    stats.prompt_tokens = len(prompt)
    stats.finish_reason = "cancelled"
    gen = decoder(target, draft, list(prompt), sp, dp, stats, rng)
    try:
        for chunk in gen:
            if stats.generated_tokens == 0:
                stats.ttft_s = time.perf_counter() - t0
            out = []
            done = False
            for tok in chunk:
                out.append(int(tok))
                if stats.generated_tokens + len(out) >= sp.max_new_tokens:
                    stats.finish_reason, done = "length", True
                if int(tok) in stop_ids:
                    stats.finish_reason, done = "stop", True
                if done:
                    break
            stats.generated_tokens += len(out)
            stats.wall_s = time.perf_counter() - t0
            yield out
            if done:
                return
    finally:
        gen.close()
        stats.wall_s = time.perf_counter() - t0
