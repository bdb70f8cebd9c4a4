"""The command lines: output format, and one-line errors with a non-zero exit for every bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import llava_rt
from conftest import assert_one_line_error, default_sigint, run
from llava_rt.runtime import InputError


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(path)
    return path


def test_run_json_is_one_object_with_every_field(variants, image_file):
    bundle = variants["mistral"].bundle
    result = run(
        "llava_rt.runtime.cli",
        str(bundle),
        "--prompt",
        "What is shown?",
        "--image",
        str(image_file),
        "--max-new-tokens",
        "5",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert set(payload) == {"prompt", "input_tokens", "token_ids", "text", "finish_reason", "timings_ms", "tokens_per_s"}
    assert payload["finish_reason"] in ("stop", "length")
    assert payload["prompt"] == "[INST] <image>\nWhat is shown? [/INST]"
    assert set(payload["timings_ms"]) == {"preprocess", "vision", "prefill", "decode"}
    assert 1 <= len(payload["token_ids"]) <= 5 and payload["input_tokens"] > 20
    expected = variants["mistral"].pipeline().generate(prompt="What is shown?", images=[image_file], max_new_tokens=5)
    assert payload["token_ids"] == expected.token_ids


def test_run_plain_prints_the_answer(variants, image_file):
    result = run(
        "llava_rt.runtime.cli",
        str(variants["llama"].bundle),
        "--prompt",
        "Hi",
        "--image",
        str(image_file),
        "--image",
        str(image_file),
        "--max-new-tokens",
        "3",
    )
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stderr


def test_export_missing_checkpoint(tmp_path):
    assert_one_line_error(
        run("llava_rt.export.cli", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "b")),
        "llava-export",
        "checkpoint directory not found",
    )


def test_export_not_a_llava_next_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    result = run("llava_rt.export.cli", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "b"))
    assert_one_line_error(result, "llava-export", "not a supported LLaVA checkpoint")
    assert not (tmp_path / "b").exists()


def test_export_directory_without_config(tmp_path):
    assert_one_line_error(
        run("llava_rt.export.cli", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "b")), "llava-export", "no config.json"
    )


def test_run_corrupt_image(variants, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = run("llava_rt.runtime.cli", str(variants["mistral"].bundle), "--prompt", "Hi", "--image", str(broken))
    assert_one_line_error(result, "llava-run", "cannot read image")


def test_run_missing_image(variants, tmp_path):
    result = run("llava_rt.runtime.cli", str(variants["mistral"].bundle), "--prompt", "Hi", "--image", str(tmp_path / "none.png"))
    assert_one_line_error(result, "llava-run", "image file not found")


def test_run_image_count_differs_from_placeholders(variants, image_file):
    result = run("llava_rt.runtime.cli", str(variants["mistral"].bundle), "--prompt", "Look: <image>", "--image", str(image_file))
    assert_one_line_error(result, "llava-run", "2 <image> placeholders but 1 images")


def test_run_prompt_longer_than_context(variants):
    result = run("llava_rt.runtime.cli", str(variants["mistral"].bundle), "--prompt", "hello world " * 600)
    assert_one_line_error(result, "llava-run", "leaves no room to answer within the model's context of 1024")


def test_run_tampered_and_newer_bundles(variants, tmp_path):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(variants["mistral"].bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["format_version"] = 99
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(run("llava_rt.runtime.cli", str(bundle), "--prompt", "Hi"), "llava-run", "format version 99 is newer")
    shutil.rmtree(bundle)
    shutil.copytree(variants["mistral"].bundle, bundle)
    with open(bundle / "vision.onnx", "r+b") as handle:
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 1]))
    assert_one_line_error(
        run("llava_rt.runtime.cli", str(bundle), "--prompt", "Hi"), "llava-run", "checksum mismatch for bundle file vision.onnx"
    )


def test_run_missing_bundle_and_bad_max_new_tokens(tmp_path, variants):
    assert_one_line_error(
        run("llava_rt.runtime.cli", str(tmp_path / "nothing"), "--prompt", "Hi"), "llava-run", "bundle directory not found"
    )
    assert_one_line_error(
        run("llava_rt.runtime.cli", str(variants["mistral"].bundle), "--prompt", "Hi", "--max-new-tokens", "0"),
        "llava-run",
        "max_new_tokens must be a positive integer",
    )


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(messages=[{"role": "robot", "content": "hi"}]), "unknown role 'robot'"),
        (dict(messages=[{"role": "user", "content": [{"type": "audio"}]}]), "unsupported content type 'audio'"),
        (
            dict(messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}]),
            "1 image placeholders but 0 images",
        ),
        (
            dict(prompt="<image> and <image>", images=[np.zeros((8, 8, 3), np.uint8)], apply_chat_template=False),
            "2 <image> placeholders but 1 images",
        ),
        (dict(prompt="hi", max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(), "exactly one of messages= or prompt="),
    ],
)
def test_api_bad_input(pipelines, kwargs, fragment):
    with pytest.raises(InputError, match=fragment.replace("(", r"\(")):
        pipelines["mistral"].generate(**kwargs)


def test_images_inside_messages(pipelines):
    image = np.random.default_rng(1).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    embedded = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]}]
    separate = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    pipeline = pipelines["mistral"]
    assert (
        pipeline.generate(embedded, max_new_tokens=4).token_ids
        == pipeline.generate(separate, images=[image], max_new_tokens=4).token_ids
    )


def test_run_stream_prints_the_same_answer(variants, image_file):
    bundle = str(variants["mistral"].bundle)
    ask = (
        "--prompt",
        "What is shown?",
        "--image",
        str(image_file),
        "--max-new-tokens",
        "8",
        "--temperature",
        "1.5",
        "--seed",
        "3",
    )
    streamed = run("llava_rt.runtime.cli", bundle, *ask, "--stream")
    plain = run("llava_rt.runtime.cli", bundle, *ask)
    assert streamed.returncode == plain.returncode == 0, streamed.stderr + plain.stderr
    assert streamed.stdout == plain.stdout


@pytest.mark.parametrize(
    "options, fragment",
    [
        (("--seed", "-1"), "seed must be an integer >= 0"),
        (("--do-sample", "--temperature", "-1"), "temperature must be > 0"),
        (("--top-p", "1.5"), "top_p must be in (0, 1]"),
        (("--top-k", "-2"), "top_k must be an integer >= 0"),
        (("--threads", "100000"), "threads must be an integer from 1 to"),
        (("--threads", "0"), "threads must be an integer from 1 to"),
        (("--max-image-pixels", "0"), "max_image_pixels must be a positive integer"),
    ],
)
def test_run_bad_options(variants, options, fragment):
    result = run("llava_rt.runtime.cli", str(variants["mistral"].bundle), "--prompt", "Hi", *options)
    assert_one_line_error(result, "llava-run", fragment)


def test_run_interactive_reuses_the_cache(variants, image_file):
    script = f"/image {image_file}\nWhat is shown?\nAnd what else?\n/quit\n"
    result = run("llava_rt.runtime.cli", str(variants["mistral"].bundle), "--interactive", "--max-new-tokens", "4", stdin=script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("> ") >= 3
    assert "reused from the cache" in result.stderr  # the second turn prefilled only its new tokens
    assert "Traceback" not in result.stderr


def test_run_json_stream_writes_json_lines(variants, image_file):
    ask = (str(variants["mistral"].bundle), "--prompt", "What is shown?", "--image", str(image_file), "--max-new-tokens", "6")
    result = run("llava_rt.runtime.cli", *ask, "--json", "--stream")
    assert result.returncode == 0, result.stderr
    *pieces, final = [json.loads(line) for line in result.stdout.splitlines()]
    assert pieces and all(set(piece) == {"text"} for piece in pieces)
    assert "".join(piece["text"] for piece in pieces) == final["text"]
    assert final["token_ids"] == json.loads(run("llava_rt.runtime.cli", *ask, "--json").stdout)["token_ids"]


def test_run_temperature_zero_is_greedy(variants):
    ask = (str(variants["llama"].bundle), "--prompt", "Hi there", "--max-new-tokens", "6", "--json")
    greedy, zero = run("llava_rt.runtime.cli", *ask), run("llava_rt.runtime.cli", *ask, "--temperature", "0", "--seed", "4")
    assert greedy.returncode == zero.returncode == 0, greedy.stderr + zero.stderr
    assert json.loads(greedy.stdout)["token_ids"] == json.loads(zero.stdout)["token_ids"]


def test_run_system_prompt_in_both_modes(variants):
    bundle = str(variants["llama"].bundle)
    once = run("llava_rt.runtime.cli", bundle, "--system", "Be terse.", "--prompt", "Hi", "--max-new-tokens", "2", "--json")
    assert once.returncode == 0, once.stderr
    prompt = json.loads(once.stdout)["prompt"]
    assert prompt.index("Be terse.") < prompt.index("Hi")
    pipeline = variants["llama"].pipeline()
    chat = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    assert prompt == pipeline.render(chat)
    interactive = run(
        "llava_rt.runtime.cli", bundle, "--system", "Be terse.", "--interactive", "--max-new-tokens", "2", "--json", stdin="Hi\n"
    )
    assert interactive.returncode == 0 and "Traceback" not in interactive.stderr, interactive.stderr


def test_run_version():
    result = run("llava_rt.runtime.cli", "--version")
    assert result.returncode == 0 and result.stdout.strip() == f"llava-run {llava_rt.__version__}"


def test_run_interactive_help_and_unknown_commands_are_not_sent(variants):
    result = run(
        "llava_rt.runtime.cli",
        str(variants["mistral"].bundle),
        "--interactive",
        "--max-new-tokens",
        "3",
        stdin="/help\n/imagine x\n",
    )
    assert result.returncode == 0, result.stderr  # end of input leaves cleanly
    assert result.stderr.count("/reset") == 2  # the help, twice: once asked for, once for the unknown command
    assert "generated" not in result.stderr  # nothing went to the model
    assert "Traceback" not in result.stderr


def test_run_reports_when_the_context_ends_the_answer(variants):
    result = run(
        "llava_rt.runtime.cli",
        str(variants["mistral"].bundle),
        "--prompt",
        "Go on",
        "--max-new-tokens",
        "100000",
        "--min-new-tokens",
        "100000",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["finish_reason"] == "length" and payload["input_tokens"] + len(payload["token_ids"]) == 1024
    warnings = [line for line in result.stderr.splitlines() if line.strip()]
    assert warnings == ["llava-run: warning: the answer was cut at the model's context of 1024 tokens (finish reason 'length')"]


def test_run_newline_in_a_path_is_one_line(variants, tmp_path):
    result = run("llava_rt.runtime.cli", str(variants["mistral"].bundle), "--prompt", "Hi", "--image", str(tmp_path / "a\nb.png"))
    assert_one_line_error(result, "llava-run", "a\\nb.png")


def _interactive_process(bundle, *args):
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "llava_rt.runtime.cli", str(bundle), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=default_sigint,
    )


def _read_until(stream, needle: bytes, limit: int = 1 << 20) -> bytes:
    """Read from a pipe until `needle` has appeared (a bounded amount; a closed pipe ends it)."""
    seen = b""
    while needle not in seen and len(seen) < limit:
        chunk = stream.read1(4096)
        if not chunk:
            break
        seen += chunk
    return seen


def _answering_chat(bundle):
    """`llava-run --interactive` streaming a long answer to its first message (its first piece has been read)."""
    process = _interactive_process(bundle, "--interactive", "--max-new-tokens", "900", "--min-new-tokens", "900")
    try:
        process.stdin.write(b"Tell me everything.\n")
        process.stdin.flush()
        assert _read_until(process.stdout, b"> ")  # the prompt, then the answer starts streaming
        _read_until(process.stdout, b" ", limit=64)
    except BaseException:
        process.kill()
        raise
    return process


def test_ctrl_c_in_an_interactive_answer_keeps_the_conversation_and_at_the_prompt_exits(variants):
    import signal

    process = _answering_chat(variants["mistral"].bundle)
    try:
        process.send_signal(signal.SIGINT)  # during the answer
        assert b"> " in _read_until(process.stdout, b"> ")  # back at the prompt
        process.send_signal(signal.SIGINT)  # at the prompt
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert b"answer interrupted (kept in the conversation)" in stderr and b"Traceback" not in stderr


def test_sigterm_in_an_interactive_answer_ends_the_process(variants):
    """SIGTERM asks the process to end: unlike Ctrl-C it does not just stop the answer and wait for the next line."""
    import signal

    process = _answering_chat(variants["mistral"].bundle)
    try:
        process.send_signal(signal.SIGTERM)  # during the answer; stdin stays open
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert stderr.decode().strip().splitlines()[-1] == "llava-run: interrupted" and b"Traceback" not in stderr


def test_ctrl_c_in_a_one_shot_run_is_one_line(variants):
    import signal

    process = _interactive_process(
        variants["mistral"].bundle, "--prompt", "Go", "--stream", "--max-new-tokens", "900", "--min-new-tokens", "900"
    )
    try:
        _read_until(process.stdout, b" ", limit=64)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130
    assert stderr.decode().strip().splitlines() == ["llava-run: interrupted"], stderr


def test_undecodable_text_is_one_line_in_both_modes(variants):
    import subprocess
    import sys

    bundle = str(variants["mistral"].bundle).encode()
    command = [sys.executable.encode(), b"-m", b"llava_rt.runtime.cli", bundle]
    once = subprocess.run([*command, b"--prompt", b"caf\xe9 \xff"], capture_output=True, timeout=120)
    lines = once.stderr.decode(errors="replace").strip().splitlines()
    assert once.returncode == 2 and len(lines) == 1 and lines[0].startswith("llava-run: error:"), once.stderr
    chat = subprocess.run([*command, b"--interactive"], input=b"caf\xe9 \xff\n/quit\n", capture_output=True, timeout=120)
    assert chat.returncode == 0 and b"Traceback" not in chat.stderr, chat.stderr
    assert b"llava-run: error:" in chat.stderr


def test_run_image_over_the_pixel_limit_and_full_verification(variants, image_file):
    bundle = str(variants["mistral"].bundle)
    small = run("llava_rt.runtime.cli", bundle, "--prompt", "Hi", "--image", str(image_file), "--max-image-pixels", "1000")
    assert_one_line_error(small, "llava-run", "1000")
    full = run("llava_rt.runtime.cli", bundle, "--prompt", "Hi", "--max-new-tokens", "2", "--verify", "full")
    assert full.returncode == 0, full.stderr


def test_api_threads_are_checked_before_the_bundle_is_read(tmp_path):
    from llava_rt.runtime import Pipeline

    for threads in (10**5, -1, 2.5, "4", True):
        with pytest.raises(InputError, match="threads must be an integer"):
            Pipeline.load(tmp_path / "no-bundle-here", threads=threads)
