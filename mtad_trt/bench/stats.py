"""Paired statistics for the bench report: intervals that say how much of a difference is noise.

Pure functions over per-record numbers (no model, no clock); `tests/test_bench_stats.py` pins them
with hand-computed values.

- Records are keyed by (prompt, seed). A comparison of decoder d with a base (`ar`) pairs the
  records of the same (prompt, seed), averages the paired differences over the seeds of each
  prompt, and bootstraps over prompts (a cluster bootstrap: the seeds of one prompt share its
  difficulty, so they are not independent samples). With one seed per prompt this is the usual
  paired bootstrap.
- Perplexity is the paper's: exp(-mean over samples of the per-sample mean log-prob), so the
  difference of mean log-probs δ = m_d - m_ar gives the perplexity ratio PPL_d / PPL_ar = exp(-δ)
  exactly (with every pair present) and its interval by the same transform.
- Intervals are percentile bootstrap intervals from `n_boot` resamples drawn by
  `numpy.random.default_rng(seed)` (reproducible), and Wilson score intervals for pass rates.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from mtad_trt.errors import MtadError

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
N_BOOT = 10_000
LEVEL = 0.95

Key = tuple[str, int]  # (prompt id, seed)


# ---------------------------------------------------------------------------------- primitives


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (successes / n)."""
    if n < 1:
        raise MtadError(f"wilson: need at least one trial, got n={n}")
    if not 0 <= successes <= n:
        raise MtadError(f"wilson: successes must be in [0, {n}], got {successes}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def boot_indices(n: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """[n_boot, n] indices drawn with replacement: the resamples every bootstrap here uses."""
    if n < 1:
        raise MtadError("bootstrap: no values")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _bounds(dist: np.ndarray, level: float) -> tuple[float, float]:
    a = (1 - level) / 2
    lo, hi = np.quantile(dist, [a, 1 - a])
    return float(lo), float(hi)


def bootstrap_mean(values: Sequence[float], level: float = LEVEL, n_boot: int = N_BOOT,
                   seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values`."""
    v = np.asarray(values, dtype=np.float64)
    return _bounds(v[boot_indices(v.size, n_boot, seed)].mean(axis=1), level)


def bootstrap_ratio(num: Sequence[float], den: Sequence[float], level: float = LEVEL, n_boot: int = N_BOOT,
                    seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of Σnum / Σden, resampling (num, den) pairs together."""
    a, b = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if a.shape != b.shape:
        raise MtadError("bootstrap_ratio: num and den differ in length")
    idx = boot_indices(a.size, n_boot, seed)
    sums = b[idx].sum(axis=1)
    return _bounds(np.divide(a[idx].sum(axis=1), sums, out=np.zeros_like(sums), where=sums > 0), level)


def quartiles(values: Iterable[float]) -> tuple[float, float, float]:
    """(p25, median, p75), numpy's linear interpolation."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        raise MtadError("quartiles: no values")
    p25, p50, p75 = np.percentile(v, [25, 50, 75])
    return float(p25), float(p50), float(p75)


def interval(estimate: float, lo: float, hi: float, n: int, **extra: Any) -> dict:
    return {"estimate": estimate, "lo": lo, "hi": hi, "n": n, **extra}


# ------------------------------------------------------------------------------------ pairing


def paired_by_prompt(values: Mapping[Key, float], base: Mapping[Key, float]) -> dict[str, float]:
    """Per prompt: the mean over its seeds of values[k] - base[k], for the keys both have."""
    per: dict[str, list[float]] = defaultdict(list)
    for key in sorted(set(values) & set(base)):
        per[key[0]].append(values[key] - base[key])
    return {p: float(np.mean(d)) for p, d in per.items()}


def paired_difference(values: Mapping[Key, float], base: Mapping[Key, float], level: float = LEVEL,
                      n_boot: int = N_BOOT, seed: int = 0) -> dict | None:
    """Mean paired difference (values - base) over prompts, with a cluster-bootstrap interval."""
    per = paired_by_prompt(values, base)
    if not per:
        return None
    d = np.array([per[p] for p in sorted(per)])
    lo, hi = bootstrap_mean(d, level, n_boot, seed)
    pairs = len(set(values) & set(base))
    return interval(float(d.mean()), lo, hi, len(d), pairs=pairs, covers_zero=bool(lo <= 0 <= hi))


# -------------------------------------------------------------------------------- perplexity


def perplexity_vs_base(logprob: Mapping[Key, float], base: Mapping[Key, float], level: float = LEVEL,
                       n_boot: int = N_BOOT, seed: int = 0) -> dict | None:
    """The paired perplexity comparison of a decoder with the base decoder.

    `logprob` / `base` map (prompt, seed) to the per-sample mean log-prob under the target. Returns
    the mean log-prob difference δ (d - base; > 0: d's outputs are likelier) with its interval,
    the perplexity ratio exp(-δ) with its interval, and whether δ's interval covers 0.
    """
    diff = paired_difference(logprob, base, level, n_boot, seed)
    if diff is None:
        return None
    ratio = interval(math.exp(-diff["estimate"]), math.exp(-diff["hi"]), math.exp(-diff["lo"]), diff["n"])
    return {"delta_mean_logprob": diff, "ppl_ratio": ratio, "covers_zero": diff["covers_zero"],
            "prompts": diff["n"], "pairs": diff["pairs"]}


FEW_PROMPTS = 20  # below this a percentile bootstrap over prompts tends to be too narrow (undercovers)


def control_check(comparisons: Mapping[str, dict | None], control: str = "sps", level: float = LEVEL) -> dict:
    """The lossless control: `sps` samples the target's own distribution, so its perplexity
    difference to `ar` must be noise, and its interval must cover 0 (it fails by chance in
    1 - level of honest runs; more often means a bug or a biased set-up)."""
    comp = comparisons.get(control)
    if comp is None:
        return {"decoder": control, "ok": None, "message": f"no `{control}` run: the lossless control is missing"}
    d = comp["delta_mean_logprob"]
    span = f"{d['estimate']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"
    few = (f" (only {d['n']} prompts: with fewer than {FEW_PROMPTS} the bootstrap interval tends to be too narrow, "
           "so this check means little)") if d["n"] < FEW_PROMPTS else ""
    if comp["covers_zero"]:
        msg = (f"control passed: lossless `{control}` differs from `ar` by {span} in mean log-prob; "
               f"the {level:.0%} interval covers 0, as it must{few}")
        return {"decoder": control, "ok": True, "message": msg, "prompts": d["n"]}
    msg = (f"CONTROL FAILED: lossless `{control}` differs from `ar` by {span} in mean log-prob and the "
           f"{level:.0%} interval excludes 0. Expected in {1 - level:.0%} of honest runs; otherwise a bug or "
           f"too few prompts{few}. Treat every perplexity difference in this run with suspicion")
    return {"decoder": control, "ok": False, "message": msg, "prompts": d["n"]}


# ---------------------------------------------------------------------------------- pass@1


def pass_rate(passed: Mapping[Key, bool], level: float = LEVEL) -> dict | None:
    """pass@1 over all (problem, seed) samples with a Wilson interval (with several seeds per
    problem the samples are clustered; the paired comparison's bootstrap accounts for that)."""
    if not passed:
        return None
    c, n = sum(bool(v) for v in passed.values()), len(passed)
    z = _z(level)
    lo, hi = wilson(c, n, z)
    return interval(c / n, lo, hi, n, passed=c, problems=len({k[0] for k in passed}))


def pass_vs_base(passed: Mapping[Key, bool], base: Mapping[Key, bool], level: float = LEVEL,
                 n_boot: int = N_BOOT, seed: int = 0) -> dict | None:
    """Paired pass@1 difference (d - base) over problems, cluster bootstrap."""
    return paired_difference({k: float(v) for k, v in passed.items()}, {k: float(v) for k, v in base.items()},
                             level, n_boot, seed)


def _z(level: float) -> float:
    from statistics import NormalDist

    return Z95 if level == LEVEL else NormalDist().inv_cdf(0.5 + level / 2)


# ------------------------------------------------------------------------------------- speed


def speed_vs_base(rates: Mapping[int, float], base: Mapping[int, float], level: float = LEVEL,
                  n_boot: int = N_BOOT, seed: int = 0) -> dict | None:
    """Per-unit speed ratios (tok/s of d / tok/s of base in the same interleaving unit).

    Returns the median ratio with its interquartile range (the spread the issue asks for), and the
    geometric-mean ratio with a bootstrap interval over units.
    """
    units = sorted(u for u in set(rates) & set(base) if rates[u] > 0 and base[u] > 0)
    if not units:
        return None
    r = np.array([rates[u] / base[u] for u in units])
    p25, p50, p75 = quartiles(r)
    logs = np.log(r)
    lo, hi = bootstrap_mean(logs, level, n_boot, seed)
    return {"median": p50, "p25": p25, "p75": p75, "units": len(units),
            "geomean": float(math.exp(logs.mean())), "geomean_lo": math.exp(lo), "geomean_hi": math.exp(hi)}


# -------------------------------------------------------------------------- acceptance/position


def acceptance_per_position(per_prompt: Mapping[str, tuple[Sequence[int], int]], level: float = LEVEL,
                            n_boot: int = N_BOOT, seed: int = 0) -> list[dict]:
    """Share of rounds accepting draft position i, with a bootstrap interval over prompts.

    `per_prompt[p]` = (accepted-per-position counts summed over p's records, rounds summed)."""
    prompts = sorted(p for p, (_, it) in per_prompt.items() if it > 0)
    if not prompts:
        return []
    width = max(len(per_prompt[p][0]) for p in prompts)
    rounds = np.array([per_prompt[p][1] for p in prompts], dtype=np.float64)
    out = []
    for i in range(width):
        acc = np.array([per_prompt[p][0][i] if i < len(per_prompt[p][0]) else 0 for p in prompts], dtype=np.float64)
        lo, hi = bootstrap_ratio(acc, rounds, level, n_boot, seed)
        out.append(interval(float(acc.sum() / rounds.sum()), lo, hi, len(prompts)))
    return out
