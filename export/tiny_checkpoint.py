"""Small random-weight LLaVA-NeXT checkpoints, built locally (no hub): the demo model and test fixtures.

The layout is exactly what `save_pretrained` writes for the real llava-hf checkpoints (config, safetensors,
generation config, tokenizer.json, processor configs, chat template), only with tiny dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoint import quiet_transformers

# A small English corpus to train the byte-level BPE on, so that prompts tokenize into real merges.
_CORPUS = [
    "What is shown in this image? Describe the picture in detail.",
    "The image shows a red square, a blue circle and a green triangle on a white background.",
    "Compare these two images and describe the differences between them.",
    "A cat is sitting on a wooden table next to a cup of coffee.",
    "What color is the car? The car is yellow and parked in the street.",
    "How many people are in the photo? There are three people smiling at the camera.",
    "Read the text in the chart and summarize what it shows.",
    "The quick brown fox jumps over the lazy dog. Hello world!",
    "Is there a dog in the picture? Yes, there is a small dog running on the grass.",
    "Explain the diagram step by step, then answer the question briefly.",
]

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]

MISTRAL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<<SYS>>\\n' + message['content'][0]['text'] + '\\n<</SYS>>\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> ' }}"
    "{% else %}{{ raise_exception('Only system, user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)

VICUNA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'][0]['text'] + ' ' }}"
    "{% elif message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image>\\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{{ ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'][0]['text'] + '</s>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


# llava-v1.6's five pinpoints, scaled from 336 px tiles to 32 px ones.
NEXT_PINPOINTS = ((32, 64), (64, 32), (64, 64), (96, 32), (32, 96))


@dataclass(frozen=True)
class TinyDims:
    """Dimensions every tiny checkpoint has: vision tower, decoder, vocabulary, and the weights' seed."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 3
    text_hidden: int = 64
    text_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 1024
    vocab_size: int = 400  # the tokenizer's vocabulary (and the model's, unless model_vocab_size is set)
    seed: int = 0
    # Real architectures (benchmark presets) differ from the tiny defaults in these; None keeps the tiny rule.
    text_intermediate: int | None = None  # default 2 x text_hidden
    vision_intermediate: int | None = None  # default 2 x vision_hidden
    vision_heads: int = 2
    model_vocab_size: int | None = None  # embedding rows beyond the tokenizer's, as real checkpoints pad theirs


@dataclass(frozen=True)
class TinySpec(TinyDims):
    """A tiny LLaVA-NeXT. Defaults give a Mistral decoder with `vision_feature_layer=-2`."""

    text_model: str = "mistral"  # "mistral" or "llama"
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"
    image_grid_pinpoints: tuple[tuple[int, int], ...] = NEXT_PINPOINTS
    sliding_window: int | None = None


# llava-onevision-qwen2's template (Qwen chat format, images then videos then text, `{% generation %}` blocks).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}"
    "{% endif %}{{ '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tokenizer(vocab_size: int, add_bos: bool = True):
    """Train a byte-level BPE tokenizer on the built-in corpus; with `add_bos`, its post-processor adds `<s>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    if add_bos:
        bos_id = tokenizer.token_to_id("<s>")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    return tokenizer


def _fast_tokenizer(vocab_size: int, add_bos: bool, **special_tokens):
    """The trained BPE wrapped as transformers' fast tokenizer, padding on the left for batched generation."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(vocab_size, add_bos=add_bos), **special_tokens)
    tokenizer.padding_side = "left"
    return tokenizer


def _text_dims(spec, tokenizer) -> dict:
    """Decoder dimensions shared by every tiny spec."""
    return dict(
        vocab_size=spec.model_vocab_size or len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate or spec.text_hidden * 2,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _clip_vision_config(spec: TinyDims):
    """The tiny CLIP tower of the LLaVA-NeXT families."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate or spec.vision_hidden * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )


def _save_model(model_class, config, tokenizer, seed: int, out_dir: Path) -> None:
    """Instantiate with random weights (seeded) and save, with the tokenizer's special ids in the generation config."""
    import torch

    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with quiet_transformers():
        model.save_pretrained(out_dir)


def build_tiny_checkpoint(out_dir: str | Path, spec: TinySpec = TinySpec()) -> Path:
    """Write a random-weight `LlavaNextForConditionalGeneration` checkpoint with its processor to `out_dir`."""
    from transformers import (
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
        MistralConfig,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = _fast_tokenizer(spec.vocab_size, True, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    text_kwargs = _text_dims(spec, tokenizer)
    if spec.text_model == "mistral":
        text_config = MistralConfig(sliding_window=spec.sliding_window, **text_kwargs)
        chat_template = MISTRAL_CHAT_TEMPLATE
    elif spec.text_model == "llama":
        text_config = LlamaConfig(**text_kwargs)
        chat_template = VICUNA_CHAT_TEMPLATE
    else:
        raise ValueError(f"unknown text model {spec.text_model!r}")

    vision_config = _clip_vision_config(spec)
    feature_layer = spec.vision_feature_layer
    config = LlavaNextConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_grid_pinpoints=[list(p) for p in spec.image_grid_pinpoints],
        vision_feature_layer=list(feature_layer) if isinstance(feature_layer, tuple) else feature_layer,
        vision_feature_select_strategy=spec.vision_feature_select_strategy,
        image_seq_length=(spec.image_size // spec.patch_size) ** 2,
    )
    _save_model(LlavaNextForConditionalGeneration, config, tokenizer, spec.seed, out_dir)

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        image_grid_pinpoints=[list(p) for p in spec.image_grid_pinpoints],
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy=spec.vision_feature_select_strategy,
        chat_template=chat_template,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(out_dir)
    return out_dir


@dataclass(frozen=True)
class TinyOnevisionSpec(TinyDims):
    """A tiny LLaVA-OneVision: SigLIP tower (5x5 patch grid, odd like the real 27x27), Qwen2 decoder."""

    tie_word_embeddings: bool = False
    image_size: int = 40
    image_grid_pinpoints: tuple[tuple[int, int], ...] = tuple((h, w) for h in (40, 80, 120) for w in (40, 80, 120))
    vision_aspect_ratio: str = "anyres_max_4"
    vision_layers: int = 2
    max_position_embeddings: int = 4096
    # Larger than the default 0.02: with tied embeddings and weak layers a random model only repeats the
    # prompt's last token, whatever the image; stronger layers make the output depend on the input.
    initializer_range: float = 0.2


def build_tiny_onevision_checkpoint(out_dir: str | Path, spec: TinyOnevisionSpec = TinyOnevisionSpec()) -> Path:
    """Write a random-weight `LlavaOnevisionForConditionalGeneration` checkpoint with its processor configs."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _fast_tokenizer(spec.vocab_size, False, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    text_config = Qwen2Config(
        **_text_dims(spec, tokenizer),
        tie_word_embeddings=spec.tie_word_embeddings,
        initializer_range=spec.initializer_range,
    )
    vision_config = SiglipVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate or spec.vision_hidden * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        vision_use_head=False,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=[list(p) for p in spec.image_grid_pinpoints],
        vision_aspect_ratio=spec.vision_aspect_ratio,
        tie_word_embeddings=spec.tie_word_embeddings,
    )
    _save_model(LlavaOnevisionForConditionalGeneration, config, tokenizer, spec.seed, out_dir)

    mean_std = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    size = {"height": spec.image_size, "width": spec.image_size}
    image_processor = LlavaOnevisionImageProcessorPil(
        size=size, image_grid_pinpoints=[list(p) for p in spec.image_grid_pinpoints], **mean_std
    )
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size=size, **mean_std),
        num_image_tokens=(spec.image_size // spec.patch_size) ** 2,
        vision_feature_select_strategy="full",
        chat_template=QWEN_CHAT_TEMPLATE,
        vision_aspect_ratio=spec.vision_aspect_ratio,
    )
    processor.save_pretrained(out_dir)
    return out_dir


# llava-hf/LLaVA-NeXT-Video-7B-hf's template (vicuna style; images, then videos, then text).
NEXT_VIDEO_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' ' }}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyNextVideoSpec(TinyDims):
    """A tiny LLaVA-NeXT-Video: CLIP tower, spatial pooling of video frames (average, max or conv), Llama decoder."""

    spatial_pool_mode: str = "average"
    spatial_pool_stride: int = 2
    image_grid_pinpoints: tuple[tuple[int, int], ...] = NEXT_PINPOINTS
    max_position_embeddings: int = 2048


def build_tiny_next_video_checkpoint(out_dir: str | Path, spec: TinyNextVideoSpec = TinyNextVideoSpec()) -> Path:
    """Write a random-weight `LlavaNextVideoForConditionalGeneration` checkpoint with its processor configs."""
    from transformers import (
        LlamaConfig,
        LlavaNextVideoConfig,
        LlavaNextVideoForConditionalGeneration,
        LlavaNextVideoProcessor,
        LlavaNextVideoVideoProcessor,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _fast_tokenizer(spec.vocab_size, True, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    vision_config = _clip_vision_config(spec)
    pinpoints = [list(p) for p in spec.image_grid_pinpoints]
    config = LlavaNextVideoConfig(
        vision_config=vision_config,
        text_config=LlamaConfig(**_text_dims(spec, tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        spatial_pool_mode=spec.spatial_pool_mode,
        spatial_pool_stride=spec.spatial_pool_stride,
        image_seq_length=(spec.image_size // spec.patch_size) ** 2,
    )
    _save_model(LlavaNextVideoForConditionalGeneration, config, tokenizer, spec.seed, out_dir)
    square = {"height": spec.image_size, "width": spec.image_size}
    processor = LlavaNextVideoProcessor(
        video_processor=LlavaNextVideoVideoProcessor(size={"shortest_edge": spec.image_size}, crop_size=square),
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": spec.image_size}, crop_size=square, image_grid_pinpoints=pinpoints
        ),
        tokenizer=tokenizer,
        chat_template=NEXT_VIDEO_CHAT_TEMPLATE,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(out_dir)
    return out_dir
