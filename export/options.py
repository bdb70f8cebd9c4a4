"""What `llava-export` accepts and what it needs installed; importable without the export extra."""

DTYPES = ("fp32", "fp16")
# weight-only quantized decoder -> bits per weight
PRECISIONS = {"int8": 8, "int4": 4}
# the `export` extra and the modules that show it is installed
EXTRA = ("export", ("torch", "transformers", "onnx", "onnxscript", "onnx_ir", "safetensors"))
