"""Benchmark metrics as pure functions: percentiles, pass@k, latency and energy ratios.

Why a separate module: every number in a report should come from one definition that a test pins
with hand-computed values, so that `bench`, the server and notebooks cannot drift apart. Nothing
here touches a model, a device or the clock.

Definitions follow docs/algorithm.md §2.4 / §6.1 (perplexity, J/token) and the MLPerf vocabulary in
reference.md (TTFT, TPOT, end-to-end latency, output tokens/s at p50/p90/p99).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from mtad_trt.errors import MtadError

DEFAULT_PERCENTILES: tuple[float, ...] = (50, 90, 99)



# --------------------------------------------------------------------------------------------
# Percentiles and summaries
# --------------------------------------------------------------------------------------------


def _finite_array(values: Iterable[float], what: str) -> np.ndarray:
    a = np.asarray(list(values), dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise MtadError(f"{what}: no values")
    if not np.isfinite(a).all():
        raise MtadError(f"{what}: values must be finite (got NaN or inf)")
    return a


def _pkey(q: float) -> str:
    return f"p{q:g}"


def percentiles(values: Iterable[float], qs: Sequence[float] = DEFAULT_PERCENTILES) -> dict[str, float]:
    """Percentiles keyed "p50", "p90", "p99" (keys follow `qs`, e.g. "p99.9").

    Uses numpy's default linear interpolation between closest ranks (Hyndman & Fan type 7), the
    same as vLLM's and most benchmark scripts' reports, so small-sample p99s are comparable.
    """
    a = _finite_array(values, "percentiles")
    for q in qs:
        if not 0 <= q <= 100:
            raise MtadError(f"percentile must be in [0, 100], got {q}")
    return {_pkey(q): float(np.percentile(a, q)) for q in qs}


def describe(values: Iterable[float], qs: Sequence[float] = DEFAULT_PERCENTILES) -> dict[str, float]:
    """count, mean, min, max and the requested percentiles of `values` (JSON-ready)."""
    a = _finite_array(values, "describe")
    out: dict[str, float] = {
        "count": int(a.size),
        "mean": float(a.mean()),
        "min": float(a.min()),
        "max": float(a.max()),
    }
    out.update(percentiles(a, qs))
    return out


# --------------------------------------------------------------------------------------------
# pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code")
# --------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: 1 - C(n-c, k) / C(n, k).

    n samples were drawn, c of them passed. Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), the
    HumanEval paper's numerically stable form (no huge binomials).
    """
    if n < 1:
        raise MtadError(f"pass@k: n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise MtadError(f"pass@k: c must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise MtadError(f"pass@k: k must be in [1, n={n}], got {k} (draw at least k samples per problem)")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int = 1) -> float:
    """Mean pass@k over problems, from (n, c) pairs: the benchmark-level score."""
    vals = [pass_at_k(n, c, k) for n, c in counts]
    if not vals:
        raise MtadError("pass@k: no problems")
    return float(np.mean(vals))


def pass_at_k_from_outcomes(
    outcomes: Mapping[Any, Sequence[bool]] | Sequence[Sequence[bool]], k: int = 1
) -> float:
    """Mean pass@k from per-problem lists of pass/fail booleans (one list per task_id)."""
    groups = outcomes.values() if isinstance(outcomes, Mapping) else outcomes
    return mean_pass_at_k(((len(g), sum(bool(x) for x in g)) for g in groups), k)


def pass_at_1(outcomes: Mapping[Any, Sequence[bool]] | Sequence[Sequence[bool]]) -> float:
    """Aggregate pass@1: with one sample per problem this is simply the fraction that passed."""
    return pass_at_k_from_outcomes(outcomes, 1)


# --------------------------------------------------------------------------------------------
# Latency (MLPerf vocabulary)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestTiming:
    """One request's timing. ttft_s: request start -> first output token; e2e_s: start -> last."""

    ttft_s: float
    e2e_s: float
    output_tokens: int

    @classmethod
    def from_token_times(cls, start: float, token_times: Sequence[float]) -> RequestTiming:
        """Build from the clock value at request start and the arrival time of every output token.

        Speculative decoders emit several tokens at once; give each of them the same time.
        """
        if len(token_times) == 0:
            raise MtadError("RequestTiming: no output tokens")
        return cls(
            ttft_s=token_times[0] - start, e2e_s=token_times[-1] - start, output_tokens=len(token_times)
        )

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (tokens - 1); None for 1 token."""
        if self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(frozen=True)
class LatencySummary:
    """describe() of each latency metric over requests (None where no request defines it)."""

    requests: int
    output_tokens: int
    ttft_s: dict[str, float]
    tpot_s: dict[str, float] | None
    e2e_s: dict[str, float]
    output_tokens_per_s: dict[str, float] | None  # per request: output_tokens / e2e_s

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize_latencies(
    timings: Iterable[RequestTiming], qs: Sequence[float] = DEFAULT_PERCENTILES
) -> LatencySummary:
    """TTFT / TPOT / end-to-end / per-request output tokens/s statistics (mean, min, max, p50/p90/p99).

    TPOT is the MLPerf/vLLM one: per request (e2e - TTFT) / (output_tokens - 1), so the prefill
    is not smeared over the decode; requests with a single token have no TPOT.
    """
    ts = list(timings)
    if not ts:
        raise MtadError("summarize_latencies: no requests")
    for i, t in enumerate(ts):
        if t.output_tokens < 1:
            raise MtadError(f"summarize_latencies: request {i} has no output tokens")
        if t.ttft_s < 0 or t.e2e_s < t.ttft_s:
            raise MtadError(f"summarize_latencies: request {i} needs 0 <= ttft_s <= e2e_s, got {t}")
    tpots = [t.tpot_s for t in ts if t.tpot_s is not None]
    rates = [t.output_tokens / t.e2e_s for t in ts if t.e2e_s > 0]
    return LatencySummary(
        requests=len(ts),
        output_tokens=sum(t.output_tokens for t in ts),
        ttft_s=describe([t.ttft_s for t in ts], qs),
        tpot_s=describe(tpots, qs) if tpots else None,
        e2e_s=describe([t.e2e_s for t in ts], qs),
        output_tokens_per_s=describe(rates, qs) if rates else None,
    )


# MLPerf Inference Llama-3.1-8B latency constraints (reference.md), checked at the 99th percentile.
MLPERF_LIMITS: dict[str, dict[str, float]] = {
    "server": {"ttft_s": 2.0, "tpot_s": 0.100},
    "interactive": {"ttft_s": 0.5, "tpot_s": 0.030},
}


def within_mlperf_limits(summary: LatencySummary, scenario: str = "server") -> dict[str, bool]:
    """Whether p99 TTFT and p99 TPOT meet an MLPerf scenario's limits ({"ttft_s": ok, "tpot_s": ok})."""
    if scenario not in MLPERF_LIMITS:
        raise MtadError(f"unknown MLPerf scenario {scenario!r}; choose one of {sorted(MLPERF_LIMITS)}")
    lim = MLPERF_LIMITS[scenario]
    ok_tpot = summary.tpot_s is None or summary.tpot_s["p99"] <= lim["tpot_s"]
    return {"ttft_s": summary.ttft_s["p99"] <= lim["ttft_s"], "tpot_s": ok_tpot}


# --------------------------------------------------------------------------------------------
# Energy ratios
# --------------------------------------------------------------------------------------------


class _HasJoules(Protocol):
    @property
    def joules(self) -> float | None: ...


def _joules_of(reading: _HasJoules | float | None) -> float | None:
    if reading is None or isinstance(reading, (int, float)):
        return None if reading is None else float(reading)
    return reading.joules


def joules_per_token(reading: _HasJoules | float | None, tokens: int) -> float | None:
    """Energy per output token (J/token). `reading` is an EnergyReading or a number of joules.

    Returns None when the energy is unknown (a NullMeter's reading), so reports can print "n/a"
    instead of a made-up number. Use the count of tokens actually emitted: the spec's
    energy/(acc + iters) (§2.4) equals it only when no EOS/max_new_tokens truncation happened.
    """
    if tokens < 1:
        raise MtadError(f"joules_per_token: need at least one token, got {tokens}")
    joules = _joules_of(reading)
    return None if joules is None else joules / tokens


def tokens_per_joule(reading: _HasJoules | float | None, tokens: int) -> float | None:
    """Output tokens per joule (the unit of the published Jetson reference, e.g. 22.6 tok/J)."""
    if tokens < 1:
        raise MtadError(f"tokens_per_joule: need at least one token, got {tokens}")
    joules = _joules_of(reading)
    if joules is None:
        return None
    if joules <= 0:
        raise MtadError(f"tokens_per_joule: energy must be > 0 J, got {joules}")
    return tokens / joules


def decode_joules_per_token(
    total: _HasJoules | float | None, prefill: _HasJoules | float | None, output_tokens: int
) -> float | None:
    """Decode-only J/token: (E_total - E_prefill) / (output_tokens - 1).

    The first output token comes out of the prefill, so the decode phase produced the other
    output_tokens - 1. `prefill` is the energy up to the first token (e.g. `meter.read()` taken
    when it arrived). None when either energy is unknown.
    """
    if output_tokens < 2:
        raise MtadError(f"decode_joules_per_token: need at least two output tokens, got {output_tokens}")
    e_total, e_prefill = _joules_of(total), _joules_of(prefill)
    if e_total is None or e_prefill is None:
        return None
    return (e_total - e_prefill) / (output_tokens - 1)
