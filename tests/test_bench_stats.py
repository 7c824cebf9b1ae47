"""The bench's statistics against hand-computed values (mtad_trt.bench.stats) and the
interleaving order (mtad_trt.bench.interleave). Pure functions: no model, no clock."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mtad_trt.bench import interleave, stats
from mtad_trt.errors import MtadError

# ---- Wilson ---------------------------------------------------------------------------------


def _wilson_by_hand(c: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = c / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_wilson_textbook_values():
    # 7 of 10: the interval every table of Wilson intervals prints, [0.3968, 0.8922]
    lo, hi = stats.wilson(7, 10)
    assert lo == pytest.approx(0.39678, abs=5e-5) and hi == pytest.approx(0.89221, abs=5e-5)
    assert (lo, hi) == pytest.approx(_wilson_by_hand(7, 10), abs=1e-12)
    # 0 of n: lower bound 0, upper bound z²/(n + z²)
    z2 = 1.959963984540054**2
    assert stats.wilson(0, 10) == pytest.approx((0.0, z2 / (10 + z2)), abs=1e-12)
    assert stats.wilson(10, 10)[1] == pytest.approx(1.0)
    assert stats.wilson(82, 164) == pytest.approx(_wilson_by_hand(82, 164), abs=1e-12)


def test_wilson_refuses_bad_counts():
    for c, n in [(1, 0), (-1, 5), (6, 5)]:
        with pytest.raises(MtadError):
            stats.wilson(c, n)


# ---- bootstrap ------------------------------------------------------------------------------


def test_bootstrap_fixed_seed_by_hand():
    # default_rng(0).integers(0, 3, size=(4, 3)) draws the resamples [[2,1,1],[0,0,0],[0,0,0],[2,1,2]]
    assert stats.boot_indices(3, 4, seed=0).tolist() == [[2, 1, 1], [0, 0, 0], [0, 0, 0], [2, 1, 2]]
    # values [1, 2, 4]: resample means 8/3, 1, 1, 10/3 -> sorted 1, 1, 8/3, 10/3;
    # 2.5% quantile at rank 0.075 -> 1; 97.5% at rank 2.925 -> 8/3 + 0.925 * (2/3) = 3.28333...
    lo, hi = stats.bootstrap_mean([1.0, 2.0, 4.0], n_boot=4, seed=0)
    assert lo == pytest.approx(1.0) and hi == pytest.approx(8 / 3 + 0.925 * 2 / 3)


def test_bootstrap_exact_cases():
    assert stats.bootstrap_mean([0.3] * 7) == pytest.approx((0.3, 0.3))  # no spread, no interval
    # two values: resample means are a, (a+b)/2, b with probabilities 1/4, 1/2, 1/4,
    # so the 2.5% and 97.5% quantiles are a and b themselves
    assert stats.bootstrap_mean([1.0, 3.0]) == pytest.approx((1.0, 3.0))
    # ratio of sums, pairs resampled together: all pairs 1/2 -> exactly 0.5
    assert stats.bootstrap_ratio([1, 2, 3], [2, 4, 6]) == pytest.approx((0.5, 0.5))


def test_bootstrap_matches_normal_theory_for_large_samples():
    x = np.random.default_rng(5).normal(0.0, 1.0, 400)
    lo, hi = stats.bootstrap_mean(x)
    se = x.std(ddof=1) / math.sqrt(x.size)
    assert lo == pytest.approx(x.mean() - 1.96 * se, abs=0.2 * se)
    assert hi == pytest.approx(x.mean() + 1.96 * se, abs=0.2 * se)


def test_quartiles():
    assert stats.quartiles([4, 1, 3, 2]) == pytest.approx((1.75, 2.5, 3.25))


# ---- pairing, perplexity, the control ------------------------------------------------------


def test_paired_by_prompt_averages_seeds_and_keeps_only_pairs():
    base = {("a", 0): -1.0, ("a", 1): -1.2, ("b", 0): -2.0}
    d = {("a", 0): -0.8, ("a", 1): -0.8, ("b", 0): -1.5, ("c", 0): -9.0}  # c has no ar partner
    assert stats.paired_by_prompt(d, base) == pytest.approx({"a": 0.3, "b": 0.5})  # a: (0.2 + 0.4) / 2


def test_perplexity_vs_base_is_the_paper_ratio():
    # the paper's PPL = exp(-mean of per-sample mean log-probs), so PPL_d / PPL_ar = exp(-(m_d - m_ar))
    base = {("p0", 0): -1.0, ("p1", 0): -2.0}
    d = {("p0", 0): -0.5, ("p1", 0): -1.5}  # every difference +0.5
    c = stats.perplexity_vs_base(d, base)
    assert c["delta_mean_logprob"]["estimate"] == pytest.approx(0.5)
    assert c["delta_mean_logprob"]["lo"] == pytest.approx(0.5) and c["delta_mean_logprob"]["hi"] == pytest.approx(0.5)
    ppl_ar, ppl_d = math.exp(1.5), math.exp(1.0)
    assert c["ppl_ratio"]["estimate"] == pytest.approx(ppl_d / ppl_ar)
    assert not c["covers_zero"]


def test_control_flag_passes_when_sps_is_noise_and_fails_when_it_differs():
    rng = np.random.default_rng(1)
    keys = [(f"p{i}", s) for i in range(30) for s in (0, 10000)]
    ar = {k: float(rng.normal(-1.0, 0.3)) for k in keys}
    same = {k: float(rng.normal(-1.0, 0.3)) for k in keys}  # lossless: the same law as ar
    ok = stats.control_check({"sps": stats.perplexity_vs_base(same, ar)})
    assert ok["ok"] is True and "covers 0" in ok["message"]
    shifted = {k: v + 0.3 for k, v in same.items()}  # a synthetic sps that is made to differ
    bad = stats.control_check({"sps": stats.perplexity_vs_base(shifted, ar)})
    assert bad["ok"] is False and bad["message"].startswith("CONTROL FAILED")
    assert "only" not in ok["message"]  # 30 prompts: no small-sample caveat
    few = stats.control_check({"sps": stats.perplexity_vs_base({("a", 0): -1.0, ("b", 0): -1.1},
                                                               {("a", 0): -1.05, ("b", 0): -1.0})})
    assert "only 2 prompts" in few["message"]
    missing = stats.control_check({"mtad": None})
    assert missing["ok"] is None and "missing" in missing["message"]


# ---- pass@1 ---------------------------------------------------------------------------------


def test_pass_rate_and_paired_difference():
    ar = {("t0", 0): True, ("t1", 0): False, ("t2", 0): True, ("t3", 0): False}
    d = {("t0", 0): True, ("t1", 0): True, ("t2", 0): True, ("t3", 0): False}
    r = stats.pass_rate(d)
    assert r["estimate"] == 0.75 and (r["lo"], r["hi"]) == pytest.approx(stats.wilson(3, 4))
    diff = stats.pass_vs_base(d, ar)
    assert diff["estimate"] == pytest.approx(0.25) and diff["n"] == 4
    assert diff["lo"] == 0.0 and diff["hi"] > 0.25  # per-problem differences 0, 1, 0, 0


# ---- speed and acceptance -------------------------------------------------------------------


def test_speed_ratios_per_unit():
    base = {0: 10.0, 1: 8.0, 2: 12.0, 3: 10.0}
    d = {0: 5.0, 1: 6.0, 2: 6.0, 3: 7.0}  # ratios 0.5, 0.75, 0.5, 0.7
    sp = stats.speed_vs_base(d, base)
    assert sp["units"] == 4
    assert (sp["p25"], sp["median"], sp["p75"]) == pytest.approx((0.5, 0.6, 0.7125))
    assert sp["geomean"] == pytest.approx((0.5 * 0.75 * 0.5 * 0.7) ** 0.25)
    assert sp["geomean_lo"] <= sp["geomean"] <= sp["geomean_hi"]


def test_acceptance_per_position_is_a_ratio_of_sums():
    per = {"a": ([4, 2], 4), "b": ([1, 0], 1)}
    out = stats.acceptance_per_position(per)
    assert [p["estimate"] for p in out] == pytest.approx([1.0, 0.4])
    assert out[0]["lo"] == pytest.approx(1.0) and out[0]["hi"] == pytest.approx(1.0)


# ---- interleaving ---------------------------------------------------------------------------


def test_interleaving_order_per_prompt_rotated_seed_major():
    units = interleave.plan(["p0", "p1", "p2"], ("ar", "sps", "mtad"), seeds=2, base_seed=5)
    assert [u.order for u in units] == [("ar", "sps", "mtad"), ("sps", "mtad", "ar"), ("mtad", "ar", "sps")] * 2
    # each unit is one (prompt, seed): all prompts under the first seed, then under the second
    assert [(u.jobs[0].prompt_id, u.jobs[0].seed) for u in units] == [
        ("p0", 5), ("p1", 6), ("p2", 7), ("p0", 10005), ("p1", 10006), ("p2", 10007)]
    assert all(len(u.jobs) == 1 for u in units)
    # every system is first equally often
    assert sorted(u.order[0] for u in units) == ["ar", "ar", "mtad", "mtad", "sps", "sps"]


def test_interleaving_per_batch_with_concurrency():
    units = interleave.plan(["p0", "p1", "p2", "p3", "p4"], ("ar", "mtad"), batch=2)
    assert [[j.prompt_id for j in u.jobs] for u in units] == [["p0", "p1"], ["p2", "p3"], ["p4"]]
    assert [u.order for u in units] == [("ar", "mtad"), ("mtad", "ar"), ("ar", "mtad")]
    assert "batch of 2" in interleave.describe(2) and "per prompt" in interleave.describe(1)


def test_interleaving_refuses_nonsense():
    with pytest.raises(MtadError):
        interleave.plan(["p0"], ())
    with pytest.raises(MtadError):
        interleave.plan(["p0"], ("ar",), seeds=0)
    with pytest.raises(MtadError):
        interleave.plan(["p0"], ("ar",), batch=0)
