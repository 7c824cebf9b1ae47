"""Tiny random models with a real (offline-trained) tokenizer, for fast tests of the whole chain."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

CORPUS = [
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "The quick brown fox jumps over the lazy dog. Hello world!",
    "import numpy as np\nx = np.zeros(3)\nprint(x)\n",
    "Once upon a time there was a small model that decoded many tokens at once.",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(vocab_size: int = 320, variant: int = 0) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = CORPUS if variant == 0 else [c.upper() for c in CORPUS]
    tok.train_from_iterator(corpus * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(arch: str, vocab: int, layers: int, seed: int, eos: int, pad: int):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True))
    # Sharpen the random LM so greedy/top-k behaviour is not decided by float noise.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()


def save_tiny(folder: Path, arch: str, layers: int, seed: int, tokenizer: PreTrainedTokenizerFast) -> Path:
    vocab = len(tokenizer)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model = make_model(arch, vocab, layers, seed, eos, pad)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


# The architecture matrix (tests/test_architectures.py, docs/architectures.md): standard-cache
# families transformers ships, tiny and random, with grouped-query attention (4 query heads over 2
# KV heads, head_dim 16) and, where the family has one, a sliding window of `window` tokens.
ARCHS = ("llama", "qwen2", "qwen2-swa", "mistral", "gemma2", "gemma3", "phi3", "phi3-longrope", "qwen3",
         "qwen3-swa", "starcoder2", "llama-dynamic-rope")


def arch_config(arch: str, window: int = 16, vocab: int = 320, layers: int = 2, eos: int = 0, pad: int = 0):
    """(config, model class) of one tiny family; `window` is the sliding window where there is one."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  eos_token_id=eos, pad_token_id=pad, bos_token_id=None, tie_word_embeddings=False)
    mixed = ["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2)
    if arch == "llama":
        return tf.LlamaConfig(**common), tf.LlamaForCausalLM
    if arch == "llama-dynamic-rope":
        rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
        return tf.LlamaConfig(**common, rope_parameters=rope), tf.LlamaForCausalLM
    if arch == "qwen2":
        return tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    if arch == "qwen2-swa":  # layers >= max_window_layers slide
        return tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=window,
                              max_window_layers=1), tf.Qwen2ForCausalLM
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=16), tf.Qwen3ForCausalLM
    if arch == "qwen3-swa":
        return tf.Qwen3Config(**common, head_dim=16, use_sliding_window=True, sliding_window=window,
                              max_window_layers=1), tf.Qwen3ForCausalLM
    if arch == "mistral":  # every layer slides
        return tf.MistralConfig(**common, sliding_window=window), tf.MistralForCausalLM
    if arch == "gemma2":  # alternating sliding/full layers, attention and final-logit soft-capping
        return tf.Gemma2Config(**common, head_dim=16, sliding_window=window, layer_types=mixed,
                               attn_logit_softcapping=50.0, final_logit_softcapping=30.0), tf.Gemma2ForCausalLM
    if arch == "gemma3":  # per-layer-type rope (local/global theta), q/k norms
        return tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=window,
                                   layer_types=mixed), tf.Gemma3ForCausalLM
    if arch == "phi3":  # fused qkv, every layer slides
        return tf.Phi3Config(**common, sliding_window=window), tf.Phi3ForCausalLM
    if arch == "phi3-longrope":  # short factors up to 128 positions, long ones past them
        half = 64 // 4 // 2
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + 0.1 * i for i in range(half)],
                "long_factor": [2.0 + 0.5 * i for i in range(half)]}
        return tf.Phi3Config(**common, sliding_window=window, rope_parameters=rope,
                             original_max_position_embeddings=128), tf.Phi3ForCausalLM
    if arch == "starcoder2":  # biases, LayerNorm, GELU MLP, every layer slides
        return tf.Starcoder2Config(**common, sliding_window=window), tf.Starcoder2ForCausalLM
    raise ValueError(f"unknown architecture {arch!r} (known: {', '.join(ARCHS)})")


def make_arch(arch: str, window: int = 16, vocab: int = 320, layers: int = 2, seed: int = 0, eos: int = 0,
              pad: int = 0):
    """A tiny random model of family `arch` (ARCHS), LM head sharpened like make_model's."""
    cfg, cls = arch_config(arch, window, vocab, layers, eos, pad)
    torch.manual_seed(seed)
    model = cls(cfg)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()


def save_arch(folder: Path, arch: str, tokenizer: PreTrainedTokenizerFast, window: int = 16, seed: int = 0) -> Path:
    """make_arch's model saved with `tokenizer` as a Hugging Face folder."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model = make_arch(arch, window, len(tokenizer), seed=seed, eos=eos, pad=pad)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
