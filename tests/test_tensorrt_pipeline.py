"""The pipeline on TensorRT plans, as far as it goes without TensorRT: the missing library is one line, requests are
checked against the limits the plans were built with, and vision-side graphs run in slices the plans take."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from conftest import assert_one_line_error, random_image, run
from llava_rt.runtime import InputError
from llava_rt.runtime.engine_plans import EnginePlans

LIMITS = {"max_batch": 1, "max_tiles": 2, "max_context": 200, "opt_context": 64}


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_cli_tensorrt_backend_without_tensorrt_is_one_line(variants):
    result = run("llava_rt.runtime.cli", str(variants["mistral"].bundle), "--prompt", "hi", "--backend", "tensorrt")
    assert result.returncode == 2
    assert_one_line_error(result, "llava-run", "TensorRT is not installed: pip install")


@pytest.fixture
def pipeline_with_limits(variants):
    """A CPU pipeline that checks requests against plans built with `LIMITS` (the plans themselves are not run)."""
    pipe = variants["llama"].pipeline()
    pipe.plans = EnginePlans(pipe.bundle.path, pipe.manifest, "10.3.0.26-sm87-fp32", {"precision": "fp32", "limits": LIMITS})
    return pipe


def test_requests_beyond_the_plans_limits_name_the_flag_to_raise(pipeline_with_limits):
    pipe, image = pipeline_with_limits, random_image(40, 60, seed=0)
    assert pipe.generate(prompt="Describe it.", images=[image], max_new_tokens=4).token_ids
    with pytest.raises(InputError, match=r"tokens exceed the 200 .* --max-context \d+") as error:
        pipe.generate(prompt="Describe it.", images=[image], max_new_tokens=500)
    assert "\n" not in str(error.value) and "llava-engines build" in str(error.value)
    with pytest.raises(InputError, match="2 sequences exceed the 1 .* --max-batch 2"):
        pipe.generate_batch([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]], max_new_tokens=2)


def test_vision_side_graphs_in_slices_give_the_same_answer(variants):
    pipe, image = variants["llama"].pipeline(), random_image(90, 50, seed=3)
    whole = pipe.generate(prompt="Describe it.", images=[image], max_new_tokens=8)
    features = pipe.media_features([pipe.prepare(prompt="Describe it.", images=[image])])[0]
    pipe.tile_batch = 1
    sliced = pipe.media_features([pipe.prepare(prompt="Describe it.", images=[image])])[0]
    assert len(pipe.prepare(prompt="Describe it.", images=[image]).media[0].pixels) > 1
    np.testing.assert_allclose(sliced, features, rtol=0, atol=1e-5)
    assert pipe.generate(prompt="Describe it.", images=[image], max_new_tokens=8).token_ids == whole.token_ids
