"""Export parity check: the exported graph, run by the runtime, against the transformers model.

The engine side is driven through the runtime's own `Row` (the same mask/position/slot code
the decoders use), so a pass also checks that bookkeeping. The reference is the plain HF model's
full causal forward over the same text (for tree nodes: over committed text + the node's path).
"""

from __future__ import annotations

import numpy as np
import torch

from mtad_trt.rows import Row
from mtad_trt.runner import ModelRunner

TOLERANCE = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 2e-1}


def _reference(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.tensor([ids], dtype=torch.int64))
    return out.logits[0].float().numpy()


def reference_cases(model, vocab_size: int, seed: int = 0) -> dict:
    """The parity inputs and the transformers logits for them, computed up front.

    Separate from the engine run so the caller can free the torch model before loading the graph:
    holding both a 1.5B float32 model and its ONNX Runtime session doubles peak RAM.
    """
    rng = np.random.default_rng(seed)
    ids = [int(x) for x in rng.integers(0, vocab_size, 16)]
    tree = ids[13:16] + [int(rng.integers(vocab_size))]
    a, b, a1, b1 = tree
    committed = ids[:13]
    return {
        "ids": ids,
        "tree": tree,
        "ref": _reference(model, committed),
        "tree_ref": [_reference(model, committed + path)[-1] for path in ([a], [b], [a, a1], [b, b1])],
    }


def check_parity(cases: dict, engine: ModelRunner, tolerance: float | None = None) -> dict:
    """Run prefill, 3 single-token steps, a 4-token chunk and a 2x2 tree; return max |Δlogits| per case."""
    ids, ref = cases["ids"], cases["ref"]
    prompt, singles, chunk = ids[:6], ids[6:9], ids[9:13]
    seq = Row(engine)
    seq.reset()
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
    out = seq.step(chunk, logits_rows=range(len(chunk)))
    got = out.logits[0]
    diffs["chunk"] = float(np.abs(got - ref[start : start + len(chunk)]).max())
    if out.top is not None:  # the top-k head must be the top-k of the graph's own logits
        values, indices, lse = (a[0] for a in out.top)
        want = np.take_along_axis(got, indices, -1)
        m = got.max(-1, keepdims=True)
        diffs["topk_head"] = max(float(np.abs(values - want).max()),
                                 float(np.abs(np.sort(got, -1)[:, ::-1][:, : values.shape[-1]] - values).max()),
                                 float(np.abs(lse - (m[:, 0] + np.log(np.exp(got - m).sum(-1)))).max()))
    seq.commit_chain(len(chunk))

    # Tree: two roots a, b (siblings share a position), each with one child.
    got = seq.forward(cases["tree"], parents=[-1, -1, 0, 1], logits_rows=range(4))
    diffs["tree"] = max(float(np.abs(got[r] - want).max()) for r, want in enumerate(cases["tree_ref"]))
    seq.reset()

    limit = TOLERANCE.get(engine.spec.dtype, 1e-3) if tolerance is None else tolerance
    max_diff = max(diffs.values())
    return {"max_abs_diff": diffs, "worst": max_diff, "tolerance": limit, "passed": bool(max_diff <= limit)}
