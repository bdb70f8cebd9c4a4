"""`llava-export` and `llava-demo` as processes: missing extras, quiet and numbered output, checks of the
checkpoint and of `--out` before any heavy work, and nothing left behind on SIGTERM or SIGHUP."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error, run
from llava_rt import __version__
from llava_rt.export.tiny_checkpoint import (
    build_tiny_checkpoint,
    build_tiny_next_video_checkpoint,
    build_tiny_onevision_checkpoint,
)

# What a runtime-only install lacks: the modules of the export and bench extras.
EXTRA_MODULES = ("torch", "transformers", "onnx", "onnxscript", "onnx_ir", "safetensors", "torchvision", "matplotlib")
COMMANDS = {"llava-export": "llava_rt.export.cli", "llava-demo": "llava_rt.export.demo", "llava-bench": "llava_rt.benchmarks.cli"}


def run_without(modules, module: str, *args: str) -> subprocess.CompletedProcess:
    """Run `module`'s `main(args)` in a fresh interpreter where `modules` cannot be imported."""
    code = (
        "import sys\n"
        f"for name in {list(modules)!r}: sys.modules[name] = None\n"
        f"from {module} import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "checkpoint")


@pytest.fixture
def copy(checkpoint, tmp_path) -> Path:
    """A copy of the tiny checkpoint this test may break."""
    return Path(shutil.copytree(checkpoint, tmp_path / "checkpoint"))


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """`llava-export --precision int8` of the tiny checkpoint, calibrated on a directory holding one image and one
    corrupt file, as a process: its result and the bundle."""
    images = tmp_path_factory.mktemp("calibration")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(images / "good.png")
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path_factory.mktemp("exported") / "bundle"
    args = ["--checkpoint", str(checkpoint), "--out", str(out), "--precision", "int8", "--calibration-images", str(images)]
    return run("llava_rt.export.cli", *args), out


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize(
    "program, args, extra",
    [
        ("llava-export", ["--checkpoint", "ck", "--out", "b"], "export"),
        ("llava-demo", [], "export"),
        ("llava-bench", ["--checkpoint", "ck"], "bench"),
    ],
)
def test_commands_without_their_extra_print_one_line_naming_it(program, args, extra):
    result = run_without(EXTRA_MODULES, COMMANDS[program], *args)
    assert result.returncode == 2
    assert_one_line_error(result, program, f'pip install "llava-rt[{extra}]"')


def test_bench_needs_matplotlib_and_torchvision_too():
    for module in ("matplotlib", "torchvision"):
        result = run_without([module], COMMANDS["llava-bench"], "--checkpoint", "ck")
        assert result.returncode == 2
        assert_one_line_error(result, "llava-bench", f'{module} not installed): pip install "llava-rt[bench]"')


@pytest.mark.parametrize("program", sorted(COMMANDS))
def test_version_and_verbose_without_the_extra(program):
    result = run_without(EXTRA_MODULES, COMMANDS[program], "--version")
    assert result.returncode == 0 and result.stdout.strip() == f"{program} {__version__}"
    result = run_without(EXTRA_MODULES, COMMANDS[program], "--help")
    assert result.returncode == 0 and "--verbose" in result.stdout


def test_export_prints_only_its_own_numbered_stages(exported):
    """No INFO lines from onnxscript/onnx_ir (onnxruntime's quantizer turned them on at import), no transformers
    progress bar, and each stage numbered once out of the right total, whatever the options."""
    result, out = exported
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    stages = [re.match(r"\[(\d+)/(\d+)\] ", line) for line in lines]
    numbers = [(int(m[1]), int(m[2])) for m in stages if m]
    assert numbers == [(k, 9) for k in range(1, 10)], lines
    others = [line for line, m in zip(lines, stages) if not m]
    assert all(line.startswith(("  ", "wrote ")) for line in others), others
    assert any("quantizing the decoder to int8" in line for line in lines)
    calibration = [line for line in lines if line.startswith("  calibrating int8 on ")]
    assert len(calibration) == 1 and "of 1 images from" in calibration[0] and "skipped 1 unusable" in calibration[0]
    assert (out / "manifest.json").is_file() and leftovers(out.parent) == []


def test_library_export_leaves_the_logging_configuration_alone(exported, tmp_path):
    """Quantizing uses onnxruntime's quantizer, whose import calls `logging.basicConfig(level=INFO)` and whose dynamic
    quantization warns through the root logger (which would add a handler)."""
    decoder = tmp_path / "decoder.onnx"
    shutil.copyfile(exported[1] / "decoder.onnx", decoder)
    code = (
        "import logging, sys\n"
        "from pathlib import Path\n"
        "from llava_rt.export.weight_only import quantize_decoder\n"
        "quantize_decoder(Path(sys.argv[1]), 'int8', lambda message: None)\n"
        "root = logging.getLogger()\n"
        "print(root.level, len(root.handlers))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(decoder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(30), "0"] and result.stderr == ""
    assert (tmp_path / "decoder.int8.onnx").is_file() and (tmp_path / "decoder.int8.ort.onnx").is_file()


def _write(path: Path, content: str | bytes) -> None:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


def _edit_json(path: Path, changes: dict, section: str | None = None) -> None:
    """Merge `changes` into a JSON file (created if absent), or into one of its sections."""
    data = json.loads(path.read_text()) if path.exists() else {}
    (data.setdefault(section, {}) if section else data).update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda ck: _write(ck / "config.json", "[1, 2]"), "config.json in checkpoint must hold a JSON object"),
        (lambda ck: _write(ck / "config.json", b'{"model_type": "llava_next\xff"}'), "unreadable config.json"),
        (lambda ck: _edit_json(ck / "config.json", {"model_type": ["llava_next"]}), "model_type is ['llava_next']"),
        (lambda ck: _edit_json(ck / "config.json", {"architectures": []}), "architectures must be a non-empty list"),
        (lambda ck: _write(ck / "tokenizer.json", '{"model": {"type": "BPE"'), "unreadable tokenizer.json"),
        (lambda ck: _write(ck / "processor_config.json", '"text"'), "processor_config.json in checkpoint must hold a JSON"),
        (lambda ck: _write(ck / "chat_template.jinja", "{% for message in messages %}"), "chat template does not compile"),
    ],
)
def test_malformed_checkpoint_files_fail_in_one_line_before_export(copy, tmp_path, damage, fragment):
    damage(copy)
    result = run("llava_rt.export.cli", "--checkpoint", str(copy), "--out", str(tmp_path / "b"))
    assert result.returncode == 2
    assert_one_line_error(result, "llava-export", fragment)
    assert not (tmp_path / "b").exists() and leftovers(tmp_path) == []


TINY_BUILDERS = {"onevision": build_tiny_onevision_checkpoint, "next_video": build_tiny_next_video_checkpoint}


@pytest.fixture(scope="module")
def tiny_checkpoints(checkpoint, tmp_path_factory):
    """The tiny checkpoint of a family ("next", "onevision", "next_video"), built the first time it is asked for."""
    built = {"next": checkpoint}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = TINY_BUILDERS[family](tmp_path_factory.mktemp(family) / "checkpoint")
        return built[family]

    return get


IMAGE = "processor_config.json", "image_processor"  # where the tiny checkpoints keep their image processor config
WHERE_IMAGE = "processor_config.json: image_processor."


@pytest.mark.parametrize(
    "family, file, section, changes, fragment",
    [
        ("next", "preprocessor_config.json", None, {"size": "abc"}, "preprocessor_config.json: size: 'abc' is not an integer"),
        ("next", *IMAGE, {"size": {"shortest_edge": "x"}}, f"{WHERE_IMAGE}size: 'x' is not an integer"),
        ("next", *IMAGE, {"size": {"shortest_edge": 0}}, f"{WHERE_IMAGE}size.shortest_edge: 0 is less than the minimum of 1"),
        ("next", *IMAGE, {"crop_size": [1]}, f"{WHERE_IMAGE}crop_size: [1] is not an integer"),
        (
            "next",
            *IMAGE,
            {"image_grid_pinpoints": "x"},
            f"{WHERE_IMAGE}image_grid_pinpoints: 'x' is not a list of [height, width]",
        ),
        ("next", *IMAGE, {"image_grid_pinpoints": [[1]]}, f"{WHERE_IMAGE}image_grid_pinpoints[0]: [1] is too short"),
        ("next", *IMAGE, {"image_grid_pinpoints": []}, f"{WHERE_IMAGE}image_grid_pinpoints: [] should be non-empty"),
        ("next", *IMAGE, {"image_mean": "x"}, f"{WHERE_IMAGE}image_mean: 'x' is not of type 'array'"),
        ("next", *IMAGE, {"image_mean": [0.5, 0.5]}, f"{WHERE_IMAGE}image_mean: [0.5, 0.5] is too short"),
        ("next", *IMAGE, {"image_std": [0.5, 0, 0.5]}, f"{WHERE_IMAGE}image_std[1]: 0 is less than or equal to the minimum of 0"),
        ("next", *IMAGE, {"resample": "bicubic"}, f"{WHERE_IMAGE}resample: 'bicubic' is not an integer"),
        ("next", *IMAGE, {"rescale_factor": "x"}, f"{WHERE_IMAGE}rescale_factor: 'x' is not of type 'number'"),
        ("next", *IMAGE, {"do_resize": "maybe"}, f"{WHERE_IMAGE}do_resize: 'maybe' is not of type 'boolean'"),
        ("next", *IMAGE, {"do_center_crop": "maybe"}, f"{WHERE_IMAGE}do_center_crop: 'maybe' is not of type 'boolean'"),
        (
            "next",
            "processor_config.json",
            None,
            {"image_token": 5},
            "processor_config.json: image_token: 5 is not of type 'string'",
        ),
        ("next", "tokenizer_config.json", None, {"eos_token": 7}, "tokenizer_config.json: eos_token: 7 is not a token string"),
        ("next", "generation_config.json", None, {"eos_token_id": "x"}, "generation_config.json: eos_token_id: 'x' is not an"),
        ("next", "generation_config.json", None, {"temperature": "hot"}, "generation_config.json: temperature: 'hot' is not of"),
        ("next", "generation_config.json", None, {"top_p": 2}, "generation_config.json: top_p: 2 is greater than the maximum"),
        ("next", "config.json", None, {"image_grid_pinpoints": "x"}, "config.json: Validation error for field 'image_grid_pin"),
        ("next", "config.json", None, {"image_grid_pinpoints": [[1]]}, "config.json: image_grid_pinpoints[0]: [1] is too short"),
        ("next", "config.json", None, {"image_token_index": -1}, "config.json: image_token_index: -1 is less than the minimum"),
        ("onevision", "video_preprocessor_config.json", None, {"size": "abc"}, "video_preprocessor_config.json: size: 'abc'"),
        ("onevision", "processor_config.json", "video_processor", {"image_mean": [1, 1]}, "video_processor.image_mean: [1, 1]"),
        ("onevision", "processor_config.json", None, {"video_token": ""}, "processor_config.json: video_token: '' should be"),
        ("onevision", "config.json", None, {"vision_aspect_ratio": "anyres_max_x"}, "config.json: vision_aspect_ratio: 'anyres"),
        ("next_video", "config.json", None, {"spatial_pool_stride": 0}, "config.json: spatial_pool_stride: integer division"),
    ],
)
def test_an_unusable_config_value_fails_naming_its_file_and_key_before_the_model_loads(
    tiny_checkpoints, tmp_path, capsys, family, file, section, changes, fragment
):
    """Values the manifest takes from the configs are computed and checked against the runtime's manifest schema up
    front, not after the whole export (where they were tracebacks, or bundles the runtime refused). The command runs
    in this process (its one-line contract is the same as in a subprocess, tested above) to spare a torch import
    per case."""
    from llava_rt.export.cli import main

    checkpoint = Path(shutil.copytree(tiny_checkpoints(family), tmp_path / "checkpoint"))
    _edit_json(checkpoint / file, changes, section)
    code = main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "b")])
    stderr = capsys.readouterr().err
    assert code == 2 and "[1/6] loading" not in stderr
    assert_one_line_error(subprocess.CompletedProcess([], code, "", stderr), "llava-export", fragment)
    assert not (tmp_path / "b").exists() and leftovers(tmp_path) == []


def test_a_bundle_the_runtime_would_refuse_is_not_written(copy, tmp_path):
    """An end-of-sequence id past the vocabulary passes the checks on the configs alone, not the runtime's check of the
    whole manifest, which export runs before writing it."""
    _edit_json(copy / "generation_config.json", {"eos_token_id": 4000})
    result = run("llava_rt.export.cli", "--checkpoint", str(copy), "--out", str(tmp_path / "b"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    *stages, error = result.stderr.splitlines()
    assert [line[:6] for line in stages if line.startswith("[")] == [f"[{k}/6] " for k in range(1, 7)], stages
    assert error == (
        "llava-export: error: the runtime would refuse this bundle: invalid manifest.json at $.tokens.eos_token_ids: "
        "[4000] is not below the vocabulary size 400"
    )
    assert not (tmp_path / "b").exists() and leftovers(tmp_path) == []


def _edit_tensors(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    weights = path / "model.safetensors"
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights, metadata={"format": "pt"})


LAYER_WEIGHT = "language_model.model.layers.0.mlp.up_proj.weight"  # as saved; loaded as model.language_model...


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda t: t.pop(LAYER_WEIGHT), "lacks 1 weight(s): model.language_model.layers.0.mlp.up_proj.weight"),
        (lambda t: t.update({LAYER_WEIGHT: t[LAYER_WEIGHT][:-1].clone()}), "wrong shape for this config: model.language_model"),
    ],
)
def test_a_missing_or_misshapen_tensor_fails_naming_it(copy, tmp_path, edit, fragment):
    """Found when the weights load (stage 1): the stage line, then one error line."""
    _edit_tensors(copy, edit)
    result = run("llava_rt.export.cli", "--checkpoint", str(copy), "--out", str(tmp_path / "b"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line[:6] for line in result.stderr.splitlines()] == ["[1/6] ", "llava-"]
    assert result.stderr.splitlines()[1].startswith("llava-export: error: checkpoint ") and fragment in result.stderr
    assert not (tmp_path / "b").exists() and leftovers(tmp_path) == []


def test_force_refuses_what_is_not_a_bundle(copy, tmp_path):
    files = sorted(p.name for p in copy.iterdir())
    for out in (copy, tmp_path):
        result = run("llava_rt.export.cli", "--checkpoint", str(copy), "--out", str(out), "--force")
        assert result.returncode == 2
        assert_one_line_error(result, "llava-export", "holds the checkpoint; --force would delete it")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    result = run("llava_rt.export.cli", "--checkpoint", str(copy), "--out", str(other), "--force")
    assert_one_line_error(result, "llava-export", "neither a bundle nor empty")
    assert sorted(p.name for p in copy.iterdir()) == files and (other / "todo.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "options, fragment",
    [
        (["--precision", "int2"], "unknown precision 'int2' (choose from fp32, fp16, int8, int4, comma separated)"),
        (["--precision", "fp16,"], "unknown precision ''"),
        (["--calibration-images", "."], "--calibration-images is used by --precision int8 only"),
        (["--precision", "int8", "--calibration-images", "/nonexistent"], "/nonexistent is not a directory"),
        (["--precision", "int8", "--calibration-images", "{empty}"], "no image files in"),
    ],
)
def test_bad_precision_options_fail_before_export(checkpoint, tmp_path, options, fragment):
    (tmp_path / "empty").mkdir()
    options = [option.format(empty=tmp_path / "empty") for option in options]
    result = run("llava_rt.export.cli", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "b"), *options)
    assert result.returncode == 2
    assert_one_line_error(result, "llava-export", fragment)
    assert "[2/" not in result.stderr and not (tmp_path / "b").exists()


def test_calibration_images_none_usable_leaves_no_bundle(checkpoint, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.jpg"):
        (images / name).write_bytes(b"corrupt")
    out = tmp_path / "b"
    args = ["--checkpoint", str(checkpoint), "--out", str(out), "--precision", "int8", "--calibration-images", str(images)]
    result = run("llava_rt.export.cli", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]  # after the stages up to the calibration
    assert last.startswith("llava-export: error: calibration images: none of the 2 image files in"), result.stderr
    assert not out.exists() and leftovers(tmp_path) == []


def test_force_replaces_a_bundle_and_verbose_shows_the_libraries_logs(checkpoint, exported):
    out = exported[1]
    result = run("llava_rt.export.cli", "--checkpoint", str(checkpoint), "--out", str(out), "--force", "--verbose")
    assert result.returncode == 0, result.stderr
    assert re.search(r"\b(onnx_ir|onnxscript)\.\w+", result.stderr), result.stderr[:2000]
    manifest = json.loads((out / "manifest.json").read_text())
    assert "decoder.int8.onnx" not in manifest["files"] and leftovers(out.parent) == []


def test_unusable_out_paths_fail_before_export(checkpoint, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    cases = [
        (a_file, "exists and is not a directory"),
        (link, "is a symbolic link"),
        (a_file / "bundle", "is under a file"),
        (Path("/proc/llava-rt-bundle"), "cannot write next to /proc/llava-rt-bundle"),  # read-only, even for root
    ]
    for out, fragment in cases:
        result = run("llava_rt.export.cli", "--checkpoint", str(checkpoint), "--out", str(out), "--force")
        assert result.returncode == 2
        assert_one_line_error(result, "llava-export", fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "link"]


def test_a_newline_in_a_path_stays_on_one_line(tmp_path):
    result = run("llava_rt.export.cli", "--checkpoint", str(tmp_path / "two\nlines"), "--out", str(tmp_path / "b"))
    assert result.returncode == 2
    assert_one_line_error(result, "llava-export", "two\\nlines")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_during_export_leaves_nothing(checkpoint, tmp_path, signum):
    parent = tmp_path / "bundles"  # created by the export (and left, empty)
    command = [sys.executable, "-m", "llava_rt.export.cli", "--checkpoint", str(checkpoint), "--out", str(parent / "b")]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in process.stderr:
        seen.append(line)
        if line.startswith("[2/"):  # the model is loaded and graphs are being exported
            break
    assert leftovers(parent), seen
    process.send_signal(signum)
    rest = process.stderr.read()
    assert process.wait(timeout=120) == 130
    assert "Traceback" not in rest and rest.strip().splitlines()[-1] == "llava-export: interrupted"
    assert list(parent.iterdir()) == []


def test_demo_workdir_that_is_a_file(tmp_path):
    workdir = tmp_path / "file"
    workdir.write_text("x")
    result = run("llava_rt.export.demo", "--workdir", str(workdir))
    assert result.returncode == 2
    assert_one_line_error(result, "llava-demo", f"--workdir {workdir} cannot be used as a directory")


def test_demo_exports_answers_and_prints_only_its_own_lines(tmp_path):
    """The README's first command: build the tiny checkpoint, export it, answer about the drawn image; no transformers
    progress bar while the checkpoint is saved, nor while it is loaded."""
    result = run("llava_rt.export.demo", "--workdir", str(tmp_path), "--max-new-tokens", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("building a tiny random-weight") and lines[-1].startswith("wrote ")
    assert all(re.match(r"\[\d/6\] |  \w", line) for line in lines[1:-1]), lines
    assert "answer:" in result.stdout and "prefill" in result.stdout and "tokens/s" in result.stdout
    assert (tmp_path / "bundle" / "manifest.json").is_file() and (tmp_path / "shapes.png").is_file()
