"""MTAD and MMTAD: joint verification of a drafted block (spec/mtad.md §2.2-2.4, §3).

MTAD verifies the best beam as a chain; MMTAD verifies the whole beam tree in the same single
target call (tree mask, siblings share positions). Prefix / node (d, j) passes when its target
joint log-likelihood beats the draft reference by log τ; the longest passing depth wins, then one
token is always sampled from the target after the accepted prefix (no residual correction: MTAD
is not lossless, by design).

Target KV rollback is free: only the rows of the kept tokens are written to cache slots.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from mtad_trt.decoders.draft import DraftTree, compact, draft_tree
from mtad_trt.params import DecodeParams, SamplingParams
from mtad_trt.rows import Row
from mtad_trt.sampling import log, process, sample
from mtad_trt.stats import Stats, Timer


def accept_chain(p: np.ndarray, block: np.ndarray, q_joint: np.ndarray, log_tau: float) -> int:
    """MTAD acceptance: n = max{i : P_i - Q_i > log τ} (0 if none). Longest passing prefix, not first failure.

    p: [γ+1, V] processed target distributions (row i predicts block[i]); block: [γ] tokens;
    q_joint: [γ] cumulative draft log-likelihoods Q_1..Q_γ.
    """
    g = len(block)
    logp = log(p[np.arange(g), block])
    passed = np.nonzero(np.cumsum(logp) - q_joint > log_tau)[0]
    return int(passed[-1]) + 1 if len(passed) else 0


def accept_tree(
    p_root: np.ndarray, p_nodes: np.ndarray, tree: DraftTree, log_tau: float, reference: str = "ancestor"
) -> tuple[int, int]:
    """MMTAD acceptance across candidates: returns (n, ĵ); n=0 means nothing accepted.

    p_root: [V] target distribution after the committed text; p_nodes: [γ, B, V] distribution after
    each node. Node (d, j) passes iff T_{d,j} - R_d > log τ, with T the target joint of its path and
    R_d the draft score of the best beam's ancestor at depth d ("ancestor", intended) or of the
    same column ("column", the reference code's v2 quirk, for reproduction only).
    """
    g, b = tree.tokens.shape
    joint = np.empty((g, b))
    joint[0] = log(p_root[tree.tokens[0]])
    for d in range(1, g):
        par = tree.parent[d]
        joint[d] = joint[d - 1][par] + log(p_nodes[d - 1, par, tree.tokens[d]])
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


def decode_mtad(
    target: Row,
    draft: Row,
    prompt: list[int],
    sp: SamplingParams,
    dp: DecodeParams,
    stats: Stats,
    rng: np.random.Generator,
) -> Iterator[list[int]]:
    tree_verify = dp.decoder == "mmtad"
    g, b = dp.gamma, dp.beam_width
    stats.decoder, stats.gamma, stats.beam_width = dp.decoder, g, b
    stats.accepted_per_position = [0] * g
    log_tau = math.log(dp.threshold)
    target.reset()
    draft.reset()
    pend_t, pend_d = list(prompt), list(prompt)  # committed tokens not yet in each cache
    first = True
    while True:
        tree = draft_tree(draft, pend_d, b, g, sp, rng, stats)
        with Timer(stats, "prefill_s" if first else "verify_s"):
            P = len(pend_t)
            if tree_verify:
                nodes = tree.tokens.ravel()  # depth-major: node (d, j) at P + d*b + j
                parents = list(range(-1, P - 1)) + [
                    P - 1 if d == 0 else P + (d - 1) * b + int(tree.parent[d, j]) for d in range(g) for j in range(b)
                ]
                logits = target.forward(
                    np.concatenate([pend_t, nodes]), parents=parents, logits_rows=[P - 1, *range(P, P + g * b)]
                )
                probs = process(logits, sp)
                n, jhat = accept_tree(probs[0], probs[1:].reshape(g, b, -1), tree, log_tau, dp.reference)
                path = tree.path(n - 1, jhat) if n else []
                block = [int(tree.tokens[d, path[d]]) for d in range(n)]
                rows = [P + d * b + path[d] for d in range(n)]
                y = sample(probs[1 + rows[-1] - P] if n else probs[0], rng)
                target.keep(list(range(P)) + rows, range(target.n, target.n + P + n))
                target.n += P + n
                stats.drafted_tokens += g * b
            else:
                path = tree.path(g - 1, tree.best)
                block = tree.tokens[np.arange(g), path]
                q_joint = tree.score[np.arange(g), path]
                logits = target.forward(np.concatenate([pend_t, block]), logits_rows=range(P - 1, P + g))
                probs = process(logits, sp)
                n = accept_chain(probs, block, q_joint, log_tau)
                y = sample(probs[n], rng)
                target.commit_chain(P + n)
                block = [int(x) for x in block[:n]]
                stats.drafted_tokens += g
            stats.target_calls += 1
        first = False
        compact(draft, tree, path, n)
        stats.iterations += 1
        stats.accepted_tokens += n
        for i in range(n):
            stats.accepted_per_position[i] += 1
        pend_t = [y]
        pend_d = ([block[-1]] if n == g else []) + [y]  # depth-γ nodes were never fed to the draft
        yield block + [y]
