"""The TensorRT build plan and the plans' place in a bundle, without TensorRT: profiles from the named axes and the
limits, plan directory keys, the manifest's `engines` section written atomically and checked, refusal of plans of
another TensorRT version, GPU or graph, and the limit errors naming the flag to raise."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys

import numpy as np
import pytest
from engines_bundle import copy_bundle, engines_bundle

from llava_rt.engines.compare import compare_arrays, compare_graph
from llava_rt.engines.plan import Limits, build_plan, graph_profile, model_tiles, plan_directory, resolve_limits
from llava_rt.engines.store import bundle_lock, commit, remove_unlisted, write_plan
from llava_rt.runtime.backends.trt import TensorRTSession
from llava_rt.runtime.bundle import Bundle, load_bundle
from llava_rt.runtime.engine_plans import plan_key, select_plans
from llava_rt.runtime.errors import BackendUnavailable, BundleError, InputError
from llava_rt.runtime.manifest_schema import check_manifest

LIMITS = Limits(max_batch=3, max_tiles=7, max_context=512, opt_context=100)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return engines_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def manifest(bundle_dir):
    return load_bundle(bundle_dir).manifest


def test_default_limits_are_the_models(manifest):
    tile = manifest["packing"]["tile_size"]
    largest = max((h // tile) * (w // tile) for h, w in manifest["packing"]["image_grid_pinpoints"])
    limits = resolve_limits(manifest)
    assert model_tiles(manifest) == largest + 1 == limits.max_tiles
    assert limits.max_context == manifest["text"]["max_position_embeddings"] == limits.opt_context  # 1024 < 2048
    assert limits.max_batch == 1
    assert resolve_limits(manifest, max_context=300).opt_context == 300
    assert resolve_limits(manifest, 2, 9, 512, 64) == Limits(2, 9, 512, 64)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (dict(max_context=5000), "--max-context 5000 is beyond the model's context of 1024"),
        (dict(max_context=100, opt_context=200), "--opt-context 200 is beyond the max context of 100"),
        (dict(max_tiles=0), "--max-tiles must be a positive integer"),
        (dict(max_batch=-1), "--max-batch must be a positive integer"),
        (dict(opt_context=True), "--opt-context must be a positive integer"),
    ],
)
def test_bad_limits_are_refused(manifest, options, fragment):
    with pytest.raises(InputError, match=fragment):
        resolve_limits(manifest, **options)


def _ranges(plan, name):
    shapes = plan.profile[name]
    return list(zip(shapes["min"], shapes["opt"], shapes["max"]))


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_profiles_come_from_the_named_axes_and_the_limits(manifest, precision):
    plans = {plan.graph: plan for plan in build_plan(manifest, precision, LIMITS)}
    assert set(plans) == set(manifest["graphs"])
    kv = manifest["graphs"]["decoder"]["kv_cache"]
    hidden = manifest["text"]["hidden_size"]
    for graph, plan in plans.items():
        entry = manifest["graphs"][graph]["variants"][precision]
        assert (plan.variant, plan.onnx_file) == (precision, entry["file"])
        assert plan.graph_sha256 == manifest["files"][entry["file"]]["sha256"]
        assert sorted(plan.profile) == sorted(t["name"] for t in entry["inputs"])
    assert _ranges(plans["vision"], "pixel_values")[0] == (1, 7, 7)
    assert [low == high for low, _, high in _ranges(plans["vision"], "pixel_values")[1:]] == [True] * 3
    tokens = manifest["packing"]["tokens_per_tile"]
    assert _ranges(plans["projector"], "image_features")[:2] == [(1, 7, 7), (tokens, tokens, tokens)]
    decoder = plans["decoder"]
    assert _ranges(decoder, "inputs_embeds") == [(1, 3, 3), (1, 1, 512), (hidden, hidden, hidden)]
    assert _ranges(decoder, "position_ids") == [(1, 3, 3), (1, 1, 512)]
    assert _ranges(decoder, "attention_mask") == [(1, 3, 3), (1, 101, 513)]
    heads, head_dim = kv["num_kv_heads"], kv["head_dim"]
    past = [(1, 3, 3), (heads, heads, heads), (0, 100, 512), (head_dim, head_dim, head_dim)]
    assert all(
        _ranges(decoder, f"past_key_values.{i}.{kind}") == past for i in range(kv["num_layers"]) for kind in ("key", "value")
    )


def test_video_frames_share_the_tile_limit(manifest):
    profile = graph_profile(manifest, [{"name": "image_features", "shape": ["frames", 16, 32]}], LIMITS, "video_pool fp16")
    assert profile["image_features"] == {"min": [1, 16, 32], "opt": [7, 16, 32], "max": [7, 16, 32]}


def test_an_axis_without_a_limit_is_refused(manifest):
    with pytest.raises(InputError, match="vision fp16 input pixel_values has axis 'height'"):
        graph_profile(manifest, [{"name": "pixel_values", "shape": ["tiles", 3, "height", 32]}], LIMITS, "vision fp16")


def test_a_graph_without_the_precision_is_built_from_its_fp32_graph(manifest):
    changed = copy.deepcopy(manifest)
    del changed["graphs"]["decoder"]["variants"]["int8"]
    plans = {plan.graph: plan for plan in build_plan(changed, "int8", LIMITS)}
    assert (plans["decoder"].variant, plans["decoder"].onnx_file) == ("fp32", "decoder.onnx")
    assert plans["vision"].variant == "int8"


def test_a_precision_the_bundle_lacks_is_refused(manifest):
    changed = copy.deepcopy(manifest)
    for spec in changed["graphs"].values():
        spec["variants"].pop("fp16")
    with pytest.raises(InputError, match="no standard-form fp16 graph; export one with llava-export --precision fp16"):
        build_plan(changed, "fp16", LIMITS)
    with pytest.raises(InputError, match="--precision must be one of fp16, int8"):
        build_plan(manifest, "int4", LIMITS)


def test_plan_directory_keys():
    assert plan_key("10.3.0.26", "8.7", "fp16") == "10.3.0.26-sm87-fp16"
    assert plan_key("11.0", "12.0", "int8") == "11.0-sm120-int8"
    assert plan_directory("10.15.1", "9.0", "int8") == "engines/10.15.1-sm90-int8/"
    assert plan_directory(None, None, "fp16") == "engines/<tensorrt-version>-sm<cc>-fp16/"
    for version, capability in (("10.x", "8.7"), ("10.3", "87"), ("10.3", "sm87")):
        with pytest.raises(InputError):
            plan_key(version, capability, "fp16")


def _entry(precision, tensorrt="10.3.0.26", capability="8.7", hardware="none", version_compatible=False, plans=None):
    return {
        "precision": precision,
        "tensorrt": tensorrt,
        "compute_capability": capability,
        "hardware_compatibility": hardware,
        "version_compatible": version_compatible,
        "limits": {"max_batch": 1, "max_tiles": 5, "max_context": 512, "opt_context": 100},
        "plans": plans or {},
    }


def _add_plans(bundle_dir, manifest, precision="fp16", content=b"plan", **entry_options):
    """Plans of `precision` recorded in the bundle as a build records them (the bytes stand for TensorRT's)."""
    entry = _entry(precision, **entry_options)
    key = plan_key(entry["tensorrt"], entry["compute_capability"], precision)
    limits = Limits(**entry["limits"])
    with bundle_lock(bundle_dir):
        for plan in build_plan(manifest, precision, limits):
            written = write_plan(bundle_dir, key, plan.graph, content + plan.graph.encode())
            entry["plans"][plan.graph] = {
                **written,
                "variant": plan.variant,
                "graph": plan.onnx_file,
                "graph_sha256": plan.graph_sha256,
                "profile": plan.profile,
            }
        return key, commit(bundle_dir, manifest, key, entry)


@pytest.fixture
def with_plans(bundle_dir, tmp_path):
    """A copy of the bundle with fp16 plans of TensorRT 10.3.0.26 on sm87, loaded."""
    copied = copy_bundle(bundle_dir, tmp_path / "bundle")
    _add_plans(copied, load_bundle(copied).manifest)
    return load_bundle(copied)


def test_plans_are_recorded_with_their_checksums(with_plans):
    entry = with_plans.manifest["engines"]["10.3.0.26-sm87-fp16"]
    for graph, plan in entry["plans"].items():
        assert plan["file"].startswith("engines/10.3.0.26-sm87-fp16/") and plan["file"].endswith(".plan")
        assert with_plans.manifest["files"][plan["file"]] == {"sha256": plan["sha256"], "bytes": plan["bytes"]}
        assert with_plans.file(plan["file"]).read_bytes() == b"plan" + graph.encode()
    assert load_bundle(with_plans.path, verify="full").manifest == with_plans.manifest


def test_a_rebuild_replaces_the_plans_and_leaves_other_engines_alone(with_plans):
    other = with_plans.path / "engines" / "onnxruntime-tensorrt"
    other.mkdir()
    (other / "cache.engine").write_bytes(b"onnxruntime's")
    old = {plan["file"] for plan in with_plans.manifest["engines"]["10.3.0.26-sm87-fp16"]["plans"].values()}
    _add_plans(with_plans.path, with_plans.manifest, content=b"rebuilt")
    reloaded = load_bundle(with_plans.path, verify="full")
    new = {plan["file"] for plan in reloaded.manifest["engines"]["10.3.0.26-sm87-fp16"]["plans"].values()}
    assert not old & new and not old & set(reloaded.manifest["files"])
    assert not any((with_plans.path / name).exists() for name in old)
    assert (other / "cache.engine").read_bytes() == b"onnxruntime's"


def test_an_interrupted_build_leaves_the_bundle_as_it_was(with_plans):
    manifest_before = (with_plans.path / "manifest.json").read_bytes()
    stray = write_plan(with_plans.path, "10.3.0.26-sm87-fp16", "vision", b"half a build")
    assert load_bundle(with_plans.path, verify="full").manifest == with_plans.manifest
    assert (with_plans.path / "manifest.json").read_bytes() == manifest_before
    remove_unlisted(with_plans.path, with_plans.manifest)
    assert not (with_plans.path / stray["file"]).exists()


def test_one_build_at_a_time(with_plans):
    with bundle_lock(with_plans.path):
        with pytest.raises(BundleError, match="another llava-engines build is writing"):
            with bundle_lock(with_plans.path):
                pass


def _refusal(bundle, *args) -> str:
    with pytest.raises(BundleError) as raised:
        select_plans(bundle, *args)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_plans_of_this_tensorrt_and_gpu_are_selected(with_plans):
    plans = select_plans(with_plans, "fp16", "10.3.0.26", "8.7")
    assert plans.key == "10.3.0.26-sm87-fp16"
    assert plans.plan_file("decoder").read_bytes() == b"plandecoder"


def test_plans_of_another_tensorrt_gpu_or_precision_are_refused(with_plans):
    rebuild = f"rebuild: llava-engines build {with_plans.path} --precision fp16"
    message = _refusal(with_plans, "fp16", "10.3.1.0", "8.7")
    assert "built by TensorRT 10.3.0.26" in message and message.endswith(rebuild)
    message = _refusal(with_plans, "fp16", "10.3.0.26", "9.0")
    assert "built for compute capability 8.7" in message and message.endswith(rebuild)
    message = _refusal(with_plans, "int8", "10.3.0.26", "8.7")
    assert message == f"the bundle has no int8 TensorRT plans; build them: llava-engines build {with_plans.path} --precision int8"


def test_plans_of_another_graph_are_refused(with_plans):
    manifest = copy.deepcopy(with_plans.manifest)
    plan = manifest["engines"]["10.3.0.26-sm87-fp16"]["plans"]["projector"]
    plan["graph_sha256"] = "0" * 64  # built before the projector was re-exported
    message = _refusal(Bundle(with_plans.path, manifest), "fp16", "10.3.0.26", "8.7")
    assert "the projector plan was built from another projector.fp16.onnx than the bundle's" in message


def test_version_and_hardware_compatible_plans(bundle_dir, tmp_path):
    copied = copy_bundle(bundle_dir, tmp_path / "bundle")
    _add_plans(
        copied, load_bundle(copied).manifest, tensorrt="10.8.0", capability="8.6", hardware="ampere+", version_compatible=True
    )
    bundle = load_bundle(copied)
    for version, capability in (("10.8.0", "8.6"), ("10.15.1", "9.0"), ("10.8.0", "12.0")):
        assert select_plans(bundle, "fp16", version, capability).key == "10.8.0-sm86-fp16"
    assert "later 10.x only" in _refusal(bundle, "fp16", "11.0.0", "9.0")
    assert "later 10.x only" in _refusal(bundle, "fp16", "10.3.0", "9.0")
    assert "Ampere or newer" in _refusal(bundle, "fp16", "10.8.0", "7.5")


def test_requests_beyond_the_limits_name_the_flag(with_plans):
    plans = select_plans(with_plans, "fp16", "10.3.0.26", "8.7")
    plans.check_request(batch=1, tiles=5, context=512)
    cases = [
        (dict(context=600), "600 tokens exceed the 512", "--max-context 600"),
        (dict(tiles=6), "6 tiles exceed the 5", "--max-tiles 6"),
        (dict(batch=2), "2 sequences exceed the 1", "--max-batch 2"),
    ]
    for request, said, flag in cases:
        with pytest.raises(InputError) as raised:
            plans.check_request(**request)
        assert said in str(raised.value) and f"rebuild with llava-engines build {with_plans.path} --precision fp16" in str(
            raised.value
        )
        assert flag in str(raised.value)


def test_shapes_outside_the_profile_name_the_flag(with_plans):
    plans = select_plans(with_plans, "fp16", "10.3.0.26", "8.7")
    kv = with_plans.manifest["graphs"]["decoder"]["kv_cache"]
    hidden = with_plans.manifest["text"]["hidden_size"]

    def decoder(sequence, past, total):
        past_shape = (1, kv["num_kv_heads"], past, kv["head_dim"])
        names = [f"past_key_values.{i}.{kind}" for i in range(kv["num_layers"]) for kind in ("key", "value")]
        shapes = {"inputs_embeds": (1, sequence, hidden), "position_ids": (1, sequence), "attention_mask": (1, total)}
        return {**shapes, **dict.fromkeys(names, past_shape)}

    plans.check_shapes("decoder", decoder(512, 0, 512))
    plans.check_shapes("decoder", decoder(1, 512, 513))
    for shapes, flag in ((decoder(1, 513, 514), "--max-context 513"), (decoder(600, 0, 600), "--max-context 600")):
        with pytest.raises(InputError, match=flag):
            plans.check_shapes("decoder", shapes)
    with pytest.raises(
        InputError, match="vision input pixel_values has tiles 6, the TensorRT plans .* take 1..5; rebuild .*--max-tiles 6"
    ):
        plans.check_shapes("vision", {"pixel_values": (6, 3, 32, 32)})
    with pytest.raises(InputError, match=r"has dimension 2 64, the TensorRT plans .* take 32..32$"):
        plans.check_shapes("vision", {"pixel_values": (1, 3, 64, 32)})


def test_the_manifest_checks_its_engines_section(with_plans):
    def refused(change, fragment):
        manifest = copy.deepcopy(with_plans.manifest)
        change(manifest["engines"]["10.3.0.26-sm87-fp16"], manifest)
        with pytest.raises(BundleError, match=fragment):
            check_manifest(manifest)

    check_manifest(with_plans.manifest)
    refused(lambda entry, m: entry.update(tensorrt="10.4.0"), "must be keyed '10.4.0-sm87-fp16'")
    refused(lambda entry, m: entry["plans"]["vision"].update(sha256="1" * 64), "not in the checksum table with this sha256")
    refused(lambda entry, m: m["files"].pop(entry["plans"]["decoder"]["file"]), "decoder.*not in the checksum table")
    refused(lambda entry, m: entry["plans"]["vision"].update(variant="int8.ort"), "not the standard-form int8.ort variant")
    refused(lambda entry, m: entry["plans"]["vision"]["profile"]["pixel_values"].update(min=[9, 3, 32, 32]), "min .9, 3, 32, 32.")
    refused(
        lambda entry, m: entry["plans"]["vision"]["profile"].pop("pixel_values"),
        "a profile for no input, but the inputs are pixel_values",
    )
    refused(lambda entry, m: entry.update(hardware_compatibility="turing+"), "turing")


def test_the_build_plan_never_imports_tensorrt(bundle_dir, tmp_path):
    """A `tensorrt` that fails on import: computing and checking plans still works."""
    poisoned = tmp_path / "poisoned" / "tensorrt"
    poisoned.mkdir(parents=True)
    (poisoned / "__init__.py").write_text("raise RuntimeError('tensorrt was imported')\n")
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from llava_rt.runtime.bundle import load_bundle;"
        "from llava_rt.engines.plan import build_plan, resolve_limits;"
        "import llava_rt.runtime.engine_plans, llava_rt.engines.cli;"
        "m = load_bundle(sys.argv[2]).manifest; build_plan(m, 'int8', resolve_limits(m));"
        "assert 'tensorrt' not in sys.modules; print('clean')"
    )
    result = subprocess.run([sys.executable, "-c", script, str(poisoned.parent), str(bundle_dir)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"


def test_arrays_compare_by_max_abs_diff_and_cosine():
    a = np.array([[1.0, 2.0], [3.0, -4.0]], np.float32)
    assert compare_arrays(a, a) == (0.0, 1.0)
    assert compare_arrays(a, -a) == (8.0, -1.0)
    assert compare_arrays(a, a.astype(np.float16) + np.float16(0.5)) == pytest.approx((0.5, 31 / np.sqrt(30 * 33)))


def test_the_comparison_runs_every_output_of_a_graph_against_fp32(bundle_dir):
    """The comparison `llava-engines check` makes, with onnxruntime's fp16 graphs standing in for plans."""
    bundle = load_bundle(bundle_dir)
    limits = Limits(max_batch=2, max_tiles=3, max_context=64, opt_context=32)
    embed_tokens = bundle.array("embed_tokens")
    for plan in build_plan(bundle.manifest, "fp16", limits):
        entry = {"variant": plan.variant, "profile": plan.profile}
        candidate, reference = bundle.session(plan.graph, "fp16"), bundle.session(plan.graph, "fp32")
        diffs = compare_graph(plan.graph, entry, bundle.manifest, candidate.run, reference.run, embed_tokens)
        outputs = [t["name"] for t in bundle.manifest["graphs"][plan.graph]["variants"]["fp16"]["outputs"]]
        samples = ["opt", "prefill"] if plan.graph == "decoder" else ["opt"]
        assert [(d.sample, d.output) for d in diffs] == [(sample, name) for sample in samples for name in outputs]
        assert all(d.cosine > 0.999 and 0 < d.max_abs_diff < 0.1 for d in diffs), [d.describe() for d in diffs]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_the_tensorrt_backend_without_tensorrt_names_the_package(tmp_path):
    with pytest.raises(BackendUnavailable, match=r'^TensorRT is not installed: pip install "llava-rt\[tensorrt\]"'):
        TensorRTSession(tmp_path / "vision.plan")
