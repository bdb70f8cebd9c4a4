"""`llava-serve --replicas`: the checks in ray_cluster_checks.py, run by pytest inside a network namespace of
their own with only loopback up (`unshare -n`, root), so Ray and every request stay on this machine."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

CHECKS = Path(__file__).with_name("ray_cluster_checks.py")


def _loopback_namespace_reason() -> str | None:
    """Why a loopback-only network namespace cannot be made here, or None."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip (util-linux, iproute2)"
    probe = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"unshare -n is not permitted here: {probe.stderr.strip()}"


@pytest.mark.skipif(_loopback_namespace_reason() is not None, reason=str(_loopback_namespace_reason()))
def test_replicas_on_ray_serve(onevision, tmp_path):
    pytest.importorskip("ray.serve", reason="the [cluster] extra (ray[serve]) is not installed")
    inner = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "inner"), str(CHECKS)]
    ray_directory = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    environment = {**os.environ, "LLAVA_RT_CLUSTER_BUNDLE": str(onevision["ov"].bundle), "RAY_TMPDIR": ray_directory}
    (tmp_path / "home").mkdir()
    environment["HOME"] = str(tmp_path / "home")  # Ray writes its authentication token under ~/.ray
    try:
        result = subprocess.run(
            ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *inner],
            env=environment,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        shutil.rmtree(ray_directory, ignore_errors=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    summary = re.search(r"(\d+) passed", output)
    assert summary is not None and int(summary.group(1)) == 9 and "skipped" not in output, output


def test_the_application_builder_takes_the_commands_flags(tmp_path):
    """`serve run llava_rt.serve.deployment:build bundle=... replicas=2` (and KubeRay's import_path) builds the
    application from llava-serve's flags, checked as the command checks them."""
    from ray.serve import Application

    from llava_rt.runtime import InputError
    from llava_rt.serve.deployment import build

    assert isinstance(
        build({"bundle": str(tmp_path), "replicas": 2, "max_concurrency": 3, "routing": "power-of-two"}), Application
    )
    with pytest.raises(InputError, match="--autoscale must be MIN:MAX"):
        build({"bundle": str(tmp_path), "replicas": 2, "autoscale": "3:1"})
    with pytest.raises(InputError, match="bundle directory not found"):
        build({"bundle": str(tmp_path / "none")})
