"""The editor: a diffusers FluxKontextPipeline loaded from a local directory, plus the few
operations the method needs on it (condition encoding, one velocity evaluation, the sigma grid,
latent packing and decoding).

The same loader takes the shipped tiny editor and a real FLUX.1-Kontext-dev directory; nothing is
ever fetched from the Hugging Face hub.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# Files a FluxKontextPipeline directory must have (the layout `save_pretrained` writes and the
# FLUX.1-Kontext-dev repository uses).
PIPELINE_SUBFOLDERS = (
    "transformer",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "scheduler",
)
# Optional sidecar written by our tiny-editor builder; a real Kontext directory has none.
EDITOR_CONFIG_FILE = "rcgrpo_editor.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EditCondition:
    """Everything the transformer needs besides the noisy target latents, for a batch of B edits."""

    prompt_embeds: torch.Tensor  # (B, L, joint_attention_dim): T5 tokens
    pooled_prompt_embeds: torch.Tensor  # (B, pooled_projection_dim): CLIP pooled
    text_ids: torch.Tensor  # (L, 3)
    text_mask: torch.Tensor  # (B, L) bool, True for instruction tokens (padding dropped)
    context_latents: torch.Tensor  # (B, N_ctx, D): the packed source-image latents (never perturbed)
    image_ids: torch.Tensor  # (N + N_ctx, 3): target ids then context ids (first coordinate 1)
    guidance: torch.Tensor | None  # (B,) embedded guidance scale, or None for non-distilled models
    height: int
    width: int

    def repeat(self, n: int) -> EditCondition:
        """The same condition for n candidates of one group (B must be 1).

        The rows are copies, not stride-0 views: CPU and GPU matmul kernels take another path for a
        broadcast batch and round bf16 differently, and a row must give the same velocity in the
        rollout's group as in the learner's micro-batch (`EditCondition.cat`, contiguous)."""
        if self.prompt_embeds.shape[0] != 1:
            raise ValueError(f"repeat() needs a single condition, got batch {self.prompt_embeds.shape[0]}")
        return EditCondition(
            prompt_embeds=self.prompt_embeds.repeat(n, 1, 1),
            pooled_prompt_embeds=self.pooled_prompt_embeds.repeat(n, 1),
            text_ids=self.text_ids,
            text_mask=self.text_mask.repeat(n, 1),
            context_latents=self.context_latents.repeat(n, 1, 1),
            image_ids=self.image_ids,
            guidance=None if self.guidance is None else self.guidance.repeat(n),
            height=self.height,
            width=self.width,
        )

    @staticmethod
    def cat(conds: list[EditCondition]) -> EditCondition:
        """One batch from several conditions of the same image size and text length (rows of a
        training micro-batch that mixes groups)."""
        first = conds[0]
        for other in conds[1:]:
            same_size = (other.height, other.width) == (first.height, first.width)
            if not same_size or other.text_ids.shape != first.text_ids.shape:
                raise ValueError(
                    f"conditions of {other.height}x{other.width} with {other.text_ids.shape[0]} text tokens and "
                    f"{first.height}x{first.width} with {first.text_ids.shape[0]} cannot share a batch"
                )
        return EditCondition(
            prompt_embeds=torch.cat([c.prompt_embeds for c in conds]),
            pooled_prompt_embeds=torch.cat([c.pooled_prompt_embeds for c in conds]),
            text_ids=first.text_ids,
            text_mask=torch.cat([c.text_mask for c in conds]),
            context_latents=torch.cat([c.context_latents for c in conds]),
            image_ids=first.image_ids,
            guidance=None if first.guidance is None else torch.cat([c.guidance for c in conds]),
            height=first.height,
            width=first.width,
        )


class Editor:
    """A FluxKontextPipeline and the operations on it that rollouts and training share."""

    def __init__(self, pipe, max_sequence_length: int = 512):
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length

    # -- handles -------------------------------------------------------------------------------
    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """Unpacked latent (h, w) for an image of this size; both must divide into 2x2 patches."""
        multiple = 2 * self.vae_scale_factor
        if height % multiple or width % multiple:
            raise ValueError(f"image size {height}x{width} must be a multiple of {multiple} for this editor")
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    # -- latents -------------------------------------------------------------------------------
    @staticmethod
    def pack(latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h/2 * w/2, 4C): Flux's 2x2 patch tokens."""
        b, c, h, w = latents.shape
        return (
            latents.view(b, c, h // 2, 2, w // 2, 2)
            .permute(0, 2, 4, 1, 3, 5)
            .reshape(b, (h // 2) * (w // 2), c * 4)
        )

    @staticmethod
    def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, N, 4C) -> (B, C, h, w), the inverse of `pack`."""
        b, _, d = tokens.shape
        return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> normalised unpacked latents (B, C, h, w), argmax mode as Kontext."""
        cfg = self.vae.config
        dist = self.vae.encode((images * 2 - 1).to(self.device, self.vae.dtype)).latent_dist
        return (dist.mode() - cfg.shift_factor) * cfg.scaling_factor

    def decode(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents (B, N, D) -> images (B, 3, H, W) in [0, 1] (float32)."""
        h, w = self.latent_size(height, width)
        cfg = self.vae.config
        latents = self.unpack(tokens, h, w) / cfg.scaling_factor + cfg.shift_factor
        images = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # -- conditioning --------------------------------------------------------------------------
    @torch.no_grad()
    def encode_condition(
        self, source: torch.Tensor, instructions: list[str], guidance_scale: float
    ) -> EditCondition:
        """Source images (B, 3, H, W) in [0, 1] and B instructions -> the transformer's condition."""
        if source.ndim != 4 or source.shape[1] != 3:
            raise ValueError(f"source images must be (B, 3, H, W), got {tuple(source.shape)}")
        if len(instructions) != source.shape[0]:
            raise ValueError(f"{len(instructions)} instructions for {source.shape[0]} source images")
        height, width = source.shape[-2:]
        h, w = self.latent_size(height, width)
        prompt_embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt=instructions,
            prompt_2=None,
            device=self.device,
            max_sequence_length=self.max_sequence_length,
        )
        tokens = self.pipe.tokenizer_2(
            instructions,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            return_tensors="pt",
        )
        context = self.pack(self.encode_images(source)).to(self.dtype)
        prepare_ids = self.pipe._prepare_latent_image_ids
        target_ids = prepare_ids(1, h // 2, w // 2, self.device, self.dtype)
        context_ids = prepare_ids(1, h // 2, w // 2, self.device, self.dtype)
        context_ids[..., 0] = 1  # Kontext marks the context image with a first coordinate of 1
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((source.shape[0],), guidance_scale, device=self.device, dtype=torch.float32)
        return EditCondition(
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled,
            text_ids=text_ids,
            text_mask=tokens.attention_mask.bool().to(self.device),
            context_latents=context,
            image_ids=torch.cat([target_ids, context_ids], dim=0),
            guidance=guidance,
            height=height,
            width=width,
        )

    # -- the flow ------------------------------------------------------------------------------
    def sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """The Kontext sigma grid (num_steps + 1 values, 1 -> 0) with its resolution-dependent shift."""
        from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift

        h, w = self.latent_size(height, width)
        scheduler = self.pipe.scheduler
        cfg = scheduler.config
        mu = calculate_shift(
            (h // 2) * (w // 2),
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu, device="cpu")
        return scheduler.sigmas.clone().float()

    def velocity(
        self, latents: torch.Tensor, sigma: torch.Tensor, cond: EditCondition, attention_kwargs=None
    ) -> torch.Tensor:
        """v_theta(x, sigma, c) for packed target latents (B, N, D); the context tokens are appended."""
        n = latents.shape[1]
        hidden = torch.cat([latents.to(self.dtype), cond.context_latents], dim=1)
        timestep = (sigma * 1000).to(self.dtype).expand(latents.shape[0]) / 1000
        out = self.transformer(
            hidden_states=hidden,
            timestep=timestep,
            guidance=cond.guidance,
            pooled_projections=cond.pooled_prompt_embeds,
            encoder_hidden_states=cond.prompt_embeds,
            txt_ids=cond.text_ids,
            img_ids=cond.image_ids,
            joint_attention_kwargs=attention_kwargs,
            return_dict=False,
        )[0]
        return out[:, :n]


def _editor_options(path: Path) -> dict:
    sidecar = path / EDITOR_CONFIG_FILE
    return json.loads(sidecar.read_text()) if sidecar.exists() else {}


def check_editor_dir(path: str | Path) -> Path:
    """`path` if it is a local FluxKontextPipeline directory; FileNotFoundError naming what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"editor directory {str(path)!r} does not exist; rcgrpo loads editors from local directories only "
            "(download FLUX.1-Kontext-dev yourself, then pass its path)"
        )
    missing = [name for name in PIPELINE_SUBFOLDERS if not (path / name).is_dir()]
    if missing or not (path / "model_index.json").exists():
        raise FileNotFoundError(
            f"editor directory {str(path)!r} is not a FluxKontextPipeline: missing "
            f"{', '.join(missing) or 'model_index.json'}"
        )
    return path


@contextmanager
def silenced(logger_name: str, *starts: str) -> Iterator[None]:
    """Drop the lines of a library's logger that start with one of `starts`: notices that are true of
    every rcgrpo run and so say nothing about this one."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(starts)

    logger = logging.getLogger(logger_name)
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def load_editor(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    max_sequence_length: int | None = None,
) -> Editor:
    """Load a local FluxKontextPipeline directory (tiny editor or FLUX.1-Kontext-dev) as an Editor.

    dtype defaults to bfloat16 on CUDA and float32 elsewhere. Nothing is downloaded: a path that is
    not an existing directory (a hub id, say) is refused.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    path = check_editor_dir(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    # importing the pipeline resolves its optional IP-Adapter image processors, which an editing run never
    # uses; without torchvision they fall back to their PIL versions, and transformers says so
    with silenced(
        "transformers.utils.import_utils", "`CLIPImageProcessor` requires", "`SiglipImageProcessor` requires"
    ):
        from diffusers import FluxKontextPipeline
    pipe = FluxKontextPipeline.from_pretrained(path, dtype=dtype, local_files_only=True)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.eval()
        module.requires_grad_(False)
    options = _editor_options(path)
    return Editor(pipe, max_sequence_length=max_sequence_length or options.get("max_sequence_length", 512))
