"""Automatic prefix caching: prompt KV kept in a bounded host pool, copied into a new row's slots.

The static-slot KV cache stays as it is (each batch row owns its slots): what is cached is a
*copy* of a prompt's key/value columns, one block of `block_size` tokens at a time, keyed by the
block's tokens and every token before it (a chain of digests, as vLLM keys its blocks). A
request whose prompt starts with cached blocks gets them written into its rows before its
prefill, which then starts after them. Because entries are copies, nothing is shared or
reference-counted: a request cancelled mid-prefill, or a row reused, cannot corrupt an entry,
and eviction (least recently used first, when the pool's byte budget is reached) never waits.

Exactness: a cached column holds what the same model computed for the same tokens at the same
positions, so greedy outputs are those of an uncached run wherever the model's numerics do not
depend on how the prompt was chunked; on ONNX Runtime CPU they do not at the sizes tested
(tests/test_prefix_cache.py). At most `len(prompt) - 1` tokens are reused: the last prompt token
is always fed, because its logits start the decoding. Each model (target, draft) has its own
namespace, keyed by its role and KV shape and dtype, so an entry is never read by a model whose
cache it does not fit. Only full blocks of the prompt are cached (never generated tokens).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from mtad_trt.backends.rows import Row
from mtad_trt.backends.runner import ModelRunner

DEFAULT_BLOCK = 16  # tokens per block: vLLM's default; a chat system prompt is a few blocks


@dataclass
class _Entry:
    tokens: tuple[int, ...]  # the block's own tokens (checked on every hit: a digest is not proof)
    kv: Any  # [2L, Hkv, block, D] host copy
    nbytes: int


def _nbytes(a: Any) -> int:
    n = getattr(a, "nbytes", None)
    return int(n) if n is not None else int(a.numel() * a.element_size())


def model_key(role: str, runner: ModelRunner) -> bytes:
    """The namespace of one model's entries: role and every KV shape fact, dtype included."""
    s = runner.spec
    return f"{role}:{s.num_layers}:{s.num_kv_heads}:{s.head_dim}:{s.dtype}:{s.architecture}".encode()


class PrefixCache:
    """A pool of prompt-prefix KV blocks for the models of one scheduler, at most `capacity_bytes`."""

    def __init__(self, capacity_bytes: int, block_size: int = DEFAULT_BLOCK) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.capacity_bytes, self.block_size = int(capacity_bytes), block_size
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self.nbytes = 0
        self.queries = 0  # prompt tokens looked up (vLLM's prefix_cache_queries)
        self.hits = 0  # of those, tokens found (vLLM's prefix_cache_hits)
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    # -- keys ----------------------------------------------------------------------------------
    def _keys(self, namespace: bytes, tokens: list[int], blocks: int) -> list[bytes]:
        keys, parent = [], hashlib.blake2b(namespace, digest_size=16).digest()
        b = self.block_size
        for i in range(blocks):
            block = np.asarray(tokens[i * b : (i + 1) * b], dtype=np.int64).tobytes()
            parent = hashlib.blake2b(parent + block, digest_size=16).digest()
            keys.append(parent)
        return keys

    def reusable(self, prompt: list[int]) -> int:
        """Full blocks a prompt may take from the cache: never its last token."""
        return max(0, len(prompt) - 1) // self.block_size

    # -- restore -------------------------------------------------------------------------------
    def restore(self, prompt: list[int], rows: dict[str, Row]) -> int:
        """Write the longest cached prefix of `prompt` that every model in `rows` has into those
        rows and return the tokens now committed in all of them. The rows hold only restored
        blocks so far (n = 0, or where an earlier restore left them): one n, at a block edge."""
        b = self.block_size
        done = {row.n for row in rows.values()}
        if len(done) != 1 or next(iter(done)) % b:
            raise ValueError(f"restore needs rows at one block edge, got n = {sorted(done)}")
        done = done.pop()
        if self.capacity_bytes <= 0:
            return done
        blocks = self.reusable(prompt)
        found = blocks
        chains = {}
        for role, row in rows.items():
            keys = self._keys(model_key(role, row.runner), prompt, blocks)
            n = 0
            while n < blocks:
                entry = self._entries.get(keys[n])
                if entry is None or entry.tokens != tuple(prompt[n * b : (n + 1) * b]):
                    break
                n += 1
            chains[role] = keys
            found = min(found, n)
        target = found * b
        if target <= done:
            return done
        for role, row in rows.items():
            row.runner.reserve(target)
            for i in range(done // b, found):
                entry = self._entries[chains[role][i]]
                self._entries.move_to_end(chains[role][i])
                row.runner.write(row.row, i * b, entry.kv)
            row.n = target
        return target

    def count(self, prompt_tokens: int, cached: int) -> None:
        """Book one request's lookup: its prompt length and the tokens it got from the cache."""
        self.queries += prompt_tokens
        self.hits += cached

    # -- store ---------------------------------------------------------------------------------
    def store(self, prompt: list[int], role: str, row: Row) -> None:
        """Copy every full prompt block that `row` has committed and the pool lacks."""
        if self.capacity_bytes <= 0:
            return
        b = self.block_size
        blocks = min(self.reusable(prompt), row.n // b)
        if blocks == 0:
            return
        keys = self._keys(model_key(role, row.runner), prompt, blocks)
        for i, key in enumerate(keys):
            if key in self._entries:
                self._entries.move_to_end(key)
                continue
            kv = row.runner.read(row.row, i * b, b)
            size = _nbytes(kv)
            if size > self.capacity_bytes:
                return
            while self.nbytes + size > self.capacity_bytes:
                _, old = self._entries.popitem(last=False)
                self.nbytes -= old.nbytes
                self.evictions += 1
            self._entries[key] = _Entry(tuple(prompt[i * b : (i + 1) * b]), kv, size)
            self.nbytes += size

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0
