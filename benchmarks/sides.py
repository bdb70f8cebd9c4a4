"""The things compared: transformers and llava-rt bundle choices (a precision, and a form of its variants), on the
CPU or a CUDA GPU, behind one `run(request)` interface.

Each run answers the same request (one image, a rendered prompt, a fixed number of new tokens with
end-of-sequence suppressed) and returns wall-clock stage times. Time to first token runs from the raw
image and prompt to the first new token (preprocessing, vision, prefill); decode speed is the new
tokens after the first over the time between the first and the last. On a GPU every time is taken with the device
synchronized (onnxruntime's runs return host results; transformers' side synchronizes torch).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

BACKEND = "onnxruntime"  # what the llava-rt sides run on
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Request:
    """What both sides answer."""

    image: Image.Image
    prompt: str  # rendered with the chat template, one image placeholder
    new_tokens: int


@dataclass(frozen=True)
class StageTimes:
    preprocess_ms: float
    vision_ms: float
    ttft_ms: float
    decode_tokens_per_s: float

    @staticmethod
    def from_stamps(preprocess_ms: float, vision_ms: float, ttft_ms: float, stamps: list[float]) -> "StageTimes":
        """Stage times, decode speed from the time each new token arrived."""
        decode_s = stamps[-1] - stamps[0]
        return StageTimes(preprocess_ms, vision_ms, ttft_ms, (len(stamps) - 1) / decode_s if decode_s > 0 else 0.0)


class TransformersSide:
    """The checkpoint run by transformers: on the CPU in fp32 with eager attention (`threads` torch threads), on a CUDA
    GPU in fp16 with SDPA attention; both under `torch.inference_mode`."""

    def __init__(self, checkpoint: Path, threads: int, device: str = "cpu"):
        import torch
        from transformers import AutoProcessor

        from ..export.checkpoint import load_model, read_checkpoint

        torch.set_num_threads(threads)
        self.name = "transformers"
        self.torch = torch
        self.device = device
        self.dtype = torch.float16 if device == "cuda" else torch.float32
        self.processor = AutoProcessor.from_pretrained(checkpoint, local_files_only=True)
        self.model = load_model(read_checkpoint(checkpoint), self.dtype)
        if device == "cuda":
            self.model.set_attn_implementation("sdpa")
            self.model.to(device)
        language_model = self.model.model.language_model
        # Per token the decoder reads every weight but the embedding table (one row of it), and lm_head (tied or not).
        self.weight_bytes_per_token = (
            sum(p.nbytes for p in language_model.parameters())
            - self.model.get_input_embeddings().weight.nbytes
            + self.model.lm_head.weight.nbytes
        )

    def _now(self) -> float:
        """A clock reading once the device has finished the work queued so far."""
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        return time.perf_counter()

    def image_features(self, inputs) -> None:
        """The vision side alone: tower and projector on the processor's pixels (`get_image_features`)."""
        with self.torch.inference_mode():
            self.model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])

    def run(self, request: Request) -> StageTimes:
        from transformers.generation.streamers import BaseStreamer

        stamps: list[float] = []

        class Stamps(BaseStreamer):
            def put(self, value):
                stamps.append(time.perf_counter())

            def end(self):
                pass

        started = self._now()
        inputs = self.processor(images=[request.image], text=request.prompt, return_tensors="pt")
        inputs = inputs.to(self.device, dtype=self.dtype)  # floating-point tensors only take the dtype
        preprocess_ms = (self._now() - started) * 1e3
        vision_started = self._now()
        self.image_features(inputs)
        vision_ms = (self._now() - vision_started) * 1e3
        with self.torch.inference_mode():
            generate_started = self._now()
            self.model.generate(
                **inputs,
                max_new_tokens=request.new_tokens,
                min_new_tokens=request.new_tokens,
                do_sample=False,
                streamer=Stamps(),
            )
        # the streamer is first handed the prompt; each new token is handed over on the host (a device sync)
        new_token_stamps = stamps[1:]
        # Time to first token: preprocessing plus generate's own vision, prefill and first choice (not the vision run above).
        ttft_ms = preprocess_ms + (new_token_stamps[0] - generate_started) * 1e3
        return StageTimes.from_stamps(preprocess_ms, vision_ms, ttft_ms, new_token_stamps)


@dataclass(frozen=True)
class BundleChoice:
    """What one llava-rt side runs: the bundle's variants of `precision`, in `form` ("standard": TensorRT's) where a
    graph has it, else (and for `form` None) in the runtime's default form on `device`; on `device`."""

    precision: str
    form: str | None = None
    device: str = "cpu"

    @property
    def name(self) -> str:
        return " ".join(["llava-rt", self.precision, *([self.form] if self.form else [])])

    def selection(self, manifest: dict[str, Any]):
        """The runtime's `Selection` of variants for this choice."""
        from ..runtime.precision import select_variants

        return select_variants(manifest, self.precision, BACKEND, self.form, self.device)


def bundle_choices(manifest: dict[str, Any], precisions: list[str], device: str = "cpu") -> list[BundleChoice]:
    """A side per precision in the runtime's default form on `device`, and one in the standard form where that runs
    other variants (on the CPU, int8 and int4: onnxruntime's own forms against the ones TensorRT builds)."""
    choices = []
    for precision in precisions:
        default, standard = BundleChoice(precision, None, device), BundleChoice(precision, "standard", device)
        choices.append(default)
        if standard.selection(manifest).variants != default.selection(manifest).variants:
            choices.append(standard)
    return choices


def token_stamps(run) -> list[float]:
    """Run a one-row decoding run to its end; the `perf_counter` time at which each new token appeared."""
    stamps: list[float] = []
    for _ in run:
        if len(run.generator.tokens[0]) > len(stamps):
            stamps.append(time.perf_counter())
    return stamps


class BundleSide:
    """A bundle run by the llava-rt runtime (onnxruntime, `threads` intra-op threads) as `choice` says."""

    def __init__(self, bundle: Path, threads: int, choice: BundleChoice):
        from ..runtime.pipeline import Pipeline

        self.name = choice.name
        self.pipeline = Pipeline.load(
            bundle, BACKEND, threads=threads, precision=choice.precision, form=choice.form, device=choice.device
        )
        decoder = self.pipeline.selection.variants["decoder"]
        self.weight_bytes_per_token = self.pipeline.bundle.graph_bytes("decoder", decoder)

    def run(self, request: Request) -> StageTimes:
        started = time.perf_counter()
        run = self.pipeline.start(
            prompt=request.prompt,
            images=[request.image],
            apply_chat_template=False,
            max_new_tokens=request.new_tokens,
            min_new_tokens=request.new_tokens,
            do_sample=False,
        )
        stamps = token_stamps(run)
        timings = run.results[0].timings_ms
        return StageTimes.from_stamps(timings["preprocess"], timings["vision"], (stamps[0] - started) * 1e3, stamps)


def synthetic_image(size: int, seed: int = 0) -> Image.Image:
    """A smooth random RGB image (the content does not change the work done)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR)
