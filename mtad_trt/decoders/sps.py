"""Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): the lossless baseline.

γ tokens are drafted by ancestral sampling from q; the target accepts x_i with probability
min(1, p(x_i)/q(x_i)); on the first rejection one token is drawn from norm(max(0, p - q)); if all
pass, a bonus token is drawn from p. The output then follows the target's (processed)
distribution exactly. This is the "conventional speculative decoding" the MTAD paper compares to.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from mtad_trt.decoders.draft import compact, draft_tree
from mtad_trt.params import DecodeParams, SamplingParams
from mtad_trt.rows import Row
from mtad_trt.sampling import process, sample
from mtad_trt.stats import Stats, Timer


def accept_sps(p: np.ndarray, q: np.ndarray, block: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    """Returns (n accepted, next token). p: [γ+1, V] target, q: [γ, V] draft distributions."""
    for i, x in enumerate(block):
        px, qx = p[i, x], q[i, x]
        if qx > 0 and rng.random() < min(1.0, px / qx):
            continue
        residual = np.maximum(p[i] - q[i], 0.0)
        total = residual.sum()
        # p == q on their support leaves no residual mass: then p itself is the right law.
        return i, sample(residual / total if total > 0 else p[i], rng)
    return len(block), sample(p[len(block)], rng)


def decode_sps(
    target: Row,
    draft: Row,
    prompt: list[int],
    sp: SamplingParams,
    dp: DecodeParams,
    stats: Stats,
    rng: np.random.Generator,
) -> Iterator[list[int]]:
    g = dp.gamma
    stats.decoder, stats.gamma, stats.beam_width = "sps", g, 1
    stats.accepted_per_position = [0] * g
    target.reset()
    draft.reset()
    pend_t, pend_d = list(prompt), list(prompt)
    first = True
    while True:
        tree = draft_tree(draft, pend_d, 1, g, sp, rng, stats, keep_q=True)
        block = tree.tokens[:, 0]
        with Timer(stats, "prefill_s" if first else "verify_s"):
            P = len(pend_t)
            logits = target.forward(np.concatenate([pend_t, block]), logits_rows=range(P - 1, P + g))
            n, y = accept_sps(process(logits, sp), tree.q, block, rng)
            target.commit_chain(P + n)
        stats.target_calls += 1
        stats.drafted_tokens += g
        first = False
        compact(draft, tree, [0] * g, n)
        stats.iterations += 1
        stats.accepted_tokens += n
        for i in range(n):
            stats.accepted_per_position[i] += 1
        pend_t = [y]
        pend_d = ([int(block[-1])] if n == g else []) + [y]
        yield [int(x) for x in block[:n]] + [y]
