"""A tiny FluxKontextPipeline built from configs, offline and deterministically.

Same architecture family as FLUX.1-Kontext-dev (MMDiT with dual- and single-stream blocks, CLIP + T5
text encoders, a KL VAE, Kontext's context tokens), shrunk so rollouts and training run on 2 CPU
cores. Tokenizers are built in memory from a hand-written vocabulary: training a tokenizer is not
deterministic, and nothing may be downloaded.
"""

from __future__ import annotations

import json
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rcgrpo.editor import EDITOR_CONFIG_FILE

# Whole-word tokens for the words editing instructions use most; anything else falls back to
# characters, so every lowercase ASCII text tokenizes.
WORDS = (
    "a an the of to in on into with and or it its this that at by from as is be make turn change "
    "replace remove delete erase add put place insert paint colour color recolour recolor swap "
    "instead please now so becomes become take away get rid draw new small large big little tiny "
    "red green blue yellow orange purple magenta cyan white black gray grey pink brown "
    "circle square triangle star cross diamond ring hexagon shape object one top bottom left right "
    "middle center centre corner background scene image picture photo"
).split()
# The pretrained tiny editor shipped in the repo (`rcgrpo pretrain` writes it); every default uses it.
SHIPPED_EDITOR_DIR = Path(__file__).parent / "assets" / "tiny_kontext_shapes"
CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
T5_SPECIALS = ("<pad>", "</s>", "<unk>")


@dataclass
class TinyEditorSpec:
    """Sizes of the tiny editor; every field is a config option of `rcgrpo pretrain`."""

    latent_channels: int = 8
    vae_block_out_channels: tuple[int, ...] = (16, 32, 32)  # 3 levels: 4x spatial compression
    vae_layers_per_block: int = 1
    num_layers: int = 2  # dual-stream (MMDiT) blocks
    num_single_layers: int = 2
    num_attention_heads: int = 4
    attention_head_dim: int = 16
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)  # sums to attention_head_dim
    text_dim: int = 32  # T5 d_model = joint_attention_dim; CLIP hidden = pooled_projection_dim
    text_layers: int = 2
    max_sequence_length: int = 32
    seed: int = 0
    extra: dict = field(default_factory=dict)


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    symbols = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab: dict[str, int] = {}
    for token in (*symbols, *(s + "</w>" for s in symbols)):
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            if (merged, piece) not in merges:
                merges.append((merged, piece))
            merged += piece
            vocab.setdefault(merged, len(vocab))
    for token in CLIP_SPECIALS:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=77,
    )


def _t5_tokenizer(max_length: int):
    from transformers import T5TokenizerFast

    pieces = [(t, 0.0) for t in T5_SPECIALS]
    pieces += [("\u2581" + w, -1.0) for w in WORDS]
    pieces += [("\u2581", -4.0)]
    pieces += [(c, -6.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_length)


def build_tiny_pipeline(spec: TinyEditorSpec | None = None):
    """A randomly initialised tiny FluxKontextPipeline, every module in eval mode."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxKontextPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    spec = spec or TinyEditorSpec()
    if sum(spec.axes_dims_rope) != spec.attention_head_dim:
        raise ValueError(
            f"axes_dims_rope {spec.axes_dims_rope} must sum to attention_head_dim {spec.attention_head_dim}"
        )
    torch.manual_seed(spec.seed)
    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer(spec.max_sequence_length)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_dim,
            intermediate_size=spec.text_dim * 2,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=spec.text_dim,
            d_kv=spec.text_dim // 2,
            d_ff=spec.text_dim * 2,
            num_layers=spec.text_layers,
            num_heads=2,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    levels = len(spec.vae_block_out_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=spec.vae_block_out_channels,
        layers_per_block=spec.vae_layers_per_block,
        latent_channels=spec.latent_channels,
        norm_num_groups=8,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0,
        scaling_factor=1.0,
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * spec.latent_channels,
        num_layers=spec.num_layers,
        num_single_layers=spec.num_single_layers,
        attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads,
        joint_attention_dim=spec.text_dim,
        pooled_projection_dim=spec.text_dim,
        guidance_embeds=True,
        axes_dims_rope=spec.axes_dims_rope,
    )
    # FLUX.1's scheduler settings: resolution-dependent (dynamic) shift of the sigma grid.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxKontextPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    for module in (transformer, vae, text_encoder, text_encoder_2):
        module.eval()
    return pipe


def save_editor(pipe, path: str | Path, spec: TinyEditorSpec) -> Path:
    """`save_pretrained` layout plus the sidecar that records the spec and T5 sequence length."""
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    sidecar = {"max_sequence_length": spec.max_sequence_length, "tiny_editor_spec": asdict(spec)}
    (path / EDITOR_CONFIG_FILE).write_text(json.dumps(sidecar, indent=2) + "\n")
    return path


def build_tiny_editor(path: str | Path, spec: TinyEditorSpec | None = None) -> Path:
    """Build, save and return the directory of a randomly initialised tiny editor."""
    spec = spec or TinyEditorSpec()
    return save_editor(build_tiny_pipeline(spec), path, spec)
