"""Which graph variants a pipeline runs: the precision asked for or the backend's best, per graph, said in one line."""

from __future__ import annotations

import pytest

from llava_rt.runtime import InputError
from llava_rt.runtime.precision import bundle_precisions, check_precision, select_variants


def _manifest(**variants: list[str]) -> dict:
    """A manifest's graphs section with the given variant keys per graph (fp32 always)."""
    graphs = {}
    for graph in ("vision", "projector", "decoder"):
        keys = ["fp32", *variants.get(graph, [])]
        graphs[graph] = {"variants": {key: {"precision": key.split(".")[0]} for key in keys}}
    return {"graphs": graphs}


FULL = _manifest(
    vision=["fp16", "int8", "int8.ort"], projector=["fp16", "int8", "int8.ort"], decoder=["fp16", "int8", "int8.ort", "int4"]
)


def test_default_is_the_best_the_bundle_has_for_the_cpu():
    selection = select_variants(FULL, None, "onnxruntime")
    assert selection.precision == "int8" and selection.by_default
    assert selection.variants == {"vision": "int8.ort", "projector": "int8.ort", "decoder": "int8.ort"}
    assert select_variants(_manifest(), None, "onnxruntime").precision == "fp32"
    assert select_variants(_manifest(decoder=["int4"]), None, "onnxruntime").precision == "int4"
    # fp16 runs through Casts in fp32 on onnxruntime's CPU provider: never the default there
    assert select_variants(_manifest(vision=["fp16"], decoder=["fp16"]), None, "onnxruntime").precision == "fp32"


@pytest.mark.parametrize(("backend", "device"), [("onnxruntime", "cuda"), ("onnxruntime", "tensorrt"), ("tensorrt", "cuda")])
def test_default_on_a_gpu_is_fp16_in_the_standard_form(backend, device):
    selection = select_variants(FULL, None, backend, device=device)
    assert selection.precision == "fp16"
    assert selection.variants == {"vision": "fp16", "projector": "fp16", "decoder": "fp16"}
    # the onnxruntime forms' CPU-only kernels never run on a GPU, even when int8 is asked for
    assert select_variants(FULL, "int8", backend, device=device).variants["decoder"] == "int8"
    assert select_variants(_manifest(decoder=["int8", "int8.ort"]), None, backend, device=device).precision == "fp32"


def test_a_backend_on_a_device_it_does_not_run_on_is_refused():
    with pytest.raises(InputError, match="backend tensorrt runs on cuda, not 'cpu'"):
        select_variants(FULL, None, "tensorrt", device="cpu")


def test_graphs_without_the_precision_run_their_fp32_reference_and_say_so():
    selection = select_variants(FULL, "int4", "onnxruntime")
    assert selection.variants == {"vision": "fp32", "projector": "fp32", "decoder": "int4"}
    line = selection.describe()
    assert line == "precision int4 (as asked): vision fp32, projector fp32, decoder int4"


def test_form_picks_the_standard_variants_where_they_exist():
    selection = select_variants(FULL, "int8", "onnxruntime", form="standard")
    assert selection.variants == {"vision": "int8", "projector": "int8", "decoder": "int8"}
    assert select_variants(FULL, "fp16", "onnxruntime", form="onnxruntime").variants["vision"] == "fp16"


def test_bad_precisions_and_forms_are_refused():
    with pytest.raises(InputError, match="precision must be one of fp32, fp16, int8, int4, got 'int2'"):
        check_precision("int2")
    with pytest.raises(InputError, match=r"this bundle has no int4 variant \(it has fp32\); export one with llava-export"):
        select_variants(_manifest(), "int4", "onnxruntime")
    with pytest.raises(InputError, match="form must be one of standard, onnxruntime"):
        select_variants(FULL, "int8", "onnxruntime", form="tensorrt")


def test_bundle_precisions_in_canonical_order():
    assert bundle_precisions(FULL) == ["fp32", "fp16", "int8", "int4"]
