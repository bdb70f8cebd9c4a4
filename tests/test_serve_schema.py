"""llava-serve's parts without a server or a model: the request schema and what it becomes, the response objects,
media URLs, and the metrics."""

from __future__ import annotations

import base64
import json
import struct
import tempfile
import zlib
from io import BytesIO

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import random_image, smooth_video, write_video
from llava_rt.runtime import InputError, MediaTooLarge
from llava_rt.runtime.scheduler import Event
from llava_rt.runtime.video import load_video
from llava_rt.serve.media import MediaReader
from llava_rt.serve.metrics import ServerMetrics
from llava_rt.serve.schema import APIError, ChatCompletionChunk, ChunkChoice, Delta, check_context, parse_chat_request


def body(**fields) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "Hi"}], **fields}).encode()


def user_content(content) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": content}]}).encode()


def refused(data: bytes) -> APIError:
    with pytest.raises(APIError) as caught:
        parse_chat_request(data)
    assert caught.value.status == 400
    return caught.value


# ---- requests -------------------------------------------------------------------------------------------------


def test_a_request_becomes_the_runtime_request():
    request = parse_chat_request(
        json.dumps(
            {
                "model": "m",
                "messages": [
                    {"role": "developer", "content": "Be brief."},
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "data:a", "detail": "high"}},
                            {"type": "text", "text": "and"},
                            {"type": "video_url", "video_url": {"url": "data:v"}},
                            {"type": "image_url", "image_url": {"url": "data:b"}},
                        ],
                    },
                    {"role": "assistant", "content": "Sure.", "name": "bot"},
                ],
                "max_tokens": 7,
                "temperature": 0,
                "top_k": -1,
                "seed": 3,
                "stop": "END",
                "user": "someone",  # unknown fields are ignored
                "metadata": {"a": "b"},
            }
        ).encode()
    )
    assert request.media_urls("image_url") == ["data:a", "data:b"] and request.media_urls("video_url") == ["data:v"]
    assert request.token_limit == 7
    runtime = request.runtime_request(["img-a", "img-b"], ["vid"], num_frames=4, max_new_tokens=7)
    assert runtime.messages == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "video"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Sure."}]},
    ]
    assert runtime.images == ("img-a", "img-b") and runtime.videos == ("vid",) and runtime.num_frames == 4
    assert runtime.max_new_tokens == 7
    search = runtime.search
    assert (search.temperature, search.top_k, search.seed, search.stop, search.top_p) == (0, 0, 3, ("END",), None)


def test_options_left_out_come_from_the_bundle():
    request = parse_chat_request(body(stop=["a", "b"], max_tokens=5, max_completion_tokens=9))
    assert request.token_limit == 9  # max_completion_tokens, OpenAI's newer name, wins
    search = request.search_options()
    assert search.stop == ("a", "b") and search.temperature is search.top_p is search.top_k is search.seed is None
    assert parse_chat_request(body()).token_limit is None


@pytest.mark.parametrize(
    "fields",
    [
        dict(n=1, logprobs=False, top_logprobs=0, tools=[], tool_choice="none", response_format={"type": "text"}),
        dict(frequency_penalty=0, presence_penalty=0.0, logit_bias={}, modalities=["text"], audio=None, n=None),
    ],
)
def test_unsupported_parameters_at_their_default_are_accepted(fields):
    parse_chat_request(body(**fields))


@pytest.mark.parametrize(
    "fields, param",
    [
        (dict(n=2), "n"),
        (dict(logprobs=True), "logprobs"),
        (dict(top_logprobs=3), "top_logprobs"),
        (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
        (dict(response_format={"type": "json_object"}), "response_format"),
        (dict(frequency_penalty=0.5), "frequency_penalty"),
        (dict(modalities=["text", "audio"]), "modalities"),
    ],
)
def test_unsupported_parameter_values_are_refused_by_name(fields, param):
    error = refused(body(**fields))
    assert error.param == param and error.message.startswith(f"{param}=") and "not supported" in error.message


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"", "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b"[" * 100_000, "not valid JSON"),
        (b'"hi"', "must be a JSON object, not str"),
        (body(max_tokens="5"), "max_tokens: Input should be a valid integer"),
        (body(max_tokens=0), "max_tokens: Input should be greater than or equal to 1"),
        (body(stream=1), "stream: Input should be a valid boolean"),
        (body(temperature=-1), "temperature: Input should be greater than or equal to 0"),
        (body(top_p=0), "top_p: Input should be greater than 0"),
        (body(seed=-2), "seed: Input should be greater than or equal to 0"),
        (body(stream_options={"include_usage": True}), "stream_options is only allowed with stream=true"),
        (body(stop=["ok", 1]), "stop.1: Input should be a valid string"),
        (user_content(5), "messages.0.content: Input should be a valid"),
        (json.dumps({"messages": []}).encode(), "messages: List should have at least 1 item"),
        (json.dumps({"messages": [{"role": "user"}]}).encode(), "messages.0.content: Field required"),
        (user_content([{"type": "input_audio"}]), "content.0: Input tag 'input_audio'"),
        (user_content([{"type": "image_url"}]), "content.0.image_url.image_url: Field required"),
    ],
)
def test_malformed_requests_are_refused(data, fragment):
    assert fragment in refused(data).message


def test_context_check_names_both_parts():
    check_context(100, 28, 128)
    check_context(100, None, 128)
    with pytest.raises(APIError) as caught:
        check_context(100, 29, 128)
    assert caught.value.status == 400 and caught.value.param == "max_tokens"
    assert caught.value.message == (
        "This model's maximum context length is 128 tokens. However, you requested 129 tokens (100 in the messages, 29 in "
        "the completion). Please reduce the length of the messages or completion."
    )


# ---- responses ------------------------------------------------------------------------------------------------


def test_chunks_leave_out_what_they_do_not_carry():
    def delta(d: Delta, finish: str | None = None) -> dict:
        chunk = ChatCompletionChunk(id="c", created=1, model="m", choices=[ChunkChoice(delta=d, finish_reason=finish)])
        return json.loads(chunk.model_dump_json())["choices"][0]

    assert delta(Delta(role="assistant", content="")) == {
        "index": 0,
        "delta": {"role": "assistant", "content": ""},
        "finish_reason": None,
        "logprobs": None,
    }
    assert delta(Delta(content="x"))["delta"] == {"content": "x"}
    assert delta(Delta(), "stop")["delta"] == {} and delta(Delta(), "stop")["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "status, kind",
    [(400, "invalid_request_error"), (401, "authentication_error"), (404, "not_found_error"), (413, "invalid_request_error")]
    + [(429, "rate_limit_error"), (500, "server_error"), (503, "server_error")],
)
def test_errors_are_openai_objects(status, kind):
    error = APIError(status, "what\nhappened", param="p").response().model_dump()
    assert error == {"error": {"message": "what\\nhappened", "type": kind, "param": "p", "code": status}}


# ---- media ----------------------------------------------------------------------------------------------------


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def png_bytes(image) -> bytes:
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares a size and holds no pixels: enough for Image.open, which reads the header only."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.fixture
def reader(tmp_path) -> MediaReader:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    random_image(10, 12).save(allowed / "a.png")
    random_image(10, 12).save(tmp_path / "outside.png")
    (allowed / "link.png").symlink_to(tmp_path / "outside.png")
    return MediaReader(allowed, max_pixels=10_000)


def test_data_url_images_are_opened_not_decoded(reader):
    image = reader.image(data_url(png_bytes(random_image(10, 12))))
    assert (image.width, image.height) == (12, 10)
    assert image.tobytes() == random_image(10, 12).tobytes()


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("data:image/png,rawbytes", "must be base64-encoded"),
        ("data:image/png;base64,%%%", "not valid base64"),
        (data_url(b"GIF89a but not really"), "cannot read the image"),
        ("https://example.com/cat.png", "https: URLs are not fetched"),
        ("HTTP://example.com/cat.png", "http: URLs are not fetched"),
        ("ftp://example.com/cat.png", "ftp: URLs are not fetched"),
        ("cat.png", "relative URLs are not fetched"),
        ("file://example.com/etc/passwd", "absolute local path"),
        ("file:relative.png", "absolute local path"),
    ],
)
def test_unusable_image_urls_are_input_errors(reader, url, fragment):
    with pytest.raises(InputError, match=fragment):
        reader.image(url)


def test_an_image_too_large_to_open_is_media_too_large(reader):
    with pytest.raises(MediaTooLarge, match="too large"):
        reader.image(data_url(png_header(20_000, 20_000)))


def test_file_urls_stay_in_the_allowed_directory(reader, tmp_path):
    allowed = tmp_path / "allowed"
    assert reader.image((allowed / "a.png").as_uri()) == allowed / "a.png"
    assert reader.image(f"file://localhost{allowed}/a%2Epng") == allowed / "a.png"
    for url, fragment in [
        ((tmp_path / "outside.png").as_uri(), "outside --allowed-local-media-path"),
        ((allowed / "link.png").as_uri(), "outside --allowed-local-media-path"),
        (f"file://{allowed}/../outside.png", "outside --allowed-local-media-path"),
        ((allowed / "missing.png").as_uri(), "no such file under --allowed-local-media-path"),
        (allowed.as_uri(), "no such file under --allowed-local-media-path"),
    ]:
        with pytest.raises(InputError, match=fragment):
            reader.image(url)
    with pytest.raises(InputError, match="started without --allowed-local-media-path"):
        MediaReader(None, 10_000).image((allowed / "a.png").as_uri())


def test_data_url_videos_are_decoded_from_a_temporary_file_that_is_removed(reader, tmp_path, monkeypatch):
    clip = write_video(tmp_path / "allowed" / "clip.mp4", smooth_video(10, 48, 64))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    frames = reader.video(data_url(clip.read_bytes(), "video/mp4"), num_frames=4)
    assert np.array_equal(frames, load_video(clip, 4))
    assert np.array_equal(reader.video(clip.as_uri(), num_frames=4), frames)
    with pytest.raises(InputError, match=r"cannot read video \(data: URL\)") as caught:
        reader.video(data_url(b"not a video", "video/mp4"), num_frames=4)
    assert str(tmp_path) not in str(caught.value)
    with pytest.raises(MediaTooLarge, match=r"each frame of video \(data: URL\) is too large"):
        MediaReader(None, max_pixels=100).video(data_url(clip.read_bytes(), "video/mp4"), num_frames=4)
    assert list((tmp_path / "tmp").iterdir()) == []


# ---- metrics --------------------------------------------------------------------------------------------------


def samples(metrics: ServerMetrics) -> dict[str, float]:
    found = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            found[sample.name + "".join(f"[{v}]" for v in sample.labels.values())] = sample.value
    return found


def test_metrics_read_the_scheduler_when_scraped_and_time_tokens():
    stats = {}
    metrics = ServerMetrics(lambda: stats or None)
    assert samples(metrics)["llava_rt_requests_running"] == 0  # no scheduler yet
    stats.update(running=2, queued=5, feature_cache_hits=3, feature_cache_misses=1, prefix_cache_hits=4, prefix_cache_tokens=90)
    found = samples(metrics)
    assert (found["llava_rt_requests_running"], found["llava_rt_requests_queued"]) == (2, 5)
    assert (found["llava_rt_feature_cache_hits_total"], found["llava_rt_feature_cache_misses_total"]) == (3, 1)
    assert (found["llava_rt_prefix_cache_hits_total"], found["llava_rt_prefix_cache_tokens_total"]) == (4, 90)
    timer = metrics.timer(arrived=10.0)
    for event in [Event("", 0, 10.5), Event("a", 1, 10.75), Event("b", 1, 10.8), Event("", 1, 10.9, "stop")]:
        timer.observe(event)
    found = samples(metrics)
    assert found["llava_rt_time_to_first_token_seconds_count"] == 1
    assert found["llava_rt_time_to_first_token_seconds_sum"] == pytest.approx(0.75)
    assert found["llava_rt_inter_token_latency_seconds_count"] == 2
    assert found["llava_rt_inter_token_latency_seconds_sum"] == pytest.approx(0.15)
    assert found["llava_rt_generated_tokens_total"] == 3
    metrics.responses.labels("/health", "503").inc()
    assert samples(metrics)["llava_rt_http_responses_total[/health][503]"] == 1
    assert samples(ServerMetrics(lambda: None)).get("llava_rt_http_responses_total[/health][503]") is None  # its own registry
