"""Decoders: pure logic over batch rows of model runners. See base.drive for how they are run."""

from mtad_trt.decoders.ar import decode_ar
from mtad_trt.decoders.base import drive
from mtad_trt.decoders.mtad import decode_mtad
from mtad_trt.decoders.sps import decode_sps

DECODER_FNS = {"ar": decode_ar, "sps": decode_sps, "mtad": decode_mtad, "mmtad": decode_mtad}

__all__ = ["DECODER_FNS", "drive"]
