"""llava-rt: export LLaVA-NeXT family checkpoints to ONNX bundles and run them without torch."""

__version__ = "0.3.0"
