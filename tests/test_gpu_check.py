"""The GPU verification kit. Here: its archives survive packing, cutting into parts and unpacking, parts that are
missing or corrupt are named, and every device call of its plan fits the transfer limit. On a GPU (marked `gpu`):
CUDA fp32 greedy tokens equal the CPU's, and fp16's agree with fp32 for at least 30 of 32 tokens, on a tiny
checkpoint of each family."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import assert_one_line_error, random_image, run
from llava_rt.benchmarks.gpu_kit import ARCHIVES, CHECK, KIT, SUMS, SUMS_BYTES, package
from llava_rt.export.exporter import export_bundle
from llava_rt.runtime import Pipeline

CALL_BYTES = 96 * 1024  # a small transfer limit, so the stand-in onnxruntime-gpu archive needs several calls


def _stage(kit: Path) -> dict[str, dict[str, bytes]]:
    """Stand-in stages: per archive a package of files, one of incompressible bytes (xz cannot shrink it below the
    call size); returns their contents by relative path."""
    rng = random.Random(0)
    trees = {}
    for archive, size in zip(ARCHIVES, (1000, 250_000)):
        package_name = archive.replace("-", "_")
        files = {f"{package_name}/__init__.py": b"VALUE = 1\n", f"{package_name}/lib/blob.so": rng.randbytes(size)}
        for relative, content in files.items():
            path = kit / "stage" / archive / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        trees[archive] = files
    return trees


def _receive(site: Path):
    return run("llava_rt.benchmarks.gpu_kit", "receive", str(site))


def test_kit_parts_fill_each_call_and_are_unpacked_once_all_arrived(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the kit and its plan are relative to the repository root
    trees = _stage(KIT)
    calls = package(KIT, CALL_BYTES)

    parts = sorted(KIT.glob("onnxruntime-gpu.tar.xz.part-*"))
    assert len(parts) == len(calls) >= 3
    assert [call["carry"][-1] for call in calls] == [str(part) for part in parts]  # one part per call, in order
    assert calls[0]["carry"] == [str(KIT / SUMS), str(KIT / "deps.tar.xz"), str(parts[0])]
    for call in calls:
        assert call["command"] == CHECK and call["carry"][0] == str(KIT / SUMS)
        assert sum(Path(path).stat().st_size for path in call["carry"]) <= CALL_BYTES
    assert (KIT / SUMS).stat().st_size <= SUMS_BYTES
    assert [call["timeout_s"] for call in calls][-1] == 600 and max(call["timeout_s"] for call in calls[:-1]) <= 180

    site = tmp_path / "site"
    last = parts[-1].read_bytes()
    parts[-1].unlink()  # the last call has not come yet: the deps are unpacked, onnxruntime-gpu waits
    waiting = _receive(site)
    assert waiting.returncode == 3 and waiting.stdout.strip() == f"gpu_kit.py: waiting for {parts[-1].name}"
    assert (site / "deps" / "__init__.py").is_file() and not (site / "onnxruntime_gpu").exists()

    parts[-1].write_bytes(last)
    good = parts[1].read_bytes()
    parts[1].write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one bit flipped on the way
    corrupt = _receive(site)
    assert corrupt.returncode == 2
    assert_one_line_error(corrupt, "gpu_kit.py", f"{parts[1]} does not match its checksum: carry it again")

    parts[1].write_bytes(good)
    for _ in range(2):  # the second time there is nothing left to do
        done = _receive(site)
        assert done.returncode == 0 and "every archive is unpacked" in done.stdout
    for files in trees.values():
        for relative, content in files.items():
            assert (site / relative).read_bytes() == content


def test_receive_without_the_checksums_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _receive(tmp_path / "site")
    assert result.returncode == 2
    assert_one_line_error(result, "gpu_kit.py", f"{KIT / SUMS} is missing: carry it with every call")


def test_the_check_script_parses_and_stops_at_the_first_failure():
    script = Path(__file__).parents[1] / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert "\nset -euo pipefail\n" in script.read_text()


# family fixture -> the tiny checkpoint of it to check on the GPU
FAMILIES = {"variants": "llama", "onevision": "ov-tied", "next_video": "average"}
NEW_TOKENS = 32


@pytest.fixture(params=sorted(FAMILIES), scope="module")
def fp16_bundle(request, tmp_path_factory) -> tuple[str, Path]:
    """A bundle of the family's tiny checkpoint with fp16 variants beside its fp32 graphs."""
    name = FAMILIES[request.param]
    checkpoint = request.getfixturevalue(request.param)[name].checkpoint
    bundle = tmp_path_factory.mktemp("fp16") / name
    export_bundle(checkpoint, bundle, precisions=["fp16"], log=lambda message: None)
    return name, bundle


def _greedy(pipeline: Pipeline) -> list[int]:
    image = random_image(40, 52, seed=1)
    ask = dict(prompt="Describe the picture.", images=[image], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    return pipeline.generate(**ask).token_ids


def _same_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens `a` and `b` share before their first difference."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.gpu
def test_cuda_fp32_greedy_equals_the_cpu_and_fp16_drifts_little(fp16_bundle):
    name, bundle = fp16_bundle
    cpu = _greedy(Pipeline.load(bundle, precision="fp32"))
    cuda = _greedy(Pipeline.load(bundle, precision="fp32", device="cuda"))
    fp16 = _greedy(Pipeline.load(bundle, precision="fp16", device="cuda"))
    same, agree = _same_prefix(cpu, cuda), _same_prefix(cuda, fp16)
    print(f"cuda fp32 {name}: {same}/{NEW_TOKENS} greedy tokens equal to the cpu's before the first difference")
    print(f"fp16 drift {name}: {agree}/{NEW_TOKENS} greedy tokens equal to fp32's before the first difference")
    assert len(cpu) == NEW_TOKENS
    assert same == NEW_TOKENS, f"first divergence at token {same}: cpu {cpu[same : same + 4]}, cuda {cuda[same : same + 4]}"
    assert agree >= 30, f"fp16 leaves fp32 at token {agree}: fp32 {cuda[agree : agree + 4]}, fp16 {fp16[agree : agree + 4]}"


def test_gpu_tests_are_skipped_with_the_reason_where_there_is_none(tmp_path, monkeypatch):
    """Where onnxruntime has no CUDA provider a `gpu` test is reported as skipped, with why, never as passed."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has the CUDA provider: gpu tests run here")
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path)
    (tmp_path / "test_marked.py").write_text(
        "import pytest\n\n\n@pytest.mark.gpu\ndef test_on_gpu():\n    pass\n\n\n"
        "@pytest.mark.tensorrt\ndef test_on_tensorrt():\n    pass\n"
    )
    monkeypatch.chdir(tmp_path)
    result = run("pytest", "-ra", "-p", "no:cacheprovider", "--rootdir", ".", ".")
    assert result.returncode == 0, result.stdout
    assert "2 skipped" in result.stdout and "passed" not in result.stdout
    assert "SKIPPED [1] test_marked.py:4: needs a CUDA GPU and onnxruntime-gpu (CUDAExecutionProvider)" in result.stdout
    assert "SKIPPED [1] test_marked.py:9: needs TensorRT (`import tensorrt`)" in result.stdout
