"""Export parity check: the exported graph, run by the runtime, against the transformers model.

The engine side is driven through the runtime's own `Row` (the same mask/position/slot code
the decoders use), so a pass also checks that bookkeeping. The reference is the plain HF model
with transformers' own eager attention (never the wrapper's attention function) and HF's own
masks, sliding windows and soft-caps: a full causal forward over the same text (for tree nodes:
over committed text + the node's path, or HF's incremental decoding from its own cache).

Two groups of cases:

- short (smallest S bucket): a 6-token prefill, 3 single-token steps, a 4-token chunk and a 2x2
  tree whose nodes have their parents in the same block;
- long (where exports break): a context longer than every sliding window that reaches the
  largest S bucket — a prefill in two chunks (the second one grows the cache to the largest
  bucket, re-laying out live rows), 3 single-token steps, then a draft-style tree level whose
  roots were kept in scratch slots (`cache_ancestors`). Only a few logits rows are compared, so
  the cost is about one prefill of the long prompt per side.

A failure is reported as one line (`failure_line`): what differed, by how much, where.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from mtad_trt.backends.kvcache import SMALLEST_BUCKET, bucket_sizes
from mtad_trt.backends.rows import Row
from mtad_trt.backends.runner import ModelRunner
from mtad_trt.contract import ModelSpec
from mtad_trt.contract.wrapper import cache_keyword

TOLERANCE = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 2e-1}
DECODE_STEPS = 3  # single-token steps after each prefill
PAST_WINDOW = 16  # the long context ends at least this many tokens past the sliding window
PAST_BUCKET = 8  # ... and this many past the second-largest bucket (so it runs in the largest)
TREE_SLOTS = 2  # scratch slots the long tree needs after the committed text


def long_layout(spec: ModelSpec, smallest_bucket: int = SMALLEST_BUCKET) -> dict:
    """Where the long case runs: context length, its prefill split, the buckets it reaches.

    The context is the shortest that is past every sliding window (by PAST_WINDOW tokens) and
    runs in the largest S bucket, within the capacity left for the decode steps and the tree.
    """
    buckets = bucket_sizes(spec.max_seq_len, smallest_bucket)
    room = spec.max_seq_len - DECODE_STEPS - TREE_SLOTS
    window = spec.window
    want = max(24, (buckets[-2] + PAST_BUCKET) if len(buckets) > 1 else 0, (window or 0) + PAST_WINDOW)
    length = max(2, min(want, room))
    # first chunk inside the second-largest bucket; the second grows the cache to the largest
    split = min(buckets[-2] - PAST_BUCKET, length - 1) if len(buckets) > 1 else length // 2
    split = max(1, split)
    return {"context": length, "split": split, "buckets": buckets, "window": window,
            "past_window": window is None or length > window}


def _probe_rows(start: int, stop: int, window: int | None, count: int = 6) -> list[int]:
    """Positions in [start, stop) to compare: the last, a spread, and the first ones past the window."""
    rows = {stop - 1, *np.linspace(start, stop - 1, count).astype(int).tolist()}
    if window is not None:
        rows |= {p for p in (window - 1, window, window + 1) if start <= p < stop}
    return sorted(rows)


def _logits(model, ids: list[int], keep: list[int] | None = None, cache: bool = False):
    """HF logits of a causal forward over `ids` at positions `keep` (all when None), float32 numpy."""
    kwargs = {} if keep is None else {"logits_to_keep": torch.tensor(keep, dtype=torch.int64)}
    with torch.no_grad():
        out = model(torch.tensor([ids], dtype=torch.int64), use_cache=cache, **kwargs)
    return out.logits[0].float().numpy(), (out.past_key_values if cache else None)


def _continue(model, cache, path: list[int]) -> np.ndarray:
    """HF incremental decoding (a copy of its own cache) over `path`: the last position's logits."""
    with torch.no_grad():
        kw = cache_keyword(model)
        out = model(torch.tensor([path], dtype=torch.int64), use_cache=True, **{kw: copy.deepcopy(cache)})
    return out.logits[0, -1].float().numpy()


class _eager:
    """Run the model with transformers' eager attention (the export sets the wrapper's own)."""

    def __init__(self, model) -> None:
        self.cfg = model.config

    def __enter__(self):
        self.old = self.cfg._attn_implementation
        self.cfg._attn_implementation = "eager"

    def __exit__(self, *exc):
        self.cfg._attn_implementation = self.old


def reference_cases(model, spec: ModelSpec, seed: int = 0, smallest_bucket: int = SMALLEST_BUCKET) -> dict:
    """The parity inputs and the transformers logits for them, computed up front.

    Separate from the engine run so the caller can free the torch model before loading the graph:
    holding both a 1.5B float32 model and its ONNX Runtime session doubles peak RAM.
    """
    vocab = spec.vocab_size
    rng = np.random.default_rng(seed)
    ids = [int(x) for x in rng.integers(0, vocab, 16)]
    tree = ids[13:16] + [int(rng.integers(vocab))]
    a, b, a1, b1 = tree
    committed = ids[:13]
    lay = long_layout(spec, smallest_bucket)
    n, split = lay["context"], lay["split"]
    long_ids = [int(x) for x in rng.integers(0, vocab, n + DECODE_STEPS)]
    long_tree = [int(x) for x in rng.integers(0, vocab, 4)]
    probes = _probe_rows(0, split, lay["window"]) + list(range(split, n))
    with _eager(model):
        short = _logits(model, committed)[0]
        short_tree = [_logits(model, committed + path)[0][-1] for path in ([a], [b], [a, a1], [b, b1])]
        keep = probes + list(range(n, n + DECODE_STEPS))
        long_ref, cache = _logits(model, long_ids, keep, cache=True)
        la, lb, la1, lb1 = long_tree
        long_tree_ref = [_continue(model, cache, path) for path in ([la], [lb], [la, la1], [lb, lb1])]
        del cache
    return {
        "ids": ids,
        "tree": tree,
        "ref": short,
        "tree_ref": short_tree,
        "long": {"layout": lay, "ids": long_ids, "tree": long_tree, "probes": probes,
                 "ref": dict(zip(keep, long_ref, strict=True)), "tree_ref": long_tree_ref},
    }


class _Diffs:
    """The worst |Δlogits| per case, and where it was (position, context length, S bucket)."""

    def __init__(self) -> None:
        self.diff: dict[str, float] = {}
        self.where: dict[str, dict] = {}

    def add(self, case: str, got: np.ndarray, want: np.ndarray, position: int, context: int, bucket: int) -> None:
        d = float(np.abs(np.asarray(got, np.float64) - want).max())
        if not np.isfinite(d):
            d = float("inf")
        if case not in self.diff or d > self.diff[case]:
            self.diff[case] = d
            self.where[case] = {"position": int(position), "context": int(context), "bucket": int(bucket)}

    def head(self, case: str, out, got: np.ndarray, positions: list[int], context: int, bucket: int) -> None:
        """The top-k head must be the top-k (and logsumexp) of the graph's own logits rows."""
        if out.top is None:
            return
        values, indices, lse = (x[0] for x in out.top)
        h = values.shape[-1]
        g = got.astype(np.float64)  # an exact reference for the graph's own float32 logsumexp
        m = g.max(-1, keepdims=True)
        want_lse = m[:, 0] + np.log(np.exp(g - m).sum(-1))
        for r, pos in enumerate(positions):
            d = max(float(np.abs(values[r] - got[r][indices[r]]).max()),
                    float(np.abs(np.sort(got[r])[::-1][:h] - values[r]).max()),
                    float(abs(lse[r] - want_lse[r])))
            self.add(case, np.array([d]), np.zeros(1), pos, context, bucket)


def check_parity(cases: dict, engine: ModelRunner, tolerance: float | None = None) -> dict:
    """Run the short and the long cases (module docstring); return max |Δlogits| per case and where."""
    ids, ref = cases["ids"], cases["ref"]
    prompt, singles, chunk = ids[:6], ids[6:9], ids[9:13]
    seq = Row(engine)
    seq.reset()
    d = _Diffs()

    got = seq.forward(prompt, logits_rows=range(len(prompt)))
    for p in range(len(prompt)):
        d.add("prefill", got[p], ref[p], p, len(prompt), engine.bucket)
    seq.commit_chain(len(prompt))

    for i, tok in enumerate(singles):
        got = seq.forward([tok])
        seq.commit_chain(1)
        p = len(prompt) + i
        d.add("decode", got[0], ref[p], p, p + 1, engine.bucket)

    start = len(prompt) + len(singles)
    out = seq.step(chunk, logits_rows=range(len(chunk)))
    got = out.logits[0]
    for r in range(len(chunk)):
        d.add("chunk", got[r], ref[start + r], start + r, start + len(chunk), engine.bucket)
    d.head("topk_head", out, got, list(range(start, start + len(chunk))), start + len(chunk), engine.bucket)
    seq.commit_chain(len(chunk))

    # Tree: two roots a, b (siblings share a position), each with one child, parents in the block.
    n = seq.n
    got = seq.forward(cases["tree"], parents=[-1, -1, 0, 1], logits_rows=range(4))
    for r, want in enumerate(cases["tree_ref"]):
        d.add("tree", got[r], want, n + r // 2, n + 1 + r // 2, engine.bucket)

    if "long" in cases:
        _check_long(cases["long"], seq, engine, d)
    seq.reset()

    limit = TOLERANCE.get(engine.spec.dtype, 1e-3) if tolerance is None else tolerance
    worst_case = max(d.diff, key=d.diff.get)
    max_diff = d.diff[worst_case]
    record = {"max_abs_diff": d.diff, "where": d.where, "worst": max_diff, "worst_case": worst_case,
              "tolerance": limit, "passed": bool(max_diff <= limit)}
    if "long" in cases:
        lay = cases["long"]["layout"]
        bucket = d.where["long_decode"]["bucket"]
        record["long"] = {"context": lay["context"], "split": lay["split"], "window": lay["window"],
                          "past_window": lay["past_window"], "bucket": bucket,
                          "largest_bucket": bucket == lay["buckets"][-1]}
    return record


def _check_long(case: dict, seq: Row, engine: ModelRunner, d: _Diffs) -> None:
    lay, ids, ref = case["layout"], case["ids"], case["ref"]
    n, split = lay["context"], lay["split"]
    seq.reset()
    # Prefill in two chunks: the second grows the cache to the largest bucket with live rows in it.
    for lo, hi in ((0, split), (split, n)):
        rows = [p for p in case["probes"] if lo <= p < hi]
        out = seq.step(ids[lo:hi], logits_rows=[p - lo for p in rows])
        got = out.logits[0]
        for r, p in enumerate(rows):
            d.add("long_prefill", got[r], ref[p], p, hi, engine.bucket)
        d.head("topk_head", out, got, rows, hi, engine.bucket)
        seq.commit_chain(hi - lo)
    for p in range(n, len(ids)):
        got = seq.forward([ids[p]])
        seq.commit_chain(1)
        d.add("long_decode", got[0], ref[p], p, p + 1, engine.bucket)
    # A draft-style tree level: roots a, b kept in scratch slots, then their children see them
    # as cache ancestors (positions n and n + 1 under the window's rule).
    a, b, a1, b1 = case["tree"]
    c = seq.n
    got = seq.forward([a, b], parents=[-1, -1], logits_rows=[0, 1], slots=c + TREE_SLOTS)
    seq.keep([0, 1], [c, c + 1])
    for r in range(2):
        d.add("long_tree", got[r], case["tree_ref"][r], c, c + 1, engine.bucket)
    got = seq.forward([a1, b1], cache_ancestors=[[c], [c + 1]], logits_rows=[0, 1], slots=c + TREE_SLOTS)
    for r in range(2):
        d.add("long_tree", got[r], case["tree_ref"][2 + r], c + 1, c + 2, engine.bucket)


CASE_NAMES = {"prefill": "short prefill", "decode": "short decode", "chunk": "4-token chunk",
              "tree": "2x2 tree", "topk_head": "top-k head", "long_prefill": "long prefill",
              "long_decode": "long decode", "long_tree": "tree from scratch slots"}


def _short(x: float) -> str:
    """3.1e-2, 1e-3: two significant digits, no exponent padding."""
    if not np.isfinite(x):
        return str(x)
    mant, exp = f"{x:.1e}".split("e")
    return f"{mant.removesuffix('.0')}e{int(exp)}"


def failure_line(parity: dict, role: str) -> str:
    """One line naming what differed, by how much and where (what a failed export prints)."""
    case = parity["worst_case"]
    w = parity["where"][case]
    what = "top-k head differs from its own logits" if case == "topk_head" else "logits differ"
    return (f"parity: {role} {what} by {_short(parity['worst'])} (tolerance {_short(parity['tolerance'])}) at "
            f"position {w['position']} of a {w['context']}-token context (S bucket {w['bucket']}, "
            f"{CASE_NAMES.get(case, case)})")
