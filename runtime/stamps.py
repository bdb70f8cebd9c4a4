"""A per-user record of bundle files already verified, so a later load re-hashes only the files that changed.

A file's stamp is its size, mtime, ctime, inode and device. Rewriting a file changes its ctime even when the
writer restores size and mtime (`os.utime` sets ctime to now, and nothing lets a user set it back), and
replacing it changes the inode. Records live in `$LLAVA_RT_CACHE_DIR`, else `$XDG_CACHE_HOME/llava-rt`, else
`~/.cache/llava-rt`, one JSON file per bundle directory under `verified/`.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

CACHE_ENV = "LLAVA_RT_CACHE_DIR"
# Files changed this recently when hashed are not recorded: a change within the file system's timestamp
# granularity of the hashing could leave every field of the stamp as it was (git's "racily clean" entries).
RACY_NS = 2_000_000_000


def cache_dir() -> Path:
    """llava-rt's per-user cache directory."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llava-rt"


def stamp(status: os.stat_result) -> list[int]:
    """What changes whenever a file's content may have changed."""
    return [status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino, status.st_dev]


def _record_path(bundle: Path) -> Path:
    return cache_dir() / "verified" / f"{hashlib.sha256(str(bundle).encode()).hexdigest()}.json"


def read_stamps(bundle: Path) -> dict[str, Any]:
    """`{file name: {"stamp": [...], "sha256": hex}}` recorded for a resolved bundle directory; `{}` when there is
    no usable record (none, unreadable, or not a regular file of this user's: another user's record is not trusted)."""
    path = _record_path(bundle)
    try:
        status = path.stat()
        if not stat.S_ISREG(status.st_mode) or status.st_uid != os.geteuid():
            return {}
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict) or record.get("bundle") != str(bundle) or not isinstance(record.get("files"), dict):
        return {}
    return record["files"]


def write_stamps(bundle: Path, files: dict[str, Any]) -> None:
    """Replace a bundle's record atomically (temporary file, then rename). A cache directory that cannot be
    written is skipped: loading still works and verifies every file each time."""
    path = _record_path(bundle)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".", suffix=".tmp", delete=False) as handle:
            temporary = handle.name
            json.dump({"bundle": str(bundle), "files": files}, handle)
        os.replace(temporary, path)
    except OSError:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
