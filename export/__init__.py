"""Export stage: Hugging Face checkpoint / GGUF file -> engine folder (ONNX graphs + manifest).

Installed as `mtad_trt.export`. Needs torch and transformers; the ONNX Runtime runtime does not.
"""
