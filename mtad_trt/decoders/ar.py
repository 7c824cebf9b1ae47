"""Autoregressive decoding with the target alone: the baseline every other decoder is judged by."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from mtad_trt.params import DecodeParams, SamplingParams
from mtad_trt.rows import Row
from mtad_trt.sampling import process, sample
from mtad_trt.stats import Stats, Timer


def decode_ar(
    target: Row,
    draft: Row | None,
    prompt: list[int],
    sp: SamplingParams,
    dp: DecodeParams,
    stats: Stats,
    rng: np.random.Generator,
) -> Iterator[list[int]]:
    stats.decoder = "ar"
    target.reset()
    with Timer(stats, "prefill_s"):
        logits = target.forward(prompt)  # logits only at the last prompt position
        target.commit_chain(len(prompt))
    stats.target_calls += 1
    while True:
        tok = sample(process(logits[0], sp), rng)
        yield [tok]
        with Timer(stats, "verify_s"):
            logits = target.forward([tok])
            target.commit_chain(1)
        stats.target_calls += 1
