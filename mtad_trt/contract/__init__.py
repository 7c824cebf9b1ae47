"""The graph contract (docs/graph-contract.md §2): one definition of every graph's inputs and outputs.

Every backend runs the same graph, so its I/O names, dtypes and shape rules live here once: the
export stage names the ONNX graph's tensors from this module, the manifest stores a `ModelSpec`,
ONNX Runtime and TensorRT bind by these names, and every runner checks a step with `check_step`.
The torch module that *is* the contract (`wrapper.ContractWrapper`) sits beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mtad_trt.errors import EngineFolderError

# Inputs of every step, in graph order, with their numpy dtypes; the KV-cache inputs follow them.
STEP_INPUTS: dict[str, type] = {
    "input_ids": np.int64,  # [B, T] new tokens
    "position_ids": np.int64,  # [B, T] explicit positions (tree siblings share one)
    "attention_mask": np.bool_,  # [B, 1, T, S+T] True = may attend; columns: S cache slots, then T new
    "logits_index": np.int64,  # [B, K] which of the T positions need logits
}
SLIDING_MASK = "sliding_attention_mask"  # bool [B, 1, T, S+T]: attention_mask within the window; only
# in graphs with sliding-window layers (ModelSpec.sliding_window), right after attention_mask
LOGITS = "logits"  # float32 [B, K, V]
# The optional top-k head (ModelSpec.topk_head = H > 0): what sampling with top-k <= H, greedy
# decoding and greedy beam ranking need, so the full logits need not leave the device.
TOPK_VALUES = "topk_values"  # float32 [B, K, H], descending
TOPK_INDICES = "topk_indices"  # int64 [B, K, H]
LOGSUMEXP = "logsumexp"  # float32 [B, K]: the full-softmax normaliser
HEAD_OUTPUTS = (TOPK_VALUES, TOPK_INDICES, LOGSUMEXP)
# The graph / KV-cache dtypes and their widths in bytes; every other dtype table derives from these.
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
DTYPES = tuple(DTYPE_BYTES)
NP_DTYPES = {"float32": np.float32, "float16": np.float16}  # numpy has no bfloat16: the host cache's set


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def new_name(layer: int, kind: str) -> str:
    return f"new_key_values.{layer}.{kind}"


@dataclass
class ModelSpec:
    """Shape facts of one exported model: all a runner needs to size its buffers."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype: str  # one of DTYPES: the KV-cache / graph dtype
    max_seq_len: int  # KV-cache capacity S_max in slots
    architecture: str = ""
    sliding_window: int | None = None  # W: a sliding layer's query at position p sees keys at p-W+1..p
    layer_types: list[str] | None = None  # per layer "full_attention" | "sliding_attention" (None: all full)
    topk_head: int = 0  # H: the graph also returns each logits row's top-H values/indices + logsumexp

    @property
    def window(self) -> int | None:
        """W when some layer slides (the graph then takes a sliding mask), else None."""
        return self.sliding_window if self.has_sliding_layers else None

    @property
    def has_sliding_layers(self) -> bool:
        return self.sliding_window is not None and "sliding_attention" in (self.layer_types or [])

    @property
    def step_names(self) -> list[str]:
        """The step inputs of this model's graph, in graph order (before the KV-cache inputs)."""
        names = list(STEP_INPUTS)
        if self.has_sliding_layers:
            names.insert(names.index("attention_mask") + 1, SLIDING_MASK)
        return names

    @property
    def kv_names(self) -> list[tuple[str, str]]:
        """(input name, output name) of every cache tensor, in graph order."""
        return [(past_name(i, k), new_name(i, k)) for i in range(self.num_layers) for k in ("key", "value")]

    @property
    def input_names(self) -> list[str]:
        return [*self.step_names, *(p for p, _ in self.kv_names)]

    @property
    def output_names(self) -> list[str]:
        head = list(HEAD_OUTPUTS) if self.topk_head else []
        return [LOGITS, *head, *(n for _, n in self.kv_names)]

    def io_dims(self) -> dict[str, list[str | int]]:
        """Every graph tensor's dimensions: named dynamic axes (B, T, S, K, S+T) or fixed sizes."""
        dims: dict[str, list[str | int]] = {
            "input_ids": ["B", "T"],
            "position_ids": ["B", "T"],
            "attention_mask": ["B", 1, "T", "S+T"],
            SLIDING_MASK: ["B", 1, "T", "S+T"],
            "logits_index": ["B", "K"],
            LOGITS: ["B", "K", self.vocab_size],
            TOPK_VALUES: ["B", "K", self.topk_head],
            TOPK_INDICES: ["B", "K", self.topk_head],
            LOGSUMEXP: ["B", "K"],
        }
        for past, new in self.kv_names:
            dims[past] = ["B", self.num_kv_heads, "S", self.head_dim]
            dims[new] = ["B", self.num_kv_heads, "T", self.head_dim]
        return {name: d for name, d in dims.items() if name in self.input_names or name in self.output_names}


def config_facts(model: Any) -> dict[str, Any]:
    """The shape facts of a Hugging Face causal LM, read from its config and LM head.

    One reading for the export (which writes them into the manifest) and the torch runner (which
    checks a model folder against the manifest before trusting it).
    """
    cfg = model.config
    heads = cfg.num_attention_heads
    return {
        "num_layers": cfg.num_hidden_layers,
        "num_kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        "vocab_size": model.get_output_embeddings().weight.shape[0],
    }


def attention_layout(config: Any) -> tuple[int | None, list[str]]:
    """(sliding window, per-layer attention types) as the HF model applies them.

    Qwen2 / Gemma 2 / Gemma 3 name each layer's type in `layer_types`; Mistral and Phi-3 slide on
    every layer when `sliding_window` is set. A window at least as long as any context the engine
    can hold changes nothing, but it is kept: the manifest records what the model does.
    """
    window = getattr(config, "sliding_window", None)
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types is None:
        types = ["sliding_attention" if window is not None else "full_attention"] * n
    types = list(types)
    if window is None:
        types = ["full_attention"] * n
    return (int(window) if window is not None else None), types


def _rope_sets(config: Any) -> list[tuple[str, dict]]:
    """(where, rope parameters) of a config: one set, or one per layer type (Gemma 3)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        return []
    if rope and all(isinstance(v, dict) for v in rope.values()):
        return [(f" on {kind} layers", params) for kind, params in rope.items()]
    return [("", rope)]


def unsupported_feature(model: Any, max_seq_len: int) -> str | None:
    """Why an export of `model` with `max_seq_len` slots could not reproduce transformers (None: it can).

    A graph is traced once, so whatever the HF model decides from the sequence length at run time
    must not change within the engine's capacity:

    - dynamic NTK rope scaling recomputes the frequencies from the longest position seen;
    - LongRoPE (Phi-3) switches from its short to its long factors past
      `original_max_position_embeddings`, for the whole sequence.
    """
    cfg = model.config
    name = type(model).__name__
    for where, rope in _rope_sets(cfg):
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind == "dynamic":
            return (f"{name} uses dynamic NTK rope scaling{where}, which rescales its frequencies with the "
                    "sequence length at run time; a static graph cannot reproduce it")
        if kind == "longrope":
            orig = rope.get("original_max_position_embeddings") or getattr(cfg, "original_max_position_embeddings", None)
            if orig is not None and max_seq_len > orig:
                return (f"{name} uses LongRoPE scaling{where}, which switches to its long factors past {orig} "
                        f"positions (original_max_position_embeddings); a static graph cannot, so export with "
                        f"--max-seq-len {orig} or less")
    return None


def spec_from_model(model: Any, dtype: str, max_seq_len: int) -> ModelSpec:
    """The ModelSpec an export of `model` at `dtype` with `max_seq_len` slots has."""
    limit = getattr(model.config, "max_position_embeddings", None) or max_seq_len
    window, types = attention_layout(model.config)
    return ModelSpec(**config_facts(model), dtype=dtype, max_seq_len=min(max_seq_len, limit),
                     architecture=type(model).__name__,
                     sliding_window=window if "sliding_attention" in types else None, layer_types=types)


def check_model(model: Any, spec: ModelSpec, where: str) -> None:
    """Refuse a checkpoint that does not match the manifest (a swapped or edited model folder)."""
    got = config_facts(model)
    bad = [f"{k} {v} (manifest: {getattr(spec, k)})" for k, v in got.items() if v != getattr(spec, k)]
    if bad:
        raise EngineFolderError(
            f"the model in {where} does not match the engine's manifest: {', '.join(bad)}; re-export the engine"
        )


@dataclass
class StepInputs:
    """One call of the graph. B rows, T new tokens, S cache slots (the current bucket), K logits rows."""

    input_ids: np.ndarray  # int64 [B, T]
    position_ids: np.ndarray  # int64 [B, T]
    attention_mask: np.ndarray  # bool [B, 1, T, S + T]; True = may attend
    logits_index: np.ndarray  # int64 [B, K]: which of the T positions need logits
    sliding_mask: np.ndarray | None = None  # bool [B, 1, T, S + T]: for graphs with sliding layers
    window: int | None = None  # W of the sliding mask (what fill_row needs to build it)

    @classmethod
    def zeros(cls, b: int, t: int, k: int, s: int, window: int | None = None) -> StepInputs:
        return cls(
            input_ids=np.zeros((b, t), np.int64),
            position_ids=np.zeros((b, t), np.int64),
            attention_mask=np.zeros((b, 1, t, s + t), bool),
            logits_index=np.zeros((b, k), np.int64),
            sliding_mask=np.zeros((b, 1, t, s + t), bool) if window is not None else None,
            window=window,
        )

    def arrays(self) -> tuple[np.ndarray, ...]:
        """The inputs in graph order (ModelSpec.step_names)."""
        if self.sliding_mask is None:
            return (self.input_ids, self.position_ids, self.attention_mask, self.logits_index)
        return (self.input_ids, self.position_ids, self.attention_mask, self.sliding_mask, self.logits_index)


class TopK:
    """Top-k head outputs of some logits rows: values [N, H] (descending), indices [N, H], lse [N]."""

    __slots__ = ("values", "indices", "lse", "vocab")

    def __init__(self, values: np.ndarray, indices: np.ndarray, lse: np.ndarray, vocab: int) -> None:
        self.values, self.indices, self.lse, self.vocab = values, indices, lse, vocab


class StepOut:
    """What a step returns: the logits [B, K, V] (fetched from a device only when read) and, for a
    graph with a top-k head, the head's outputs [B, K, ...]."""

    __slots__ = ("_logits", "_fetch", "top", "vocab")

    def __init__(self, logits: np.ndarray | None = None, fetch: Any = None,
                 top: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None, vocab: int = 0) -> None:
        self._logits, self._fetch, self.top, self.vocab = logits, fetch, top, vocab

    @property
    def logits(self) -> np.ndarray:
        if self._logits is None:
            self._logits = self._fetch()
        return self._logits

    def row(self, r: int, k: int) -> RowLogits:
        return RowLogits(self, r, slice(0, k))


class RowLogits:
    """The logits rows one request asked for in a step: `full` [n, V] (read lazily) and `top` (the
    head's TopK, or None). Indexing picks rows: `lg[0]`, `lg[-1]`."""

    __slots__ = ("out", "r", "sel")

    def __init__(self, out: StepOut, r: int, sel: slice | list[int]) -> None:
        self.out, self.r, self.sel = out, r, sel

    @property
    def full(self) -> np.ndarray:
        return self.out.logits[self.r, self.sel]

    @property
    def top(self) -> TopK | None:
        if self.out.top is None:
            return None
        v, i, lse = self.out.top
        return TopK(v[self.r, self.sel], i[self.r, self.sel], lse[self.r, self.sel], self.out.vocab)

    def __len__(self) -> int:
        s = self.sel
        return len(range(*s.indices(10**9))) if isinstance(s, slice) else len(s)

    def __getitem__(self, i: int) -> RowLogits:
        rows = range(*self.sel.indices(10**9)) if isinstance(self.sel, slice) else self.sel
        return RowLogits(self.out, self.r, [list(rows)[i]])


def as_step_out(x: Any, vocab: int = 0) -> StepOut:
    """A runner's step result as a StepOut (runners without a head may return the logits array)."""
    return x if isinstance(x, StepOut) else StepOut(np.asarray(x), vocab=vocab)


Key = tuple[int, int, int, int]  # (B, T, K, S): batch rows, new tokens, logits rows, cache bucket


def check_step(inputs: StepInputs, rows: int, s: int, spec: ModelSpec | None = None) -> Key:
    """The step's shape key (B, T, K, S), after the checks every runner makes.

    A step may use fewer rows than the cache has (the first B: a contiguous prefix of each cache
    tensor), so a batch of 3 requests need not pay for 16 rows.
    """
    b, t = inputs.input_ids.shape
    k = inputs.logits_index.shape[1]
    if not 1 <= b <= rows:
        raise ValueError(f"step has {b} batch rows; this runner's cache has {rows}")
    if inputs.attention_mask.shape != (b, 1, t, s + t):
        raise ValueError(f"attention_mask shape {inputs.attention_mask.shape}, expected {(b, 1, t, s + t)}")
    if spec is not None and spec.has_sliding_layers != (inputs.sliding_mask is not None):
        raise ValueError(f"this graph {'needs' if spec.has_sliding_layers else 'takes no'} {SLIDING_MASK}")
    return (b, t, k, s)
