"""Decoders: per-request state machines over the rows of two models (see base.Call)."""

from mtad_trt.engine.decoders.ar import decode_ar
from mtad_trt.engine.decoders.base import Call, Decoder, DecoderFn, DecodeState, decode_prompt
from mtad_trt.engine.decoders.mtad import decode_mtad
from mtad_trt.engine.decoders.sps import decode_sps

DECODER_FNS: dict[str, DecoderFn] = {"ar": decode_ar, "sps": decode_sps, "mtad": decode_mtad, "mmtad": decode_mtad}

__all__ = ["DECODER_FNS", "Call", "DecodeState", "Decoder", "DecoderFn", "decode_prompt"]
