"""Synthetic checkpoints: a real config, random weights, written the way users download them.

Step time and memory depend on shapes, not weight values, so a checkpoint with a real model's
config (Qwen2.5-7B, …) and random bf16 weights, written tensor by tensor into sharded safetensors
with an index json, exercises the exporter exactly as a downloaded one would — without ever
holding the model: each tensor is generated, written and dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mtad_trt.export.tensors import INDEX, SINGLE, write_safetensors

# Real configs (the published config.json fields that set shapes), for synthetic checkpoints.
CONFIGS = {
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=False, sliding_window=None, use_sliding_window=False),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, sliding_window=None, use_sliding_window=False),
}


def tensor_list(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor a checkpoint of `config` holds (tied LM head left out)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out = [(n, tuple(t.shape)) for n, t in model.state_dict().items()]
    if getattr(config, "tie_word_embeddings", False):
        out = [(n, s) for n, s in out if n != "lm_head.weight"]
    return out


def value(name: str, shape: tuple[int, ...], seed: int, scale: float = 0.02) -> np.ndarray:
    """A tensor's random value, the same for the same (name, seed) whatever the sharding."""
    if name.endswith("norm.weight") or "layernorm" in name or name.endswith("_norm.weight"):
        return np.ones(shape, dtype=np.float32)
    rng = np.random.default_rng([seed, *name.encode()])
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= scale
    if name == "lm_head.weight" or (name.endswith("embed_tokens.weight")):
        x *= 8.0  # sharper logits, so greedy tokens are not decided by float noise
    return x


def write_checkpoint(folder: Path, config, shards: int = 1, dtype: str = "BF16", seed: int = 0,
                     tokenizer=None, corrupt=None, scale: float = 0.02) -> Path:
    """Write config.json (+ tokenizer) and the weights in `shards` files (an index when > 1).

    corrupt(name, array) -> array may change one tensor's value on its way to disk (tests).
    scale: the weights' standard deviation (larger: every layer moves the logits more).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    items = tensor_list(config)
    sizes = [int(np.prod(s)) for _, s in items]
    per = sum(sizes) / shards
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[] for _ in range(shards)]
    acc = 0
    for (name, shape), n in zip(items, sizes, strict=True):
        groups[min(int(acc // per), shards - 1)].append((name, shape))
        acc += n
    weight_map = {}
    shapes = dict(items)

    def produce(name):
        x = value(name, shapes[name], seed, scale)
        return corrupt(name, x) if corrupt is not None else x

    for i, group in enumerate(groups):
        fname = SINGLE if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(folder / fname, [(n, s, dtype) for n, s in group], produce)
        weight_map.update({n: fname for n, _ in group})
    if shards > 1:
        total = sum(2 * n if dtype != "F32" else 4 * n for n in sizes)
        (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder
