"""The bundle: a self-describing directory written by `llava-export` and read here without torch.

`load_bundle` checks the manifest (schema and cross-section rules), that every file it lists lies inside the
bundle directory, is a regular file and has its recorded size and sha256. Every file the runtime then opens
goes through `Bundle.file`, which accepts only files of that verified checksum table.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .backends import BackendConfig, Session, TensorSpec, open_session
from .chat import ChatTemplate
from .console import progress
from .errors import BundleError, InputError
from .graph_segments import SegmentedGraph, load_segmented
from .manifest_schema import REEXPORT_ADVICE, check_manifest
from .stamps import RACY_NS, read_stamps, stamp, write_stamps
from .tokenizer import Tokenizer

FORMAT_VERSION = 3
MANIFEST_NAME = "manifest.json"
VERIFY_MODES = ("auto", "full")
MAX_MANIFEST_BYTES = 64 << 20  # real manifests are a few kB; this bounds what is read into memory
# The arrays the runtime reads and their shapes, as keys of the manifest's `text` section.
_ARRAY_DIMS = {"embed_tokens": ("vocab_size", "hidden_size"), "image_newline": ("hidden_size",)}


def sha256_file(path: str | Path, chunk_size: int = 1 << 22, on_chunk: Callable[[int], Any] | None = None) -> str:
    """Hex sha256 of a regular file, read in chunks (`on_chunk(bytes read)` after each). Opened without blocking
    and checked, so a FIFO put in its place is refused instead of read forever."""
    digest = hashlib.sha256()
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise BundleError(f"{Path(path).name} is not a regular file")
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
            if on_chunk is not None:
                on_chunk(len(chunk))
    return digest.hexdigest()


def _inside(root: Path, name: str) -> Path:
    """`root / name`, refused unless it resolves inside `root` (no absolute path, no `..`, no symlink out)."""
    path = root / name
    try:
        inside = path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a symlink loop
        inside = False
    if not inside:
        raise BundleError(f"bundle file {name!r} lies outside the bundle directory; {REEXPORT_ADVICE}")
    return path


def _regular_file(root: Path, name: str) -> os.stat_result:
    """The status of a bundle file that must exist and be a regular file inside the bundle."""
    path = _inside(root, name)
    try:
        status = path.stat()
    except FileNotFoundError:
        raise BundleError(f"bundle file missing: {path}") from None
    except OSError as exc:
        raise BundleError(f"cannot access bundle file {name}: {exc.strerror}") from None
    if not stat.S_ISREG(status.st_mode):
        raise BundleError(f"bundle file {name} is not a regular file; {REEXPORT_ADVICE}")
    return status


def read_array(directory: Path, spec: str | dict[str, Any]) -> np.ndarray:
    """Memory-map an array: an `.npy` file name (no pickled objects), or a raw region of a file given by
    `{"file", "offset", "shape", "dtype", "transposed"}` (how tied embeddings point into the decoder's weights)."""
    name = spec if isinstance(spec, str) else spec["file"]
    try:
        if isinstance(spec, str):
            return np.load(directory / spec, mmap_mode="r", allow_pickle=False)
        dtype, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
        end = spec["offset"] + int(np.prod(shape)) * dtype.itemsize
        size = (directory / name).stat().st_size
        if end > size:
            region = f"{spec['offset']}..{end}"
            raise BundleError(f"array region {region} lies past the end of {name} ({size} bytes); {REEXPORT_ADVICE}")
        array = np.memmap(directory / name, dtype=dtype, mode="r", offset=spec["offset"], shape=shape)
    except (OSError, ValueError, TypeError) as exc:
        raise BundleError(f"cannot read array file {name}: {' '.join(str(exc).split())}; {REEXPORT_ADVICE}") from None
    return array.T if spec["transposed"] else array


def _io_mismatch(declared: list[dict[str, Any]], actual: list[TensorSpec]) -> str | None:
    """How a graph's actual inputs (or outputs) differ from the manifest's, if they do."""
    graph = {tensor.name: tensor for tensor in actual}
    if sorted(graph) != sorted(tensor["name"] for tensor in declared):
        return f"{', '.join(sorted(graph))} in the graph, {', '.join(sorted(t['name'] for t in declared))} in the manifest"
    for tensor in declared:
        found = graph[tensor["name"]]
        if found.dtype != tensor["dtype"]:
            return f"{tensor['name']} is {found.dtype} in the graph, {tensor['dtype']} in the manifest"
        fixed = [(a, b) for a, b in zip(found.shape, tensor["shape"]) if isinstance(a, int) and isinstance(b, int) and a and b]
        if len(found.shape) != len(tensor["shape"]) or any(a != b for a, b in fixed):
            return f"{tensor['name']} has shape {list(found.shape)} in the graph, {tensor['shape']} in the manifest"
    return None


def _as_declared(entry: dict[str, Any], graph):
    """`graph` (a session, or a graph in segments), refused unless its inputs and outputs are the manifest's."""
    for kind in ("inputs", "outputs"):
        mismatch = _io_mismatch(entry[kind], getattr(graph, kind))
        if mismatch:
            raise BundleError(f"graph {entry['file']} does not match the manifest's {kind}: {mismatch}; {REEXPORT_ADVICE}")
    return graph


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified bundle: its resolved directory and checked manifest. Its files are opened only
    through its methods."""

    path: Path
    manifest: dict[str, Any]

    def file(self, name: str) -> Path:
        """The path of a bundle file, refused unless the checksum table lists it and it is a regular file
        inside the bundle."""
        if name not in self.manifest["files"]:
            raise BundleError(f"bundle file {name!r} is not in the manifest's checksum table; {REEXPORT_ADVICE}")
        _regular_file(self.path, name)
        return self.path / name

    def text(self, name: str) -> str:
        """A UTF-8 text file of the bundle."""
        try:
            return self.file(name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise BundleError(f"cannot read bundle file {name}: {' '.join(str(exc).split())}; {REEXPORT_ADVICE}") from None

    def variant(self, graph: str, key: str = "fp32") -> dict[str, Any]:
        """The manifest entry of one precision variant of a graph (`fp32`, `fp16`, `int8.ort`, ...)."""
        variants = self.manifest["graphs"][graph]["variants"]
        if key not in variants:
            raise BundleError(f"the {graph} graph has no {key} variant (it has {', '.join(variants)})")
        return variants[key]

    def graph_bytes(self, graph: str, variant: str = "fp32") -> int:
        """Size of a graph variant with its external weights: about the bytes one run of it reads."""
        entry = self.variant(graph, variant)
        return sum(self.file(entry[key]).stat().st_size for key in ("file", "external_data") if entry.get(key))

    def input_dtype(self, graph: str, name: str, variant: str = "fp32") -> np.dtype:
        """The dtype a graph variant's input takes, as the manifest records it (and `session` checked against the
        graph)."""
        for tensor in self.variant(graph, variant)["inputs"]:
            if tensor["name"] == name:
                return np.dtype(tensor["dtype"])
        raise BundleError(f"the {graph} graph has no input {name!r}; {REEXPORT_ADVICE}")

    def array(self, key: str) -> np.ndarray:
        """A numpy array of the bundle (`embed_tokens`, `image_newline`), memory-mapped, checked to have the
        shape the manifest's text dimensions give and the dtype of the fp32 reference decoder's `inputs_embeds`."""
        spec = self.manifest["arrays"][key]
        self.file(spec if isinstance(spec, str) else spec["file"])
        array = read_array(self.path, spec)
        shape = tuple(self.manifest["text"][dim] for dim in _ARRAY_DIMS[key])
        dtype = self.input_dtype("decoder", "inputs_embeds")
        if array.shape != shape or array.dtype != dtype:
            raise BundleError(
                f"bundle array {key} is {array.dtype} of shape {list(array.shape)}, expected {dtype} of shape {list(shape)}; "
                f"{REEXPORT_ADVICE}"
            )
        return array

    def session(
        self, graph: str, variant: str = "fp32", config: BackendConfig = BackendConfig(), plan: Path | None = None
    ) -> Session:
        """A graph variant loaded as `config` says (from `plan`, a TensorRT plan built from it, when given), refused
        unless its inputs and outputs are the ones the manifest declares. Engines a backend compiles on first use
        (onnxruntime's TensorRT provider) are cached in `engines/<backend>-<device>/` of the bundle."""
        entry = self.variant(graph, variant)
        if entry.get("external_data") and plan is None:
            self.file(entry["external_data"])  # onnxruntime opens it itself
        source = plan if plan is not None else self.file(entry["file"])
        session = open_session(source, config, precision=entry["precision"], engine_cache=self._engine_cache(config))
        return _as_declared(entry, session)

    def segmented(self, graph: str, variant: str, config: BackendConfig, count: int) -> SegmentedGraph:
        """A graph variant split into at most `count` segments (see `graph_segments`), each loaded with onnxruntime as
        `config` says, refused unless the whole's inputs and outputs are the ones the manifest declares."""
        from .backends.onnxrt import OnnxRuntimeSession

        entry = self.variant(graph, variant)
        if entry.get("external_data"):
            self.file(entry["external_data"])  # onnx reads it itself

        def open_segment(path: Path, index: int) -> OnnxRuntimeSession:
            name = f"{entry['file']} (segment {index + 1})"
            return OnnxRuntimeSession(path, config, entry["precision"], self._engine_cache(config), name, stop_spinning=True)

        return _as_declared(entry, load_segmented(self.file(entry["file"]), count, open_segment))

    def _engine_cache(self, config: BackendConfig) -> Path:
        """Where engines compiled on first use (onnxruntime's TensorRT provider) are cached for `config`."""
        return self.path / "engines" / f"{config.backend}-{config.device}"

    def tokenizer(self) -> Tokenizer:
        """The bundle's tokenizer."""
        path = self.file(self.manifest["tokenizer"])
        try:
            return Tokenizer(path)
        except Exception as exc:  # the tokenizers library raises plain Exceptions for bad files
            raise BundleError(f"invalid tokenizer file {path.name}: {' '.join(str(exc).split())}; {REEXPORT_ADVICE}") from None

    def chat_template(self) -> ChatTemplate | None:
        """The bundle's chat template, compiled (`None` when the checkpoint had none)."""
        name = self.manifest.get("chat_template")
        return ChatTemplate(self.text(name), self.manifest["tokens"]["special_tokens"]) if name else None


def _read_manifest(root: Path) -> Any:
    if _regular_file(root, MANIFEST_NAME).st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{MANIFEST_NAME} is larger than {MAX_MANIFEST_BYTES >> 20} MiB; {REEXPORT_ADVICE}")
    try:
        return json.loads((root / MANIFEST_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"unreadable manifest {root / MANIFEST_NAME}: {exc}") from None


def _check_version(manifest: dict[str, Any]) -> None:
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise BundleError(f"{MANIFEST_NAME} has no integer format_version; {REEXPORT_ADVICE}")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"bundle format version {version} is newer than this llava-rt supports ({FORMAT_VERSION}); "
            "upgrade llava-rt or re-export the bundle"
        )
    if version < FORMAT_VERSION:
        raise BundleError(f"bundle format version {version} is no longer supported; re-export it with llava-export")


def _verify_files(root: Path, files: dict[str, Any], verify: str) -> None:
    """Sizes of every file, then sha256 of those whose stamp is not recorded as verified (all with "full")."""
    statuses = {name: _regular_file(root, name) for name in files}
    for name, status in statuses.items():
        if status.st_size != files[name]["bytes"]:
            raise BundleError(f"bundle file {name} has the wrong size (modified or truncated); {REEXPORT_ADVICE}")
    recorded = read_stamps(root) if verify == "auto" else {}
    current = {name: {"stamp": stamp(statuses[name]), "sha256": files[name]["sha256"]} for name in files}
    verified = {name: entry for name, entry in current.items() if recorded.get(name) == entry}
    pending = [name for name in files if name not in verified]
    started = time.time_ns()
    with progress(total=sum(files[n]["bytes"] for n in pending) / 2**20, desc="verifying bundle", unit="MiB") as bar:
        for name in pending:
            try:
                digest = sha256_file(root / name, on_chunk=lambda count: bar.update(count / 2**20))
            except OSError as exc:
                raise BundleError(f"cannot read bundle file {name}: {exc.strerror}") from None
            if digest != files[name]["sha256"]:
                raise BundleError(f"checksum mismatch for bundle file {name} (the file was modified); {REEXPORT_ADVICE}")
            if statuses[name].st_ctime_ns < started - RACY_NS:
                verified[name] = current[name]
    if verified != recorded:
        write_stamps(root, verified)


def load_bundle(path: str | Path, verify: str = "auto") -> Bundle:
    """Read and check a bundle: manifest present, supported and valid, every file of its checksum table inside
    the bundle, regular, of its size and sha256.

    `verify="auto"` re-hashes only files whose stamp (size, mtime, ctime, inode) changed since this user last
    verified them (see `stamps`); `verify="full"` re-hashes every file.
    """
    if verify not in VERIFY_MODES:
        raise InputError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"a bundle path must be a string or a path, got {type(path).__name__}")
    root = Path(path).resolve()
    if not root.is_dir():
        raise BundleError(f"bundle directory not found: {path}")
    if not (root / MANIFEST_NAME).exists():
        raise BundleError(f"not a llava-rt bundle (no {MANIFEST_NAME}): {path}")
    manifest = _read_manifest(root)
    if isinstance(manifest, dict):  # first, so that a newer format gets "upgrade" rather than a schema error
        _check_version(manifest)
    check_manifest(manifest)
    _verify_files(root, manifest["files"], verify)
    return Bundle(path=root, manifest=manifest)
