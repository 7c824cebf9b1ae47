"""The engine folder as the runtime reads it: its manifest, its tokenizer, and the source
checkpoints (a Hugging Face folder or a GGUF file) the torch backend and the export stage load.
"""
