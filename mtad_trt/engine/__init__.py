"""The engine: requests, the scheduler that batches them, the decoders' logic and sampling.

Everything here is pure logic over the `ModelRunner` interface of `mtad_trt.backends`: it knows
MTAD, batching and sampling, and nothing of ONNX Runtime, TensorRT or torch.
"""
