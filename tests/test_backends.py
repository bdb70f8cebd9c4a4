"""Backends: devices map to onnxruntime providers (a missing one is one line naming onnxruntime-gpu, never a CPU
run), provider options pass through or are refused with one line, and a session's binding reads bound inputs in
place and writes preallocated outputs in place."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper

from conftest import assert_one_line_error, run
from llava_rt.runtime.backends import BackendConfig, open_session, parse_provider_options
from llava_rt.runtime.backends.onnxrt import PROVIDERS, _engine_cache_options
from llava_rt.runtime.errors import BackendUnavailable, BundleError, InputError


@pytest.fixture(scope="module")
def add_graph(tmp_path_factory):
    """`y = a + b` over float32 `[2, n]`."""
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, "n"]) for name in ("a", "b")]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, "n"])
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "add", inputs, [output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    path = tmp_path_factory.mktemp("graphs") / "add.onnx"
    onnx.save(model, path)
    return path


def test_binding_reads_inputs_in_place_and_writes_preallocated_outputs(add_graph):
    session = open_session(add_graph)
    assert session.array_module is np
    a, b, out = np.ones((2, 3), np.float32), np.arange(6, dtype=np.float32).reshape(2, 3), np.empty((2, 3), np.float32)
    binding = session.bind()
    binding.input("a", a)
    binding.input("b", b)
    binding.output("y", out)
    assert binding.run()["y"] is out and np.array_equal(out, a + b)
    a[:] = 10  # a bound array is read where it lies at every run
    binding.input("a", a)
    binding.run()
    np.testing.assert_array_equal(out, 10 + b)
    binding.input("a", np.full((2, 5), 2, np.float32))  # other arrays, other shapes; the backend allocates the output
    binding.input("b", np.ones((2, 5), np.float32))
    binding.output("y")
    y = binding.run()["y"]
    assert isinstance(y, np.ndarray) and y.shape == (2, 5) and (y == 3).all()
    np.testing.assert_array_equal(session.run({"a": a, "b": b})["y"], 10 + b)


@pytest.mark.parametrize("device", ["cuda", "tensorrt"])
def test_a_missing_gpu_provider_is_one_line_naming_onnxruntime_gpu(add_graph, device):
    if PROVIDERS[device] in onnxruntime.get_available_providers():
        pytest.skip(f"this onnxruntime has the {PROVIDERS[device]}")
    with pytest.raises(BackendUnavailable) as error:
        open_session(add_graph, BackendConfig(device=device))
    message = str(error.value)
    assert "\n" not in message and PROVIDERS[device] in message and "pip install onnxruntime-gpu" in message


def test_provider_options_parse_key_value_items():
    assert parse_provider_options(["trt_fp16_enable=True", " device_id = 0", "a=b=c"]) == {
        "trt_fp16_enable": "True",
        "device_id": "0",
        "a": "b=c",
    }
    for item in ("novalue", "=1", "key=", " = "):
        with pytest.raises(InputError, match="KEY=VALUE"):
            parse_provider_options([item])


def test_unusable_configs_are_refused(add_graph):
    with pytest.raises(InputError, match="device must be one of"):
        BackendConfig(device="gpu")
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        BackendConfig(backend="openvino")
    with pytest.raises(InputError, match="enable_cuda_graph"):
        BackendConfig(device="cuda", provider_options={"enable_cuda_graph": "1"})
    with pytest.raises(InputError, match="CPU provider takes no provider options"):
        open_session(add_graph, BackendConfig(provider_options={"use_arena": "0"}))


def test_tensorrt_engine_cache_is_created_in_place_or_refused_with_a_way_out(tmp_path):
    engines = tmp_path / "bundle" / "engines" / "onnxruntime-tensorrt"
    options = _engine_cache_options(engines, {})
    assert engines.is_dir() and options["trt_engine_cache_path"] == options["trt_timing_cache_path"] == str(engines)
    assert options["trt_engine_cache_enable"] == options["trt_timing_cache_enable"] == "True"
    blocked = tmp_path / "file"
    blocked.write_text("")  # not a directory: the cache cannot be made there (as in a read-only bundle, even for root)
    with pytest.raises(BundleError, match="trt_engine_cache_path=DIR"):
        _engine_cache_options(blocked / "onnxruntime-tensorrt", {})
    assert _engine_cache_options(blocked / "elsewhere", {"trt_engine_cache_path": str(tmp_path)}) == {}


def test_cli_malformed_provider_option_is_one_line(tmp_path):
    result = run("llava_rt.runtime.cli", str(tmp_path), "--prompt", "hi", "--provider-option", "trt_fp16_enable")
    assert result.returncode == 2
    assert_one_line_error(result, "llava-run", "--provider-option takes KEY=VALUE, got 'trt_fp16_enable'")


def test_cli_device_without_its_provider_is_one_line(variants):
    if PROVIDERS["cuda"] in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDAExecutionProvider")
    result = run("llava_rt.runtime.cli", str(variants["mistral"].bundle), "--prompt", "hi", "--device", "cuda")
    assert result.returncode == 2
    assert_one_line_error(result, "llava-run", "CUDAExecutionProvider, which this onnxruntime lacks; install")
    assert "pip install onnxruntime-gpu" in result.stderr
