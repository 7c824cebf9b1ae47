"""Draft beam sampling with the small model (docs/algorithm.md §2.1, §3.2).

All B beams of one sequence live in scratch slots of one batch row: depth d's B nodes are fed in
one draft call with a tree mask (committed prefix + own ancestors + self), so drafting costs γ
draft calls whatever B is, and no cache row is ever copied. Depth-γ nodes are sampled but never
fed. With B=1 this is ordinary ancestral sampling from q (the speculative-sampling draft).

Temperature 0 gives deterministic beam search: beams are ranked by the full-softmax joint
log-likelihood (no top-k/top-p), as in the reference code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mtad_trt.backends.rows import Row
from mtad_trt.engine.decoders.base import Call, Decoder, DecodeState, catch_up
from mtad_trt.engine.sampling import Dist, log, log_top, process, sample_many


@dataclass
class DraftTree:
    """The beam tree: depth-major arrays [γ, B]."""

    tokens: np.ndarray  # int64 token of node (d, j)
    parent: np.ndarray  # int64 index of the parent at depth d-1 (-1 at depth 0)
    score: np.ndarray  # float64 S_{d,j}: cumulative draft log-likelihood of path(d, j)
    best: int  # j* = argmax_j S_{γ-1, j}
    base: int  # draft slots committed before this tree; node (d, j) sits in slot base + d*B + j
    q: list[Dist] | None = None  # processed draft distribution at each depth along beam 0 (B=1 only)

    @property
    def gamma(self) -> int:
        return self.tokens.shape[0]

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    def path(self, d: int, j: int) -> list[int]:
        """Beam indices of the ancestors of node (d, j) at depths 0..d (inclusive)."""
        return _ancestors(self.parent, d, j) + [j]

    def slot(self, d: int, j: int) -> int:
        return self.base + d * self.width + j


def draft_tree(st: DecodeState, pending: list[int], width: int, gamma: int, keep_q: bool = False) -> Decoder:
    """Feed the draft's pending tokens, then grow a B-wide beam tree γ levels deep (returns it)."""
    sp, rng, draft = st.sampling, st.rng, st.row("draft")
    yield from catch_up(st, pending)
    greedy = sp.temperature == 0
    tokens = np.zeros((gamma, width), np.int64)
    parent = np.full((gamma, width), -1, np.int64)
    score = np.zeros((gamma, width))
    qs: list[Dist] | None = [] if keep_q else None

    logits = (yield Call("draft", pending))[0]
    draft.commit_chain(len(pending))
    base = draft.n
    if greedy:  # beam search: the top-B tokens by full-softmax log-likelihood (ties: lower id first)
        tok, lp = log_top(logits, width)
        order = np.argsort(-lp[0], kind="stable")
        tokens[0], score[0] = tok[0][order], lp[0][order]
        if keep_q:
            qs.append(process(logits, sp))
    else:
        r = process(logits, sp)
        if keep_q:
            qs.append(r)
        tokens[0] = r.sample_many(width, rng)
        score[0] = log(r.prob(0, tokens[0]))

    for d in range(1, gamma):
        # Feed depth d-1's nodes; each sees the committed prefix and its own ancestors' slots.
        ancestors = [[base + e * width + a for e, a in enumerate(_ancestors(parent, d - 1, j))] for j in range(width)]
        logits = yield Call("draft", tokens[d - 1], cache_ancestors=ancestors, logits_rows=range(width),
                            slots=base + d * width)
        draft.keep(np.arange(width), base + (d - 1) * width + np.arange(width))
        # candidates (parent j, token v) scored S_j + log r_j[v]: log of w_j * r_j[v] up to a constant
        if greedy:
            tok, lp = log_top(logits, width)  # each row's best `width` suffice for the best `width` pairs
            joint = score[d - 1][:, None] + lp
            top = np.argsort(-joint.ravel(), kind="stable")[:width]
            if keep_q:
                qs.append(process(logits[0], sp))
        else:
            r = process(logits, sp)  # [B rows]
            if keep_q:
                qs.append(r.rows(0))
            joint = score[d - 1][:, None] + log(r.p)
            tok = r.idx if r.idx is not None else np.broadcast_to(np.arange(r.p.shape[1]), r.p.shape)
            w = np.exp(joint - joint.max())
            top = sample_many(w / w.sum(), width, rng)
        parent[d], tokens[d] = top // joint.shape[1], tok.ravel()[top]
        score[d] = joint.ravel()[top]

    best = int(np.argmax(score[-1]))
    return DraftTree(tokens, parent, score, best, base, qs)


def _ancestors(parent: np.ndarray, d: int, j: int) -> list[int]:
    """Beam indices at depths 0..d-1 of the ancestors of node (d, j) (not the node itself)."""
    out = []
    for e in range(d, 0, -1):
        j = int(parent[e, j])
        out.append(j)
    return out[::-1]


def compact(draft: Row, tree: DraftTree, path: list[int], accepted: int) -> None:
    """Move the accepted path's cached draft nodes to the next committed slots.

    Depth-γ nodes were never fed, so at most γ-1 nodes move; they go to slots base..base+m-1,
    each at or below its source slot, so increasing depth order never overwrites a pending source.
    """
    m = min(accepted, tree.gamma - 1)
    if m:
        src = [tree.slot(d, path[d]) for d in range(m)]
        dst = list(range(tree.base, tree.base + m))
        if src != dst:
            draft.move(src, dst)
    draft.n = tree.base + m
