"""The contract wrapper: a Hugging Face causal LM as one function of the graph contract.

    (input_ids, position_ids, attention_mask[bool], [sliding_attention_mask], logits_index, *past)
        -> (logits, *new_kv)

Both the ONNX export and the torch backend run this same module, so the torch backend is also the
parity reference for every other backend. No model is re-implemented: the wrapper calls the HF
model's own decoder stack with a cache of plain full-length layers built from the flat past
tensors, fully specified 4-D masks (the runtime builds the sliding-window one too: no window size
is baked into the graph), and explicit positions.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from mtad_trt.contract import attention_layout

ATTN_NAME = "mtad_grouped"


def grouped_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, softcap=None, **kwargs):
    """Grouped-query attention without materialising K/V per query head.

    HF's eager path repeats K/V `num_key_value_groups` times (`repeat_kv`) before the matmuls; in
    an exported graph that is a real copy of the whole cache every step. Here the query heads are
    folded onto their KV head instead ([B, Hkv, G*T, D]) and the mask is broadcast over groups.
    Mathematically identical to eager attention, soft-capping (Gemma 2) included.
    """
    b, h, t, d = query.shape
    hkv = key.shape[1]
    g = h // hkv
    q = query.reshape(b, hkv, g * t, d)
    w = torch.matmul(q, key.transpose(2, 3)) * scaling  # [B, Hkv, G*T, S+T]
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    if attention_mask is not None:
        w = w.view(b, hkv, g, t, -1) + attention_mask.unsqueeze(2)  # mask [B,1,T,S+T] -> [B,1,1,T,S+T]
        w = w.view(b, hkv, g * t, -1)
    # Cast, then softmax: not softmax(w, dtype=float32). torch-onnx (onnxscript's aten::softmax.int)
    # exports that as a Softmax in the input's dtype with a Cast of its *output*, so an fp16 graph
    # would normalise in fp16 (docs/gpu.md, "fp16 attention softmax"). Identical in torch.
    w = torch.softmax(w.float(), dim=-1).to(query.dtype)
    out = torch.matmul(w, value)  # [B, Hkv, G*T, D]
    out = out.view(b, h, t, d).transpose(1, 2).contiguous()
    return out, None


AttentionInterface.register(ATTN_NAME, grouped_attention)
# The model keeps working outside the wrapper too (2-D masks get eager's additive causal mask).
AttentionMaskInterface.register(ATTN_NAME, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def cache_keyword(model: nn.Module) -> str:
    """transformers 5.x renamed `past_key_values=` to `cache=` (the old name goes in 5.40)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _longrope_modules(model: nn.Module) -> list[nn.Module]:
    """Rotary embeddings with LongRoPE (Phi-3): HF picks short or long factors per call from the
    longest position, with an in-place buffer update a graph cannot hold. The export refuses a
    capacity past `original_max_position_embeddings` (contract.unsupported_feature), so within an
    engine the short factors always apply: the wrapper pins them (see `_pinned_rope`)."""
    found = []
    for m in model.modules():
        if getattr(m, "rope_type", None) == "longrope" and hasattr(m, "original_inv_freq"):
            with torch.no_grad():
                m.inv_freq.copy_(m.original_inv_freq.to(m.inv_freq.device))
            found.append(m)
    return found


class _pinned_rope:
    """While the wrapper runs, LongRoPE modules run as plain rope on the (short) factors they hold."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules

    def __enter__(self):
        for m in self.modules:
            m.rope_type = "default"

    def __exit__(self, *exc):
        for m in self.modules:
            m.rope_type = "longrope"


def stable_logsumexp(logits: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last axis, written out as max + log(sum(exp(x - max))).

    Not torch.logsumexp: that exports as ONNX ReduceLogSumExp, which TensorRT's ONNX parser lowers
    to log(sum(exp(x))) without the max (NVIDIA/TensorRT#4772), so a row with a logit above ~88.7
    overflows to inf in fp32 (~11 in fp16). `top` is the row's maximum, [..., 1]: the top-k head's
    first value, so no extra reduction is needed. The shift is clamped to the finite range (Max and
    Min against constants: plain ops for every TensorRT, where a scalar clamp would export CastLike)
    so that an infinite maximum gives what torch.logsumexp gives, +inf or -inf, not NaN (inf - inf).
    """
    big = torch.finfo(logits.dtype).max
    lo = torch.full((), -big, dtype=top.dtype, device=top.device)
    hi = torch.full((), big, dtype=top.dtype, device=top.device)
    shift = torch.minimum(torch.maximum(top, lo), hi)
    return shift.squeeze(-1) + torch.log(torch.exp(logits - shift).sum(dim=-1))


class ContractWrapper(nn.Module):
    """attention="grouped" (default) folds query heads onto KV heads; "eager" is transformers' own
    repeat_kv formulation, kept to measure the difference. topk > 0 adds the top-k head outputs."""

    def __init__(self, model: nn.Module, attention: str = "grouped", topk: int = 0) -> None:
        super().__init__()
        if attention not in ("grouped", "eager"):
            raise ValueError(f"attention must be 'grouped' or 'eager', not {attention!r}")
        self.model = model
        cfg = model.config
        self.num_layers = cfg.num_hidden_layers
        self.decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.lm_head = model.get_output_embeddings()
        self.cache_kw = cache_keyword(self.decoder)
        cfg._attn_implementation = ATTN_NAME if attention == "grouped" else "eager"
        self.mask_dtype = next(model.parameters()).dtype
        window, types = attention_layout(cfg)
        self.sliding = window is not None and "sliding_attention" in types
        # Qwen2 / Gemma take {layer type: mask}; Mistral / Phi-3 (every layer sliding) take one mask.
        self.masks_by_type = getattr(cfg, "layer_types", None) is not None
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)  # applied in *ForCausalLM.forward
        self.topk = topk  # > 0: also return the top-k head (values, indices, logsumexp) of every logits row
        self.longrope = _longrope_modules(model)

    def _additive(self, mask: torch.Tensor) -> torch.Tensor:
        # Eager attention *adds* the mask: use finfo.min, not -inf (an all -inf row would be NaN).
        return torch.where(
            mask,
            torch.zeros((), dtype=self.mask_dtype),
            torch.full((), torch.finfo(self.mask_dtype).min, dtype=self.mask_dtype),
        )

    def forward(self, input_ids, position_ids, attention_mask, *rest):
        if self.sliding:
            sliding_mask, logits_index, *past = rest
        else:
            logits_index, *past = rest
        t = input_ids.shape[1]
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)]
        # No config: every layer a plain DynamicLayer holding all S+T keys. With the config,
        # sliding layers would keep only W-1 of them, which no S+T wide mask fits.
        cache = DynamicCache(ddp_cache_data=pairs)
        mask = self._additive(attention_mask)
        if self.sliding:
            slide = self._additive(sliding_mask)
            mask = {"full_attention": mask, "sliding_attention": slide} if self.masks_by_type else slide
        with _pinned_rope(self.longrope):
            out = self.decoder(
                input_ids=input_ids,
                position_ids=position_ids,
                attention_mask=mask,
                use_cache=True,
                **{self.cache_kw: cache},
            )
        hidden = out.last_hidden_state  # [B, T, H]
        idx = logits_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        picked = torch.gather(hidden, 1, idx)  # [B, K, H]: the LM head runs only where asked
        logits = self.lm_head(picked).float()
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        head = ()
        if self.topk:
            values, indices = torch.topk(logits, self.topk, dim=-1)  # sorted, largest first
            head = (values, indices, stable_logsumexp(logits, values[..., :1]))
        new = []
        for layer in cache.layers:
            new.append(layer.keys[:, :, -t:, :])
            new.append(layer.values[:, :, -t:, :])
        return (logits, *head, *new)
