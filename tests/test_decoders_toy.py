"""Decoder properties from spec/mtad.md §4 on bigram toy engines (fast, many samples)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mtad_trt.batch import Batcher
from mtad_trt.decoders import DecodeState
from mtad_trt.decoders.draft import draft_tree
from mtad_trt.decoders.mtad import accept_chain, accept_tree
from mtad_trt.params import DecodeParams, SamplingParams
from mtad_trt.request import Request
from mtad_trt.rows import Row
from mtad_trt.sampling import process
from mtad_trt.scheduler import Scheduler
from mtad_trt.stats import Stats
from toy import BigramRunner, ToyTokenizer, random_tables, run_toy

V = 6
PROMPT = [0, 3, 1]
FREE = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=1)


def run(decoder, draft_tab, target_tab, sp, seed=None, **dp):
    return run_toy(decoder, draft_tab, target_tab, SamplingParams(**{**sp.__dict__, "seed": seed}), PROMPT, **dp)


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def chi_square_ok(counts: np.ndarray, probs: np.ndarray) -> bool:
    """Pearson chi-square at a 1e-4 false-alarm level (scipy-free: Wilson-Hilferty approximation)."""
    n = counts.sum()
    mask = probs > 0
    assert counts[~mask].sum() == 0, "a token with probability 0 was emitted"
    exp = probs[mask] * n
    stat = ((counts[mask] - exp) ** 2 / exp).sum()
    k = mask.sum() - 1
    z = 3.719  # one-sided 1e-4
    crit = k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3
    return stat < crit


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


def test_wrong_residual_would_be_caught():
    # The test above must be able to fail: the draft's own law is rejected by it.
    counts, dtab, _ = first_token_counts("sps", 6000, gamma=3)
    assert not chi_square_ok(counts, softmax(dtab[PROMPT[-1]]))


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
        if n_tree:
            assert 0 <= j < 3


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
    """spec/mtad.md §2 written out plainly (independent of the package): one MTAD iteration.

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
    agree = 0
    for seed in range(200):
        out, _ = run("mtad", dtab, ttab, sp, seed=seed, gamma=3, beam_width=3, threshold=0.5)
        rng = np.random.default_rng(seed)
        u = iter(rng.random(64))
        ref = reference_iteration(dtab, ttab, PROMPT[-1], 3, 3, 0.5, u)
        assert out[: len(ref)] == ref, f"seed {seed}"
        agree += 1
    assert agree == 200
