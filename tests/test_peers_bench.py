"""The peer decoder benchmark's report, from a saved result (measuring needs the peers' venvs and a long build)."""

from __future__ import annotations

import json

from conftest import run


def _side(name: str, precision: str, weight_mib: int, decode: list[float], prefill: list[float], rss: float) -> dict:
    runs = [{"decode_tps": d, "prefill_ms": p, "peak_rss_mib": rss, "foreign_cpu": 0.0} for d, p in zip(decode, prefill)]
    return {"name": name, "precision": precision, "weight_bytes": weight_mib * 2**20, "runs": runs}


def test_report_gives_ratios_to_our_precision_and_the_roofline_share(tmp_path):
    saved = {
        "config": {
            "threads": "2",
            "prompt_tokens": "1000",
            "new_tokens": "64",
            "repeats": "3",
            "retries": "3",
            "max_foreign": "0.03",
            "bandwidth": str(2**30 * 20),
        },
        "sides": [
            _side("llava-rt", "int4", 300, [40.0, 44.0, 42.0], [4000, 4200, 4400], 700.0),
            _side("llama.cpp", "Q4_0", 333, [30.0, 32.0, 31.5], [4800, 5000, 5200], 650.0),
        ],
        "table": "",
    }
    path = tmp_path / "result.json"
    path.write_text(json.dumps(saved))
    done = run("llava_rt.benchmarks.peers", "--workdir", str(tmp_path), "--report-only", str(path))
    assert done.returncode == 0, done.stderr
    rows = {
        line.split(" | ")[0]: line.split(" | ")
        for line in done.stdout.splitlines()
        if line.startswith("| llava-rt") or line.startswith("| llama.cpp")
    }
    ours, peer = rows["| llava-rt"], rows["| llama.cpp"]
    assert ours[3:7] == ["4200 ±200", "42.0 ±2.0", "62%", "700"]  # 42 tok/s x 300 MiB / 20 GiB/s = 0.615
    assert peer[8:12] == ["int4", "1.19x", "0.75x", "0.93x |"]  # 5000 / 4200, 31.5 / 42, 650 / 700
