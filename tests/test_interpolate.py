"""`resize_bilinear` equals torch's `F.interpolate(mode="bilinear", align_corners=False)`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llava_rt.runtime.errors import InputError
from llava_rt.runtime.interpolate import resize_bilinear

SHAPE_PAIRS = [
    ((24, 24), (8, 8)),
    ((7, 7), (4, 4)),
    ((5, 5), (3, 3)),
    ((10, 10), (10, 10)),
    ((3, 3), (7, 7)),
    ((24, 16), (5, 11)),
    ((6, 9), (13, 4)),
    ((1, 9), (1, 4)),
    ((1, 5), (3, 12)),
    ((9, 1), (4, 2)),
    ((27, 27), (14, 14)),
    ((336, 336), (24, 24)),
]


def _torch_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    batched = torch.from_numpy(x).reshape(-1, *x.shape[-3:]) if x.ndim >= 3 else torch.from_numpy(x)[None, None]
    out = F.interpolate(batched, size=[height, width], mode="bilinear", align_corners=False)
    return out.reshape(*x.shape[:-2], height, width).numpy()


@pytest.mark.parametrize("leading", [(3,), (2, 4), ()], ids=["chw", "nchw", "hw"])
@pytest.mark.parametrize(("src", "dst"), SHAPE_PAIRS, ids=[f"{s[0]}x{s[1]}-{d[0]}x{d[1]}" for s, d in SHAPE_PAIRS])
def test_matches_torch_bilinear(src, dst, leading):
    x = np.random.default_rng(0).standard_normal((*leading, *src)).astype(np.float32)
    ours = resize_bilinear(x, *dst)
    expected = _torch_bilinear(x, *dst)
    assert ours.dtype == np.float32 and ours.shape == expected.shape
    assert np.abs(ours - expected).max() <= 1e-5


def test_rejects_bad_input():
    with pytest.raises(InputError, match="float"):
        resize_bilinear(np.zeros((4, 4), dtype=np.uint8), 2, 2)
    with pytest.raises(InputError, match="float"):
        resize_bilinear(np.zeros(4, dtype=np.float32), 2, 2)
    with pytest.raises(InputError, match="cannot resize"):
        resize_bilinear(np.zeros((4, 4), dtype=np.float32), 0, 2)
