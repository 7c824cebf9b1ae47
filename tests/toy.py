"""A bigram "model" behind the ModelRunner protocol: logits depend only on the fed token.

Fast enough to run a decoder tens of thousands of times, which the distributional properties of
docs/algorithm.md §4 (P2, P5, lossless speculative sampling) need. The cache calls are recorded, not
simulated: a bigram model does not read its context.
"""

from __future__ import annotations

import math

import numpy as np

from mtad_trt.contract import ModelSpec


class BigramRunner:
    name = "toy"
    row_window = False

    def __init__(self, table: np.ndarray, max_seq_len: int = 4096) -> None:
        self.table = np.asarray(table, np.float32)  # [V, V] logits of the next token given the current
        v = self.table.shape[0]
        self.spec = ModelSpec(1, 1, 1, v, "float32", max_seq_len, "bigram")
        self.calls = 0
        self.last_shapes: list[tuple[int, int]] = []

    @property
    def bucket(self) -> int:
        return self.spec.max_seq_len

    def reserve(self, slots: int) -> int:
        assert slots <= self.spec.max_seq_len
        return self.spec.max_seq_len

    def reset(self) -> None:
        pass

    def shrink(self, slots: int) -> int:
        return self.spec.max_seq_len

    def step(self, inputs) -> np.ndarray:
        self.calls += 1
        ids = inputs.input_ids  # [R, T]
        # Contract sanity: every query row sees itself (else softmax of an all-masked row is NaN).
        t = ids.shape[1]
        s = inputs.attention_mask.shape[-1] - t
        assert inputs.attention_mask[:, 0, np.arange(t), s + np.arange(t)].all()
        self.last_shapes.append((t, inputs.logits_index.shape[1]))
        return self.table[np.take_along_axis(ids, inputs.logits_index, 1)]  # [R, K, V]

    def keep(self, row, src, dst) -> None:
        pass

    def move(self, row, src, dst) -> None:
        pass

    def read(self, row, start, count) -> np.ndarray:
        return np.zeros((2, 1, count, 1), np.float32)  # a bigram model keeps no context worth copying

    def write(self, row, start, block) -> None:
        pass

    def close(self) -> None:
        pass


class ToyTokenizer:
    """Token ids as text ("3 1 4 "), so stop strings and streaming work on toy runners."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(f"{i} " for i in ids)


def run_toy(decoder: str, draft_table, target_table, sp, prompt, max_batch: int = 1, **dp):
    """One request through the real scheduler on bigram runners: (tokens, stats)."""
    from mtad_trt.engine.params import DecodeParams
    from mtad_trt.engine.request import Request
    from mtad_trt.engine.scheduler import Scheduler

    sched = Scheduler(BigramRunner(target_table), BigramRunner(draft_table), ToyTokenizer(), set(), max_batch)
    req = Request(list(prompt), sp, DecodeParams(decoder=decoder, **dp))
    sched.add(req)
    while not req.finished:
        sched.step()
    if req.error is not None:
        raise req.error
    return req.output_ids, req.stats


def random_tables(v: int = 6, seed: int = 0, sharp: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """(draft, target) bigram logits that agree partly, like a small and a large model."""
    rng = np.random.default_rng(seed)
    target = rng.normal(0, sharp, (v, v))
    draft = target + rng.normal(0, sharp * 0.7, (v, v))
    return draft.astype(np.float32), target.astype(np.float32)


def warp(logits, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """docs/algorithm.md §1 proc_T in plain numpy, independent of mtad_trt.engine.sampling: divide by the
    temperature, keep the top-k logits (ties with the k-th kept), softmax, then drop every token
    whose more likely tokens already carry more than top_p of the mass; renormalise."""
    x = np.asarray(logits, np.float64) / temperature
    if top_k:
        kth = np.sort(x)[::-1][top_k - 1]
        x = np.where(x >= kth, x, -np.inf)
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    mass_before = np.cumsum(p[order]) - p[order]
    p[order[mass_before > top_p]] = 0.0
    return p / p.sum()


def chi2_pvalue(counts, probs, min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness-of-fit p-value of `counts` against `probs` (any shape, flattened).

    Categories expected fewer than `min_expected` times are pooled into one. A count in a category
    of probability 0 gives p = 0 (the law cannot produce it). scipy-free: the Wilson-Hilferty
    normal approximation of the chi-square tail (accurate to a few per cent of p down to 1e-10).
    """
    counts = np.asarray(counts, np.float64).ravel()
    probs = np.asarray(probs, np.float64).ravel()
    assert counts.shape == probs.shape and abs(probs.sum() - 1) < 1e-6  # (float32 softmax rows)
    probs = probs / probs.sum()
    if counts[probs <= 0].sum() > 0:
        return 0.0
    expected = probs * counts.sum()
    big = expected >= min_expected
    obs, exp = list(counts[big]), list(expected[big])
    if expected[~big].sum() > 0:
        obs.append(counts[~big].sum())
        exp.append(expected[~big].sum())
    obs, exp = np.array(obs), np.array(exp)
    dof = len(obs) - 1
    assert dof >= 1, "need at least two categories"
    stat = float(((obs - exp) ** 2 / exp).sum())
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def first_round(decoder: str, draft_table, target_table, sp, prompt, **dp) -> list[int]:
    """The tokens one request emits in its first iteration (the prompt's prefill and one round:
    one scheduler step). `sp.max_new_tokens` must not cut the round (γ+1 is enough)."""
    from mtad_trt.engine.params import DecodeParams
    from mtad_trt.engine.request import Request
    from mtad_trt.engine.scheduler import Scheduler

    sched = Scheduler(BigramRunner(target_table), BigramRunner(draft_table), ToyTokenizer(), set())
    req = Request(list(prompt), sp, DecodeParams(decoder=decoder, **dp))
    sched.add(req)
    sched.step()
    assert req.stats.iterations == 1 and req.error is None
    return list(req.output_ids)
