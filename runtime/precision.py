"""Which precision variant of each graph a pipeline runs: the one asked for, or the best the bundle has for the backend
and device.

Every graph has its fp32 reference; a bundle may add fp16, int8 and int4 variants of some graphs, each in the
standard form (`<graph>.<precision>.onnx`, what TensorRT builds) and/or an onnxruntime-only form
(`<graph>.<precision>.ort.onnx`). A graph without a variant of the chosen precision runs its fp32 reference, and
the selection says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import InputError
from .manifest_schema import FORMS, PRECISIONS, variant_key


@dataclass(frozen=True)
class BackendPreference:
    """What a backend runs best: precisions for the default choice and forms per graph, most preferred first."""

    precisions: tuple[str, ...]
    forms: tuple[str, ...]


_GPU = BackendPreference(("fp16", "fp32", "int8", "int4"), ("standard",))
# (backend, device) -> preference. onnxruntime on the CPU: int8 kernels are faster than fp32 (int4 saves memory), fp16
# runs through Casts in fp32 (slower: a correctness check there), and its own forms (uint8 activations, contrib
# kernels) are the fast ones. On a GPU fp16 is the fast precision, and only standard forms run there: the onnxruntime
# forms' CPU-only kernels would put their nodes back on the CPU.
PREFERENCES = {
    ("onnxruntime", "cpu"): BackendPreference(("int8", "int4", "fp32", "fp16"), ("onnxruntime", "standard")),
    ("onnxruntime", "cuda"): _GPU,
    ("onnxruntime", "tensorrt"): _GPU,
    ("tensorrt", "cuda"): _GPU,
}


@dataclass(frozen=True)
class Selection:
    """The chosen precision and, per graph, the key of the variant that runs (`fp32` where the graph has none)."""

    precision: str
    variants: dict[str, str]
    by_default: bool

    def describe(self) -> str:
        """One line for stderr: the precision, how it was chosen, and each graph's variant."""
        how = "the best this bundle has for the backend and device" if self.by_default else "as asked"
        graphs = ", ".join(f"{graph} {key}" for graph, key in self.variants.items())
        return f"precision {self.precision} ({how}): {graphs}"


def bundle_precisions(manifest: dict[str, Any]) -> list[str]:
    """The precisions any graph of the bundle has a variant of, in `PRECISIONS` order."""
    present = {entry["precision"] for spec in manifest["graphs"].values() for entry in spec["variants"].values()}
    return [precision for precision in PRECISIONS if precision in present]


def check_precision(precision: object) -> str | None:
    """`precision` when it is None or a known precision name; else `InputError`."""
    if precision is not None and precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def select_variants(
    manifest: dict[str, Any], precision: str | None, backend: str, form: str | None = None, device: str = "cpu"
) -> Selection:
    """The variants to run for `precision` (None: the most preferred precision on `backend` and `device` the bundle
    has), each graph in the form `form` ("standard" or "onnxruntime") where it has that variant, else in the backend's
    preferred one.

    Raises `InputError` for an unknown precision or form, a precision no graph of the bundle has, or a backend and
    device that do not go together."""
    if form is not None and form not in FORMS:
        raise InputError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    available = bundle_precisions(manifest)
    if (backend, device) not in PREFERENCES:
        devices = [d for b, d in PREFERENCES if b == backend]
        raise InputError(f"backend {backend} runs on {', '.join(devices)}, not {device!r}")
    preference = PREFERENCES[backend, device]
    if check_precision(precision) is None:
        chosen = next(p for p in preference.precisions if p in available)
    elif precision not in available:
        raise InputError(
            f"this bundle has no {precision} variant (it has {', '.join(available)}); "
            f"export one with llava-export --precision {precision}"
        )
    else:
        chosen = precision
    variants = {}
    for graph, spec in manifest["graphs"].items():
        forms = [form] * (form is not None) + list(preference.forms)
        keys = [variant_key(chosen, kind) for kind in forms]
        variants[graph] = next((key for key in keys if key in spec["variants"]), "fp32")
    return Selection(chosen, variants, by_default=precision is None)
