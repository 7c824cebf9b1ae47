"""Per-request settings: how to sample, and which decoder with which shape.

Defaults follow the MTAD paper's setup (spec/mtad.md §5): temperature 1, top-k 10, top-p 0.9,
applied identically to draft and target; γ=4, B=4, τ=0.5.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mtad_trt.errors import MtadError

DECODERS = ("ar", "sps", "mtad", "mmtad")


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy (one-hot distributions everywhere)
    top_k: int = 10  # 0 = off
    top_p: float = 0.9  # 1 = off
    seed: int | None = None
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's EOS ids
    stop: tuple[str, ...] = ()  # stop strings; the output is cut before the first match
    ignore_eos: bool = False

    def validate(self) -> None:
        if self.temperature < 0:
            raise MtadError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise MtadError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise MtadError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise MtadError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class DecodeParams:
    decoder: str = "mtad"
    gamma: int = 4  # draft depth γ
    beam_width: int = 4  # B (MTAD/MMTAD); sps drafts one chain
    threshold: float = 0.5  # τ: accept prefix i when p(x_1..i) > τ q(x_1..i)
    reference: str = "ancestor"  # MMTAD reference draft score: ancestor (intended) | column (repo v2 quirk)
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.decoder not in DECODERS:
            raise MtadError(f"unknown decoder '{self.decoder}' (choose from {', '.join(DECODERS)})")
        if self.gamma < 1:
            raise MtadError(f"gamma must be >= 1, got {self.gamma}")
        if self.beam_width < 1:
            raise MtadError(f"beam_width must be >= 1, got {self.beam_width}")
        if not self.threshold > 0:
            raise MtadError(f"threshold τ must be > 0, got {self.threshold}")
        if self.reference not in ("ancestor", "column"):
            raise MtadError(f"reference must be 'ancestor' or 'column', got '{self.reference}'")
