"""What every decoder shares: statistics, and the driver that turns a decoder into output.

A decoder is a generator over engine sequences that yields the tokens each iteration emits (one
for `ar`, n+1 for the speculative ones). It never decides when to stop: the driver scans every
emitted token for EOS / stop ids, truncates at max_new_tokens, and closes the generator. That
fixes the reference code's overshoot (spec/mtad.md §2.4) in one place for all decoders, and
lets a caller (the server) cancel between iterations just by closing the iterator.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np

from mtad_trt.params import DecodeParams, SamplingParams
from mtad_trt.rows import Row
from mtad_trt.stats import Stats

DecoderFn = Callable[..., Iterator[list[int]]]


def drive(
    decoder: DecoderFn,
    target: Row,
    draft: Row | None,
    prompt: list[int],
    sp: SamplingParams,
    dp: DecodeParams,
    stats: Stats,
    stop_ids: set[int],
) -> Iterator[list[int]]:
    """Run a decoder; yield emitted token chunks, cut at the first stop id and at max_new_tokens.

    Stop ids are emitted (like an EOS in a chat transcript) but nothing after them.
    """
    rng = np.random.default_rng(sp.seed)
    t0 = time.perf_counter()
    stats.prompt_tokens = len(prompt)
    stats.finish_reason = "cancelled"
    gen = decoder(target, draft, list(prompt), sp, dp, stats, rng)
    try:
        for chunk in gen:
            if stats.generated_tokens == 0:
                stats.ttft_s = time.perf_counter() - t0
            out = []
            done = False
            for tok in chunk:
                out.append(int(tok))
                if stats.generated_tokens + len(out) >= sp.max_new_tokens:
                    stats.finish_reason, done = "length", True
                if int(tok) in stop_ids:
                    stats.finish_reason, done = "stop", True
                if done:
                    break
            stats.generated_tokens += len(out)
            stats.wall_s = time.perf_counter() - t0
            yield out
            if done:
                return
    finally:
        gen.close()
        stats.wall_s = time.perf_counter() - t0
