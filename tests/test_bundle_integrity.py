"""Loading refuses a bundle the runtime cannot trust or use, with one line: checksums (verified once, then
by stamp), the manifest's schema and rules, paths inside the bundle, regular files only, graphs that match
their manifest entry; and onnxruntime errors arrive whole, on one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llava_rt.runtime import BundleError, InputError, Pipeline, load_bundle
from llava_rt.runtime import bundle as bundle_module
from llava_rt.runtime.backends import open_session
from llava_rt.runtime.bundle import sha256_file
from llava_rt.runtime.stamps import RACY_NS


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Stamps go to a per-test directory, never to the home directory."""
    path = tmp_path / "cache"
    monkeypatch.setenv("LLAVA_RT_CACHE_DIR", str(path))
    return path


@pytest.fixture
def bundle(variants, tmp_path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(variants["mistral"].bundle, target)
    return target


def rewrite(bundle: Path, edit=None) -> dict:
    """Edit a bundle's manifest (`edit(manifest)`) and recompute its files table from the files it lists, as an
    attacker or a buggy tool that rewrites the table consistently would: what checksums alone cannot catch."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    if edit is not None:
        edit(manifest)
    if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict):
        manifest["files"] = {
            name: {"sha256": sha256_file(bundle / name), "bytes": (bundle / name).stat().st_size}
            if (bundle / name).is_file()
            else entry
            for name, entry in manifest["files"].items()
        }
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def refused(bundle: Path, fragment: str, load=load_bundle) -> str:
    """Loading raises a one-line BundleError containing `fragment`; returns the message."""
    with pytest.raises(BundleError) as caught:
        load(bundle)
    message = str(caught.value)
    assert fragment in message and "\n" not in message, message
    return message


def count_hashes(monkeypatch) -> list[str]:
    hashed: list[str] = []
    real = bundle_module.sha256_file

    def counting(path, *args, **kwargs):
        hashed.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(bundle_module, "sha256_file", counting)
    return hashed


def settle(bundle: Path) -> None:
    """Wait until every file's last change is older than the stamp cache's racy window."""
    newest = max(p.stat().st_ctime_ns for p in bundle.iterdir())
    time.sleep(max(0.0, (newest + RACY_NS - time.time_ns()) / 1e9 + 0.05))


# ---- checksums: verified once, then by stamp ----------------------------------------------------------


def test_second_load_rehashes_nothing_and_full_rehashes_everything(bundle, monkeypatch, cache_dir):
    settle(bundle)
    hashed = count_hashes(monkeypatch)
    files = set(json.loads((bundle / "manifest.json").read_text())["files"])
    load_bundle(bundle)
    assert set(hashed) == files
    hashed.clear()
    load_bundle(bundle)
    assert hashed == []
    assert list((cache_dir / "verified").glob("*.json"))
    load_bundle(bundle, verify="full")
    assert set(hashed) == files


def test_byte_flipped_in_place_with_size_and_mtime_restored_is_refused(bundle, monkeypatch):
    settle(bundle)
    load_bundle(bundle)
    target = bundle / "decoder.onnx"
    before = target.stat()
    with open(target, "r+b") as handle:
        handle.seek(before.st_size // 2)
        byte = handle.read(1)
        handle.seek(before.st_size // 2)
        handle.write(bytes([byte[0] ^ 1]))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = target.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    hashed = count_hashes(monkeypatch)
    refused(bundle, "checksum mismatch for bundle file decoder.onnx")
    assert hashed == ["decoder.onnx"]  # only the changed file was hashed again


def test_unwritable_cache_directory_still_loads_and_verifies_fully(bundle, monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("LLAVA_RT_CACHE_DIR", str(blocker / "cache"))
    settle(bundle)
    hashed = count_hashes(monkeypatch)
    load_bundle(bundle)
    load_bundle(bundle)
    assert len(hashed) == 2 * len(json.loads((bundle / "manifest.json").read_text())["files"])


@pytest.mark.skipif(os.geteuid() != 0, reason="handing a file to another user needs root")
def test_another_users_stamp_record_is_not_trusted(bundle, monkeypatch, cache_dir):
    """In a shared cache directory, a record someone else wrote could vouch for a tampered file."""
    settle(bundle)
    load_bundle(bundle)
    (record,) = (cache_dir / "verified").glob("*.json")
    os.chown(record, 12345, 12345)
    hashed = count_hashes(monkeypatch)
    load_bundle(bundle)
    assert len(hashed) == len(json.loads((bundle / "manifest.json").read_text())["files"])


def test_unknown_verify_mode_and_non_path_are_input_errors(bundle):
    with pytest.raises(InputError, match="verify must be one of auto, full"):
        load_bundle(bundle, verify="none")
    with pytest.raises(InputError, match="a bundle path must be a string or a path, got int"):
        load_bundle(7)


def test_progress_bar_on_a_terminal(bundle):
    """On a terminal (a pseudo-terminal of 120 columns here), verification shows a progress bar on stderr."""
    import fcntl
    import pty
    import struct
    import termios

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    code = f"from llava_rt.runtime import load_bundle; load_bundle({str(bundle)!r}, verify='full')"
    result = subprocess.run([sys.executable, "-c", code], stderr=terminal, timeout=120)
    os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the terminal side is closed and everything was read
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)
    assert result.returncode == 0
    assert b"verifying bundle" in output and b"MiB" in output


# ---- the manifest: schema and rules -----------------------------------------------------------------


def _set(path: str, value):
    """An edit setting a dotted path of the manifest (`~` deletes the key)."""

    def edit(manifest):
        *parents, last = path.split(".")
        node = manifest
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value == "~":
            del node[last]
        else:
            node[last] = value

    return edit


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (_set("graphs", "~"), "at $: 'graphs' is a required property"),
        (_set("tokens", "~"), "at $: 'tokens' is a required property"),
        (_set("preprocess", "~"), "at $: 'preprocess' is a required property"),
        (_set("files", "~"), "at $: 'files' is a required property"),
        (_set("packing.image_grid_pinpoints", []), "at $.packing.image_grid_pinpoints: [] should be non-empty"),
        (_set("packing.patch_grid", 0), "at $.packing.patch_grid: 0 is less than the minimum of 1"),
        (_set("packing.image_grid_pinpoints", [[32, 48]]), "[32, 48] is not a multiple of the tile size 32"),
        (_set("tokens.eos_token_ids", "2"), "at $.tokens.eos_token_ids: '2' is not of type 'array'"),
        (_set("tokens.eos_token_ids", [100000]), "at $.tokens.eos_token_ids: [100000] is not below the vocabulary size"),
        (_set("tokens.special_tokens", {"messages": "x"}), "at $.tokens.special_tokens"),
        (_set("text.max_position_embeddings", "4096"), "at $.text.max_position_embeddings: '4096' is not of type 'integer'"),
        (
            _set("graphs.decoder.kv_cache.num_kv_heads", 3),
            "at $.graphs.decoder.variants.fp32.inputs: past_key_values.0.key has shape",
        ),
        (_set("graphs.decoder.kv_cache.num_layers", 3), "at $.graphs.decoder.variants.fp32.inputs: no 'past_key_values.2.key'"),
        (_set("graphs.extra", {"variants": {}}), "at $.graphs"),
        (_set("graphs.vision.variants.fp32.precision", "fp16"), "a standard fp16 variant must be keyed 'fp16'"),
        (_set("graphs.vision.variants.int2", {}), "at $.graphs.vision.variants"),
        (_set("graphs.vision.variants.fp32.form", "onnxruntime"), "variant must be keyed 'fp32.ort'"),
        (_set("graphs.projector.variants", {}), "at $.graphs.projector.variants: 'fp32' is a required property"),
        (
            _set("graphs.decoder.variants.fp32.outputs.1.dtype", "float16"),
            "at $.graphs.decoder.variants.fp32: the KV cache inputs and outputs mix float16 and float32",
        ),
        (_set("preprocess.image_std", [0.5, 0, 0.5]), "at $.preprocess.image_std[1]"),
        (_set("arrays.embed_tokens", "vision.onnx.npy"), "'vision.onnx.npy' is used by the bundle but not in its checksum table"),
        (
            _set(
                "video",
                {"preprocess": {}, "pooling": {"mode": "graph", "graph": "video_pool"}, "tokens_per_frame": 1, "newline": None},
            ),
            "at $.video.preprocess",
        ),
    ],
)
def test_invalid_manifest_is_refused_with_its_json_path(bundle, edit, fragment):
    rewrite(bundle, edit)
    refused(bundle, fragment)


def test_manifest_that_is_not_an_object_is_refused(bundle):
    (bundle / "manifest.json").write_text("[1, 2]")
    refused(bundle, "manifest.json is not a JSON object")


def test_oversized_manifest_is_refused_unread(bundle):
    os.truncate(bundle / "manifest.json", 1 << 40)  # sparse: a terabyte that takes no disk
    refused(bundle, "manifest.json is larger than 64 MiB")


# ---- files the runtime opens: listed, inside the bundle, regular ---------------------------------------


def test_file_missing_from_the_checksum_table_is_refused(bundle):
    """An edited chat template no longer verifies merely because its table entry was dropped."""
    (bundle / "chat_template.jinja").write_text("{{ 'edited' }}")
    rewrite(bundle, lambda m: m["files"].pop("chat_template.jinja"))
    refused(bundle, "'chat_template.jinja' is used by the bundle but not in its checksum table")


@pytest.mark.parametrize("key", ["chat_template", "tokenizer", "graphs.vision.variants.fp32.file", "arrays.image_newline"])
@pytest.mark.parametrize("form", ["relative", "absolute"])
def test_paths_outside_the_bundle_are_refused(bundle, key, form):
    """`../secret.txt` or an absolute path, listed in the table with its true checksum, is still refused."""
    secret = bundle.parent / "secret.txt"
    secret.write_text("secret")
    outside = "../secret.txt" if form == "relative" else str(secret)

    def edit(manifest):
        _set(key, outside)(manifest)
        manifest["files"][outside] = {"sha256": sha256_file(secret), "bytes": secret.stat().st_size}

    rewrite(bundle, edit)
    refused(bundle, f"bundle file {outside!r} lies outside the bundle directory")


def test_symlink_leaving_the_bundle_is_refused(bundle):
    """Same content, so the checksum matches: the link itself is what is refused."""
    outside = bundle.parent / "tokenizer-elsewhere.json"
    shutil.copy(bundle / "tokenizer.json", outside)
    (bundle / "tokenizer.json").unlink()
    (bundle / "tokenizer.json").symlink_to(outside)
    refused(bundle, "bundle file 'tokenizer.json' lies outside the bundle directory")


def in_child(call: str) -> str:
    """Run `call` (of `llava_rt.runtime.bundle`) in a child process, printing the BundleError it raises: reading a
    FIFO would block forever, so a regression fails on the timeout instead of hanging the test run."""
    code = f"from llava_rt.runtime.bundle import *\ntry: {call}\nexcept BundleError as e: print(e)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return result.stdout + result.stderr


def test_fifo_in_place_of_a_file_is_refused_without_reading_it(bundle):
    (bundle / "chat_template.jinja").unlink()
    os.mkfifo(bundle / "chat_template.jinja")
    assert "bundle file chat_template.jinja is not a regular file" in in_child(f"load_bundle({str(bundle)!r})")


def test_sha256_file_refuses_a_fifo_instead_of_blocking(tmp_path):
    """The check behind the `stat` one: a FIFO swapped in between the stat and the read is not read either."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "fifo is not a regular file" in in_child(f"sha256_file({str(fifo)!r})")


def test_directory_in_place_of_a_file_is_refused(bundle):
    (bundle / "tokenizer.json").unlink()
    (bundle / "tokenizer.json").mkdir()
    refused(bundle, "bundle file tokenizer.json is not a regular file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads mode-000 files; the directory case covers unreadable files there")
def test_unreadable_file_is_refused(bundle):
    (bundle / "tokenizer.json").chmod(0)
    try:
        refused(bundle, "cannot read bundle file tokenizer.json: Permission denied")
    finally:
        (bundle / "tokenizer.json").chmod(0o644)


# ---- what checksums cannot catch: files rewritten with a consistent table ---------------------------


def test_swapped_in_graph_is_refused(bundle):
    shutil.copy(bundle / "projector.onnx", bundle / "vision.onnx")
    rewrite(bundle)
    refused(bundle, "graph vision.onnx does not match the manifest's inputs", load=Pipeline.load)


def test_graph_dtype_unlike_its_manifest_entry_is_refused(bundle):
    rewrite(bundle, _set("graphs.vision.variants.fp32.inputs.0.dtype", "float16"))
    refused(bundle, "pixel_values is float32 in the graph, float16 in the manifest", load=Pipeline.load)


def test_invalid_tokenizer_is_refused(bundle):
    (bundle / "tokenizer.json").write_text('{"not": "a tokenizer"')
    rewrite(bundle)
    refused(bundle, "invalid tokenizer file tokenizer.json", load=Pipeline.load)


@pytest.mark.parametrize("kind", ["shape", "dtype", "objects"])
def test_bad_embedding_table_is_refused(bundle, kind):
    text = json.loads((bundle / "manifest.json").read_text())["text"]
    vocab, hidden = text["vocab_size"], text["hidden_size"]
    table, fragment = {
        "shape": (np.zeros((vocab, hidden + 1), np.float32), f"is float32 of shape [{vocab}, {hidden + 1}], expected float32"),
        "dtype": (np.zeros((vocab, hidden), np.int32), f"is int32 of shape [{vocab}, {hidden}], expected float32"),
        "objects": (np.array([{"a": 1}] * 3, dtype=object), "cannot read array file embed_tokens.npy"),
    }[kind]
    np.save(bundle / "embed_tokens.npy", table, allow_pickle=True)
    rewrite(bundle)
    refused(bundle, fragment, load=Pipeline.load)


def test_array_region_past_the_end_of_its_file_is_refused(bundle):
    text = json.loads((bundle / "manifest.json").read_text())["text"]
    size = (bundle / "decoder.onnx").stat().st_size
    spec = {
        "file": "decoder.onnx",
        "offset": size - 8,
        "shape": [text["vocab_size"], text["hidden_size"]],
        "dtype": "float32",
        "transposed": False,
    }
    rewrite(bundle, _set("arrays.embed_tokens", spec))
    refused(bundle, "lies past the end of decoder.onnx", load=Pipeline.load)


def test_template_syntax_error_is_refused_at_load(bundle):
    (bundle / "chat_template.jinja").write_text("{% for m in messages %}{{ m }}")
    rewrite(bundle)
    refused(bundle, "the chat template does not compile", load=Pipeline.load)


def test_template_cannot_reach_the_callers_media(bundle, tmp_path):
    """A template calling `image.save`, `tofile` or `fill` on the caller's media writes nothing, changes nothing."""
    written = tmp_path / "written.png"
    (bundle / "chat_template.jinja").write_text(
        "{% for m in messages %}{% for c in m.content %}"
        f"{{% if c.type == 'image' %}}{{{{ c.image.save('{written}') }}}}{{{{ c.image.tofile('{written}') }}}}"
        "{{ c.image.fill(0) }}{% endif %}{{ c.text }}{% endfor %}{% endfor %}"
    )
    rewrite(bundle)
    pipeline = Pipeline.load(bundle)
    image = np.full((32, 32, 3), 7, np.uint8)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "hi"}]}]
    with pytest.raises(InputError, match="chat template rejected the messages"):
        pipeline.generate(messages, max_new_tokens=1)
    assert not written.exists() and (image == 7).all()


# ---- graph input dtypes and onnxruntime errors ----------------------------------------------------------


def test_input_dtype_comes_from_the_manifest(bundle):
    loaded = load_bundle(bundle)
    assert loaded.input_dtype("vision", "pixel_values") == np.float32
    assert loaded.input_dtype("decoder", "attention_mask") == np.int64
    with pytest.raises(BundleError, match="the vision graph has no input 'pixels'"):
        loaded.input_dtype("vision", "pixels")


def test_onnxruntime_errors_keep_their_detail_on_one_line(bundle):
    vision = open_session(bundle / "vision.onnx")
    size = load_bundle(bundle).manifest["vision"]["image_size"]
    with pytest.raises(BundleError) as caught:
        vision.run({"pixel_values": np.zeros((1, 4, size, size), np.float32)})
    message = str(caught.value)
    assert "\n" not in message and "[ONNXRuntimeError]" not in message
    assert "onnxruntime failed to run vision.onnx: Got invalid dimensions for input: pixel_values" in message
    assert "index: 1 Got: 4 Expected: 3" in message  # the informative part, after the first line break
    with pytest.raises(BundleError, match=r"Unexpected input data type. Actual: \(tensor\(double\)\)"):
        vision.run({"pixel_values": np.zeros((1, 3, size, size), np.float64)})
