"""The device-resident decode loop. On the CPU its IO-binding path gives the same tokens as the decoder run on host
feeds (`Session.run`, the path before it) on every family's tiny bundle: greedy, seeded sampling, EOS held back,
a left-padded batch, chat turns reusing the KV cache. On a GPU (marked `gpu`, `tensorrt`) greedy tokens equal the
CPU's."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnxruntime
import pytest

from conftest import random_image
from llava_rt.runtime import Pipeline
from llava_rt.runtime.chat_session import ChatSession

# family fixture -> the variant of it to run
FAMILIES = {"variants": "llama", "onevision": "ov-tied", "next_video": "average"}
SAMPLING = dict(do_sample=True, temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.3, seed=11)
HAS_CUDA = bool("CUDAExecutionProvider" in onnxruntime.get_available_providers() and importlib.util.find_spec("cupy"))
HAS_TENSORRT = HAS_CUDA and "TensorrtExecutionProvider" in onnxruntime.get_available_providers()


class HostFeedsDecoder:
    """The reference: the decoder session run on numpy feeds (`Session.run`, no IO binding), behind the binding
    interface the decode loop uses."""

    def __init__(self, session):
        self.session, self.inputs, self.outputs, self.array_module = session, session.inputs, session.outputs, np

    def bind(self):
        return HostFeedsBinding(self.session)


class HostFeedsBinding:
    def __init__(self, session):
        self.session, self.feeds = session, {}

    def input(self, name, array):
        self.feeds[name] = array

    def output(self, name, array=None):
        pass

    def run(self):
        return self.session.run(dict(self.feeds))


@pytest.fixture(params=sorted(FAMILIES), scope="module")
def bundle(request):
    return request.getfixturevalue(request.param)[FAMILIES[request.param]].bundle


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def _answers(pipeline: Pipeline) -> dict[str, list]:
    """Token ids of one request of each kind (the images differ in size, so the batch is left-padded)."""
    small, tall = random_image(40, 52, seed=1), random_image(90, 30, seed=2)
    ask = dict(prompt="Describe the picture.", images=[small], max_new_tokens=12)
    batch = pipeline.generate_batch(
        [_user("What is this?"), _user("Tell me a long story about the two colours you can see.")],
        images=[[small], [tall]],
        max_new_tokens=12,
        **SAMPLING,
    )
    chat = ChatSession(pipeline)
    turns = [chat.send("Hello there.", images=[tall], max_new_tokens=8), chat.send("And then?", max_new_tokens=8)]
    assert turns[1].reused_tokens > 0
    return {
        "greedy": pipeline.generate(**ask).token_ids,
        "sampled": pipeline.generate(**ask, **SAMPLING).token_ids,
        "eos held back": pipeline.generate(**ask, min_new_tokens=12).token_ids,
        "batch": [r.token_ids for r in batch],
        "chat": [t.token_ids for t in turns],
    }


def test_bound_decode_equals_host_feeds(bundle):
    bound, reference = Pipeline.load(bundle), Pipeline.load(bundle)
    reference.sessions["decoder"] = HostFeedsDecoder(reference.sessions["decoder"])
    expected = _answers(reference)
    assert _answers(bound) == expected
    assert all(expected.values())


def _first_tokens(pipeline: Pipeline) -> list[list[int]]:
    images = [[random_image(40, 52, seed=1)], [random_image(90, 30, seed=2)]]
    results = pipeline.generate_batch([_user("Describe the picture."), _user("What is it?")], images=images, max_new_tokens=32)
    return [r.token_ids for r in results]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU: onnxruntime-gpu's CUDAExecutionProvider and cupy (llava-rt[gpu])")
def test_cuda_greedy_equals_cpu(bundle):
    cuda = Pipeline.load(bundle, device="cuda")
    run = cuda.start(prompt="Describe the picture.", images=[random_image(40, 52, seed=1)], max_new_tokens=4)
    for _ in run:
        pass
    assert all(type(buffer).__module__.startswith("cupy") for buffer in run.generator.cache.buffers.values())
    assert _first_tokens(cuda) == _first_tokens(Pipeline.load(bundle))


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TENSORRT, reason="needs onnxruntime-gpu's TensorrtExecutionProvider, TensorRT and cupy")
def test_tensorrt_provider_greedy_equals_cpu_and_caches_engines(bundle):
    tensorrt = Pipeline.load(bundle, device="tensorrt")
    assert _first_tokens(tensorrt) == _first_tokens(Pipeline.load(bundle))
    assert any((bundle / "engines" / "onnxruntime-tensorrt").iterdir())
