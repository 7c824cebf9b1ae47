"""Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): the lossless baseline.

γ tokens are drafted by ancestral sampling from q; the target accepts x_i with probability
min(1, p(x_i)/q(x_i)); on the first rejection one token is drawn from norm(max(0, p - q)); if all
pass, a bonus token is drawn from p. The output then follows the target's (processed)
distribution exactly. This is the "conventional speculative decoding" the MTAD paper compares to.
"""

from __future__ import annotations

import numpy as np

from mtad_trt.engine.decoders.ar import target_step
from mtad_trt.engine.decoders.base import Call, Decoder, DecodeState, count_accepted, prefill_prompt
from mtad_trt.engine.decoders.draft import compact, draft_tree
from mtad_trt.engine.sampling import Dist, process, sample


def accept_sps(p: Dist, q: list[Dist], block: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    """Returns (n accepted, next token). p: γ+1 rows of target distributions, q[i]: the draft's at depth i."""
    for i, x in enumerate(block):
        px, qx = float(p.at(i, [x])[0]), float(q[i].at(0, [x])[0])
        if qx > 0 and rng.random() < min(1.0, px / qx):
            continue
        if p.idx is None and q[i].idx is None:  # both dense (top_k = 0)
            tokens, residual = np.arange(p.vocab), np.maximum(p.p[i] - q[i].p[0], 0.0)
        else:  # on the union of the two supports, tokens ascending: the dense draw, without the zeros
            tokens = np.union1d(p.support(i)[0], q[i].support(0)[0])
            residual = np.maximum(p.at(i, tokens) - q[i].at(0, tokens), 0.0)
        total = residual.sum()
        # p == q on their support leaves no residual mass: then p itself is the right law.
        return i, int(tokens[sample(residual / total, rng)]) if total > 0 else p.sample(rng, i)
    return len(block), p.sample(rng, len(block))


def decode_sps(st: DecodeState) -> Decoder:
    st.stats.decoder, st.stats.beam_width = "sps", 1
    yield from prefill_prompt(st, ["target", "draft"])
    pend_t, pend_d = [st.prompt[-1]], [st.prompt[-1]]  # committed tokens not yet in each cache
    while True:
        g = st.gamma
        if g == 0:  # the policy turned speculation off this iteration: one plain target step
            y = yield from target_step(st, pend_t)
            pend_t, pend_d = [y], pend_d + [y]
            yield None  # iteration boundary
            continue
        tree = yield from draft_tree(st, pend_d, 1, g, keep_q=True)
        block = tree.tokens[:, 0]
        p = len(pend_t)
        logits = yield Call("target", np.concatenate([pend_t, block]), logits_rows=range(p - 1, p + g))
        n, y = accept_sps(process(logits, st.sampling), tree.q, block, st.rng)
        st.target.commit_chain(p + n)
        st.stats.drafted_tokens += g
        compact(st.row("draft"), tree, [0] * g, n)
        count_accepted(st, n)
        pend_t = [y]
        pend_d = ([int(block[-1])] if n == g else []) + [y]
        st.emit([int(x) for x in block[:n]] + [y], logits, range(n + 1))  # row i predicts block[i]; n the bonus
        yield None  # iteration boundary: the policy may change γ before the next round
