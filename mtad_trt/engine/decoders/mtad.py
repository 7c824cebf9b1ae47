"""MTAD and MMTAD: joint verification of a drafted block (docs/algorithm.md §2.2-2.4, §3).

MTAD verifies the best beam as a chain; MMTAD verifies the whole beam tree in the same single
target call (tree mask, siblings share positions). Prefix / node (d, j) passes when its target
joint log-likelihood beats the draft reference by log τ; the longest passing depth wins, then one
token is always sampled from the target after the accepted prefix (no residual correction: MTAD
is not lossless, by design).

Target KV rollback is free: only the rows of the kept tokens are written to cache slots.
"""

from __future__ import annotations

import math

import numpy as np

from mtad_trt.engine.decoders.ar import target_step
from mtad_trt.engine.decoders.base import Call, Decoder, DecodeState, count_accepted, prefill_prompt
from mtad_trt.engine.decoders.draft import DraftTree, compact, draft_tree
from mtad_trt.engine.sampling import Dist, log, process


def accept_chain(p: Dist, block: np.ndarray, q_joint: np.ndarray, log_tau: float) -> int:
    """MTAD acceptance: n = max{i : P_i - Q_i > log τ} (0 if none). Longest passing prefix, not first failure.

    p: γ+1 rows of processed target distributions (row i predicts block[i]); block: [γ] tokens;
    q_joint: [γ] cumulative draft log-likelihoods Q_1..Q_γ.
    """
    g = len(block)
    logp = log(p.prob(np.arange(g), block))
    passed = np.nonzero(np.cumsum(logp) - q_joint > log_tau)[0]
    return int(passed[-1]) + 1 if len(passed) else 0


def accept_tree(probs: Dist, tree: DraftTree, log_tau: float, reference: str = "ancestor") -> tuple[int, int]:
    """MMTAD acceptance across candidates: returns (n, ĵ); n=0 means nothing accepted.

    probs: row 0 is the target distribution after the committed text, row 1 + d*B + j the one
    after node (d, j). Node (d, j) passes iff T_{d,j} - R_d > log τ, with T the target joint of its
    path and R_d the draft score of the best beam's ancestor at depth d ("ancestor", intended) or
    of the same column ("column", the reference code's v2 quirk, for reproduction only).
    """
    g, b = tree.tokens.shape
    joint = np.empty((g, b))
    joint[0] = log(probs.prob(0, tree.tokens[0]))
    for d in range(1, g):
        par = tree.parent[d]
        joint[d] = joint[d - 1][par] + log(probs.prob(1 + (d - 1) * b + par, tree.tokens[d]))
    if reference == "ancestor":
        ref = tree.score[np.arange(g), tree.path(g - 1, tree.best)]
    else:
        ref = tree.score[:, tree.best]
    passing = joint - ref[:, None] > log_tau
    depths = np.nonzero(passing.any(axis=1))[0]
    if not len(depths):
        return 0, -1
    d = int(depths[-1])
    cand = np.where(passing[d], joint[d], -np.inf)
    return d + 1, int(np.argmax(cand))


def decode_mtad(st: DecodeState) -> Decoder:
    """MTAD (chain verify of the best beam) or MMTAD (tree verify of every node): st.decode.decoder."""
    sp, dp, stats = st.sampling, st.decode, st.stats
    tree_verify = dp.decoder == "mmtad"
    stats.decoder = dp.decoder
    log_tau = math.log(dp.threshold)
    yield from prefill_prompt(st, ["target", "draft"])
    pend_t, pend_d = [st.prompt[-1]], [st.prompt[-1]]  # committed tokens not yet in each cache
    while True:
        g, b = st.gamma, st.beam_width
        if g == 0:  # the policy turned speculation off this iteration: one plain target step
            y = yield from target_step(st, pend_t)
            pend_t, pend_d = [y], pend_d + [y]
            yield None  # iteration boundary
            continue
        stats.beam_width = max(stats.beam_width, b)
        tree = yield from draft_tree(st, pend_d, b, g)
        p = len(pend_t)
        if tree_verify:
            nodes = tree.tokens.ravel()  # depth-major: node (d, j) at p + d*b + j
            parents = list(range(-1, p - 1)) + [
                p - 1 if d == 0 else p + (d - 1) * b + int(tree.parent[d, j]) for d in range(g) for j in range(b)
            ]
            logits = yield Call("target", np.concatenate([pend_t, nodes]), parents=parents,
                                logits_rows=[p - 1, *range(p, p + g * b)])
            probs = process(logits, sp)
            n, jhat = accept_tree(probs, tree, log_tau, dp.reference)
            path = tree.path(n - 1, jhat) if n else []
            block = [int(tree.tokens[d, path[d]]) for d in range(n)]
            rows = [p + d * b + path[d] for d in range(n)]
            y_row = 1 + rows[-1] - p if n else 0
            y = probs.sample(st.rng, y_row)
            # node (d, j) is predicted by its parent's logits row: the root's (0) or 1 + (d-1)b + path[d-1]
            emit_rows = [1 + (d - 1) * b + path[d - 1] if d else 0 for d in range(n)] + [y_row]
            st.target.keep(list(range(p)) + rows, range(st.target.n, st.target.n + p + n))
            st.target.n += p + n
            stats.drafted_tokens += g * b
        else:
            path = tree.path(g - 1, tree.best)
            chain = tree.tokens[np.arange(g), path]
            q_joint = tree.score[np.arange(g), path]
            logits = yield Call("target", np.concatenate([pend_t, chain]), logits_rows=range(p - 1, p + g))
            probs = process(logits, sp)
            n = accept_chain(probs, chain, q_joint, log_tau)
            y = probs.sample(st.rng, n)
            emit_rows = list(range(n + 1))  # chain row i predicts chain[i]; row n the bonus token
            st.target.commit_chain(p + n)
            block = [int(x) for x in chain[:n]]
            stats.drafted_tokens += g
        compact(st.row("draft"), tree, path, n)
        count_accepted(st, n)
        pend_t = [y]
        pend_d = ([block[-1]] if n == g else []) + [y]  # depth-γ nodes were never fed to the draft
        st.emit(block + [y], logits, emit_rows)
        yield None  # iteration boundary: the policy may change γ and B before the next round
