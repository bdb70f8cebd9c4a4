"""`llava-engines`: the dry run's build plan, one-line errors with exit status 2 for bad input and a missing
TensorRT, and (where TensorRT and a GPU exist) a real build of a tiny bundle compared with onnxruntime fp32."""

from __future__ import annotations

import json
import re

import pytest
from engines_bundle import TENSORRT_MISSING, copy_bundle, engines_bundle, requires_tensorrt

from conftest import assert_one_line_error, run
from llava_rt.runtime.bundle import load_bundle
from llava_rt.runtime.engine_plans import select_plans

CLI = "llava_rt.engines.cli"


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return engines_bundle(tmp_path_factory)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_dry_run_prints_the_build_plan(bundle_dir, precision):
    done = run(
        CLI, "build", str(bundle_dir), "--precision", precision, "--dry-run", "--max-context", "256", "--opt-context", "64"
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"build plan, precision {precision}: max-batch 1, max-tiles 5, max-context 256, opt-context 64"
    decided = "(the TensorRT version and sm<cc> are decided at build time)"
    assert lines[1] == f"plan directory: engines/<tensorrt-version>-sm<cc>-{precision}/ {decided}"
    for graph in ("vision", "projector", "decoder"):
        assert f"  {graph}: {graph}.{precision}.onnx ({precision}, strongly typed)" in lines
    assert "    pixel_values: min [1, 3, 32, 32] opt [5, 3, 32, 32] max [5, 3, 32, 32]" in lines
    assert "    attention_mask: min [1, 1] opt [1, 65] max [1, 257]" in lines
    assert re.search(
        r"^    past_key_values\.0\.key: min \[1, 2, 0, 16\] opt \[1, 2, 64, 16\] max \[1, 2, 256, 16\]$", done.stdout, re.M
    )


def test_dry_run_names_the_plan_directory_when_told_the_versions(bundle_dir):
    args = ["--dry-run", "--trt-version", "10.3.0.26", "--compute-capability", "8.7", "--max-tiles", "9"]
    done = run(CLI, "build", str(bundle_dir), "--precision", "int8", *args)
    assert done.returncode == 0, done.stderr
    assert "plan directory: engines/10.3.0.26-sm87-int8/" in done.stdout.splitlines()
    assert "opt [9, 3, 32, 32] max [9, 3, 32, 32]" in done.stdout


def test_a_dry_run_changes_nothing(bundle_dir):
    before = (bundle_dir / "manifest.json").read_bytes()
    assert run(CLI, "build", str(bundle_dir), "--precision", "fp16", "--dry-run").returncode == 0
    assert (bundle_dir / "manifest.json").read_bytes() == before
    assert not (bundle_dir / "engines").exists()


@pytest.mark.skipif(TENSORRT_MISSING is None, reason="TensorRT is installed here")
def test_without_tensorrt_a_build_and_a_check_say_so(bundle_dir):
    for args in (["build", str(bundle_dir), "--precision", "fp16"], ["check", str(bundle_dir)]):
        result = run(CLI, *args)
        assert result.returncode == 2
        assert_one_line_error(
            result, "llava-engines", "needs the 'tensorrt' extra (tensorrt not installed): pip install \"llava-rt[tensorrt]\""
        )


@pytest.fixture(scope="module")
def fp16_only(bundle_dir, tmp_path_factory):
    """A copy of the bundle without its int8 variants."""
    copied = copy_bundle(bundle_dir, tmp_path_factory.mktemp("fp16-only") / "bundle")
    manifest = json.loads((copied / "manifest.json").read_text())
    for spec in manifest["graphs"].values():
        for key in [key for key in spec["variants"] if key.startswith("int8")]:
            entry = spec["variants"].pop(key)
            for name in (entry["file"], entry.get("external_data")):
                if name:
                    manifest["files"].pop(name)
                    (copied / name).unlink()
    (copied / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return copied


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["build", "{missing}", "--precision", "fp16", "--dry-run"], "bundle directory not found"),
        (
            ["build", "{fp16_only}", "--precision", "int8", "--dry-run"],
            "no standard-form int8 graph; export one with llava-export --precision int8",
        ),
        (
            ["build", "{bundle}", "--precision", "fp16", "--dry-run", "--max-context", "99999"],
            "--max-context 99999 is beyond the model's context",
        ),
        (
            ["build", "{bundle}", "--precision", "fp16", "--dry-run", "--max-context", "64", "--opt-context", "65"],
            "--opt-context 65 is beyond",
        ),
        (
            ["build", "{bundle}", "--precision", "fp16", "--dry-run", "--max-tiles", "0"],
            "--max-tiles must be a positive integer, got 0",
        ),
        (
            ["build", "{bundle}", "--precision", "fp16", "--dry-run", "--max-batch", "-2"],
            "--max-batch must be a positive integer, got -2",
        ),
        (["build", "{bundle}", "--precision", "fp16", "--workspace", "0"], "--workspace must be a positive number of GiB"),
        (
            ["build", "{bundle}", "--precision", "fp16", "--dry-run", "--compute-capability", "sm90"],
            "a compute capability is MAJOR.MINOR",
        ),
        (
            ["build", "{bundle}", "--precision", "fp16", "--dry-run", "--trt-version", "ten"],
            "a TensorRT version is numbers separated by dots",
        ),
        (["build", "{bundle}", "--precision", "fp16", "--compute-capability", "9.0"], "name a dry run's plan directory"),
        (
            ["build", "{bundle}", "--precision", "fp16", "--timing-cache", "{missing}/t.cache"],
            "not a file in an existing directory",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(bundle_dir, fp16_only, tmp_path, args, fragment):
    paths = {"missing": str(tmp_path / "missing"), "fp16_only": str(fp16_only), "bundle": str(bundle_dir)}
    result = run(CLI, *(arg.format(**paths) for arg in args))
    assert result.returncode == 2
    assert_one_line_error(result, "llava-engines", fragment)


@pytest.mark.tensorrt
@requires_tensorrt
@pytest.mark.parametrize(("precision", "min_cosine"), [("fp16", "0.99"), ("int8", "0.95")])
def test_build_and_check_on_tensorrt(bundle_dir, tmp_path, precision, min_cosine):
    import tensorrt

    from llava_rt.runtime.backends.trt import compute_capability

    copied = copy_bundle(bundle_dir, tmp_path / "bundle")
    cache = tmp_path / "timing.cache"
    built = run(CLI, "build", str(copied), "--precision", precision, "--max-context", "128", "--timing-cache", str(cache))
    assert built.returncode == 0, built.stderr
    assert cache.stat().st_size > 0
    bundle = load_bundle(copied, verify="full")
    plans = select_plans(bundle, precision, tensorrt.__version__, compute_capability())
    assert plans.entry["limits"]["max_context"] == 128 and set(plans.entry["plans"]) == set(bundle.manifest["graphs"])
    engine = tensorrt.Runtime(tensorrt.Logger()).deserialize_cuda_engine(plans.plan_file("decoder").read_bytes())
    for name, ranges in plans.entry["plans"]["decoder"]["profile"].items():
        built_ranges = [list(shape) for shape in engine.get_tensor_profile_shape(name, 0)]
        assert built_ranges == [ranges["min"], ranges["opt"], ranges["max"]], name
    checked = run(CLI, "check", str(copied), "--precision", precision, "--min-cosine", min_cosine)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    diffs = re.findall(r"^  (\w+) (opt|prefill) (\S+): max \|diff\| \S+, cosine \S+$", checked.stdout, re.M)
    assert {graph for graph, _, _ in diffs} == set(bundle.manifest["graphs"])
    assert ("decoder", "prefill", "logits") in diffs
