"""Hand-computed values for every metric a report prints (mtad_trt.bench.metrics)."""

from __future__ import annotations

import itertools
import math

import pytest

from mtad_trt.bench.metrics import (
    RequestTiming,
    decode_joules_per_token,
    describe,
    joules_per_token,
    mean_pass_at_k,
    pass_at_1,
    pass_at_k,
    pass_at_k_from_outcomes,
    percentiles,
    summarize_latencies,
    tokens_per_joule,
    within_mlperf_limits,
)
from mtad_trt.errors import MtadError

LN2 = math.log(2.0)


# ---- percentiles ----------------------------------------------------------------------------


def test_percentiles_linear_interpolation():
    # 1..10: rank = q/100 * 9 -> p50 at 4.5 -> 5.5; p90 at 8.1 -> 9.1; p99 at 8.91 -> 9.91
    p = percentiles(range(1, 11))
    assert p == pytest.approx({"p50": 5.5, "p90": 9.1, "p99": 9.91})


def test_percentiles_custom_and_single_value():
    assert percentiles([7.0], (0, 99.9)) == {"p0": 7.0, "p99.9": 7.0}
    assert percentiles([4, 1, 3, 2], (25, 75)) == pytest.approx({"p25": 1.75, "p75": 3.25})


def test_percentiles_refuse_empty_nonfinite_and_bad_q():
    with pytest.raises(MtadError):
        percentiles([])
    with pytest.raises(MtadError):
        percentiles([1.0, float("inf")])
    with pytest.raises(MtadError):
        percentiles([1.0], (101,))


def test_describe():
    d = describe([2.0, 4.0, 6.0, 8.0])
    assert d["count"] == 4 and d["mean"] == 5.0 and d["min"] == 2.0 and d["max"] == 8.0
    assert d["p50"] == 5.0


# ---- pass@k ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 1, 0.4),  # c/n
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 0, 5, 0.0),
        (10, 10, 1, 1.0),
        (4, 3, 2, 1.0),  # n - c < k: every k-subset contains a pass
        (1, 1, 1, 1.0),
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_binomial_definition():
    for n in range(1, 9):
        for c, k in itertools.product(range(n + 1), range(1, n + 1)):
            exact = 1 - math.comb(n - c, k) / math.comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)


def test_pass_at_k_refuses_impossible_counts():
    for args in [(0, 0, 1), (5, 6, 1), (5, -1, 1), (5, 2, 6), (5, 2, 0)]:
        with pytest.raises(MtadError):
            pass_at_k(*args)


def test_aggregate_pass_at_k():
    outcomes = {"HumanEval/0": [True, False], "HumanEval/1": [False, False]}
    assert pass_at_k_from_outcomes(outcomes, 1) == pytest.approx(0.25)  # (1/2 + 0) / 2
    assert pass_at_k_from_outcomes(outcomes, 2) == pytest.approx(0.5)  # (1 + 0) / 2
    assert pass_at_1([[True], [False], [True], [True]]) == 0.75
    assert mean_pass_at_k([(5, 2), (5, 0)], k=1) == pytest.approx(0.2)
    with pytest.raises(MtadError):
        mean_pass_at_k([], k=1)


# ---- latency --------------------------------------------------------------------------------


def test_request_timing_from_token_times_and_tpot():
    # speculative decoders deliver bursts: two tokens share one arrival time
    t = RequestTiming.from_token_times(10.0, [10.5, 10.5, 10.7])
    assert t.ttft_s == pytest.approx(0.5) and t.e2e_s == pytest.approx(0.7) and t.output_tokens == 3
    assert t.tpot_s == pytest.approx(0.1)  # (0.7 - 0.5) / (3 - 1)
    assert RequestTiming(0.2, 0.2, 1).tpot_s is None


def test_summarize_latencies():
    s = summarize_latencies(
        [
            RequestTiming(ttft_s=0.1, e2e_s=1.1, output_tokens=11),  # TPOT 0.1, 10 tok/s
            RequestTiming(ttft_s=0.2, e2e_s=0.2, output_tokens=1),  # no TPOT, 5 tok/s
            RequestTiming(ttft_s=0.3, e2e_s=2.3, output_tokens=5),  # TPOT 0.5
        ]
    )
    assert s.requests == 3 and s.output_tokens == 17
    assert s.ttft_s["p50"] == pytest.approx(0.2) and s.ttft_s["mean"] == pytest.approx(0.2)
    assert s.tpot_s is not None
    assert (
        s.tpot_s["count"] == 2
        and s.tpot_s["mean"] == pytest.approx(0.3)
        and s.tpot_s["p50"] == pytest.approx(0.3)
    )
    assert s.e2e_s["max"] == pytest.approx(2.3)
    assert s.output_tokens_per_s is not None
    assert s.output_tokens_per_s["max"] == pytest.approx(10.0)
    assert s.output_tokens_per_s["min"] == pytest.approx(5 / 2.3)
    assert s.to_dict()["ttft_s"]["p99"] == pytest.approx(0.298)
    assert within_mlperf_limits(s, "server") == {"ttft_s": True, "tpot_s": False}  # p99 TPOT ~0.5 s


def test_summarize_latencies_refuses_bad_input():
    with pytest.raises(MtadError):
        summarize_latencies([])
    with pytest.raises(MtadError):
        summarize_latencies([RequestTiming(ttft_s=1.0, e2e_s=0.5, output_tokens=3)])
    with pytest.raises(MtadError):
        summarize_latencies([RequestTiming(ttft_s=0.1, e2e_s=0.5, output_tokens=0)])


# ---- energy ratios --------------------------------------------------------------------------


class _Reading:
    def __init__(self, joules):
        self.joules = joules


def test_joules_per_token_and_inverse():
    assert joules_per_token(_Reading(50.0), 100) == 0.5
    assert joules_per_token(12.0, 4) == 3.0
    assert tokens_per_joule(_Reading(50.0), 100) == 2.0
    # the published Jetson reference: 22.6 tok/J <-> ~0.0442 J/token
    assert joules_per_token(1.0, 226) == pytest.approx(1 / 226)


def test_unknown_energy_gives_none_not_zero():
    assert joules_per_token(_Reading(None), 10) is None
    assert joules_per_token(None, 10) is None
    assert tokens_per_joule(_Reading(None), 10) is None
    assert decode_joules_per_token(_Reading(None), 1.0, 10) is None


def test_decode_joules_per_token_excludes_prefill_and_first_token():
    # 50 J total, 5 J until the first token, 10 output tokens -> 45 J over 9 decode tokens
    assert decode_joules_per_token(50.0, 5.0, 10) == pytest.approx(5.0)
    assert decode_joules_per_token(_Reading(50.0), _Reading(5.0), 10) == pytest.approx(5.0)


def test_energy_ratios_refuse_no_tokens():
    with pytest.raises(MtadError):
        joules_per_token(1.0, 0)
    with pytest.raises(MtadError):
        tokens_per_joule(1.0, 0)
    with pytest.raises(MtadError):
        decode_joules_per_token(1.0, 0.5, 1)
