"""The Python packages the GPU verification kit (`benchmarks/gpu_check.sh`) needs and the GPU machine lacks: it has no
package index, and a device call carries at most 64 MiB. Standard library only: it also runs there before anything
is installed.

Here, from the repository root (downloads ~270 MB, packs them into ~210 MB of xz parts under `.gpu-kit/`, git-ignored,
and prints the device calls to make, in order):

    python3 benchmarks/gpu_kit.py prepare

There, every one of those calls runs `bash benchmarks/gpu_check.sh`, which first runs `gpu_kit.py receive`: parts
carried by earlier calls of the same warm machine are still there, and each archive is unpacked into the site
directory once all of its parts are.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

KIT = Path(".gpu-kit")
SUMS = "SHA256SUMS"
PYTHON_VERSION = "3.12"  # the GPU machine's python3
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# archive name -> requirements. `deps`: what the machine's image lacks (jsonschema and its own needs), holds in a
# version llava-rt's export refuses (transformers 5.17, onnx-ir 1.0), or may hold too old (setuptools, to build
# llava-rt; regex, which transformers 5.24 wants >= 2025.10.22 at import); onnxruntime-gpu: the PyPI wheel of 1.31.1
# is built for CUDA 13 (libcublas.so.13) and finds CUDA and cuDNN in the image's nvidia-* packages.
ARCHIVES = {
    "deps": (
        "setuptools==84.2.1",
        "transformers==5.24.0",
        "regex==2026.11.19",
        "onnx-ir==1.1.0",
        "jsonschema==4.26.0",
        "jsonschema-specifications==2025.9.1",
        "referencing==0.37.0",
        "rpds-py==2026.9.1",
    ),
    "onnxruntime-gpu": ("onnxruntime-gpu==1.31.1",),
}
CALL_BYTES = 60 * 2**20  # carried per device call: the limit is 64 MiB, the working tree included
SUMS_BYTES = 4096  # room kept in every call for the checksum file
CHECK = "bash benchmarks/gpu_check.sh"
FIRST_TIMEOUT_S, MIDDLE_TIMEOUT_S, LAST_TIMEOUT_S = 180, 60, 600
EXIT_WAITING = 3  # `receive`: parts are still to come


class KitError(Exception):
    """A kit that cannot be prepared or unpacked; one line."""


def _pip(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise KitError(f"pip {args[0]} failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")


def _target_options() -> list[str]:
    platforms = [option for platform in PLATFORMS for option in ("--platform", platform)]
    return ["--no-deps", "--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp", *platforms]


def pack(stage: Path, archive: Path) -> None:
    """`stage`'s contents as an xz-compressed tar (preset 1: the CUDA library shrinks nearly as much as at 9, in a
    third of the time)."""
    with tarfile.open(archive, "w:xz", preset=1) as tar:
        for path in sorted(stage.iterdir()):
            tar.add(path, arcname=path.name)


def split(archive: Path, sizes: list[int]) -> list[Path]:
    """Cut `archive` into parts `<archive>.part-NN` of `sizes[i]` bytes (the last size repeats), in order; the archive
    itself is removed."""
    parts = []
    with archive.open("rb") as source:
        while chunk := source.read(sizes[min(len(parts), len(sizes) - 1)]):
            part = archive.with_name(f"{archive.name}.part-{len(parts):02d}")
            part.write_bytes(chunk)
            parts.append(part)
    archive.unlink()
    return parts


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def plan(kit: Path, first: list[Path], parts: list[Path]) -> list[dict]:
    """The device calls, in order: `first` (whole archives) travel with the first part; every call carries the
    checksums and one part and runs the check; the last one, which completes the kit, gets the long timeout."""
    calls = []
    for index, part in enumerate(parts):
        carry = [kit / SUMS, *(first if index == 0 else []), part]
        timeout = LAST_TIMEOUT_S if index == len(parts) - 1 else FIRST_TIMEOUT_S if index == 0 else MIDDLE_TIMEOUT_S
        calls.append({"command": CHECK, "carry": [str(path) for path in carry], "timeout_s": timeout})
    return calls


def prepare(kit: Path) -> list[dict]:
    """Download every archive's wheels and install them into its stage as pip would there, then `package` them."""
    if not Path("benchmarks/gpu_check.sh").is_file():
        raise KitError("run prepare from the repository root (the kit's paths are relative to it)")
    for archive, requirements in ARCHIVES.items():
        wheels, stage = kit / "wheels" / archive, kit / "stage" / archive
        _pip("download", *_target_options(), "--dest", str(wheels), *requirements)
        shutil.rmtree(stage, ignore_errors=True)
        _pip("install", *_target_options(), "--no-compile", "--target", str(stage), *map(str, sorted(wheels.glob("*.whl"))))
    return package(kit)


def package(kit: Path, call_bytes: int = CALL_BYTES) -> list[dict]:
    """Pack each archive's stage, cut onnxruntime-gpu's archive into parts that fill the calls (the first call also
    carries the deps), write the checksums and the plan (`plan.json`); returns the plan."""
    for archive in ARCHIVES:
        pack(kit / "stage" / archive, kit / f"{archive}.tar.xz")
    for old in kit.glob("*.part-*"):
        old.unlink()
    deps, budget = kit / "deps.tar.xz", call_bytes - SUMS_BYTES
    parts = split(kit / "onnxruntime-gpu.tar.xz", [budget - deps.stat().st_size, budget])
    (kit / SUMS).write_text("".join(f"{sha256(path)}  {path.name}\n" for path in [deps, *parts]))
    calls = plan(kit, [deps], parts)
    (kit / "plan.json").write_text(json.dumps(calls, indent=2) + "\n")
    return calls


def receive(kit: Path, site: Path) -> list[str]:
    """Unpack into `site` each archive whose parts are all in `kit` (once: a marker file records it), after checking
    them against the checksums. Returns the names of the parts still missing; `KitError` names a corrupt one."""
    sums_file = kit / SUMS
    if not sums_file.is_file():
        raise KitError(f"{sums_file} is missing: carry it with every call")
    sums = {name: digest for digest, name in (line.split("  ", 1) for line in sums_file.read_text().splitlines())}
    missing = []
    for archive in ARCHIVES:
        done = site / f".{archive}.unpacked"
        names = sorted(name for name in sums if name.startswith(f"{archive}.tar.xz"))
        absent = [name for name in names if not (kit / name).is_file()]
        if done.is_file() or absent:
            missing += absent
            continue
        for name in names:
            if sha256(kit / name) != sums[name]:
                raise KitError(f"{kit / name} does not match its checksum: carry it again")
        joined = site / f".{archive}.tar.xz"
        site.mkdir(parents=True, exist_ok=True)
        with joined.open("wb") as out:
            for name in names:
                with (kit / name).open("rb") as part:
                    shutil.copyfileobj(part, out)
        with tarfile.open(joined, "r:xz") as tar:
            tar.extractall(site, filter="data")
        joined.unlink()
        done.touch()
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_kit.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare", help="here: download, pack and cut the kit into .gpu-kit/, print the device calls")
    unpack = commands.add_parser("receive", help=f"there: unpack what has arrived; exit {EXIT_WAITING} while parts are missing")
    unpack.add_argument("site", type=Path, help="the directory to unpack into (put it on PYTHONPATH)")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            calls = prepare(KIT)
            print(f"{len(calls)} device calls, back to back (a machine idle for 30 s is given back, and its parts with it):")
            for index, call in enumerate(calls, 1):
                print(f"{index}. run {json.dumps(call)}")
            return 0
        missing = receive(KIT, args.site)
    except (KitError, OSError, tarfile.TarError) as exc:
        print(f"gpu_kit.py: error: {exc}", file=sys.stderr)
        return 2
    if missing:
        print(f"gpu_kit.py: waiting for {', '.join(missing)}")
        return EXIT_WAITING
    print(f"gpu_kit.py: every archive is unpacked in {args.site}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
