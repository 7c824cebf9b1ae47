"""Decoder properties from docs/algorithm.md §4 on bigram toy engines (fast, many samples)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import mtad_trt.engine.decoders.draft as draft_mod
import mtad_trt.engine.decoders.sps as sps_mod
from mtad_trt.backends.rows import Row
from mtad_trt.engine.batch import Batcher
from mtad_trt.engine.decoders import DecodeState
from mtad_trt.engine.decoders.draft import draft_tree
from mtad_trt.engine.decoders.mtad import accept_chain, accept_tree
from mtad_trt.engine.params import DecodeParams, SamplingParams
from mtad_trt.engine.request import Request
from mtad_trt.engine.sampling import Dist, process
from mtad_trt.engine.scheduler import Scheduler
from mtad_trt.engine.stats import Stats
from toy import BigramRunner, ToyTokenizer, chi2_pvalue, first_round, random_tables, run_toy, warp

V = 6
PROMPT = [0, 3, 1]
FREE = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=1)


def run(decoder, draft_tab, target_tab, sp, seed=None, **dp):
    return run_toy(decoder, draft_tab, target_tab, SamplingParams(**{**sp.__dict__, "seed": seed}), PROMPT, **dp)


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


ALPHA = 1e-4  # false-alarm level of every law test (seeds are fixed: each outcome is deterministic)


def chi_square_ok(counts: np.ndarray, probs: np.ndarray) -> bool:
    """Pearson chi-square goodness of fit at the ALPHA level (a token of probability 0 fails it)."""
    return chi2_pvalue(counts, probs) > ALPHA


def first_token_counts(decoder, n, **dp):
    dtab, ttab = random_tables(V, seed=5)
    counts = np.zeros(V, int)
    for s in range(n):
        out, _ = run(decoder, dtab, ttab, FREE, seed=s, **dp)
        counts[out[0]] += 1
    return counts, dtab, ttab


def test_sps_is_lossless():
    # First token of speculative sampling follows the target exactly, for a draft that differs.
    counts, dtab, ttab = first_token_counts("sps", 6000, gamma=3)
    assert chi_square_ok(counts, softmax(ttab[PROMPT[-1]]))


def test_sps_lossless_joint_of_two_tokens():
    dtab, ttab = random_tables(V, seed=7)
    sp = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=2)
    counts = np.zeros((V, V), int)
    for s in range(6000):
        out, _ = run("sps", dtab, ttab, sp, seed=s, gamma=3)
        counts[out[0], out[1]] += 1
    p1 = softmax(ttab[PROMPT[-1]])
    joint = p1[:, None] * np.stack([softmax(ttab[a]) for a in range(V)])
    assert chi_square_ok(counts.ravel(), joint.ravel())


def resample_from_p(p, q, block, rng):
    """Mutant of accept_sps: after a rejection, draw from p instead of norm(max(0, p - q))."""
    n, y = REAL_ACCEPT_SPS(p, q, block, rng)
    return (n, p.sample(rng, n)) if n < len(block) else (n, y)


REAL_ACCEPT_SPS, REAL_PROCESS = sps_mod.accept_sps, sps_mod.process


def test_wrong_residual_would_be_caught(monkeypatch):
    # test_sps_is_lossless must be able to fail: the same run with the residual replaced by p
    # (the classic bug: rejected tokens are still likely to be redrawn) is rejected by it.
    monkeypatch.setattr(sps_mod, "accept_sps", resample_from_p)
    counts, _, ttab = first_token_counts("sps", 6000, gamma=3)
    assert not chi_square_ok(counts, softmax(ttab[PROMPT[-1]]))


def test_p2_huge_threshold_is_target_sampling():
    counts, dtab, ttab = first_token_counts("mtad", 4000, gamma=3, beam_width=3, threshold=1e9)
    assert chi_square_ok(counts, softmax(ttab[PROMPT[-1]]))


def test_p5_gamma1_beam1_law():
    tau = 0.8
    counts, dtab, ttab = first_token_counts("mtad", 8000, gamma=1, beam_width=1, threshold=tau)
    q, p = softmax(dtab[PROMPT[-1]]), softmax(ttab[PROMPT[-1]])
    ok = p > tau * q
    law = q * ok + (1 - (q * ok).sum()) * p
    assert chi_square_ok(counts, law)
    assert not np.allclose(law, p, atol=0.02)  # MTAD is not lossless: the test can tell them apart


@pytest.mark.parametrize("decoder", ["sps", "mtad", "mmtad"])
@pytest.mark.parametrize("gamma,beam", [(1, 1), (1, 3), (3, 1), (4, 4)])
def test_p1_greedy_equals_target_greedy(decoder, gamma, beam):
    dtab, ttab = random_tables(V, seed=11)
    sp = SamplingParams(temperature=0, max_new_tokens=25)
    ref, _ = run("ar", dtab, ttab, sp)
    out, stats = run(decoder, dtab, ttab, sp, gamma=gamma, beam_width=beam, threshold=0.3)
    assert out == ref
    assert stats.generated_tokens == 25


@pytest.mark.parametrize("decoder", ["mtad", "mmtad"])
def test_p4_self_draft_accepts_everything(decoder):
    _, ttab = random_tables(V, seed=3)
    sp = SamplingParams(temperature=1.0, top_k=4, top_p=0.9, max_new_tokens=40)
    _, stats = run(decoder, ttab, ttab, sp, seed=1, gamma=4, beam_width=3, threshold=0.99)
    assert stats.acceptance_rate == 1.0
    # every round but possibly the last (cut by max_new_tokens) emits γ+1 tokens per target call
    assert stats.accepted_tokens == 4 * stats.iterations
    if decoder == "mtad":  # (MMTAD compares other nodes against the best beam's score: they can pass)
        _, stats = run(decoder, ttab, ttab, sp, seed=1, gamma=4, beam_width=3, threshold=1.0)
        assert stats.accepted_tokens == 0  # strict '>' : τ=1 passes nothing when p == q


def test_p7_mmtad_with_one_beam_equals_mtad():
    dtab, ttab = random_tables(V, seed=13)
    sp = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=30)
    for seed in range(20):
        a, _ = run("mtad", dtab, ttab, sp, seed=seed, gamma=3, beam_width=1, threshold=0.5)
        b, _ = run("mmtad", dtab, ttab, sp, seed=seed, gamma=3, beam_width=1, threshold=0.5)
        assert a == b


@pytest.mark.parametrize("decoder", ["sps", "mtad", "mmtad"])
def test_p10_bookkeeping(decoder):
    dtab, ttab = random_tables(V, seed=17)
    sp = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=10_000, seed=0)
    dp = DecodeParams(decoder=decoder, gamma=3, beam_width=2, threshold=0.4)
    sched = Scheduler(BigramRunner(ttab), BigramRunner(dtab), ToyTokenizer(), set())
    req = Request(list(PROMPT), sp, dp)
    sched.add(req)
    emitted = 0
    for _ in range(200):
        (update,) = sched.step()  # one iteration per step: one round of this request
        chunk = update.piece.token_ids
        assert 1 <= len(chunk) <= dp.gamma + 1
        emitted += len(chunk)
    stats = req.stats
    assert emitted == stats.accepted_tokens + stats.iterations == stats.generated_tokens
    assert stats.target_calls == stats.iterations == 200
    assert stats.draft_calls == stats.iterations * dp.gamma
    assert stats.prefill_calls == 2  # the prompt (but its last token) into each model, one chunk
    assert sum(stats.accepted_per_position) == stats.accepted_tokens
    assert all(a >= b for a, b in zip(stats.accepted_per_position, stats.accepted_per_position[1:], strict=False))


def test_p8_tree_accepts_at_least_the_chain():
    dtab, ttab = random_tables(V, seed=19)
    sp = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)
    rng = np.random.default_rng(0)
    strictly_more = 0
    for _ in range(300):
        tree = draft_only(dtab, PROMPT, 3, 4, sp, rng)
        path = tree.path(3, tree.best)
        block = tree.tokens[np.arange(4), path]
        # target distributions along the chain and at every node (bigram: depends on the token only)
        chain_p = process(ttab[np.concatenate([[PROMPT[-1]], block])], sp)
        n_chain = accept_chain(chain_p, block, tree.score[np.arange(4), path], math.log(0.5))
        # rows: the root, then node (d, j) at 1 + d*B + j (bigram: a node's next law is its token's)
        probs = process(ttab[np.concatenate([[PROMPT[-1]], tree.tokens.ravel()])], sp)
        n_tree, j = accept_tree(probs, tree, math.log(0.5))
        assert n_tree >= n_chain
        strictly_more += n_tree > n_chain
        if n_tree:  # the chosen node passes: target joint of its path beats the best beam's ancestor score
            node_path = tree.path(n_tree - 1, j)
            toks = [PROMPT[-1]] + [int(tree.tokens[d, node_path[d]]) for d in range(n_tree)]
            joint = sum(math.log(softmax(ttab[a])[b]) for a, b in zip(toks, toks[1:], strict=False))
            assert joint - tree.score[n_tree - 1, path[n_tree - 1]] > math.log(0.5) - 1e-9
    assert strictly_more > 0  # the tree does find longer blocks than the chain (else the test says little)


def draft_only(dtab, prompt, width, gamma, sp, rng, keep_q=False):
    """Run draft_tree alone on a bigram draft runner (one request, row 0): the tree it returns."""
    runner = BigramRunner(dtab)
    st = DecodeState(Row(BigramRunner(dtab)), Row(runner), list(prompt), sp, DecodeParams(), rng, Stats())
    gen = draft_tree(st, list(prompt), width, gamma, keep_q=keep_q)
    batcher = Batcher(runner, 1)
    call = next(gen)
    try:
        while True:
            call = gen.send(batcher.run([(st.row(call.role), call)])[0])
    except StopIteration as done:
        return done.value


def reference_iteration(q_tab, p_tab, last, B, gamma, tau, u):
    """docs/algorithm.md §2 written out plainly (independent of the package): one MTAD iteration.

    `u` supplies the uniforms in the order the spec consumes them: B per depth, then 1 for y.
    """
    def draw(probs, k):
        c = np.cumsum(probs.ravel())
        return np.minimum(np.searchsorted(c, next(u) * c[-1], side="right") if k == 1 else
                          np.searchsorted(c, np.array([next(u) for _ in range(k)]) * c[-1], side="right"), c.size - 1)

    d1 = softmax(q_tab[last])
    beams = [[int(a)] for a in draw(d1, B)]
    S = np.array([math.log(d1[b[0]]) for b in beams])
    for _ in range(1, gamma):
        w = np.exp(S - S.max())
        w /= w.sum()
        pi = np.stack([w[j] * softmax(q_tab[beams[j][-1]]) for j in range(B)])
        picks = draw(pi, B)
        new_beams, new_S = [], []
        for k in np.atleast_1d(picks):
            j, v = divmod(int(k), len(d1))
            new_beams.append(beams[j] + [v])
            new_S.append(S[j] + math.log(softmax(q_tab[beams[j][-1]])[v]))
        beams, S = new_beams, np.array(new_S)
    x = beams[int(np.argmax(S))]
    ctx = [last] + x
    Q = np.cumsum([math.log(softmax(q_tab[ctx[i]])[x[i]]) for i in range(gamma)])
    P = np.cumsum([math.log(softmax(p_tab[ctx[i]])[x[i]]) for i in range(gamma)])
    passing = [i + 1 for i in range(gamma) if P[i] - Q[i] > math.log(tau)]
    n = max(passing) if passing else 0
    y = int(draw(softmax(p_tab[ctx[n]]), 1))
    return x[:n] + [y]


def test_mtad_iteration_matches_plain_reference():
    dtab, ttab = random_tables(V, seed=23)
    sp = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=100)
    lengths = set()
    for seed in range(200):
        out, _ = run("mtad", dtab, ttab, sp, seed=seed, gamma=3, beam_width=3, threshold=0.5)
        rng = np.random.default_rng(seed)
        u = iter(rng.random(64))
        ref = reference_iteration(dtab, ttab, PROMPT[-1], 3, 3, 0.5, u)
        assert out[: len(ref)] == ref, f"seed {seed}"
        lengths.add(len(ref))
    assert lengths == {1, 2, 3, 4}  # the seeds reach every outcome, n = 0..γ accepted


# --- Laws under the settings people use: T != 1, top-k and top-p on (issue 14, item 5) -----------

WARPED = dict(temperature=1.3, top_k=5, top_p=0.9)  # on V=6 tables: 2-5 tokens survive per row


def warped_rows(table: np.ndarray) -> np.ndarray:
    """[V, V]: row a is the warped next-token law after token a (plain numpy, toy.warp)."""
    return np.stack([warp(row, **WARPED) for row in table])


SPS_GAMMA, SPS_N = 2, 1500
SPS_TABLES = random_tables(V, seed=7)


def sps_block_counts(n: int = SPS_N) -> tuple[np.ndarray, float]:
    """Counts [V]*(γ+1) of sps's first γ+1 tokens over seeds 0..n-1, and the share of runs whose
    first round accepted every draft, so that token γ+1 was the bonus token drawn from the target."""
    dtab, ttab = SPS_TABLES
    k = SPS_GAMMA + 1
    sp = SamplingParams(**WARPED, max_new_tokens=k)
    counts, bonus = np.zeros((V,) * k, int), 0
    for seed in range(n):
        out, stats = run("sps", dtab, ttab, sp, seed=seed, gamma=SPS_GAMMA)
        counts[tuple(out[:k])] += 1
        bonus += stats.iterations == 1  # one round emitted all k tokens: γ accepted + the bonus
    return counts, bonus / n


def sps_reference_law() -> np.ndarray:
    p = warped_rows(SPS_TABLES[1])
    law = p[PROMPT[-1]]
    for _ in range(SPS_GAMMA):
        law = law[..., :, None] * p  # P(x_1..x_m, x_{m+1}) = P(x_1..x_m) p(x_{m+1} | x_m)
    return law


def sps_warped_pvalue() -> tuple[float, float]:
    counts, bonus_share = sps_block_counts()
    return chi2_pvalue(counts, sps_reference_law()), bonus_share


def test_sps_lossless_with_temperature_top_k_top_p():
    # speculative sampling's output is the target's warped law, bonus token included
    dtab, ttab = SPS_TABLES
    q, p = warped_rows(dtab), warped_rows(ttab)
    # the setting can tell: top-p cuts beyond top-k, the draft's law differs, the bonus path is common
    assert ((p > 0).sum(1) < WARPED["top_k"]).any()
    assert np.abs(q - p).sum(1).max() > 0.5
    pvalue, bonus_share = sps_warped_pvalue()
    assert bonus_share > 0.4
    assert pvalue > ALPHA


def bonus_unwarped(logits, sp):
    """Mutant of sps's target processing: the bonus row (the last) is the raw softmax (T=1, no
    top-k/top-p); the rows the ratio test and the residual read stay correct."""
    p = REAL_PROCESS(logits, sp).dense()
    p[-1] = REAL_PROCESS(logits, SamplingParams(temperature=1.0, top_k=0, top_p=1.0)).dense()[-1]
    return Dist(p)


def target_without_top_p(logits, sp):
    """Mutant: sps processes the target's logits without top-p (ratio test, residual and bonus)."""
    return REAL_PROCESS(logits, SamplingParams(temperature=sp.temperature, top_k=sp.top_k, top_p=1.0))


SPS_MUTANTS = {
    "bonus_unwarped": ("process", bonus_unwarped),
    "target_without_top_p": ("process", target_without_top_p),
    "residual_is_p": ("accept_sps", resample_from_p),
}


@pytest.mark.parametrize("mutant", sorted(SPS_MUTANTS))
def test_sps_warped_law_rejects_mutant(monkeypatch, mutant):
    # the test above can fail: each mutant of sps is rejected by the same statistic at the same n
    attr, fn = SPS_MUTANTS[mutant]
    monkeypatch.setattr(sps_mod, attr, fn)
    pvalue, _ = sps_warped_pvalue()
    assert pvalue < ALPHA


# MMTAD with B > 1: the exact law of one round, enumerated over every beam tree (spec §2.1, §3.4)

MM_B, MM_GAMMA, MM_TAU, MM_N = 2, 2, 1.0, 2000
MM_TABLES = random_tables(V, seed=7)


def mmtad_round_law(q, p, last, width, gamma, tau, reference="ancestor", uniform_parents=False):
    """{emitted tokens: probability} of one MMTAD round after token `last`, by enumeration.

    q, p: [V, V] warped bigram laws of draft and target. Plain spec: depth 1 draws `width` tokens
    i.i.d. from q(.|last); depth d draws `width` (parent j, token v) pairs i.i.d. from
    π(j, v) = w_j q(v | beam j), w = normalised exp(S) (uniform when `uniform_parents`: a mutant);
    node (d, j) passes iff T_{d,j} - R_d > log τ with R_d the draft score of the best beam's
    ancestor at depth d ("column": of the same column, the repo's v2 quirk); n = deepest depth with
    a pass, ĵ = the passing node there with the highest target joint; emit path(n, ĵ), then
    y ~ p(. | last token of that path).
    """
    law: dict[tuple[int, ...], float] = {}
    log_tau = math.log(tau)
    with np.errstate(divide="ignore"):
        lq, lp = np.log(q), np.log(p)

    def verify(tokens, parent, score, prob):
        best = int(np.argmax(score[-1]))
        anc = [best]
        for d in range(gamma - 1, 0, -1):
            anc.append(parent[d][anc[-1]])
        anc = anc[::-1]  # the best beam's node index at each depth
        joint = [lp[last, tokens[0]]]
        for d in range(1, gamma):
            par = parent[d]
            joint.append(joint[d - 1][par] + lp[tokens[d - 1][par], tokens[d]])
        n, jhat = 0, -1
        for d in range(gamma):
            ref = score[d][anc[d]] if reference == "ancestor" else score[d][best]
            ok = joint[d] - ref > log_tau
            if ok.any():
                n, jhat = d + 1, int(np.argmax(np.where(ok, joint[d], -np.inf)))
        block, j = [], jhat
        for d in range(n - 1, -1, -1):
            block.insert(0, int(tokens[d][j]))
            j = parent[d][j]
        ctx = block[-1] if block else last
        for y in np.nonzero(p[ctx])[0]:
            key = (*block, int(y))
            law[key] = law.get(key, 0.0) + prob * p[ctx, y]

    def grow(tokens, parent, score, prob):
        if len(tokens) == gamma:
            return verify(tokens, parent, score, prob)
        s = score[-1]
        w = np.full(width, 1 / width) if uniform_parents else np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        pi = w[:, None] * q[tokens[-1]]
        cells = list(zip(*np.nonzero(pi), strict=True))
        for picks in itertools.product(cells, repeat=width):
            par = np.array([j for j, _ in picks])
            tok = np.array([v for _, v in picks])
            grow(tokens + [tok], parent + [par], score + [s[par] + lq[tokens[-1][par], tok]],
                 prob * np.prod([pi[j, v] for j, v in picks]))

    for first in itertools.product(np.nonzero(q[last])[0], repeat=width):
        tok = np.array(first)
        grow([tok], [np.full(width, -1)], [lq[last, tok]], float(np.prod(q[last, tok])))
    return law


def mmtad_round_pvalue(n: int = MM_N, **dp) -> float:
    dtab, ttab = MM_TABLES
    law = mmtad_round_law(warped_rows(dtab), warped_rows(ttab), PROMPT[-1], MM_B, MM_GAMMA, MM_TAU)
    counts: dict[tuple[int, ...], int] = {}
    for seed in range(n):
        sp = SamplingParams(**WARPED, max_new_tokens=MM_GAMMA + 1, seed=seed)
        out = tuple(first_round("mmtad", dtab, ttab, sp, PROMPT, gamma=MM_GAMMA, beam_width=MM_B,
                                threshold=MM_TAU, **dp))
        counts[out] = counts.get(out, 0) + 1
    keys = sorted(set(law) | set(counts))
    return chi2_pvalue([counts.get(k, 0) for k in keys], [law.get(k, 0.0) for k in keys])


def test_mmtad_round_law_enumeration_is_a_law():
    dtab, ttab = MM_TABLES
    q, p = warped_rows(dtab), warped_rows(ttab)
    law = mmtad_round_law(q, p, PROMPT[-1], MM_B, MM_GAMMA, MM_TAU)
    assert abs(sum(law.values()) - 1) < 1e-12
    by_len = [sum(v for k, v in law.items() if len(k) == m) for m in (1, 2, 3)]
    assert min(by_len) > 0.2  # every outcome (n = 0, 1, 2 accepted) is common: the test sees all paths
    for mutant in ({"reference": "column"}, {"uniform_parents": True}):  # and the mutants' laws differ
        other = mmtad_round_law(q, p, PROMPT[-1], MM_B, MM_GAMMA, MM_TAU, **mutant)
        assert 0.5 * sum(abs(law.get(k, 0) - other.get(k, 0)) for k in set(law) | set(other)) > 0.05


def test_mmtad_beam_round_follows_the_spec_law():
    assert mmtad_round_pvalue() > ALPHA


def uniform_parent_weights(probs, n, rng):
    """Mutant of draft_tree's pair sampling at depth >= 2: the parent beams' weights w_j are dropped
    (each beam weighs 1/B), as the reference code's log_softmax-of-probabilities quirk nearly does."""
    return REAL_SAMPLE_MANY(probs / probs.sum(-1, keepdims=True) / probs.shape[0], n, rng)


REAL_SAMPLE_MANY = draft_mod.sample_many


@pytest.mark.parametrize("mutant", ["column_reference", "uniform_parent_weights"])
def test_mmtad_round_law_rejects_mutant(monkeypatch, mutant):
    if mutant == "column_reference":  # the repo's v2 quirk, behind its flag
        pvalue = mmtad_round_pvalue(reference="column")
    else:
        monkeypatch.setattr(draft_mod, "sample_many", uniform_parent_weights)
        pvalue = mmtad_round_pvalue()
    assert pvalue < ALPHA


def reference_mmtad_round(q, p, last, width, gamma, tau, u, reference="ancestor"):
    """docs/algorithm.md §2.1 + §3.4 written out plainly with dense [V] laws: one MMTAD round.

    q, p: [V, V] warped bigram laws. `u` supplies the uniforms in the order the spec consumes
    them: B at depth 1, B per deeper depth (pairs over the flattened [B, V] joint), 1 for y.
    """
    def draw(probs, k):
        c = np.cumsum(probs.ravel())
        return np.minimum(np.searchsorted(c, np.array([next(u) for _ in range(k)]) * c[-1], side="right"),
                          c.size - 1)

    with np.errstate(divide="ignore"):
        lq, lp = np.log(q), np.log(p)
    tokens = [draw(q[last], width)]
    parent = [np.full(width, -1)]
    score = [lq[last, tokens[0]]]
    for _ in range(1, gamma):
        w = np.exp(score[-1] - score[-1].max())
        w /= w.sum()
        picks = draw(w[:, None] * q[tokens[-1]], width)
        par, tok = picks // V, picks % V
        score.append(score[-1][par] + lq[tokens[-1][par], tok])
        tokens.append(tok)
        parent.append(par)
    best = int(np.argmax(score[-1]))
    anc = [best]
    for d in range(gamma - 1, 0, -1):
        anc.insert(0, int(parent[d][anc[0]]))
    joint = [lp[last, tokens[0]]]
    for d in range(1, gamma):
        joint.append(joint[-1][parent[d]] + lp[tokens[d - 1][parent[d]], tokens[d]])
    n, jhat = 0, -1
    for d in range(gamma):
        ref = score[d][anc[d]] if reference == "ancestor" else score[d][best]
        ok = joint[d] - ref > math.log(tau)
        if ok.any():
            n, jhat = d + 1, int(np.argmax(np.where(ok, joint[d], -np.inf)))
    block, j = [], jhat
    for d in range(n - 1, -1, -1):
        block.insert(0, int(tokens[d][j]))
        j = int(parent[d][j])
    y = int(draw(p[block[-1] if block else last], 1)[0])
    return block + [y]


MM_REF = dict(width=3, gamma=3, tau=0.7)


def mmtad_reference_mismatches(seeds=range(200), **dp) -> int:
    """Seeds whose first MMTAD round (B=3, γ=3, warped) differs from the plain reference's."""
    dtab, ttab = random_tables(V, seed=23)
    q, p = warped_rows(dtab), warped_rows(ttab)
    bad = 0
    for seed in seeds:
        sp = SamplingParams(**WARPED, max_new_tokens=MM_REF["gamma"] + 1, seed=seed)
        out = first_round("mmtad", dtab, ttab, sp, PROMPT, gamma=MM_REF["gamma"], beam_width=MM_REF["width"],
                          threshold=MM_REF["tau"], **dp)
        u = iter(np.random.default_rng(seed).random(64))
        bad += out != reference_mmtad_round(q, p, PROMPT[-1], u=u, **MM_REF)
    return bad


def test_mmtad_round_matches_plain_reference_token_for_token():
    assert mmtad_reference_mismatches() == 0


@pytest.mark.parametrize("mutant", ["column_reference", "uniform_parent_weights"])
def test_mmtad_plain_reference_rejects_mutant(monkeypatch, mutant):
    if mutant == "column_reference":
        bad = mmtad_reference_mismatches(reference="column")
    else:
        monkeypatch.setattr(draft_mod, "sample_many", uniform_parent_weights)
        bad = mmtad_reference_mismatches()
    assert bad >= 10
