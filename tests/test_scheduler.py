"""Continuous batching: requests that share a batch give what they give alone (mtad_trt.engine.scheduler).

The references are the same requests run one at a time (row 0, nothing beside them) and, on toy
runners, the spec's properties per row. Tiny engines scale their LM head, so greedy choices are
not decided by float noise and outputs must agree token for token.
"""

from __future__ import annotations

import numpy as np
import pytest

from mtad_trt import Pipeline
from mtad_trt.engine.params import DecodeParams, SamplingParams
from mtad_trt.engine.request import Request
from mtad_trt.engine.scheduler import Scheduler
from toy import BigramRunner, ToyTokenizer, random_tables

PROMPTS = ["def fib(n):", "The quick brown fox jumps over the lazy dog. " * 3, "import numpy as np\n", "x",
           "Once upon a time " * 9, "print(", "Hello world! Hello world!", "a = [1, 2, 3]\n"]
MIXED = [  # decoder settings, one per prompt: every decoder, several γ / B, some stopped early
    dict(decoder="ar", max_new_tokens=30),
    dict(decoder="sps", gamma=3, max_new_tokens=40),
    dict(decoder="mtad", gamma=4, beam_width=4, max_new_tokens=35),
    dict(decoder="mmtad", gamma=3, beam_width=3, max_new_tokens=25),
    dict(decoder="mtad", gamma=1, beam_width=2, max_new_tokens=8),  # stops early (length)
    dict(decoder="sps", gamma=5, max_new_tokens=45),
    dict(decoder="mmtad", gamma=2, beam_width=4, max_new_tokens=30),
    dict(decoder="ar", max_new_tokens=20),
]


@pytest.fixture(scope="module")
def batched(pair_engine):
    with Pipeline.load(pair_engine, backend="ort", max_batch=8) as pipe:
        yield pipe


def alone(pipe: Pipeline, prompt, **settings):
    return pipe.generate(prompt, **settings)


def test_mixed_greedy_batch_equals_each_request_alone(batched):
    common = dict(temperature=0, ignore_eos=True)
    refs = [alone(batched, p, **common, **s) for p, s in zip(PROMPTS, MIXED, strict=True)]
    # stop ids and stop strings taken from the references, so they really cut some requests short
    per = [dict(s) for s in MIXED]
    per[1]["stop_token_ids"] = [refs[1].token_ids[10]]
    per[6]["stop"] = [refs[6].text[6:9]]
    refs[1] = alone(batched, PROMPTS[1], **common, **per[1])
    refs[6] = alone(batched, PROMPTS[6], **common, **per[6])
    outs = batched.generate(PROMPTS, settings=per, **common)
    for i, (out, ref) in enumerate(zip(outs, refs, strict=True)):
        assert out.token_ids == ref.token_ids, f"request {i} ({MIXED[i]['decoder']})"
        assert out.text == ref.text and out.finish_reason == ref.finish_reason
    assert refs[1].finish_reason == "stop" and refs[6].finish_reason == "stop" and refs[4].finish_reason == "length"
    assert max(o.stats.iterations for o in outs) > 0


def test_seeded_sampling_does_not_depend_on_neighbours(batched):
    common = dict(temperature=1.0, top_k=10, top_p=0.9, ignore_eos=True)
    per = [{**s, "seed": 100 + i} for i, s in enumerate(MIXED)]
    refs = [alone(batched, p, **common, **s) for p, s in zip(PROMPTS, per, strict=True)]
    outs = batched.generate(PROMPTS, settings=per, **common)
    assert [o.token_ids for o in outs] == [r.token_ids for r in refs]
    # and the seeds matter: a request's output changes with its own seed
    other = batched.generate(PROMPTS[2], **common, **{**per[2], "seed": 7})
    assert other.token_ids != refs[2].token_ids


def test_cancelled_request_leaves_and_the_others_go_on(batched):
    common = dict(temperature=0, ignore_eos=True, max_new_tokens=40)
    refs = [alone(batched, p, decoder=d, **common) for p, d in zip(PROMPTS[:3], ("sps", "mtad", "ar"), strict=True)]
    reqs = [batched.prepare(batched.encode(p), decoder=d, **common) for p, d in zip(PROMPTS[:3], ("sps", "mtad", "ar"),
                                                                                    strict=True)]
    steps = 0
    for _ in batched.run(reqs):
        steps += 1
        if steps == 3:
            reqs[1].cancelled.set()  # what a client disconnect does
    assert reqs[1].stats.finish_reason == "cancelled"
    assert reqs[1].output_ids == refs[1].token_ids[: len(reqs[1].output_ids)]
    assert [reqs[0].output_ids, reqs[2].output_ids] == [refs[0].token_ids, refs[2].token_ids]
    assert batched.scheduler.free == list(range(8)) and not batched.scheduler.running


def test_released_and_padding_rows_never_leak(batched):
    """Poison a finished request's row (large finite values: what stale slots could hold) and the
    padding rows of the batch (NaN: rows are independent in every op), then check the neighbours."""
    common = dict(temperature=0, ignore_eos=True)
    refs = [alone(batched, p, decoder="mmtad", max_new_tokens=40, **common) for p in PROMPTS[:3]]
    reqs = [batched.prepare(batched.encode(p), decoder="mmtad", max_new_tokens=n, **common)
            for p, n in zip(PROMPTS[:3], (40, 5, 40), strict=True)]
    sched = batched.scheduler
    poisoned = False
    for _ in batched.run(reqs):
        if reqs[1].finished and not poisoned:  # row 1 is free now; rows 3 (padding of R=4) never used
            for runner in (batched.target, batched.draft):
                for view in runner.cache.views:
                    view[1] = 1e4
                    view[3:] = np.nan
            poisoned = True
    assert poisoned and reqs[1].row == 1
    assert [reqs[0].output_ids, reqs[2].output_ids] == [refs[0].token_ids, refs[2].token_ids]
    # a newcomer in the poisoned (finite) row is unaffected too: stale slots are masked. Row 0 is
    # taken by a request that starts with it, so the newcomer gets row 1, poisoned again first.
    for runner in (batched.target, batched.draft):
        for view in runner.cache.views:
            view[1] = 1e4
    occupant, late = (batched.prepare(batched.encode(p), decoder="mmtad", max_new_tokens=40, **common)
                      for p in (PROMPTS[2], PROMPTS[0]))
    for _ in batched.run([occupant, late]):
        pass
    assert (occupant.row, late.row) == (0, 1)
    assert late.output_ids == refs[0].token_ids and occupant.output_ids == refs[2].token_ids
    assert sched.free == list(range(8))
    for runner in (batched.target, batched.draft):  # leave the module's pipeline clean
        for view in runner.cache.views:
            view[...] = 0


def test_prompts_many_chunks_long_mixed_with_short_ones_equal_alone(pair_engine):
    """Prompts 3-8x the prefill chunk beside short ones (and arriving while they decode): every
    output equals the request alone; once the long ones leave, the short ones' steps run on a
    smaller bucket again (the cache shrinks at a boundary, not only when the server is idle)."""
    rng = np.random.default_rng(5)
    chunk = 24
    longs = [[int(t) for t in rng.integers(3, 300, n)] for n in (3 * chunk, 5 * chunk + 7, 8 * chunk - 2)]
    shorts = [[int(t) for t in rng.integers(3, 300, n)] for n in (5, 12, 30)]
    prompts = [shorts[0], longs[0], shorts[1], longs[1], longs[2], shorts[2]]
    per = [dict(decoder="mtad", gamma=3, beam_width=2, max_new_tokens=50), dict(decoder="ar", max_new_tokens=6),
           dict(decoder="sps", gamma=3, max_new_tokens=50), dict(decoder="mmtad", gamma=2, beam_width=2, max_new_tokens=5),
           dict(decoder="mtad", gamma=2, beam_width=3, max_new_tokens=4), dict(decoder="ar", max_new_tokens=50)]
    common = dict(temperature=0, ignore_eos=True)
    with Pipeline.load(pair_engine, backend="ort", max_batch=6, prefill_chunk=chunk, prefix_cache_mb=0) as pipe:
        refs = [pipe.generate(p, **common, **s) for p, s in zip(prompts, per, strict=True)]
        reqs = [pipe.prepare(p, **common, **s) for p, s in zip(prompts, per, strict=True)]
        buckets = []
        for _ in pipe.run(reqs):
            if all(reqs[i].finished for i in (1, 3, 4)) and not reqs[0].finished:
                buckets.append(pipe.target.bucket)
        assert [r.output_ids for r in reqs] == [r.token_ids for r in refs]
        assert max(r.stats.prefill_calls for r in reqs) >= 8  # the longest prompt took 8 chunks per model
        assert buckets and buckets[-1] == 128  # grew to 256 for the long prompts, back to 128 after


def test_more_requests_than_rows_queue_fifo(pair_engine):
    with Pipeline.load(pair_engine, backend="ort", max_batch=2) as pipe:
        common = dict(temperature=0, ignore_eos=True, max_new_tokens=12, decoder="sps")
        refs = [alone(pipe, p, **common) for p in PROMPTS[:5]]
        reqs = [pipe.prepare(pipe.encode(p), **common) for p in PROMPTS[:5]]
        rows_seen = []
        for _ in pipe.run(reqs):
            rows_seen.append(len(pipe.scheduler.running))
        assert max(rows_seen) == 2
        assert [r.output_ids for r in reqs] == [r.token_ids for r in refs]
        assert sorted(r.started for r in reqs) == [r.started for r in reqs]  # first come, first served


def test_self_draft_accepts_everything_in_a_batch(self_engine):
    """P4 per row at R > 1: draft == target, τ < 1: every round accepts γ, whatever runs beside it."""
    with Pipeline.load(self_engine, backend="ort", max_batch=4) as pipe:
        per = [dict(decoder=d, gamma=4, beam_width=3, seed=i) for i, d in enumerate(("mtad", "mmtad", "sps", "mtad"))]
        outs = pipe.generate(PROMPTS[:4], settings=per, temperature=1.0, top_k=10, top_p=0.9, max_new_tokens=41,
                             threshold=0.99, ignore_eos=True)
        for o in outs:
            assert o.stats.acceptance_rate == 1.0 and o.stats.iterations == o.stats.target_calls == 9


@pytest.mark.parametrize("rows", [3, 6])
def test_toy_bookkeeping_per_row(rows):
    """P10 per row in a batch of toy runners: emitted = accepted + rounds, calls = rounds (× γ)."""
    dtab, ttab = random_tables(6, seed=17)
    sched = Scheduler(BigramRunner(ttab), BigramRunner(dtab), ToyTokenizer(), set(), max_batch=rows)
    decoders = ["sps", "mtad", "mmtad", "ar", "mtad", "sps"][:rows]
    reqs = []
    for i, d in enumerate(decoders):
        sp = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=10_000, seed=i)
        reqs.append(Request([0, 3, 1, i % 6], sp, DecodeParams(decoder=d, gamma=2 + i % 3, beam_width=1 + i % 3)))
        sched.add(reqs[-1])
    for _ in range(60):
        sched.step()
    for req, d in zip(reqs, decoders, strict=True):
        st = req.stats
        assert st.generated_tokens == len(req.output_ids)
        if d == "ar":
            assert st.target_calls == st.generated_tokens == 60 and st.draft_calls == 0
            continue
        assert st.generated_tokens == st.accepted_tokens + st.iterations
        assert st.target_calls == st.iterations == 60 and st.draft_calls == 60 * req.decode.gamma
        assert sum(st.accepted_per_position) == st.accepted_tokens


def test_bad_max_batch_is_refused(pair_engine):
    from mtad_trt.errors import MtadError

    with pytest.raises(MtadError, match="max-batch must be >= 1"):
        Pipeline.load(pair_engine, backend="ort", max_batch=0)


def test_kv_cache_that_cannot_fit_is_refused_at_load(pair_engine, monkeypatch):
    from mtad_trt import backends
    from mtad_trt.errors import CapacityError

    monkeypatch.setattr(backends, "available_bytes", lambda device: 10 << 20)  # 10 MiB free
    with pytest.raises(CapacityError, match=r"KV cache for 64 rows needs .* GiB.*lower --max-batch"):
        Pipeline.load(pair_engine, backend="ort", max_batch=64)


# -- the speculation policy ---------------------------------------------------------------------------
def _policy(costs: dict, accepted: int = 4, **kwargs):
    from mtad_trt.engine.policy import CostModel, SpeculationPolicy

    pol = SpeculationPolicy(CostModel(costs), warmup_rounds=0, learn_costs=False, **kwargs)
    for d in ("sps", "mtad", "mmtad"):
        for b in (1, 2, 3, 4):
            for _ in range(20):  # as if earlier rounds had accepted `accepted` of 4 drafted tokens
                pol.acceptance[(d, b)].observe(4, accepted)
    return pol


EXPENSIVE_VERIFY = {"target": {1: 0.01, 2: 0.05, 5: 0.2, 17: 1.0, 80: 5.0}, "draft": {1: 0.001, 4: 0.002, 16: 0.004}}
FREE_VERIFY = {"target": {1: 0.01, 80: 0.01}, "draft": {1: 0.001, 16: 0.001}}
EXPENSIVE_DRAFT_ROWS = {"target": {1: 0.01, 80: 0.02}, "draft": {1: 0.01, 4: 0.2, 16: 1.0}}  # beams cost


def _run_policy(pol, decoder: str, fixed=frozenset(), seed: int = 5):
    dtab, ttab = random_tables(6, seed=3)
    sched = Scheduler(BigramRunner(ttab), BigramRunner(dtab), ToyTokenizer(), set(), max_batch=2, policy=pol)
    sp = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=60, seed=seed)
    req = Request([0, 3, 1], sp, DecodeParams(decoder=decoder, gamma=4, beam_width=3), fixed=fixed)
    sched.add(req)
    while not req.finished:
        sched.step()
    return req


def test_policy_turns_speculation_off_when_verifying_is_expensive():
    pol = _policy(EXPENSIVE_VERIFY)
    req = _run_policy(pol, "sps")
    assert pol.history and all(g == 0 for _, g, _ in pol.history)
    ar = _run_policy(None, "ar")
    # γ = 0 is plain decoding: the same draws from the same RNG give ar's very tokens
    assert req.output_ids == ar.output_ids and req.stats.plain_steps == 60 and req.stats.iterations == 0


def test_policy_keeps_gamma_when_verifying_is_free():
    pol = _policy(FREE_VERIFY)
    req = _run_policy(pol, "sps")
    assert all(g == 4 for _, g, _ in pol.history) and req.stats.plain_steps == 0
    assert req.stats.gamma == 4 and req.stats.iterations > 0


def test_policy_moves_only_what_the_request_left_unset():
    pol = _policy(EXPENSIVE_VERIFY)
    req = _run_policy(pol, "mtad", fixed=frozenset({"gamma", "beam_width"}))
    assert req.stats.plain_steps == 0 and req.stats.gamma == 4 and req.stats.beam_width == 3
    pol = _policy(EXPENSIVE_DRAFT_ROWS)
    req = _run_policy(pol, "mtad", fixed=frozenset({"gamma"}))  # B may move, γ may not
    assert req.stats.plain_steps == 0 and req.stats.gamma == 4 and req.state.beam_width == 1


@pytest.mark.parametrize("decoder", ["mtad", "mmtad"])
def test_policy_keeps_joint_verification_unless_throughput_first(decoder):
    """MTAD/MMTAD are lossy on purpose (their output quality is the point): where verifying is so
    expensive that SpS drops to plain steps, they still verify jointly (γ >= 1) every iteration;
    only a throughput-first policy turns them into plain decoding."""
    req = _run_policy(_policy(EXPENSIVE_VERIFY), decoder)
    assert req.stats.plain_steps == 0 and req.stats.iterations > 0
    assert req.stats.draft_positions >= req.stats.iterations  # γ >= 1 in every round
    fast = _run_policy(_policy(EXPENSIVE_VERIFY, keep_joint_verification=False), decoder)
    assert fast.stats.plain_steps > 0


def test_policy_memory_stays_bounded():
    """Per-request bookkeeping leaves with the request; the history keeps the recent iterations."""
    pol = _policy(FREE_VERIFY, history_limit=50)
    for seed in range(5):
        req = _run_policy(pol, "sps", seed=seed)
        assert set(pol._seen) <= {req.id}  # noqa: SLF001 - at most the rows of the last iteration
    assert len(pol.history) == 50


def test_policy_is_greedy_exact():
    """P1 whatever the policy picks per iteration: greedy output equals greedy ar."""
    dtab, ttab = random_tables(6, seed=11)
    outs = {}
    for name, pol in (("expensive", _policy(EXPENSIVE_VERIFY, accepted=2)), ("free", _policy(FREE_VERIFY, 2)),
                      ("none", None)):
        sched = Scheduler(BigramRunner(ttab), BigramRunner(dtab), ToyTokenizer(), set(), max_batch=4, policy=pol)
        reqs = [Request([0, 3, 1 + i], SamplingParams(temperature=0, max_new_tokens=30),
                        DecodeParams(decoder=d, gamma=4, beam_width=3)) for i, d in enumerate(("ar", "sps", "mtad", "mmtad"))]
        for r in reqs:
            sched.add(r)
        while not all(r.finished for r in reqs):
            sched.step()
        outs[name] = [r.output_ids for r in reqs]
        ref = Scheduler(BigramRunner(ttab), None, ToyTokenizer(), set(), max_batch=4)
        ars = [Request([0, 3, 1 + i], SamplingParams(temperature=0, max_new_tokens=30), DecodeParams(decoder="ar"))
               for i in range(4)]
        for r in ars:
            ref.add(r)
        while not all(r.finished for r in ars):
            ref.step()
        assert outs[name] == [r.output_ids for r in ars], name


def test_cost_model_interpolates_and_learns():
    from mtad_trt.engine.policy import CostModel

    m = CostModel({"target": {1: 1.0, 5: 2.0, 17: 5.0}}, decay=0.5)
    assert m.cost("target", 1, 3) == pytest.approx(1.5)  # between 1 and 5 tokens
    assert m.cost("target", 4, 5) == pytest.approx(5.0 + 3 * (20 - 17) / 12)  # beyond: the last segment extended
    m.observe("target", 1, 5, 40.0)  # a shape's first call is the runtime's one-time work, not its cost
    assert m.cost("target", 1, 5) == pytest.approx(2.0)
    m.observe("target", 1, 5, 4.0)
    assert m.cost("target", 5, 1) == pytest.approx(3.0)  # EMA of 2.0 and 4.0; keyed by rows·T


def test_policy_prices_the_drafts_catch_up_call():
    """A round's first draft call feeds the target's token, plus the last drafted one when the whole
    block was accepted; one call serves all rows: 1 + P(some row accepted all)."""
    for accepted, rows, want in ((4, 1, 2.0), (0, 1, 1.0), (0, 3, 1.0), (4, 3, 2.0)):
        pol = _policy(EXPENSIVE_VERIFY, accepted=accepted)
        assert pol._catch_up_width([("sps", 4, 1)] * rows) == pytest.approx(want)  # noqa: SLF001
    pol = _policy(EXPENSIVE_VERIFY, accepted=0)
    for _ in range(40):  # now half the rounds accept the whole block
        pol.acceptance[("mtad", 2)].observe(4, 4)
        pol.acceptance[("mtad", 2)].observe(4, 0)
    half = pol.acceptance[("mtad", 2)]
    p = half.hits[3] / half.trials[3]
    assert 0.4 < p < 0.6
    assert pol._catch_up_width([("mtad", 4, 2)] * 2) == pytest.approx(1 + 1 - (1 - p) ** 2)  # noqa: SLF001


def test_tune_writes_the_table_the_auto_policy_loads(pair_engine, tmp_path, monkeypatch):
    import json
    import shutil

    from click.testing import CliRunner

    from mtad_trt.cli import main
    from mtad_trt.engine import policy

    folder = tmp_path / "engine"
    shutil.copytree(pair_engine, folder)
    res = CliRunner().invoke(main, ["tune", str(folder), "--backend", "ort", "--max-batch", "2", "--widths", "1,5"])
    assert res.exit_code == 0, res.output
    table = json.loads((folder / "tuning.json").read_text())
    (entry,) = table.values()
    assert entry["shapes"] == [[1, 1], [1, 5], [2, 1], [2, 5]]
    assert set(entry["points"]) == {"target", "draft"} and all(t > 0 for t in entry["points"]["target"].values())
    monkeypatch.setattr(policy, "probe_costs", lambda *a, **k: pytest.fail("probed although a table exists"))
    with Pipeline.load(folder, backend="ort", max_batch=2, spec_policy="auto") as pipe:
        costs = pipe.scheduler.policy.costs
        assert costs.points["target"] == {int(n): t for n, t in entry["points"]["target"].items()}


def test_steps_run_on_the_rows_in_use_only(pair_engine, monkeypatch):
    """ONNX Runtime binds the cache per step, so a step covers only the window of rows in use: a
    request left alone in row 5 costs one row, not six (and its output is unchanged)."""
    from mtad_trt.backends.ort import OrtRunner

    seen = []
    original = OrtRunner.step

    def spy(self, inputs, first_row=0):
        seen.append((inputs.input_ids.shape[0], first_row))
        return original(self, inputs, first_row)

    monkeypatch.setattr(OrtRunner, "step", spy)
    common = dict(temperature=0, ignore_eos=True, decoder="ar")
    with Pipeline.load(pair_engine, backend="ort", max_batch=8, prefix_cache_mb=0) as pipe:
        per = [{"max_new_tokens": 3}] * 5 + [{"max_new_tokens": 30}]
        outs = pipe.generate(PROMPTS[:6], settings=per, **common)
        ref = pipe.generate(PROMPTS[5], max_new_tokens=30, **common)
    assert outs[5].token_ids == ref.token_ids
    assert (1, 5) in seen
