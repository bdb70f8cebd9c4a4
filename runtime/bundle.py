"""The bundle: a self-describing directory written by `llava-export` and read here without torch."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BundleError

FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"


def sha256_file(path: Path, chunk_size: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified bundle: its directory and parsed manifest."""

    path: Path
    manifest: dict[str, Any]

    def file(self, name: str) -> Path:
        """Absolute path of a file the manifest lists."""
        return self.path / name

    def graph_path(self, graph: str) -> Path:
        return self.file(self.manifest["graphs"][graph]["file"])

    def graph_bytes(self, graph: str) -> int:
        """Size of a graph with its external weights: about the bytes one run of it reads."""
        entry = self.manifest["graphs"][graph]
        return sum(self.file(entry[key]).stat().st_size for key in ("file", "external_data") if entry.get(key))

    def array(self, key: str) -> np.ndarray:
        """A numpy array of the bundle (`embed_tokens`, `image_newline`), memory-mapped."""
        return read_array(self.path, self.manifest["arrays"][key])


def read_array(directory: Path, spec: str | dict[str, Any]) -> np.ndarray:
    """Memory-map an array: an `.npy` file name, or a raw region of a file given by
    `{"file", "offset", "shape", "dtype", "transposed"}` (how tied embeddings point into the decoder's weights)."""
    if isinstance(spec, str):
        return np.load(directory / spec, mmap_mode="r")
    array = np.memmap(directory / spec["file"], dtype=spec["dtype"], mode="r", offset=spec["offset"], shape=tuple(spec["shape"]))
    return array.T if spec["transposed"] else array


def load_bundle(path: str | Path, verify_checksums: bool = True) -> Bundle:
    """Read and check a bundle: manifest present, format version supported, every file's sha256 intact."""
    path = Path(path)
    manifest_path = path / MANIFEST_NAME
    if not path.is_dir():
        raise BundleError(f"bundle directory not found: {path}")
    if not manifest_path.is_file():
        raise BundleError(f"not a llava-rt bundle (no {MANIFEST_NAME}): {path}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"unreadable manifest {manifest_path}: {exc}") from None
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise BundleError(f"manifest {manifest_path} has no integer format_version")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"bundle format version {version} is newer than this llava-rt supports ({FORMAT_VERSION}); "
            "upgrade llava-rt or re-export the bundle"
        )
    if version < FORMAT_VERSION:
        raise BundleError(f"bundle format version {version} is no longer supported; re-export it with llava-export")
    for name, entry in manifest.get("files", {}).items():
        file_path = path / name
        if not file_path.is_file():
            raise BundleError(f"bundle file missing: {file_path}")
        if file_path.stat().st_size != entry["bytes"]:
            raise BundleError(f"bundle file {name} has the wrong size (modified or truncated)")
        if verify_checksums and sha256_file(file_path) != entry["sha256"]:
            raise BundleError(f"checksum mismatch for bundle file {name} (the file was modified)")
    return Bundle(path=path, manifest=manifest)
