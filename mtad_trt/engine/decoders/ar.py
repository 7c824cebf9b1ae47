"""Autoregressive decoding with the target alone: the baseline every other decoder is judged by."""

from __future__ import annotations

from mtad_trt.engine.decoders.base import Call, Decoder, DecodeState, prefill_prompt
from mtad_trt.engine.sampling import process


def decode_ar(st: DecodeState) -> Decoder:
    st.stats.decoder = "ar"
    yield from prefill_prompt(st, ["target"])
    pending = [st.prompt[-1]]
    while True:
        pending = [(yield from target_step(st, pending))]
        yield None  # iteration boundary


def target_step(st: DecodeState, pending: list[int]) -> Decoder:
    """One plain step: feed the pending tokens, commit them, sample one token from the target and
    emit it (returns it). Also what a speculative decoder does while its policy says γ=0."""
    logits = yield Call("target", pending)
    st.target.commit_chain(len(pending))
    if st.decode.speculative:
        st.stats.plain_steps += 1
    tok = process(logits[-1], st.sampling).sample(st.rng)
    st.emit([tok], logits, [len(logits) - 1])
    return tok
