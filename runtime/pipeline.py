"""`Pipeline`: a bundle loaded for generation. Messages or prompt + images in; text, ids and timings out."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .backends import open_session
from .bundle import Bundle, load_bundle
from .chat import ChatTemplate, image_items, normalize_messages, user_turn
from .decoding import greedy_decode
from .errors import BundleError, InputError
from .image_processing import AnyResImageProcessor, ImageInput, load_image
from .packing import anyres_layout, pack_anyres
from .tokenizer import Tokenizer


@dataclass
class GenerationResult:
    """One request's output. `token_ids` are the generated ids (EOS included when it was produced)."""

    text: str
    token_ids: list[int]
    prompt: str
    input_tokens: int
    timings_ms: dict[str, float] = field(default_factory=dict)
    tokens_per_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Request:
    prompt: str
    input_ids: np.ndarray
    images: list[tuple[np.ndarray, tuple[int, int]]]


class Pipeline:
    """Runs a bundle: preprocessing, vision, projector, packing, then greedy decoding with the KV cache."""

    def __init__(self, bundle: Bundle, backend: str = "onnxruntime", threads: int | None = None):
        manifest = bundle.manifest
        self.bundle = bundle
        self.manifest = manifest
        self.sessions = {name: open_session(bundle.graph_path(name), backend, threads=threads) for name in manifest["graphs"]}
        self.tokenizer = Tokenizer(bundle.file(manifest["tokenizer"]))
        template_file = manifest.get("chat_template")
        self.chat_template = (
            ChatTemplate(bundle.file(template_file).read_text(), manifest["tokens"]["special_tokens"]) if template_file else None
        )
        self.image_processor = AnyResImageProcessor.from_manifest(manifest["preprocess"])
        self.embed_tokens = bundle.array("embed_tokens")
        self.image_newline = np.asarray(bundle.array("image_newline"))
        self.tokens = manifest["tokens"]
        self.max_length = manifest["text"]["max_position_embeddings"]

    @classmethod
    def load(
        cls, path: str | Path, backend: str = "onnxruntime", threads: int | None = None, verify_checksums: bool = True
    ) -> "Pipeline":
        """Load a bundle directory (checksums verified unless told otherwise)."""
        return cls(load_bundle(path, verify_checksums=verify_checksums), backend=backend, threads=threads)

    # ---- request preparation -------------------------------------------------------------------------

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text the chat template makes of a conversation (images as `<image>` placeholders)."""
        if self.chat_template is None:
            raise InputError("this bundle has no chat template; pass a pre-formatted prompt with apply_chat_template=False")
        return self.chat_template.render(normalize_messages(messages), add_generation_prompt)

    def _collect_images(self, messages: list[dict[str, Any]], images: Sequence[ImageInput]) -> list[ImageInput]:
        """Images embedded in the messages' image items, else taken in order from `images`."""
        items = image_items(messages)
        embedded = [item.get("image", item.get("path", item.get("url"))) for item in items]
        if any(source is not None for source in embedded):
            if images:
                raise InputError("give images either inside the messages or as images=, not both")
            if any(source is None for source in embedded):
                raise InputError("some image items carry an image and some do not")
            return embedded
        if len(items) != len(images):
            raise InputError(f"the messages have {len(items)} image placeholders but {len(images)} images were given")
        return list(images)

    def _prepare(self, text: str, images: Sequence[ImageInput]) -> _Request:
        """Expand each `<image>` of the rendered prompt to its token count, tokenize, check the context length."""
        image_token = self.tokens["image_token"]
        pieces = text.split(image_token)
        if len(pieces) - 1 != len(images):
            raise InputError(f"the prompt has {len(pieces) - 1} {image_token} placeholders but {len(images)} images were given")
        processed = [self.image_processor.preprocess(load_image(image)) for image in images]
        packing = self.manifest["packing"]
        counts = [anyres_layout(size, packing).num_tokens for _, size in processed]
        expanded = pieces[0] + "".join(image_token * n + piece for n, piece in zip(counts, pieces[1:]))
        input_ids = np.array(self.tokenizer.encode(expanded), dtype=np.int64)
        if int((input_ids == self.tokens["image_token_id"]).sum()) != sum(counts):
            raise BundleError(f"the tokenizer does not encode {image_token} as the image token id")
        if len(input_ids) > self.max_length:
            raise InputError(f"the prompt is {len(input_ids)} tokens, longer than the model's context of {self.max_length}")
        return _Request(prompt=text, input_ids=input_ids, images=processed)

    def _request(self, messages, prompt, images, apply_chat_template) -> _Request:
        images = list(images or [])
        if (messages is None) == (prompt is None):
            raise InputError("give exactly one of messages= or prompt=")
        if messages is not None:
            messages = normalize_messages(messages)
            images = self._collect_images(messages, images)
            return self._prepare(self.render(messages), images)
        if not isinstance(prompt, str):
            raise InputError("prompt must be a string")
        if apply_chat_template:
            return self._prepare(self.render(user_turn(prompt, len(images))), images)
        return self._prepare(prompt, images)

    # ---- model stages -----------------------------------------------------------------------------------

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        """Token embeddings by row lookup in the memory-mapped table (no full-table copy)."""
        return np.take(self.embed_tokens, ids, axis=0)

    def image_features(self, requests: list[_Request]) -> list[np.ndarray]:
        """Packed features of every image of every request, in order (one vision and one projector call)."""
        tiles = [pixels for request in requests for pixels, _ in request.images]
        if not tiles:
            return []
        dtype = self.embed_tokens.dtype
        selected = self.sessions["vision"].run({"pixel_values": np.concatenate(tiles).astype(dtype)})["image_features"]
        embeds = self.sessions["projector"].run({"image_features": selected})["image_embeds"]
        packing = self.manifest["packing"]
        packed, start = [], 0
        for request in requests:
            for pixels, size in request.images:
                layout = anyres_layout(size, packing)
                packed.append(pack_anyres(embeds[start : start + len(pixels)], layout, packing["patch_grid"], self.image_newline))
                start += len(pixels)
        return packed

    def _inputs_embeds(self, requests: list[_Request], features: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded `[B, S, H]` embeddings with image features scattered over the image tokens, and the mask."""
        length = max(len(r.input_ids) for r in requests)
        hidden = self.embed_tokens.shape[1]
        embeds = np.zeros((len(requests), length, hidden), dtype=self.embed_tokens.dtype)
        mask = np.zeros((len(requests), length), dtype=np.int64)
        feature_iter = iter(features)
        for row, request in enumerate(requests):
            ids = request.input_ids
            row_embeds = self._embed(ids)
            image_positions = ids == self.tokens["image_token_id"]
            if request.images:
                row_embeds[image_positions] = np.concatenate([next(feature_iter) for _ in request.images])
            embeds[row, length - len(ids) :] = row_embeds
            mask[row, length - len(ids) :] = 1
        return embeds, mask

    # ---- public generation --------------------------------------------------------------------------

    def _run(self, requests: list[_Request], max_new_tokens: int, preprocess_s: float) -> list[GenerationResult]:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        started = time.perf_counter()
        features = self.image_features(requests)
        vision_s = time.perf_counter() - started
        embeds, mask = self._inputs_embeds(requests, features)
        output = greedy_decode(
            self.sessions["decoder"],
            self._embed,
            embeds,
            mask,
            self.manifest["graphs"]["decoder"]["kv_cache"],
            max_new_tokens,
            self.tokens["eos_token_ids"],
            self.max_length,
        )
        timings = {
            "preprocess": preprocess_s * 1e3,
            "vision": vision_s * 1e3,
            "prefill": output.prefill_s * 1e3,
            "decode": output.decode_s * 1e3,
        }
        tokens_per_s = output.decode_steps / output.decode_s if output.decode_s > 0 else 0.0
        return [
            GenerationResult(
                text=self.tokenizer.decode(tokens),
                token_ids=tokens,
                prompt=request.prompt,
                input_tokens=len(request.input_ids),
                timings_ms=dict(timings),
                tokens_per_s=tokens_per_s,
            )
            for request, tokens in zip(requests, output.tokens)
        ]

    def generate(
        self,
        messages: list[dict[str, Any]] | None = None,
        *,
        prompt: str | None = None,
        images: Sequence[ImageInput] = (),
        max_new_tokens: int = 128,
        apply_chat_template: bool = True,
    ) -> GenerationResult:
        """Answer one request: a conversation (transformers' message format) or a prompt with images.

        A `prompt` is rendered as one user turn (images first) unless `apply_chat_template=False`, in
        which case it is used verbatim and must hold one `<image>` placeholder per image.
        """
        started = time.perf_counter()
        request = self._request(messages, prompt, images, apply_chat_template)
        return self._run([request], max_new_tokens, time.perf_counter() - started)[0]

    def generate_batch(
        self,
        conversations: Sequence[list[dict[str, Any]]],
        *,
        images: Sequence[Sequence[ImageInput]] | None = None,
        max_new_tokens: int = 128,
    ) -> list[GenerationResult]:
        """Answer several conversations at once (left-padded into one batch); `images[i]` belongs to conversation i."""
        if not conversations:
            raise InputError("generate_batch needs at least one conversation")
        images = images if images is not None else [()] * len(conversations)
        if len(images) != len(conversations):
            raise InputError(f"{len(conversations)} conversations but {len(images)} image lists")
        started = time.perf_counter()
        requests = [self._request(c, None, i, True) for c, i in zip(conversations, images)]
        return self._run(requests, max_new_tokens, time.perf_counter() - started)
