"""Weight-only quantized copies of the decoder (block-wise `MatMulNBits`, 8 or 4 bits) and their drift vs fp32.

The quantized graph uses onnxruntime's contrib operator, so it is an extra, clearly named copy
(`decoder.int4.onnx`); the fp32 `decoder.onnx` stays in the bundle as the reference.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from ..runtime.kv_cache import KVCache
from .options import PRECISIONS

BLOCK_SIZE = 32
DRIFT_PROMPTS = 8
DRIFT_PROMPT_LENGTH = 24


def _quantizer_module():
    """onnxruntime's weight-only quantizer. Importing it runs `logging.basicConfig(level=INFO)`, which would turn on
    every library's INFO logs (about 200 lines per export from onnxscript alone): the root logger is restored."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    from onnxruntime.quantization import matmul_nbits_quantizer

    root.handlers[:] = handlers
    root.setLevel(level)
    return matmul_nbits_quantizer


def quantize_decoder(reference: Path, precision: str) -> Path:
    """Write `decoder.<precision>.onnx` (+ `.data`) next to the fp32 decoder; returns its path."""
    quantizer_module = _quantizer_module()
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # it logs every node at INFO
    config = quantizer_module.DefaultWeightOnlyQuantConfig(
        block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=4, bits=PRECISIONS[precision]
    )
    quantizer = quantizer_module.MatMulNBitsQuantizer(onnx.load(reference), algo_config=config)
    quantizer.process()
    target = reference.with_name(f"{reference.stem}.{precision}.onnx")
    onnx.save_model(
        quantizer.model.model,
        str(target),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=f"{target.name}.data",
    )
    return target


def measure_drift(reference: Path, quantized: Path, embed: np.ndarray, kv_cache: dict[str, int]) -> dict[str, Any]:
    """Last-token logits of both decoders on a fixed set of prompts: mean cosine and greedy top-1 agreement."""
    rng = np.random.default_rng(0)
    sessions = [ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]) for path in (reference, quantized)]
    cosines, agree = [], 0
    for _ in range(DRIFT_PROMPTS):
        ids = rng.integers(0, len(embed), size=(1, DRIFT_PROMPT_LENGTH))
        feeds = {
            "inputs_embeds": np.asarray(embed[ids], dtype=embed.dtype),
            "position_ids": np.arange(DRIFT_PROMPT_LENGTH, dtype=np.int64)[None],
            **KVCache(kv_cache, 1, embed.dtype).feeds(np.zeros((1, 0), np.int64), np.ones(ids.shape, np.int64)),
        }
        fp32, low = (session.run(["logits"], feeds)[0][0].astype(np.float64) for session in sessions)
        cosines.append(float(fp32 @ low / (np.linalg.norm(fp32) * np.linalg.norm(low))))
        agree += int(fp32.argmax() == low.argmax())
    return {"prompts": DRIFT_PROMPTS, "mean_cosine": float(np.mean(cosines)), "top1_agreement": agree / DRIFT_PROMPTS}
