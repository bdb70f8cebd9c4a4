"""`Pipeline`: a bundle loaded for generation. Messages or prompt + images in; text, ids and timings out."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .backends import BackendConfig
from .bundle import Bundle, load_bundle
from .chat import normalize_messages, user_turn
from .console import progress
from .decoding import PREFILL_CHUNK, Generator
from .detokenize import TextStream
from .engine_plans import plans_for
from .errors import BundleError, InputError
from .feature_cache import FeatureCache
from .graph_segments import run_steps
from .image_processing import MAX_IMAGE_PIXELS, ImageInput
from .kv_cache import KVCache, writes_in_place
from .media import Media, MediaProcessor
from .precision import check_precision, select_variants
from .request import Request, check_positive_int
from .sampling import SearchOptions
from .video import VideoInput

logger = logging.getLogger("llava_rt")
VISION_BATCH = 16  # tiles or frames per vision call: bounds its activations, and steps the CLI's progress bar


@dataclass
class GenerationResult:
    """One request's output. `token_ids` are the generated ids (EOS included when it was produced)."""

    text: str
    token_ids: list[int]
    prompt: str
    input_tokens: int
    # "stop": end-of-sequence or a stop string; "length": max_new_tokens or the context; "abort": ended by the caller
    finish_reason: str = "stop"
    timings_ms: dict[str, float] = field(default_factory=dict)
    tokens_per_s: float = 0.0
    reused_tokens: int = 0  # prompt tokens whose KV cache came from an earlier turn (chat sessions)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PreparedRequest:
    """A request ready for the model: its rendered prompt, expanded token ids, and its images and videos."""

    prompt: str
    input_ids: np.ndarray
    media: list[Media]


class Pipeline:
    """Runs a bundle: preprocessing, vision, projector, packing, then greedy or sampled decoding with the KV cache.

    One pipeline may serve several threads at once: each call has its own decoding state, and onnxruntime
    sessions, the tokenizer and the chat template are safe to share.
    """

    show_progress = False  # a progress bar over vision batches on a terminal (the CLI sets it)

    def __init__(
        self,
        bundle: Bundle,
        backend: str = "onnxruntime",
        threads: int | None = None,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        precision: str | None = None,
        form: str | None = None,
        device: str = "cpu",
        provider_options: dict[str, str] | None = None,
        vision_segments: int = 1,
    ):
        if check_positive_int("vision_segments", vision_segments) > 1 and backend != "onnxruntime":
            raise InputError(f"vision segments need the onnxruntime backend, not {backend}")
        manifest = bundle.manifest
        self.bundle = bundle
        self.manifest = manifest
        self.config = BackendConfig(backend, device, threads, dict(provider_options or {}))
        self.selection = select_variants(manifest, precision, backend, form, device)
        logger.info("%s", self.selection.describe())
        variants = self.selection.variants
        self.plans = plans_for(bundle, self.selection.precision, variants) if backend == "tensorrt" else None
        self.sessions = {
            name: bundle.session(name, variant, self.config, self.plans.plan_file(name) if self.plans else None)
            for name, variant in variants.items()
            if name != "vision" or vision_segments == 1
        }
        # the vision graph as segments run one after another, one tile at a time (see `feature_steps`)
        self.vision = None
        if vision_segments > 1:
            self.vision = bundle.segmented("vision", variants["vision"], self.config, vision_segments)
        # tiles or frames per vision-side call: bounds activations, and stays within the plans' --max-tiles
        self.tile_batch = min(VISION_BATCH, self.plans.entry["limits"]["max_tiles"]) if self.plans else VISION_BATCH
        self.tokenizer = bundle.tokenizer()
        self.chat_template = bundle.chat_template()
        self.embed_tokens = bundle.array("embed_tokens")
        self.embeds_dtype = self.input_dtype("decoder", "inputs_embeds")
        newline = np.asarray(bundle.array("image_newline"), self.embeds_dtype)
        self.media = MediaProcessor(manifest, newline, max_image_pixels)
        self.tokens = manifest["tokens"]
        self._placeholder_kinds = {
            self.tokens[f"{kind}_token"]: kind for kind in ("image", "video") if self.tokens.get(f"{kind}_token")
        }
        self._placeholders = re.compile("|".join(re.escape(token) for token in self._placeholder_kinds))
        self.max_length = manifest["text"]["max_position_embeddings"]
        # prompt tokens per decoder run of a prefill (0: the whole prompt in one run, the default on a GPU); see `Generator`
        self.prefill_chunk = PREFILL_CHUNK if self.sessions["decoder"].array_module is np else 0

    @classmethod
    def load(
        cls,
        path: str | Path,
        backend: str = "onnxruntime",
        threads: int | None = None,
        verify: str = "auto",
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        precision: str | None = None,
        form: str | None = None,
        device: str = "cpu",
        provider_options: dict[str, str] | None = None,
        vision_segments: int = 1,
    ) -> "Pipeline":
        """Load a bundle directory. `verify`: "auto" re-hashes only the files changed since this user last verified
        them, "full" re-hashes every file (see `load_bundle`). `threads`: intra-op threads per graph (default: one
        per physical core; at most the CPU count). `max_image_pixels`: the most pixels an image or a video frame
        may have (checked before decoding it). `precision` (fp32, fp16, int8, int4): the graph variants to run;
        default: the best the bundle has for the backend and device (`pipeline.selection` says which, also logged at INFO).
        `form` ("standard", "onnxruntime"): run that form of each variant where the bundle has it (default: the
        backend's preferred form; onnxruntime's own on the CPU). `device` ("cpu", "cuda", "tensorrt": onnxruntime's
        TensorRT provider) and `provider_options` (passed to its provider, e.g. `{"trt_fp16_enable": "True"}`):
        where the graphs run; the KV cache and each decode step stay there. `vision_segments` > 1: run the vision graph
        as that many segments (at most; onnxruntime only, needs `onnx`), one tile at a time, so that a `Scheduler`
        can run its decode steps between them; the features are the same."""
        BackendConfig(backend, device, threads, dict(provider_options or {}))  # checked before the bundle is hashed
        check_precision(precision)
        check_positive_int("vision_segments", vision_segments)
        bundle = load_bundle(path, verify=verify)
        return cls(bundle, backend, threads, max_image_pixels, precision, form, device, provider_options, vision_segments)

    def input_dtype(self, graph: str, name: str) -> np.dtype:
        """The dtype the running variant of `graph` takes for its input `name`, as the manifest records it."""
        return self.bundle.input_dtype(graph, name, self.selection.variants[graph])

    def _graph_steps(self, graph: str, name: str, values: np.ndarray):
        """The one output of a one-input graph over `values`, its input cast to the dtype the running variant takes,
        in runs of `tile_batch` along the first axis (the vision graph in segments: each tile through each segment).
        Yields after each run; a progress bar over the vision runs when `show_progress`."""
        segmented = self.vision if graph == "vision" else None
        step = 1 if segmented is not None else self.tile_batch
        dtype = self.input_dtype(graph, name)
        starts = progress(range(0, len(values), step), desc=graph, unit="batch", enabled=self.show_progress and graph == "vision")
        outputs = []
        for i in starts:
            feeds = {name: values[i : i + step].astype(dtype, copy=False)}
            if segmented is not None:
                outputs.extend((yield from segmented.steps(feeds)).values())
            else:
                outputs.extend(self.sessions[graph].run(feeds).values())
                yield
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    # ---- request preparation -------------------------------------------------------------------------

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text the chat template makes of a conversation (images as `<image>` placeholders)."""
        if self.chat_template is None:
            raise InputError("this bundle has no chat template; pass a pre-formatted prompt with apply_chat_template=False")
        return self.chat_template.render(normalize_messages(messages), add_generation_prompt)

    def _prepare(self, text: str, images: Sequence[ImageInput], videos: Sequence[VideoInput], num_frames: int) -> PreparedRequest:
        """Expand each placeholder of the rendered prompt to its token count, tokenize, check the context length."""
        if videos and not self.tokens.get("video_token"):
            raise InputError(f"this {self.manifest['family']} model has no video token; it cannot take videos")
        kinds = [self._placeholder_kinds[token] for token in self._placeholders.findall(text)]
        for kind, given in (("image", images), ("video", videos)):
            if kinds.count(kind) != len(given):
                token = self.tokens[f"{kind}_token"]
                raise InputError(f"the prompt has {kinds.count(kind)} {token} placeholders but {len(given)} {kind}s were given")
        if videos:
            frame_tokens = len(videos) * num_frames * self.manifest["video"]["tokens_per_frame"]
            if frame_tokens >= self.max_length:
                raise InputError(
                    f"{len(videos)} video(s) of {num_frames} frames make {frame_tokens} tokens, more than the model's "
                    f"context of {self.max_length}; use fewer frames"
                )
        sources = {"image": iter(images), "video": iter(videos)}
        media = [
            self.media.image(next(sources[kind]), len(images) > 1)
            if kind == "image"
            else self.media.video(next(sources[kind]), num_frames)
            for kind in kinds
        ]
        pieces = self._placeholders.split(text)
        expanded = pieces[0] + "".join(
            self.tokens[f"{m.kind}_token"] * m.num_tokens + piece for m, piece in zip(media, pieces[1:])
        )
        input_ids = np.array(self.tokenizer.encode(expanded), dtype=np.int64)
        for kind in set(self._placeholder_kinds.values()):
            expected = sum(m.num_tokens for m in media if m.kind == kind)
            if int((input_ids == self.tokens[f"{kind}_token_id"]).sum()) != expected:
                raise BundleError(f"the tokenizer does not encode {self.tokens[f'{kind}_token']} as the {kind} token id")
        if len(input_ids) >= self.max_length:
            raise InputError(
                f"the prompt is {len(input_ids)} tokens, which leaves no room to answer within the model's context "
                f"of {self.max_length}"
            )
        return PreparedRequest(prompt=text, input_ids=input_ids, media=media)

    def prepare(self, messages: Any = None, /, **request: Any) -> PreparedRequest:
        """Render, preprocess and tokenize one request without running the model (arguments as for `generate`)."""
        request = Request.build(messages, **request)
        if request.messages is not None:
            text = self.render(request.messages)
        elif request.apply_chat_template:
            text = self.render(user_turn(request.prompt, len(request.images), len(request.videos)))
        else:
            text = request.prompt
        return self._prepare(text, request.images, request.videos, request.num_frames)

    # ---- model stages -----------------------------------------------------------------------------------

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        """Token embeddings by row lookup in the memory-mapped table. Indexing (not `np.take`, which first makes
        its input contiguous) reads only the rows asked for, also from a transposed view (tied embeddings), then
        casts them to the running decoder's `inputs_embeds` dtype (the table is the fp32 reference's)."""
        return np.ascontiguousarray(self.embed_tokens[ids], dtype=self.embeds_dtype)

    def media_features(self, requests: list[PreparedRequest], cache: FeatureCache | None = None) -> list[np.ndarray]:
        """Features of every image and video of every request, in order (see `features`)."""
        return self.features([m for request in requests for m in request.media], cache)

    def features(self, media: list[Media], cache: FeatureCache | None = None) -> list[np.ndarray]:
        """Features of images and videos, in order; with a `cache`, media seen before are taken from it and only the
        others run through the graphs."""
        return run_steps(self.feature_steps(media, cache))

    def feature_steps(self, media: list[Media], cache: FeatureCache | None = None):
        """`features` as a generator that yields after each graph run and returns the features: a `Scheduler` runs
        its decode steps in between. With vision segments, a run is one segment over one tile."""
        if cache is None:
            return (yield from self._feature_steps(media))
        keys = [m.digest for m in media]
        found = [cache.get(key) for key in keys]
        missing = [i for i, features in enumerate(found) if features is None]
        computed = yield from self._feature_steps([media[i] for i in missing])
        for i, features in zip(missing, computed):
            cache.put(keys[i], features)
            found[i] = features
        return found

    def _feature_steps(self, media: list[Media]):
        """The vision graph over every tile and frame of all media; NeXT-Video frames then go through the `video_pool`
        graph; the projector runs once per distinct token count (tiles, pooled frames). Yields after each run."""
        if not media:
            return []
        pixels = np.concatenate([m.pixels for m in media])
        selected = yield from self._graph_steps("vision", "pixel_values", pixels)
        bounds = np.cumsum([0] + [len(m.pixels) for m in media])
        parts = [selected[start:stop] for start, stop in zip(bounds[:-1], bounds[1:])]
        for index, item in enumerate(media):
            if item.kind == "video" and self.media.pools_before_projector:
                parts[index] = yield from self._graph_steps("video_pool", "image_features", parts[index])
        projected: list[np.ndarray | None] = [None] * len(parts)
        for tokens in {part.shape[1] for part in parts}:
            group = [i for i, part in enumerate(parts) if part.shape[1] == tokens]
            embeds = yield from self._graph_steps("projector", "image_features", np.concatenate([parts[i] for i in group]))
            embeds = embeds.astype(self.embeds_dtype, copy=False)
            starts = np.cumsum([0] + [len(parts[i]) for i in group])
            for i, start, stop in zip(group, starts[:-1], starts[1:]):
                projected[i] = embeds[start:stop]
        return [self.media.features(item, embeds) for item, embeds in zip(media, projected)]

    def _inputs_embeds(self, requests: list[PreparedRequest], features: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded `[B, S, H]` embeddings with image and video features over their tokens, and the mask."""
        length = max(len(r.input_ids) for r in requests)
        hidden = self.embed_tokens.shape[1]
        embeds = np.zeros((len(requests), length, hidden), dtype=self.embeds_dtype)
        mask = np.zeros((len(requests), length), dtype=np.int64)
        feature_iter = iter(features)
        for row, request in enumerate(requests):
            ids = request.input_ids
            row_embeds = self._embed(ids)
            row_features = [(m.kind, next(feature_iter)) for m in request.media]
            for kind in ("image", "video"):
                rows = [f for k, f in row_features if k == kind]
                if rows:
                    row_embeds[ids == self.tokens[f"{kind}_token_id"]] = np.concatenate(rows)
            embeds[row, length - len(ids) :] = row_embeds
            mask[row, length - len(ids) :] = 1
        return embeds, mask

    # ---- public generation --------------------------------------------------------------------------

    def search_options(self, search: SearchOptions | None = None, **overrides) -> SearchOptions:
        """Resolved search options: `search` or keyword overrides, then the bundle's generation config."""
        options = search if search is not None else SearchOptions.from_keywords(**overrides)
        return options.resolve(self.manifest.get("generation", {}))

    def run(
        self,
        requests: list[PreparedRequest],
        *,
        max_new_tokens: int,
        search: SearchOptions,
        feature_cache: FeatureCache | None = None,
        reuse: tuple[int, KVCache] | None = None,
    ) -> "DecodingRun":
        """Start decoding prepared requests with resolved `search` options: iterate the run for
        `(row, text piece)`, then read `run.results`.

        `reuse = (n, cache)` continues a single request whose first `n` tokens are in the KV cache `cache`
        (a previous run's `generator.cache`, which is then extended in place).
        """
        return DecodingRun(self, requests, max_new_tokens, search, feature_cache, reuse)

    def start(self, messages: Any = None, /, **request: Any) -> "DecodingRun":
        """Prepare one request and start decoding it. Takes a `Request`, or its fields and search options as
        keywords (`prompt=`, `images=`, `videos=`, `num_frames=`, `max_new_tokens=`, `apply_chat_template=`,
        `search=` or `temperature=`, `top_k=`, `top_p=`, `min_p=`, `repetition_penalty=`, `seed=`, `stop=`, ...);
        see `Request` and `SearchOptions`. Bad input raises `InputError` here, before any decoding."""
        return self._start([Request.build(messages, **request)])

    def generate(self, messages: Any = None, /, **request: Any) -> GenerationResult:
        """Answer one request (arguments as for `start`): text, token ids, prompt, finish reason and timings."""
        run = self.start(messages, **request)
        for _ in run:
            pass
        return run.results[0]

    def stream(self, messages: Any = None, /, **request: Any) -> Iterator[str]:
        """Like `generate` (arguments as for `start`), yielding the answer's text as it is decoded; the pieces
        concatenate to the full text. Bad input raises here, before iteration."""
        run = self.start(messages, **request)
        return (piece for _, piece in run if piece)

    def generate_batch(
        self,
        conversations: Sequence[Any],
        *,
        images: Sequence[Sequence[ImageInput]] | None = None,
        videos: Sequence[Sequence[VideoInput]] | None = None,
        **request: Any,
    ) -> list[GenerationResult]:
        """Answer several conversations at once (left-padded into one batch); `images[i]` and `videos[i]`
        belong to conversation i; the other arguments (as for `start`) apply to all."""
        if isinstance(conversations, (str, bytes)) or not isinstance(conversations, Sequence) or not conversations:
            raise InputError("generate_batch needs a non-empty list of conversations")
        images = images if images is not None else [()] * len(conversations)
        videos = videos if videos is not None else [()] * len(conversations)
        if not len(images) == len(videos) == len(conversations):
            raise InputError(f"{len(conversations)} conversations but {len(images)} image and {len(videos)} video lists")
        requests = [Request.build(c, images=i, videos=v, **request) for c, i, v in zip(conversations, images, videos)]
        run = self._start(requests)
        for _ in run:
            pass
        return run.results

    def _start(self, requests: list[Request]) -> "DecodingRun":
        """Resolve the search options, prepare every request and start one decoding run over them."""
        started = time.perf_counter()
        first = requests[0]
        if any(r.search != first.search or r.max_new_tokens != first.max_new_tokens for r in requests[1:]):
            raise InputError("the requests of one batch must share max_new_tokens and the search options")
        options = self.search_options(first.search)
        prepared = [self.prepare(request) for request in requests]
        run = self.run(prepared, max_new_tokens=first.max_new_tokens, search=options)
        run.preprocess_s = time.perf_counter() - started
        return run


class DecodingRun:
    """One decoding run: iterate it for `(row, text piece)` pairs; afterwards `results` holds the answers and
    `generator.cache` the KV cache of every token fed. A run stopped early (the caller stops iterating) can
    still report what it has: `partial_results()`."""

    def __init__(self, pipeline: Pipeline, requests, max_new_tokens, options, feature_cache, reuse):
        self.pipeline, self.requests, self.max_new_tokens = pipeline, requests, max_new_tokens
        self.options, self.feature_cache, self.reuse = options, feature_cache, reuse
        self.preprocess_s = self.vision_s = 0.0
        self.reused = 0
        self.done = False
        self.results: list[GenerationResult] = []
        self.generator: Generator | None = None
        self.streams: list[TextStream] = []
        self._cache_counts = (feature_cache.hits, feature_cache.misses) if feature_cache else (0, 0)
        if pipeline.plans is not None:  # the KV cache is reserved for the prompt and every new token
            context = max(len(r.input_ids) for r in requests) + max_new_tokens
            pipeline.plans.check_request(batch=len(requests), context=min(context, pipeline.max_length))

    def __iter__(self) -> Iterator[tuple[int, str]]:
        pipeline = self.pipeline
        started = time.perf_counter()
        features = pipeline.media_features(self.requests, self.feature_cache)
        self.vision_s = time.perf_counter() - started
        embeds, mask = pipeline._inputs_embeds(self.requests, features)
        kv_cache = pipeline.manifest["graphs"]["decoder"]["kv_cache"]
        kv_dtype = pipeline.input_dtype("decoder", "past_key_values.0.key")
        decoder = pipeline.sessions["decoder"]
        if self.reuse is None:
            in_place = writes_in_place([value.name for value in decoder.inputs])
            cache = KVCache(kv_cache, len(self.requests), kv_dtype, array_module=decoder.array_module, in_place=in_place)
        else:
            self.reused, cache = self.reuse
        cache.truncate(self.reused)
        self.generator = generator = Generator(
            decoder,
            pipeline._embed,
            embeds[:, self.reused :],
            mask,
            cache,
            self.options,
            [r.input_ids for r in self.requests],
            pipeline.tokens["eos_token_ids"],
            self.max_new_tokens,
            pipeline.max_length,
            pipeline.prefill_chunk,
        )
        self.streams = streams = [TextStream(pipeline.tokenizer, self.options.stop) for _ in self.requests]
        while not generator.is_done:
            active = np.flatnonzero(~generator.finished)
            next_tokens = generator.generate_next_token()
            for row in active:
                piece = streams[row].push(int(next_tokens[row]))
                if streams[row].stopped:
                    generator.finish(row)
                yield int(row), piece
        for row, stream in enumerate(streams):
            yield row, stream.flush()
        if generator.context_full:
            logger.warning("the answer was cut at the model's context of %d tokens (finish reason 'length')", pipeline.max_length)
        self.done = True
        self.results = self.partial_results()

    def partial_results(self) -> list[GenerationResult]:
        """The answers so far (all of them once the run is over). A row the caller ended early, by no longer
        iterating, has the finish reason "abort"."""
        generator = self.generator
        if generator is None:
            return []
        timings = {
            "preprocess": self.preprocess_s * 1e3,
            "vision": self.vision_s * 1e3,
            "prefill": generator.prefill_s * 1e3,
            "decode": generator.decode_s * 1e3,
        }
        if self.feature_cache is not None:
            timings["feature_cache_hits"] = self.feature_cache.hits - self._cache_counts[0]
            timings["feature_cache_misses"] = self.feature_cache.misses - self._cache_counts[1]
        tokens_per_s = generator.decode_steps / generator.decode_s if generator.decode_s > 0 else 0.0
        return [
            GenerationResult(
                text=stream.text,
                token_ids=list(generator.tokens[row]),
                prompt=request.prompt,
                input_tokens=len(request.input_ids),
                finish_reason=generator.finish_reason(row) if self.done or generator.finished[row] else "abort",
                timings_ms=dict(timings),
                tokens_per_s=tokens_per_s,
                reused_tokens=self.reused,
            )
            for row, (request, stream) in enumerate(zip(self.requests, self.streams))
        ]
