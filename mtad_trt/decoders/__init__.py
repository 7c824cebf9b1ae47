"""Decoders: per-request state machines over the rows of two models (see base.Call)."""

from mtad_trt.decoders.ar import decode_ar
from mtad_trt.decoders.base import Call, Decoder, DecoderFn, DecodeState
from mtad_trt.decoders.mtad import decode_mtad
from mtad_trt.decoders.sps import decode_sps

DECODER_FNS: dict[str, DecoderFn] = {"ar": decode_ar, "sps": decode_sps, "mtad": decode_mtad, "mmtad": decode_mtad}

__all__ = ["DECODER_FNS", "Call", "DecodeState", "Decoder", "DecoderFn"]
