"""Per-request statistics: what each decoder did, in the paper's vocabulary (docs/algorithm.md §2.4).

Shared by the Python API, the server's metrics, the bench and the CLI; computed properties
(acceptance rate, tokens per target call) are defined here once.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields


@dataclass
class Stats:
    decoder: str = "ar"
    gamma: int = 0  # the largest γ a round used (a speculation policy may vary it)
    beam_width: int = 0  # the largest B a round used
    target_calls: int = 0  # verify calls (plain steps for ar); prompt chunks are prefill_calls
    draft_calls: int = 0  # draft calls of the rounds (depth 0..γ-1)
    prefill_calls: int = 0  # prompt chunks fed to either model (and draft catch-up after plain steps)
    drafted_tokens: int = 0  # tokens put before the target for verification (B*γ for mmtad)
    accepted_tokens: int = 0
    iterations: int = 0  # draft+verify rounds
    draft_positions: int = 0  # Σ γ over the rounds (= iterations * γ when γ is fixed)
    plain_steps: int = 0  # target-only steps a speculative decoder took while the policy had γ = 0
    accepted_per_position: list[int] = field(default_factory=list)  # rounds that accepted >= i+1 tokens
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens restored from the prefix cache instead of prefilled
    generated_tokens: int = 0
    ttft_s: float = 0.0
    prefill_s: float = 0.0  # prompt chunks (both models)
    draft_s: float = 0.0
    verify_s: float = 0.0
    wall_s: float = 0.0
    finish_reason: str = ""  # "stop" (EOS/stop id/stop string) | "length" | "cancelled"

    @classmethod
    def total(cls, many: list[Stats]) -> Stats:
        """Counters and times summed over requests of one decoder (for aggregate rates)."""
        out = cls(decoder=many[0].decoder if many else "ar", gamma=many[0].gamma if many else 0,
                  beam_width=many[0].beam_width if many else 0)
        for name in ("target_calls", "draft_calls", "prefill_calls", "drafted_tokens", "accepted_tokens", "iterations",
                     "draft_positions", "plain_steps",
                     "prompt_tokens", "cached_tokens", "generated_tokens", "prefill_s", "draft_s", "verify_s", "wall_s"):
            setattr(out, name, sum(getattr(s, name) for s in many))
        width = max((len(s.accepted_per_position) for s in many), default=0)
        out.accepted_per_position = [sum(s.accepted_per_position[i] for s in many if i < len(s.accepted_per_position))
                                     for i in range(width)]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Stats:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def acceptance_rate(self) -> float:
        """Accepted / Σ_rounds γ: the paper's acc / (rounds * γ) when γ is fixed (not B*γ for MMTAD)."""
        positions = self.draft_positions or self.iterations * self.gamma
        return self.accepted_tokens / positions if positions else 0.0

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
