"""Plans into a bundle without ever leaving it half-written: each plan file is written under a new name
(`engines/<key>/<graph>-<sha256 prefix>.plan`, through a temporary file), then one atomic replace of `manifest.json`
makes them the bundle's (the `engines` entry and the checksum table together), then files no entry names any more
are removed. Until the replace the bundle is exactly what it was; after it, exactly the new one. One build at a
time per bundle (a lock file)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from ..runtime.bundle import MANIFEST_NAME
from ..runtime.errors import BundleError
from ..runtime.manifest_schema import check_manifest

ENGINES_DIR = "engines"
PLAN_KEY = re.compile(r"^\d+(\.\d+)*-sm\d+-[a-z0-9]+$")


@contextlib.contextmanager
def bundle_lock(bundle: Path):
    """Hold `BUNDLE/engines/.lock`; another build of the same bundle is refused."""
    (bundle / ENGINES_DIR).mkdir(exist_ok=True)
    with open(bundle / ENGINES_DIR / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BundleError(f"another llava-engines build is writing {bundle}") from None
        yield


def write_atomically(path: Path, data: bytes) -> None:
    """`data` into `path` through a temporary file in the same directory, synced, then renamed; a failure (a full
    disk) is a `BundleError` and leaves `path` as it was."""
    try:
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as exc:
        raise BundleError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        raise BundleError(f"cannot write {path}: {exc.strerror}") from None
    finally:
        Path(temporary).unlink(missing_ok=True)


def write_plan(bundle: Path, key: str, graph: str, data: bytes) -> dict[str, Any]:
    """Write one plan; its `file`, `sha256` and `bytes` for the manifest."""
    digest = hashlib.sha256(data).hexdigest()
    name = f"{ENGINES_DIR}/{key}/{graph}-{digest[:16]}.plan"
    (bundle / ENGINES_DIR / key).mkdir(parents=True, exist_ok=True)
    write_atomically(bundle / name, data)
    return {"file": name, "sha256": digest, "bytes": len(data)}


def commit(bundle: Path, manifest: dict[str, Any], key: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Make `entry` the bundle's plans under `key` (replacing any there), checksum table included; returns the new
    manifest. `manifest` is the bundle's as loaded under `bundle_lock`."""
    updated = json.loads(json.dumps(manifest))
    previous = updated.setdefault("engines", {}).get(key)
    for plan in previous["plans"].values() if previous else ():
        updated["files"].pop(plan["file"], None)
    for plan in entry["plans"].values():
        updated["files"][plan["file"]] = {"sha256": plan["sha256"], "bytes": plan["bytes"]}
    updated["engines"][key] = entry
    check_manifest(updated)
    write_atomically(bundle / MANIFEST_NAME, (json.dumps(updated, indent=2) + "\n").encode())
    remove_unlisted(bundle, updated)
    return updated


def remove_unlisted(bundle: Path, manifest: dict[str, Any]) -> None:
    """Delete plan files in plan directories (`engines/<key>/`) the manifest does not list: replaced plans, an
    interrupted build's. Nothing else under `engines/` is touched (onnxruntime's TensorRT cache lives there too)."""
    listed = set(manifest["files"])
    for directory in (bundle / ENGINES_DIR).iterdir():
        if not (directory.is_dir() and PLAN_KEY.match(directory.name)):
            continue
        for path in directory.iterdir():
            if path.is_file() and ".plan" in path.name and path.relative_to(bundle).as_posix() not in listed:
                path.unlink()
        if not any(directory.iterdir()):
            directory.rmdir()
