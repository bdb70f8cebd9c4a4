"""Run each exported graph with onnxruntime against the PyTorch module it came from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..runtime.kv_cache import KVCache, new_names
from .graphs import cache_keyword

# Max abs difference allowed between onnxruntime and PyTorch for the fp32 graphs.
TOLERANCE = {"fp32": 1e-4}

_aten = torch.ops.aten
_GEMMS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default, _aten.convolution.default}


class Fp32Accumulation(TorchDispatchMode):
    """While active, PyTorch runs fp16 matrix products and convolutions as fp32 ones on the same fp16 values, the result
    rounded to fp16; every other operator runs as is.

    That is the math of an fp16 kernel accumulating in fp32 (PyTorch's own CPU kernels, cuBLAS, TensorRT), at fp32
    speed: on CPUs without fp16 arithmetic PyTorch's fp16 matrix products are 7 to 25 times slower, which makes an
    fp16 reference at real shapes take minutes.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _GEMMS and any(isinstance(arg, torch.Tensor) and arg.dtype == torch.float16 for arg in args):
            widened = [arg.float() if isinstance(arg, torch.Tensor) and arg.dtype == torch.float16 else arg for arg in args]
            return func(*widened, **kwargs).half()
        return func(*args, **kwargs)


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _max_diff(actual: np.ndarray, expected: torch.Tensor) -> float:
    return float(np.max(np.abs(actual.astype(np.float64) - expected.double().numpy())))


def verify_graph(path: Path, module, sample: torch.Tensor, input_name: str) -> tuple[float, torch.Tensor]:
    """Max abs diff of a one-input graph against its module, and the module's output (the next graph's input)."""
    with torch.no_grad():
        expected = module(sample)
    (actual,) = _session(path).run(None, {input_name: sample.numpy()})
    return _max_diff(actual, expected), expected


def decoder_logits(
    path: Path, model, kv_cache: dict[str, int], dtype: torch.dtype
) -> tuple[list[np.ndarray], list[torch.Tensor]]:
    """Prefill a left-padded batch of two, then decode two tokens; the graph's last-token logits at each of the three
    steps, and transformers'. Embeddings and KV cache are in `dtype`.

    The reference is the transformers language model with its own cache, not our wrapper, so this
    also checks the mask, positions and KV cache plumbing of the exported graph: the decode steps run
    through the runtime's preallocated `KVCache`, with unused capacity masked out as in a real run.
    """
    from transformers import DynamicCache

    language_model = model.model.language_model
    lm_head = model.lm_head
    session = _session(path)
    generator = torch.Generator().manual_seed(0)
    hidden = language_model.config.hidden_size
    embeds = torch.randn(2, 6, hidden, generator=generator).to(dtype)
    mask = torch.ones(2, 6, dtype=torch.int64)
    mask[1, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    kv = KVCache(kv_cache, 2, embeds.numpy().dtype)
    reference_cache = DynamicCache(config=language_model.config)
    actual, expected = [], []
    for step in range(3):
        if step:
            embeds = torch.randn(2, 1, hidden, generator=generator).to(dtype)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.int64)], dim=-1)
            positions = positions[:, -1:] + 1
        feeds = kv.feeds(mask[:, : kv.length].numpy(), mask[:, kv.length :].numpy())
        outputs = dict(
            zip(
                [o.name for o in session.get_outputs()],
                session.run(None, {"inputs_embeds": embeds.numpy(), "position_ids": positions.numpy(), **feeds}),
            )
        )
        kv.reserve(mask.shape[1] + 4)  # spare slots, masked: the runtime's preallocated layout
        kv.append({name: outputs[name] for name in new_names(kv_cache)})
        with torch.no_grad():
            reference = language_model(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{cache_keyword(language_model): reference_cache},
            )
            expected.append(lm_head(reference.last_hidden_state[:, -1]))
        actual.append(outputs["logits"])
    return actual, expected


def verify_decoder(path: Path, model, kv_cache: dict[str, int], dtype: torch.dtype) -> float:
    """Max abs diff of the decoder graph's last-token logits against transformers' (see `decoder_logits`)."""
    actual, expected = decoder_logits(path, model, kv_cache, dtype)
    return max(_max_diff(a, e) for a, e in zip(actual, expected))
