"""Export parity check: the exported graph, run by the runtime, against the transformers model.

The engine side is driven through the runtime's own `Sequence` (the same mask/position/slot code
the decoders use), so a pass also checks that bookkeeping. The reference is the plain HF model's
full causal forward over the same text (for tree nodes: over committed text + the node's path).
"""

from __future__ import annotations

import numpy as np
import torch

from mtad_trt.engine import Engine
from mtad_trt.sequence import Sequence

TOLERANCE = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 2e-1}


def _reference(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.tensor([ids], dtype=torch.int64))
    return out.logits[0].float().numpy()


def check_parity(model, engine: Engine, vocab_size: int, seed: int = 0, tolerance: float | None = None) -> dict:
    """Run prefill, 3 single-token steps, a 4-token chunk and a 2x2 tree; return max |Δlogits| per case."""
    rng = np.random.default_rng(seed)
    ids = [int(x) for x in rng.integers(0, vocab_size, 16)]
    prompt, singles, chunk, tree = ids[:6], ids[6:9], ids[9:13], ids[13:16] + [int(rng.integers(vocab_size))]
    seq = Sequence(engine)
    seq.reset()
    ref = _reference(model, ids[:13])
    diffs: dict[str, float] = {}

    got = seq.forward(prompt, logits_rows=range(len(prompt)))
    seq.commit_chain(len(prompt))
    diffs["prefill"] = float(np.abs(got - ref[: len(prompt)]).max())

    worst = 0.0
    for i, tok in enumerate(singles):
        got = seq.forward([tok])
        seq.commit_chain(1)
        worst = max(worst, float(np.abs(got[0] - ref[len(prompt) + i]).max()))
    diffs["decode"] = worst

    start = len(prompt) + len(singles)
    got = seq.forward(chunk, logits_rows=range(len(chunk)))
    diffs["chunk"] = float(np.abs(got - ref[start : start + len(chunk)]).max())
    seq.commit_chain(len(chunk))

    # Tree: two roots a, b (siblings share a position), each with one child.
    a, b, a1, b1 = tree
    got = seq.forward([a, b, a1, b1], parents=[-1, -1, 0, 1], logits_rows=range(4))
    committed = ids[:13]
    worst = 0.0
    for row, path in enumerate(([a], [b], [a, a1], [b, b1])):
        want = _reference(model, committed + path)[-1]
        worst = max(worst, float(np.abs(got[row] - want).max()))
    diffs["tree"] = worst
    seq.reset()

    limit = TOLERANCE.get(engine.spec.dtype, 1e-3) if tolerance is None else tolerance
    max_diff = max(diffs.values())
    return {"max_abs_diff": diffs, "worst": max_diff, "tolerance": limit, "passed": bool(max_diff <= limit)}
