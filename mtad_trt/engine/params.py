"""Per-request settings: how to sample, and which decoder with which shape.

The defaults here are the only ones: the CLI options, the server and the bench read them from
these dataclasses. They follow the MTAD paper's setup (docs/algorithm.md §5): temperature 1, top-k 10,
top-p 0.9, applied identically to draft and target; γ=4, B=4, τ=0.5.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from mtad_trt.errors import MtadError

DECODERS = ("ar", "sps", "mtad", "mmtad")


MAX_LOGPROBS = 20  # the most alternatives per token a request may ask for (vLLM's default limit)
LOGPROBS_MODES = ("raw", "processed")  # engine/logprobs.py: before, or after, temperature / top-k / top-p


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
    logprobs: int | None = None  # k: each generated token's log-probability and the k most likely (0..MAX_LOGPROBS)
    prompt_logprobs: int | None = None  # k for every prompt token but the first (computed in the prefill)
    logprobs_mode: str = "raw"  # generated tokens' log-probs: raw target logits, or the processed distribution

    def validate(self) -> None:
        if self.temperature < 0:
            raise MtadError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise MtadError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise MtadError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise MtadError(f"logprobs_mode must be one of {', '.join(LOGPROBS_MODES)}, got {self.logprobs_mode!r}",
                            param="logprobs_mode")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise MtadError(f"{name} must be between 0 and {MAX_LOGPROBS}, got {k}", param=name)
        if self.max_new_tokens < (0 if self.prompt_logprobs is not None else 1):
            raise MtadError(f"max_new_tokens must be >= 1 (0 only when scoring the prompt), got {self.max_new_tokens}",
                            param="max_new_tokens")


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

    @property
    def speculative(self) -> bool:
        return self.decoder != "ar"

    @property
    def scratch_slots(self) -> int:
        """KV slots a round may need beyond the committed text: at most B·γ drafted nodes (a bound
        for every speculative decoder) and the pending bonus token. The one formula for fitting a request."""
        return self.gamma * self.beam_width + 1 if self.speculative else 0


SAMPLING_FIELDS = frozenset(f.name for f in fields(SamplingParams))
DECODE_FIELDS = frozenset(f.name for f in fields(DecodeParams))
DEFAULTS: dict[str, Any] = {**vars(SamplingParams()), **vars(DecodeParams())}  # for CLI help and docs


def split_settings(settings: dict[str, Any]) -> tuple[SamplingParams, DecodeParams]:
    """Keyword settings -> validated (SamplingParams, DecodeParams); unknown names are refused."""
    unknown = set(settings) - SAMPLING_FIELDS - DECODE_FIELDS
    if unknown:
        raise MtadError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    sp = SamplingParams(**{k: v for k, v in settings.items() if k in SAMPLING_FIELDS})
    dp = DecodeParams(**{k: v for k, v in settings.items() if k in DECODE_FIELDS})
    sp.stop_token_ids = tuple(sp.stop_token_ids)
    sp.stop = tuple([sp.stop] if isinstance(sp.stop, str) else sp.stop)
    sp.validate()
    dp.validate()
    return sp, dp


def settings_dict(sp: SamplingParams, dp: DecodeParams) -> dict[str, Any]:
    """Both settings objects as one flat dict (what a response reports as used)."""
    d = {f.name: getattr(sp, f.name) for f in fields(sp)}
    d.update({f.name: getattr(dp, f.name) for f in fields(dp) if f.name != "extra"})
    return d
