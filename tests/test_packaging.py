"""pyproject's lower bounds are the versions .ci/lower-bounds pins (and so ran the suite with)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from llava_rt.export.compat import SUPPORTED_BELOW, TESTED_TRANSFORMERS, check_transformers
from llava_rt.runtime import ExportError

ROOT = Path(__file__).resolve().parents[1]


GPU_EXTRAS = ("tensorrt", "gpu")  # not installable where the suite runs: unbounded until a GPU run tries versions


def _extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for name, group in _extras().items() if name not in GPU_EXTRAS for r in group if not r.startswith("llava-rt")]
    return project["dependencies"] + extras


def _pins() -> dict[str, str]:
    lines = (ROOT / ".ci" / "lower-bounds.txt").read_text().splitlines()
    return dict(line.lower().split("==") for line in lines if line and not line.startswith("#"))


def test_every_lower_bound_is_pinned_in_the_lower_bounds_run():
    pins = _pins()
    for requirement in _requirements():
        name, lowest = re.match(r"([A-Za-z0-9_.-]+)(?:\[[a-z,]+\])?>=([0-9.]+)", requirement).groups()
        assert pins.get(name.lower()) == lowest, f"{requirement}: .ci/lower-bounds.txt pins {pins.get(name.lower())}"


def test_gpu_extras_claim_no_version_nothing_ran():
    for name in GPU_EXTRAS:
        assert _extras()[name] and all(re.fullmatch(r"[A-Za-z0-9_.-]+", r) for r in _extras()[name]), name


def test_the_transformers_range_is_the_tested_one():
    (requirement,) = [r for r in _requirements() if r.startswith("transformers")]
    assert requirement == f"transformers>={TESTED_TRANSFORMERS[0]},<{SUPPORTED_BELOW}"
    assert _pins()["transformers"] == TESTED_TRANSFORMERS[0]


@pytest.mark.parametrize("version", ["5.20.0", "5.25.0", "5.25.0.dev0", "6.0.0"])
def test_export_refuses_untested_transformers_releases(version):
    with pytest.raises(ExportError, match=r"tested: 5\.21\.0 to 5\.24\.0.*pip install"):
        check_transformers(version)


@pytest.mark.parametrize("version", [TESTED_TRANSFORMERS[0], TESTED_TRANSFORMERS[1], "5.24.9"])
def test_export_accepts_the_tested_range(version):
    check_transformers(version)


def test_llava_export_names_the_supported_range_before_any_work(tmp_path):
    """An untested transformers release is refused in one line, before the checkpoint is even read."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import importlib.metadata, sys
        real = importlib.metadata.version
        importlib.metadata.version = lambda name: "5.25.0" if name == "transformers" else real(name)
        from llava_rt.export.cli import main
        sys.exit(main(["--checkpoint", {str(tmp_path / "none")!r}, "--out", {str(tmp_path / "b")!r}]))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "llava-export: error: transformers 5.25.0 is not supported by this llava-rt export (tested: 5.21.0 to 5.24.0); "
        'install one with: pip install "transformers>=5.21.0,<5.25"'
    ]
