"""The vision graph split into segments: the same features, and a scheduler that decodes between the segments."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import random_image
from llava_rt.runtime import InputError, Pipeline, Request
from llava_rt.runtime.scheduler import Scheduler


@pytest.fixture(scope="module")
def bundles(variants, onevision):
    return {"next": variants["mistral"].bundle, "onevision": onevision["ov"].bundle}


@pytest.mark.parametrize("family", ["next", "onevision"])
@pytest.mark.parametrize("count", [2, 3, 1000])
def test_segments_give_the_features_of_the_whole_graph(bundles, family, count):
    whole, segmented = Pipeline.load(bundles[family]), Pipeline.load(bundles[family], vision_segments=count)
    reads = segmented.vision.reads  # the tensors each segment reads
    assert 2 <= len(reads) <= count and "vision" not in segmented.sessions
    if count <= 3:  # cut between encoder layers, where only the hidden state crosses
        assert all(len(names) == 1 for names in reads)
    else:  # as many as the graph has places to cut: some inside a layer, where more tensors cross
        assert 3 < len(reads) < count and max(len(names) for names in reads) > 1
    images = [random_image(40, 60, seed=1), random_image(90, 30, seed=2)]
    media = whole.prepare(Request.build(prompt="Compare them.", images=images)).media
    for want, got in zip(whole.features(media), segmented.features(media)):
        assert np.array_equal(want, got)


def test_segments_are_counted_and_need_the_onnxruntime_backend(bundles):
    with pytest.raises(InputError, match="vision_segments must be a positive integer"):
        Pipeline.load(bundles["next"], vision_segments=0)
    with pytest.raises(InputError, match="vision segments need the onnxruntime backend"):
        Pipeline.load(bundles["next"], backend="tensorrt", vision_segments=4)


def test_a_stream_decodes_between_the_segments_of_a_new_image(bundles):
    """Each scheduler step runs one decode step and one unit of a prefill: a vision segment over one tile is a unit,
    so a running stream gets a token per segment while an image is prefilled, and both answers are unchanged."""
    pipeline = Pipeline.load(bundles["next"], vision_segments=4)
    question = dict(prompt="What is it?", images=[random_image(40, 60)], max_new_tokens=5)
    tiles = len(pipeline.prepare(Request.build(**question)).media[0].pixels)
    with Scheduler(pipeline, max_concurrency=2) as scheduler:
        stream = scheduler.submit(Request.build(prompt="Keep going.", max_new_tokens=400, min_new_tokens=400))
        events = stream.events()
        times = [next(events).time]
        image = scheduler.submit(Request.build(**question))
        answer = image.result(timeout=60)
        while times[-1] < image.first_token_time:
            times.append(next(events).time)
        stream.cancel()
    during = sum(image.created < t < image.first_token_time for t in times)
    assert tiles >= 2 and during >= tiles * len(pipeline.vision.reads)
    assert answer.token_ids == Pipeline.load(bundles["next"]).generate(**question).token_ids
