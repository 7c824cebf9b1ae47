"""Reference logits from transformers when the float model does not fit in memory.

Two references, both transformers' own modules, both fed by the same `TensorSource` the export
reads (so a weight the exporter maps wrongly differs from what transformers is given):

- `truncated`: the checkpoint cut to its first layers (enough to hold every attention type), and
  its vocabulary to the first rows when the embedding is large — a small model that loads whole,
  for strict float parity through the very same exporter path (`pair.export_role`);
- `streamed_logits`: the *full* model run by transformers' own forward with every decoder layer
  loaded just before it runs and freed right after, the embedding reading only the rows of the
  tokens asked for, and the LM head applied one block of vocabulary rows at a time. Peak memory
  is about one float32 decoder layer, whatever the depth.
"""

from __future__ import annotations

import copy
import re
import types

import numpy as np
import torch
from torch import nn

from mtad_trt.errors import MtadError
from mtad_trt.export.quantize import GATHER_KEY
from mtad_trt.export.tensors import TensorInfo, TensorSource, row_blocks
from mtad_trt.export.weights import param_names, pipelined

LAYER = re.compile(r"\.layers\.(\d+)\.")
TRUNCATED_VOCAB = 8192  # vocabulary rows kept by the truncated model when the embedding is large
LARGE_EMBEDDING = 256 * 2**20  # float32 bytes of embedding above which the vocabulary is cut


def _source_name(candidates: list[str], source: TensorSource) -> str:
    available = source.names()
    for c in candidates:
        if c in available:
            return c
    raise MtadError(f"{source.path}: the checkpoint has no tensor for {candidates[0]}")


def _load(module: nn.Module, names: dict[int, list[str]], source: TensorSource) -> None:
    """Give every (meta) parameter of `module` its float32 value from the source (tensors read on
    as many threads as there are cores)."""
    todo: dict[int, nn.Parameter] = {}
    for m in module.modules():
        for p in m._parameters.values():
            if p is not None:
                todo.setdefault(id(p), p)

    def read(p: nn.Parameter):
        value = torch.from_numpy(source.read(_source_name(names[id(p)], source)))
        return id(p), nn.Parameter(value.reshape(p.shape), requires_grad=False)

    loaded = dict(pipelined(read, list(todo.values())))
    for old, new in loaded.items():
        names[id(new)] = names[old]
    for m in module.modules():
        for n, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[n] = loaded[id(p)]


def _unload(module: nn.Module, names: dict[int, list[str]]) -> None:
    """Back to the meta device (frees the weights); the parameter identities `names` knows stay valid."""
    for m in module.modules():
        for n, p in list(m._parameters.items()):
            if p is not None and not p.is_meta:
                meta = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
                names[id(meta)] = names.pop(id(p), [])
                m._parameters[n] = meta


def load_all(model: nn.Module, source: TensorSource) -> nn.Module:
    """Fill every parameter of a meta model from the source (for models that fit: truncated ones)."""
    _load(model, param_names(model), source)
    return model


# ---------------------------------------------------------------------------- the truncated model


class TruncatedSource:
    """A view of a source holding only the first `layers` decoder layers and `vocab` vocabulary rows."""

    def __init__(self, base: TensorSource, layers: int, vocab: int, full_vocab: int) -> None:
        self.base, self.layers, self.vocab, self.full_vocab = base, layers, vocab, full_vocab
        self.path = base.path
        self._names = [n for n in base.names() if (m := LAYER.search(n)) is None or int(m.group(1)) < layers]

    def names(self) -> list[str]:
        return self._names

    def _cut(self, info: TensorInfo) -> bool:
        return bool(info.shape) and info.shape[0] == self.full_vocab and self.vocab < self.full_vocab

    def info(self, name: str) -> TensorInfo:
        info = self.base.info(name)
        if self._cut(info):
            return TensorInfo((self.vocab, *info.shape[1:]), info.dtype, info.file)
        return info

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        if self._cut(self.base.info(name)):
            lo, hi, _ = (rows or slice(None)).indices(self.vocab)
            return self.base.read(name, slice(lo, hi))
        return self.base.read(name, rows)

    def close(self) -> None:
        pass


def truncation(config, hidden: int) -> tuple[int, int]:
    """(layers, vocab) of the truncated model: the shortest prefix of layers holding every attention
    type the model has (at least 2), and the vocabulary cut when the embedding is large."""
    types_ = list(getattr(config, "layer_types", None) or [])
    n = config.num_hidden_layers
    k = min(2, n)
    for t in set(types_):
        k = max(k, types_.index(t) + 1)
    vocab = config.vocab_size
    if vocab * hidden * 4 > LARGE_EMBEDDING:
        vocab = min(vocab, TRUNCATED_VOCAB)
    return min(k, n), vocab


def truncated_config(config, layers: int, vocab: int):
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types)[:layers]
    cfg.vocab_size = vocab
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id"):  # ids past the cut would not embed
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v >= vocab:
            setattr(cfg, attr, None)
    return cfg


# ---------------------------------------------------------------------------- the streamed model


def _row(x, i: int):
    """Batch row i of a layer's arguments: tensors of rank >= 2 with 2 rows are sliced."""
    if isinstance(x, torch.Tensor):
        return x[i:i + 1] if x.dim() >= 2 and x.shape[0] == 2 else x
    if isinstance(x, tuple):
        return tuple(_row(v, i) for v in x)
    if isinstance(x, list):
        return [_row(v, i) for v in x]
    if isinstance(x, dict):
        return {k: _row(v, i) for k, v in x.items()}
    return x


def _cat(a, b):
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b], 0)
    return (torch.cat([a[0], b[0]], 0), *a[1:])


def streamed_logits(model: nn.Module, source: TensorSource, ids: list[int], keep: list[int],
                    block_bytes: int = 64 * 2**20, progress=None, fake=None) -> tuple[np.ndarray, np.ndarray | None]:
    """transformers' forward over `ids` with layers loaded one at a time; float32 logits at `keep`.

    `model` is a float32 meta model (onnx_export.meta_model). With `fake(name, w) -> w'` (the
    weights a quantized engine really multiplies by), a second batch row runs in lockstep with
    each layer's weights replaced by fake(...) after the float row has run: one pass over the
    checkpoint gives both the float reference and the quantized graph's own float arithmetic (the
    embedding rows too, when the graph looks them up quantized: `fake(name + GATHER_KEY, rows)`).
    Returns (float logits, fake-quantized logits or None).
    """
    names = param_names(model)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    layers = list(decoder.layers)
    big = {id(p) for m in (embed, head, *layers) for p in m.parameters()}
    for m in model.modules():  # norms and anything else small: load once
        for n, p in list(m._parameters.items()):
            if p is not None and id(p) not in big and p.is_meta:
                m._parameters[n] = nn.Parameter(torch.from_numpy(
                    source.read(_source_name(names[id(p)], source))).reshape(p.shape), requires_grad=False)

    embed_name = _source_name(names[id(embed.weight)], source)
    head_name = _source_name(names[id(head.weight)], source)
    head_bias = getattr(head, "bias", None)
    bias_name = None if head_bias is None else _source_name(names[id(head_bias)], source)

    def embed_forward(self, input_ids):
        uniq, inverse = torch.unique(input_ids, return_inverse=True)
        rows = np.stack([source.read(embed_name, slice(i, i + 1))[0] for i in uniq.tolist()])
        quantized = fake(embed_name + GATHER_KEY, rows) if fake is not None else None

        def lookup(table: np.ndarray, idx: torch.Tensor) -> torch.Tensor:
            meta, pad = self.weight, getattr(self, "padding_idx", None)
            self.weight = nn.Parameter(torch.from_numpy(np.ascontiguousarray(table)), requires_grad=False)
            self.padding_idx = None  # it only masks gradients; an index past the gathered rows would be refused
            try:
                return type(self).forward(self, idx)
            finally:
                self.weight, self.padding_idx = meta, pad

        if quantized is None:
            return lookup(rows, inverse)
        # the quantized row (batch row 1) looks up the rows the engine's GatherBlockQuantized returns
        return torch.cat([lookup(rows, inverse[:1]), lookup(quantized.astype(np.float32), inverse[1:])], 0)

    def head_forward(self, hidden):
        parts = []
        for rows in row_blocks(source.info(head_name), block_bytes):
            w = source.read(head_name, rows)
            b = None if bias_name is None else torch.from_numpy(source.read(bias_name, rows))
            out = nn.functional.linear(hidden[:1].float(), torch.from_numpy(w), b)
            if fake is not None:  # the quantized row; an LM head kept float (--lm-head float) is w itself
                q = fake(head_name, w)
                wq = torch.from_numpy(w if q is None else np.ascontiguousarray(q, dtype=np.float32))
                out = torch.cat([out, nn.functional.linear(hidden[1:].float(), wq, b)], 0)
            parts.append(out)
        return torch.cat(parts, dim=-1)

    def fake_(module: nn.Module) -> None:
        params = list({id(p): p for m in module.modules() for p in m._parameters.values() if p is not None}.values())

        def one(p):
            return p, fake(_source_name(names[id(p)], source), p.data.numpy())

        for p, q in pipelined(one, params):
            if q is not None:
                p.data = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32)).reshape(p.shape)

    def layer_forward(index):
        layer = layers[index]
        original = type(layer).forward

        def run(self, hidden_states, *args, **kwargs):
            _load(self, names, source)
            try:
                if fake is None:
                    return original(self, hidden_states, *args, **kwargs)
                a = original(self, hidden_states[:1], *_row(args, 0), **_row(kwargs, 0))
                fake_(self)
                b = original(self, hidden_states[1:], *_row(args, 1), **_row(kwargs, 1))
                return _cat(a, b)
            finally:
                _unload(self, names)
                if progress is not None:
                    progress(index + 1, len(layers))
        return run

    saved = [embed, head, *layers]
    embed.forward = types.MethodType(embed_forward, embed)
    head.forward = types.MethodType(head_forward, head)
    for i, layer in enumerate(layers):
        layer.forward = types.MethodType(layer_forward(i), layer)
    old_attn = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    batch = 1 if fake is None else 2
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids] * batch, dtype=torch.int64), use_cache=False,
                        logits_to_keep=torch.tensor(keep, dtype=torch.int64))
        logits = out.logits.float().numpy()
        return logits[0], (logits[1] if fake is not None else None)
    finally:
        model.config._attn_implementation = old_attn
        for m in saved:
            m.__dict__.pop("forward", None)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """Worst row of ||got - want|| / ||want - mean(want)||: how far an engine's logits are from the
    reference, on the scale of the reference's own spread (a precision-independent measure)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    spread = np.linalg.norm(want - want.mean(-1, keepdims=True), axis=-1)
    err = np.linalg.norm(got - want, axis=-1) / np.maximum(spread, 1e-12)
    return float(np.max(err)) if np.isfinite(err).all() else float("inf")

