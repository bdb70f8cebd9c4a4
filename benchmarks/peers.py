#!/usr/bin/env python3
"""The decoder against its peers: `python -m llava_rt.benchmarks.peers --workdir W --llama-venv V1 --genai-venv V2`.

The text decoder at the Qwen2-0.5B shape (the language model of llava-onevision-qwen2-0.5b-ov: hidden 896, 24 layers,
14 heads, 2 KV heads, vocab 152000, tied embeddings, random weights), three ways on the same prompt token ids and
thread count:

  llava-rt         the project's bundle decoder (fp32, int8, int4), through its own Pipeline (text-only prompt,
                   greedy, min_new_tokens = new tokens so EOS cannot stop it)
  llama.cpp        llama-cpp-python (llama.cpp built from the sdist's vendored source), GGUF F32/F16/Q8_0/Q4_0
  ort-genai        onnxruntime-genai, its model builder's Qwen2 export at fp32/int8/int4 (-e cpu)

Per side: prefill ms of the prompt (first forward pass + choice of the first token), decode tokens/s over the
next new_tokens-1 tokens (time from the first to the last new token), peak RSS of the side's own process
(every side lives in its own worker process; ru_maxrss), the weight bytes on disk of what it runs, and decode
as a share of the roofline: the machine's streaming-read bandwidth (`machine.measure_bandwidth`, same threads)
over the weight bytes every token reads. Sides run alternately (the order reversed every other round) after a
warm-up; medians over --repeats.

Three Python environments are used, one per side: the one running this module (llava-rt with its export extra:
checkpoint, bundles, the Qwen2ForCausalLM copy of the language model, the GGUF conversion), --llama-venv
(llama-cpp-python built from source) and --genai-venv (onnxruntime-genai, with torch, transformers and onnx for
its model builder). `--setup` creates the missing peer venvs (llama-cpp-python compiles llama.cpp: allow 10+
minutes on 2 cores). Everything built is cached in --workdir; delete a sub-folder to rebuild it (`llava/` after a
change to the export).

Adopted from the team's shared peer benchmark (its first results, before the decoder fusions, are in the README).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
PRESET = "llava-onevision-qwen2-0.5b-ov"
LLAVA_PRECISIONS = ("fp32", "int8", "int4")
GGUF_TYPES = ("F32", "F16", "Q8_0", "Q4_0")
# onnxruntime-genai builder runs: name -> arguments. The defaults are what a user gets; "int4-prune" adds the
# builder's prune_lm_head option (last-token logits only in the prompt run, as llava-rt and llama.cpp do).
GENAI_BUILDS = {
    "fp32": ["-p", "fp32"],
    "int8": ["-p", "int8"],
    "int4": ["-p", "int4"],
    "int4-prune": ["-p", "int4", "--extra_options", "prune_lm_head=true"],
}
GENAI_PRECISIONS = tuple(GENAI_BUILDS)
# Which of our precisions each peer precision is compared with (the ratio column).
COMPARE_WITH = {
    "fp32": "fp32",
    "F32": "fp32",
    "F16": "fp32",
    "Q8_0": "int8",
    "int8": "int8",
    "Q4_0": "int4",
    "int4": "int4",
    "int4-prune": "int4",
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def sh(command: list[str], env: dict | None = None, cwd: Path | None = None) -> None:
    """Run a command, echoing it; fail loudly."""
    log("$ " + " ".join(shlex.quote(str(c)) for c in command))
    subprocess.run([str(c) for c in command], check=True, env={**os.environ, **(env or {})}, cwd=cwd)


def py(venv: Path) -> Path:
    return venv / "bin" / "python"


# ------------------------------------------------------------------------------------------------------------
# setup: the three environments (only what is missing)
# ------------------------------------------------------------------------------------------------------------


def llama_cpp_source(args) -> Path:
    """The unpacked llama-cpp-python sdist (its vendor/llama.cpp has convert_hf_to_gguf.py and gguf-py)."""
    return args.workdir / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"


def llama_bench_binary(args) -> Path:
    return args.workdir / "llama-bench-build" / "bin" / "llama-bench"


def run_llama_bench(args) -> str:
    """Cross-check with llama.cpp's own llama-bench (no Python in the loop): prompt processing of the prompt length
    from an empty cache, and generation of the new tokens after a context of the prompt length (-d), with
    flash attention off and on."""
    out = []
    for gguf_type in args.gguf_types.split(","):
        model = args.workdir / "gguf" / f"qwen2-lm-{gguf_type}.gguf"
        for test in (
            ["-p", str(args.prompt_tokens), "-n", "0"],
            ["-p", "0", "-n", str(args.new_tokens), "-d", str(args.prompt_tokens)],
        ):
            command = [
                str(llama_bench_binary(args)),
                "-m",
                str(model),
                "-t",
                str(args.threads),
                "-fa",
                "0,1",
                "-r",
                "3",
                "-o",
                "md",
                *test,
            ]
            log("$ " + " ".join(command))
            done = subprocess.run(command, capture_output=True, text=True)
            rows = [line for line in done.stdout.splitlines() if line.startswith("|")]
            out.extend(rows if not out else rows[2:])
    return "\n".join(out)


def ensure_venv(venv: Path, module: str, install: list, env: dict | None = None) -> None:
    """Create `venv` with a current pip and `pip install` `install` into it, unless it already imports `module`."""
    if py(venv).exists() and subprocess.run([py(venv), "-c", f"import {module}"]).returncode == 0:
        return
    sh([sys.executable, "-m", "venv", venv])
    sh([py(venv), "-m", "pip", "install", "-q", "-U", "pip"])
    sh([py(venv), "-m", "pip", "install", *install], env=env)


def setup(args) -> None:
    source = llama_cpp_source(args)
    if not source.is_dir():
        (args.workdir / "src").mkdir(parents=True, exist_ok=True)
        sh(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                args.workdir / "src",
                f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
            ]
        )
        sh(
            [
                "tar",
                "xzf",
                args.workdir / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz",
                "-C",
                args.workdir / "src",
            ]
        )
    # llama.cpp from the sdist's vendored source: CPU only, -march=native (AVX-512, VNNI here), OpenMP;
    # the multimodal library (mtmd) is not needed. About 10 minutes on 2 cores.
    ensure_venv(
        args.llama_venv,
        "llama_cpp",
        [
            "-v",
            f"--config-settings=build-dir={args.workdir / 'llama-cpp-build'}",
            args.workdir / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz",
        ],
        env={"CMAKE_ARGS": "-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF", "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)},
    )
    if args.llama_bench and not llama_bench_binary(args).is_file():
        # llama.cpp's own llama-bench from the same vendored source (a second, static build: ~8 minutes on 2 cores)
        build_dir = args.workdir / "llama-bench-build"
        sh(
            [
                "cmake",
                "-S",
                source / "vendor" / "llama.cpp",
                "-B",
                build_dir,
                "-DCMAKE_BUILD_TYPE=Release",
                "-DGGML_NATIVE=ON",
                "-DLLAMA_CURL=OFF",
                "-DBUILD_SHARED_LIBS=OFF",
                "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF",
                "-DLLAMA_BUILD_SERVER=OFF",
                "-DLLAMA_OPENSSL=OFF",
            ]
        )
        sh(["cmake", "--build", build_dir, "--target", "llama-bench", f"-j{os.cpu_count() or 2}"])
    # the builder needs torch + transformers (it loads the HF checkpoint) and onnx / onnx-ir
    ensure_venv(
        args.genai_venv,
        "onnxruntime_genai",
        ["-q", "onnxruntime-genai", "torch", "transformers", "onnx", "onnx-ir", "onnxscript", "safetensors"],
    )


# ------------------------------------------------------------------------------------------------------------
# build steps (each runs in one of the venvs: `peers.py --step NAME --workdir W ...`)
# ------------------------------------------------------------------------------------------------------------


def step_llava(workdir: Path, vision_layers: int, prompt_tokens: int) -> None:
    """[llava venv] The preset checkpoint (decoder at full shape; vision tower cut to `vision_layers`, which the
    decoder graph does not depend on), one bundle per precision, the language model alone as a
    Qwen2ForCausalLM checkpoint (same weights, the project's tokenizer), and the prompt's token ids."""
    from dataclasses import replace

    from llava_rt.benchmarks.presets import PRESETS
    from llava_rt.export.exporter import export_bundle

    root = workdir / "llava"
    checkpoint = root / "checkpoint"
    if not (checkpoint / ".complete").is_file():
        preset = PRESETS[PRESET]
        spec = replace(preset.spec, vision_layers=vision_layers)
        log(f"building {PRESET} (vision layers {vision_layers}) with random weights in {checkpoint}")
        preset.build(checkpoint, spec)
        (checkpoint / ".complete").touch()
    for precision in LLAVA_PRECISIONS:
        bundle = root / f"bundle-{precision}"
        if not (bundle / "manifest.json").is_file():
            precisions = () if precision == "fp32" else (precision,)
            export_bundle(checkpoint, bundle, precisions=precisions, force=True, log=log)

    lm = workdir / "qwen2-lm"
    if not (lm / ".complete").is_file():
        import torch
        from transformers import AutoTokenizer, Qwen2ForCausalLM

        from llava_rt.export.checkpoint import load_model, read_checkpoint

        log(f"saving the language model alone as Qwen2ForCausalLM in {lm}")
        model = load_model(read_checkpoint(checkpoint), torch.float32)
        text_config = model.config.text_config
        text_config.architectures = ["Qwen2ForCausalLM"]
        text_config.tie_word_embeddings = True
        causal = Qwen2ForCausalLM(text_config).eval()
        causal.model.load_state_dict(model.model.language_model.state_dict())
        causal.tie_weights()
        assert causal.lm_head.weight.data_ptr() == causal.model.embed_tokens.weight.data_ptr()
        assert torch.equal(causal.lm_head.weight, model.lm_head.weight)
        causal.generation_config = model.generation_config
        causal.save_pretrained(lm)
        AutoTokenizer.from_pretrained(checkpoint).save_pretrained(lm)
        (lm / ".complete").touch()

    prompt_file = workdir / f"prompt-{prompt_tokens}.json"
    if not prompt_file.is_file():
        from llava_rt.runtime.chat import user_turn
        from llava_rt.runtime.pipeline import Pipeline

        pipe = Pipeline.load(root / "bundle-int4")
        words = prompt_tokens
        for _ in range(10):  # " the" is one token: adjust the word count until the rendered prompt has prompt_tokens ids
            prompt = pipe.render(user_turn(" ".join(["the"] * words), 0))
            ids = pipe.prepare(prompt=prompt, apply_chat_template=False).input_ids.tolist()
            if len(ids) == prompt_tokens:
                break
            words += prompt_tokens - len(ids)
        assert len(ids) == prompt_tokens, (len(ids), prompt_tokens)
        prompt_file.write_text(json.dumps({"prompt": prompt, "ids": ids, "eos": pipe.tokens["eos_token_ids"]}))


def step_gguf(workdir: Path, source: Path) -> None:
    """[llava venv] convert_hf_to_gguf.py (the llama.cpp of the sdist, its own gguf-py) at F32, F16, Q8_0.

    Workaround: the converter identifies a BPE tokenizer's pre-tokenizer by hashing how it splits a test
    string, and refuses unknown ones; the project's tiny byte-level BPE is unknown, so its answer is
    replaced by "qwen2" (the real model's). Prompts are given as token ids, so the pre-tokenizer is never used.
    Tokens 400..151999 (the checkpoint pads its embedding table like the real one) become [PADn] entries.
    The converter imports torch (lazy tensors) and transformers (AutoTokenizer): hence the llava venv.
    """
    llama_dir = source / "vendor" / "llama.cpp"
    out = workdir / "gguf"
    out.mkdir(exist_ok=True)
    sys.path[:0] = [str(llama_dir), str(llama_dir / "gguf-py")]
    import runpy

    import conversion.base as base
    import conversion.qwen as qwen

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
    # Qwen2Model.set_vocab tries SentencePiece first and falls back to GPT-2 BPE only on FileNotFoundError (no
    # tokenizer.model); without the sentencepiece module it fails with ModuleNotFoundError instead. A Qwen2
    # checkpoint has no tokenizer.model, so go straight to the path a real one takes.
    qwen.Qwen2Model.set_vocab = lambda self: self._set_vocab_gpt2()
    for outtype in ("f32", "f16", "q8_0"):
        target = out / f"qwen2-lm-{outtype.upper()}.gguf"
        if target.is_file():
            continue
        sys.argv = ["convert_hf_to_gguf.py", str(workdir / "qwen2-lm"), "--outtype", outtype, "--outfile", str(target) + ".tmp"]
        runpy.run_path(str(llama_dir / "convert_hf_to_gguf.py"), run_name="__main__")
        os.replace(str(target) + ".tmp", target)


def step_quantize(workdir: Path) -> None:
    """[llama venv] Q4_0 from the F32 GGUF with llama.cpp's own quantizer (`llama_model_quantize`, what the
    llama-quantize tool calls), default rules (so llama.cpp picks the type of the tied output/embedding)."""
    import llama_cpp

    target = workdir / "gguf" / "qwen2-lm-Q4_0.gguf"
    if target.is_file():
        return
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = os.cpu_count() or 2
    source = workdir / "gguf" / "qwen2-lm-F32.gguf"
    log(f"llama_model_quantize {source} -> {target} (Q4_0)")
    rc = llama_cpp.llama_model_quantize(str(source).encode(), (str(target) + ".tmp").encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed: {rc}")
    os.replace(str(target) + ".tmp", target)


def step_genai(workdir: Path, threads: int) -> None:
    """[genai venv] onnxruntime-genai's model builder, CPU target, one model per precision; its genai_config.json
    then gets the thread count in session_options (intra_op_num_threads)."""
    for precision, options in GENAI_BUILDS.items():
        out = workdir / "genai" / precision
        if not (out / ".complete").is_file():
            cache = workdir / "genai" / "cache"
            command = [
                sys.executable,
                "-m",
                "onnxruntime_genai.models.builder",
                "-i",
                str(workdir / "qwen2-lm"),
                "-o",
                str(out),
                "-e",
                "cpu",
                "-c",
                str(cache),
                *options,
            ]
            log("$ " + " ".join(command))
            subprocess.run(command, check=True)
            (out / ".complete").touch()
        config_path = out / "genai_config.json"
        config = json.loads(config_path.read_text())
        options = config["model"]["decoder"].setdefault("session_options", {})
        if options.get("intra_op_num_threads") != threads:
            options["intra_op_num_threads"] = threads
            options["inter_op_num_threads"] = 1
            config_path.write_text(json.dumps(config, indent=4))


# ------------------------------------------------------------------------------------------------------------
# workers: one process per side, commands on stdin, one JSON line per answer
# ------------------------------------------------------------------------------------------------------------


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class LlavaWorker:
    """The project's Pipeline, text-only prompt (the rendered chat template), greedy, EOS suppressed. Only the
    decoder graph is opened (a text-only request never runs the vision or projector graphs), so the peak RSS is
    the decoder's, like the other sides'."""

    def __init__(self, spec: dict):
        from llava_rt.runtime.bundle import Bundle, load_bundle
        from llava_rt.runtime.pipeline import Pipeline

        bundle = load_bundle(spec["path"])
        manifest = {**bundle.manifest, "graphs": {"decoder": bundle.manifest["graphs"]["decoder"]}}
        self.pipe = Pipeline(Bundle(bundle.path, manifest), threads=spec["threads"])
        self.prompt, self.ids, self.new_tokens = spec["prompt"], spec["ids"], spec["new_tokens"]
        prepared = self.pipe.prepare(prompt=self.prompt, apply_chat_template=False)
        assert prepared.input_ids.tolist() == self.ids, "the bundle does not tokenize the prompt into the shared ids"

    def run(self) -> dict:
        from llava_rt.benchmarks.sides import token_stamps

        started = time.perf_counter()
        run = self.pipe.start(
            prompt=self.prompt,
            apply_chat_template=False,
            max_new_tokens=self.new_tokens,
            min_new_tokens=self.new_tokens,
            do_sample=False,
        )
        stamps = token_stamps(run)
        result = run.results[0]
        return {
            "prefill_ms": run.generator.prefill_s * 1e3,  # the decoder's prompt run + first choice (the runtime's own timer)
            "first_token_ms": (stamps[0] - started) * 1e3,  # + tokenizing the text and embedding lookup
            "decode_tps": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "prompt_tokens": result.input_tokens,
            "new_tokens": len(result.token_ids),
            "head": result.token_ids[:8],
        }


class LlamaWorker:
    """llama-cpp-python: eval() of the prompt ids, then one eval() per token, greedy argmax of the last logits."""

    def __init__(self, spec: dict):
        import llama_cpp
        import numpy as np
        from llama_cpp import Llama

        self.np, self.llama_cpp = np, llama_cpp
        self.llm = Llama(
            model_path=spec["path"],
            n_ctx=spec["n_ctx"],
            n_batch=spec["n_batch"],
            n_ubatch=spec["n_ubatch"],
            n_threads=spec["threads"],
            n_threads_batch=spec["threads"],
            flash_attn=spec["flash_attn"],
            verbose=False,
        )
        self.ids, self.new_tokens = spec["ids"], spec["new_tokens"]
        self.n_vocab = self.llm.n_vocab()

    def _argmax(self) -> int:
        logits = self.llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return int(self.np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())

    def run(self) -> dict:
        llm = self.llm
        llm.reset()
        llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
        tokens: list[int] = []
        stamps: list[float] = []
        started = time.perf_counter()
        llm.eval(self.ids)
        tokens.append(self._argmax())
        stamps.append(time.perf_counter())
        while len(tokens) < self.new_tokens:
            llm.eval([tokens[-1]])
            tokens.append(self._argmax())
            stamps.append(time.perf_counter())
        return {
            "prefill_ms": (stamps[0] - started) * 1e3,
            "decode_tps": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "prompt_tokens": len(self.ids),
            "new_tokens": len(tokens),
            "head": tokens[:8],
        }


class GenaiWorker:
    """onnxruntime-genai's Generator: append_tokens(prompt ids) runs the prompt, generate_next_token() per token."""

    def __init__(self, spec: dict):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(spec["path"])
        self.ids, self.new_tokens = spec["ids"], spec["new_tokens"]

    def run(self) -> dict:
        og = self.og
        total = len(self.ids) + self.new_tokens
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=1)
        generator = og.Generator(self.model, params)
        stamps: list[float] = []
        started = time.perf_counter()
        generator.append_tokens(self.ids)
        while not generator.is_done():
            generator.generate_next_token()
            stamps.append(time.perf_counter())
        sequence = list(generator.get_sequence(0))
        new = sequence[len(self.ids) :]
        del generator
        return {
            "prefill_ms": (stamps[0] - started) * 1e3,
            "decode_tps": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "prompt_tokens": len(self.ids),
            "new_tokens": len(new),
            "head": [int(t) for t in new[:8]],
        }


WORKERS = {"llava-rt": LlavaWorker, "llama.cpp": LlamaWorker, "ort-genai": GenaiWorker}


def worker_main(kind: str, spec: dict) -> None:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # libraries that print go to stderr; the protocol keeps the real stdout
    started = time.perf_counter()
    worker = WORKERS[kind](spec)
    out.write(json.dumps({"loaded_s": time.perf_counter() - started, "rss_after_load_mib": peak_rss_mib()}) + "\n")
    for line in sys.stdin:
        if line.strip() != "run":
            break
        result = worker.run()
        result["peak_rss_mib"] = peak_rss_mib()
        out.write(json.dumps(result) + "\n")


# ------------------------------------------------------------------------------------------------------------
# orchestration
# ------------------------------------------------------------------------------------------------------------


class Side:
    def __init__(self, name: str, precision: str, python: Path, spec: dict, weight_bytes: int, note: str = ""):
        self.name, self.precision, self.python, self.spec = name, precision, python, spec
        self.weight_bytes, self.note = weight_bytes, note
        self.runs: list[dict] = []
        self.rejected: list[dict] = []  # runs during which other processes took more than --max-foreign of the CPU
        self.proc: subprocess.Popen | None = None
        self.load: dict = {}

    @property
    def label(self) -> str:
        return f"{self.name} {self.precision}"

    def start(self) -> None:
        command = [
            str(self.python),
            str(Path(__file__).resolve()),
            "--workdir",
            self.spec["workdir"],
            "--worker",
            self.name,
            "--spec",
            json.dumps(self.spec),
        ]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.load = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.label}: worker exited ({self.proc.wait()})")
        return json.loads(line)

    def run(self) -> dict:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._read()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def busy_jiffies() -> int:
    """CPU time (all cores, clock ticks) spent busy since boot: user+nice+system+irq+softirq+steal (not idle/iowait)."""
    with open("/proc/stat") as handle:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, handle.readline().split()[1:9])
    return user + nice + system + irq + softirq + steal


def process_jiffies(pid: int) -> int:
    """CPU time (utime + stime, all threads) of one process, in clock ticks."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def measured_run(side: "Side") -> dict:
    """One run of a side, with the share of the machine's CPU that other processes (other jobs, steal) took
    meanwhile: (busy time of all cores - the worker's own) / (wall time x cores)."""
    busy, own, started = busy_jiffies(), process_jiffies(side.proc.pid), time.perf_counter()
    result = side.run()
    wall = time.perf_counter() - started
    foreign = (busy_jiffies() - busy) - (process_jiffies(side.proc.pid) - own)
    result["foreign_cpu"] = max(0.0, foreign / (wall * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)))
    return result


def wait_for_quiet(threshold: float, timeout: float) -> float:
    """Wait (up to `timeout` s) until the machine has been quiet for 3 s: other processes using at most
    `threshold` of all cores (our workers are idle meanwhile). Returns the seconds waited."""
    started = time.perf_counter()
    capacity = 3 * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
    while time.perf_counter() - started < timeout:
        busy = busy_jiffies()
        time.sleep(3)
        if (busy_jiffies() - busy) / capacity <= threshold:
            break
    return time.perf_counter() - started


def files_bytes(*paths: Path) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def make_sides(args, prompt: dict) -> list[Side]:
    from llava_rt.runtime.precision import select_variants

    want = set(args.sides.split(","))
    common = {"ids": prompt["ids"], "new_tokens": args.new_tokens, "threads": args.threads, "workdir": str(args.workdir)}
    sides: list[Side] = []
    for precision in LLAVA_PRECISIONS:
        if "llava-rt" in want and precision in args.llava_precisions.split(","):
            bundle = args.workdir / "llava" / f"bundle-{precision}"
            manifest = json.loads((bundle / "manifest.json").read_text())
            key = select_variants(manifest, precision, "onnxruntime").variants["decoder"]  # what the worker's Pipeline runs
            decoder = manifest["graphs"]["decoder"]["variants"][key]
            weight = files_bytes(*(bundle / decoder[k] for k in ("file", "external_data") if decoder.get(k)))
            sides.append(
                Side(
                    "llava-rt",
                    precision,
                    Path(sys.executable),
                    {**common, "path": str(bundle), "prompt": prompt["prompt"]},
                    weight,
                )
            )
    for gguf_type in GGUF_TYPES:
        if "llama.cpp" in want and gguf_type in args.gguf_types.split(","):
            path = args.workdir / "gguf" / f"qwen2-lm-{gguf_type}.gguf"
            for flash in [False, True] if args.llama_flash_attn == "both" else [args.llama_flash_attn == "on"]:
                spec = {
                    **common,
                    "path": str(path),
                    "n_ctx": args.n_ctx,
                    "n_batch": args.n_batch,
                    "n_ubatch": args.n_ubatch,
                    "flash_attn": flash,
                }
                sides.append(
                    Side("llama.cpp", gguf_type + ("+FA" if flash else ""), py(args.llama_venv), spec, files_bytes(path))
                )
    for precision in GENAI_PRECISIONS:
        if "ort-genai" in want and precision in args.genai_precisions.split(","):
            folder = args.workdir / "genai" / precision
            weight = files_bytes(*folder.glob("*.onnx"), *folder.glob("*.onnx.data"))
            sides.append(Side("ort-genai", precision, py(args.genai_venv), {**common, "path": str(folder)}, weight))
    return sides


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / 2


def report(sides: list[Side], args) -> str:
    reference = {s.precision: s for s in sides if s.name == "llava-rt"}
    lines = [
        f"Decoder at the Qwen2-0.5B shape, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
        f"{args.threads} threads, median of {args.repeats} (± half the min-max spread); ratio = side / llava-rt at the "
        "compared precision (prefill and RSS: lower is better; decode: higher is better). Runs during which other "
        f"processes took more than {getattr(args, 'measured_max_foreign', args.max_foreign):.0%} of the CPU were measured "
        f"again, up to {args.retries} times ({sum(len(s.rejected) for s in sides)} such runs); medians are over the runs "
        f"during which they took at most {args.max_foreign:.0%} (clean runs column). Peak RSS: the worker process's ru_maxrss. "
        f"Roofline: decode tok/s x weight bytes / the streaming-read bandwidth ({args.bandwidth / 1e9:.1f} GB/s with "
        f"{args.threads} threads; weight bytes on disk, so a peer's untied embedding copy counts though decode reads one row).",
        "",
        "| side | precision | weight MiB | prefill ms | decode tok/s | of roofline | peak RSS MiB | clean runs | vs llava-rt | "
        "prefill ratio | decode ratio | RSS ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]

    def clean(side) -> list[dict]:
        """Runs kept for the medians: the undisturbed ones (all of them if every run was disturbed)."""
        good = [r for r in side.runs if r.get("foreign_cpu", 0.0) <= args.max_foreign]
        return good or side.runs

    for side in sides:
        if not side.runs:
            continue
        runs = clean(side)
        prefill = [r["prefill_ms"] for r in runs]
        decode = [r["decode_tps"] for r in runs]
        rss = max(r["peak_rss_mib"] for r in side.runs)
        compared = COMPARE_WITH.get(side.precision.replace("+FA", ""))
        ref = reference.get(compared)
        cells = ["", "", "", ""]
        if ref is not None and ref.runs and side is not ref:
            ref_runs = clean(ref)
            cells = [
                f"{compared}",
                f"{median(prefill) / median([r['prefill_ms'] for r in ref_runs]):.2f}x",
                f"{median(decode) / median([r['decode_tps'] for r in ref_runs]):.2f}x",
                f"{rss / max(r['peak_rss_mib'] for r in ref.runs):.2f}x",
            ]
        roofline = median(decode) * side.weight_bytes / args.bandwidth
        row = [
            side.name,
            side.precision,
            f"{side.weight_bytes / 2**20:.0f}",
            f"{median(prefill):.0f} ±{spread(prefill):.0f}",
            f"{median(decode):.1f} ±{spread(decode):.1f}",
            f"{roofline:.0%}",
            f"{rss:.0f}",
            f"{len(runs)}/{len(side.runs)}",
            *cells,
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def build(args) -> None:
    me = str(Path(__file__).resolve())
    base = [
        "--workdir",
        str(args.workdir),
        "--threads",
        str(args.threads),
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--vision-layers",
        str(args.vision_layers),
    ]
    want = set(args.sides.split(","))
    sh([Path(sys.executable), me, "--step", "llava", *base])
    if "llama.cpp" in want:
        sh([Path(sys.executable), me, "--step", "gguf", "--llama-cpp-src", str(llama_cpp_source(args)), *base])
        sh([py(args.llama_venv), me, "--step", "quantize", *base])
    if "ort-genai" in want:
        sh([py(args.genai_venv), me, "--step", "genai", *base])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--workdir", type=Path, required=True, help="cache of everything built, and the results")
    parser.add_argument("--llama-venv", type=Path, help="venv with llama-cpp-python")
    parser.add_argument("--genai-venv", type=Path, help="venv with onnxruntime-genai and its builder's needs")
    parser.add_argument("--llama-cpp-src", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--setup", action="store_true", help="create missing venvs and build llama-cpp-python first")
    parser.add_argument("--build-only", action="store_true", help="build everything, measure nothing")
    parser.add_argument("--sides", default="llava-rt,llama.cpp,ort-genai")
    parser.add_argument("--llava-precisions", default=",".join(LLAVA_PRECISIONS))
    parser.add_argument("--gguf-types", default=",".join(GGUF_TYPES))
    parser.add_argument("--genai-precisions", default=",".join(GENAI_PRECISIONS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    # 2 threads on 2 cores run in lock-step: a neighbour taking 7% of the machine already cost one run 25% of its decode
    # speed here, so the bar is low (an idle machine measures about 1%).
    parser.add_argument(
        "--max-foreign",
        type=float,
        default=0.03,
        help="a run during which other processes used more than this share of the CPU is measured again",
    )
    parser.add_argument("--retries", type=int, default=3, help="measurements again of a disturbed run (then kept, flagged)")
    parser.add_argument("--quiet-timeout", type=float, default=300, help="longest wait for a quiet machine before a retry")
    parser.add_argument("--report-only", type=Path, help="print the table of a saved --json result and exit")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds of idle between runs (lets spinning threads settle)")
    parser.add_argument("--vision-layers", type=int, default=1, help="vision depth of the built checkpoint (decoder unaffected)")
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--n-batch", type=int, default=2048, help="llama.cpp logical batch (>= prompt: one eval call)")
    parser.add_argument("--n-ubatch", type=int, default=512, help="llama.cpp physical batch (its default)")
    parser.add_argument(
        "--llama-flash-attn",
        choices=("off", "on", "both"),
        default="off",
        help="llama.cpp flash attention (llama-cpp-python's default is off)",
    )
    parser.add_argument(
        "--llama-bench",
        action="store_true",
        help="also build (with --setup) and run llama.cpp's llama-bench as a cross-check, after the table",
    )
    parser.add_argument("--json", type=Path, help="write all runs here")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        worker_main(args.worker, json.loads(args.spec))
        return 0
    if args.report_only:
        saved = json.loads(args.report_only.read_text())
        args.bandwidth = float(saved["config"]["bandwidth"])
        for key in ("threads", "prompt_tokens", "new_tokens", "repeats", "retries"):
            if key in saved["config"]:
                setattr(args, key, type(getattr(args, key))(saved["config"][key]))
        args.measured_max_foreign = float(saved["config"].get("max_foreign", args.max_foreign))
        sides = []
        for entry in saved["sides"]:
            side = Side(entry["name"], entry["precision"], Path(), {}, entry["weight_bytes"])
            side.runs, side.rejected = entry["runs"], entry.get("rejected_runs", [])
            sides.append(side)
        print(report(sides, args))
        if "llama-bench" in saved["table"]:
            print("\n" + saved["table"].split("\n\n", 1)[1])
        return 0
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.step == "llava":
        step_llava(args.workdir, args.vision_layers, args.prompt_tokens)
        return 0
    if args.step == "gguf":
        step_gguf(args.workdir, args.llama_cpp_src)
        return 0
    if args.step == "quantize":
        step_quantize(args.workdir)
        return 0
    if args.step == "genai":
        step_genai(args.workdir, args.threads)
        return 0

    for name in ("llama_venv", "genai_venv"):
        if getattr(args, name) is None:
            parser.error(f"--{name.replace('_', '-')} is required")
        setattr(args, name, getattr(args, name).absolute())  # not resolve(): a venv's python is a symlink
    started = time.perf_counter()
    if args.setup:
        setup(args)
    build(args)
    log(f"built in {time.perf_counter() - started:.0f}s")
    if args.build_only:
        return 0

    # In a process of its own: its 1 GiB buffer would otherwise count in every worker's peak RSS (ru_maxrss
    # survives the fork and exec that start a worker).
    code = f"from llava_rt.benchmarks.machine import measure_bandwidth; print(measure_bandwidth({args.threads}))"
    args.bandwidth = float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    log(f"streaming-read bandwidth with {args.threads} threads: {args.bandwidth / 1e9:.1f} GB/s")
    prompt = json.loads((args.workdir / f"prompt-{args.prompt_tokens}.json").read_text())
    sides = make_sides(args, prompt)
    measure_started = time.perf_counter()
    try:
        for side in sides:
            log(f"loading {side.label}")
            side.start()
            log(f"  loaded in {side.load['loaded_s']:.1f}s, RSS {side.load['rss_after_load_mib']:.0f} MiB")
        for warm in range(args.warmup):
            for side in sides:
                result = side.run()
                log(
                    f"warm-up {side.label}: prefill {result['prefill_ms']:.0f} ms, decode {result['decode_tps']:.1f} tok/s, "
                    f"{result['prompt_tokens']}+{result['new_tokens']} tokens, head {result['head']}"
                )
                time.sleep(args.pause)
        for repeat in range(args.repeats):
            order = sides if repeat % 2 == 0 else list(reversed(sides))
            for side in order:
                for attempt in range(args.retries + 1):
                    result = measured_run(side)
                    assert result["prompt_tokens"] == args.prompt_tokens and result["new_tokens"] == args.new_tokens, result
                    log(
                        f"repeat {repeat + 1}/{args.repeats} {side.label}: prefill {result['prefill_ms']:.0f} ms, "
                        f"decode {result['decode_tps']:.1f} tok/s, RSS {result['peak_rss_mib']:.0f} MiB, "
                        f"other processes took {result['foreign_cpu']:.0%} of the CPU"
                    )
                    time.sleep(args.pause)
                    if result["foreign_cpu"] <= args.max_foreign:
                        break
                    side.rejected.append(result)
                    if attempt < args.retries:
                        waited = wait_for_quiet(args.max_foreign, args.quiet_timeout)
                        log(f"  disturbed by other processes: waited {waited:.0f}s for a quiet machine, measuring again")
                side.runs.append(result)
            save(args, sides)
    finally:
        for side in sides:
            side.stop()
    table = report(sides, args)
    save(args, sides, table)
    print(table)
    if args.llama_bench and "llama.cpp" in args.sides and llama_bench_binary(args).is_file():
        bench = run_llama_bench(args)
        print("\nllama-bench (llama.cpp's own tool, same build flags, t/s = tokens per second):\n")
        print(bench)
        table += "\n\n" + bench
    log(f"measured in {time.perf_counter() - measure_started:.0f}s, total {time.perf_counter() - started:.0f}s")
    save(args, sides, table)
    return 0


def save(args, sides: list[Side], table: str = "") -> None:
    """Write every run so far to --json (also after each round, so an interrupted run keeps what it measured)."""
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "config": {k: str(v) for k, v in vars(args).items()},
                    "cpu": next(
                        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), ""
                    ),
                    "sides": [
                        {
                            "name": s.name,
                            "precision": s.precision,
                            "weight_bytes": s.weight_bytes,
                            "load": s.load,
                            "runs": s.runs,
                            "rejected_runs": s.rejected,
                        }
                        for s in sides
                    ],
                    "table": table,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    raise SystemExit(main())
