"""A tiny, randomly initialised Llama 4 mixture-of-experts model, built from a config.

It has Llama 4's text architecture (`Llama4ForCausalLM`): mixture-of-experts
layers interleaved with dense ones, chunked local attention, layers without
RoPE, QK norm, and Llama 4's chat format. Its weights are random (a fixed seed,
so the same everywhere), so its text is noise; what it proves is that the
production code path loads, routes through experts and generates what
transformers generates for the same weights.

The tokenizer is SmolLM2's (vocabulary 49152) with Llama 4's special tokens
added; the CPU attention backend needs a head size of at least 32.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.errors import ModelError

SEED = 20261128

#: Llama 4's chat format: header tokens around each role, `<|eot|>` after each turn.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|header_start|>' + message['role'] + '<|header_end|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|eot|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|header_start|>assistant<|header_end|>\\n\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|header_start|>", "<|header_end|>", "<|eot|>", "<|image|>"]


def config_kwargs(vocab_size: int, bos: int, eos: int, pad: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,  # each expert's
        intermediate_size_mlp=256,  # the dense layers'
        head_dim=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,  # MoE every 2nd layer
        attention_chunk_size=128,
        no_rope_layer_interval=4,
        use_qk_norm=True,
        max_position_embeddings=4096,
        # Wider than the usual 0.02: random logits further apart, so greedy
        # choices rarely hinge on near-ties.
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        dtype="bfloat16",
    )


def _token_ids(tokenizer):
    """One special token's id (the tokenizer answers a list for a list)."""

    def token_id(token: str) -> int:
        found = tokenizer.convert_tokens_to_ids(token)
        if not isinstance(found, int):
            raise ModelError(f"the tokenizer has no single id for {token!r}")
        return found

    return token_id


def _tokenizer_and_text_config(tokenizer_source: Path, extra_tokens: list[str]):
    """SmolLM2's tokenizer with Llama 4's special tokens and chat format, and the text config sized to it."""
    from transformers import AutoTokenizer, Llama4TextConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS + extra_tokens})
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = "<|begin_of_text|>", "<|eot|>", "<|end_of_text|>"
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = _token_ids(tokenizer)
    vocab = -(-len(tokenizer) // 64) * 64  # padded, as real checkpoints are
    text = Llama4TextConfig(**config_kwargs(vocab, ids("<|begin_of_text|>"), ids("<|eot|>"), ids("<|end_of_text|>")))
    return tokenizer, text


def _init_and_save(model_cls, config, text_config, tokenizer, out: Path):
    """Random weights from the fixed seed, saved in bf16 with the tokenizer."""
    import torch
    from transformers import GenerationConfig

    torch.manual_seed(SEED)
    model = model_cls(config).to(torch.bfloat16).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=text_config.bos_token_id, eos_token_id=text_config.eos_token_id,
        pad_token_id=text_config.pad_token_id,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build(out: Path, *, tokenizer_source: Path) -> None:
    """Write the checkpoint (config, bf16 safetensors, tokenizer, chat template) into `out`."""
    from transformers import Llama4ForCausalLM

    tokenizer, config = _tokenizer_and_text_config(tokenizer_source, [])
    config.architectures = ["Llama4ForCausalLM"]
    _init_and_save(Llama4ForCausalLM, config, config, tokenizer, out)


#: The multimodal variant's image tokens, as Llama 4's processor names them.
IMAGE_TOKENS = ["<|image_start|>", "<|image_end|>", "<|patch|>", "<|tile_x_separator|>", "<|tile_y_separator|>"]
IMAGE_SIZE = 336  # one 336x336 tile of 14-pixel patches: 576 patches, 144 tokens after pixel shuffle


def build_multimodal(out: Path, *, tokenizer_source: Path) -> None:
    """The same text model with a tiny vision encoder and projector (`Llama4ForConditionalGeneration`).

    Its image processor needs torchvision, so this runs where vLLM's multimodal
    Llama 4 class runs: on a GPU machine with the CUDA builds (infra/gpu-check/).
    """
    from transformers import (
        Llama4Config,
        Llama4ForConditionalGeneration,
        Llama4ImageProcessor,
        Llama4Processor,
        Llama4VisionConfig,
    )

    tokenizer, text = _tokenizer_and_text_config(tokenizer_source, IMAGE_TOKENS)
    ids = _token_ids(tokenizer)
    vision = Llama4VisionConfig(
        hidden_size=64,
        intermediate_size=256,  # hidden x 4: the channels after pixel shuffle
        num_hidden_layers=2,
        num_attention_heads=2,  # head size 32
        image_size=IMAGE_SIZE,
        patch_size=14,
        pixel_shuffle_ratio=0.5,
        vision_output_dim=128,
        projector_input_dim=128,
        projector_output_dim=128,
    )
    config = Llama4Config(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        boi_token_index=ids("<|image_start|>"),
        eoi_token_index=ids("<|image_end|>"),
        image_token_index=ids("<|patch|>"),
    )
    config.architectures = ["Llama4ForConditionalGeneration"]

    _init_and_save(Llama4ForConditionalGeneration, config, text, tokenizer, out)
    image_processor = Llama4ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, max_patches=1)
    processor = Llama4Processor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                pixel_shuffle_ratio=0.5, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out)
