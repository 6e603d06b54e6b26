"""Supervised pretraining of the tiny Kontext editor on ShapesEdit, so RL starts from an editor that
is partly competent (it copies the scene and roughly follows instructions) and has headroom left.

Two stages, both reproducible from one seed on CPU:
1. the VAE learns to reconstruct ShapesEdit images (L1 + a small KL term), then its latent shift and
   scale are set from the data so normalised latents have zero mean and unit variance (as FLUX's);
2. the transformer learns the rectified flow from noise to the target's latents, conditioned on the
   source image's latents (Kontext context tokens) and the instruction: x_sigma = (1 - sigma) x_0 +
   sigma z, target velocity v = z - x_0 (the direction `rcgrpo.sampler.euler_step` integrates).
The text encoders keep their random initialisation: their token features are distinct per word,
which is all the transformer needs to read the instruction.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rcgrpo.config import MethodConfig
from rcgrpo.data.shapes import ShapesEditConfig, generate_shapes_edit
from rcgrpo.editor import EditCondition, Editor
from rcgrpo.tiny_editor import TinyEditorSpec, build_tiny_pipeline, save_editor


@dataclass
class PretrainConfig:
    spec: TinyEditorSpec = field(default_factory=TinyEditorSpec)
    seed: int = 0
    image_size: int = 64
    train_samples: int = 4000
    vae_steps: int = 3000
    vae_batch_size: int = 64
    vae_learning_rate: float = 1e-3
    kl_weight: float = 1e-6
    flow_steps: int = 8000
    flow_batch_size: int = 32
    flow_learning_rate: float = 5e-4
    guidance_scale: float = 2.5
    device: str = "cpu"


def _stack(samples, attribute: str) -> torch.Tensor:
    return torch.stack([getattr(s, attribute) for s in samples])


def train_vae(vae, images: torch.Tensor, cfg: PretrainConfig, rng: np.random.Generator) -> list[float]:
    """Reconstruction training; returns the loss curve."""
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_learning_rate)
    losses = []
    for _ in tqdm(range(cfg.vae_steps), desc="pretrain vae", unit="step"):
        batch = images[rng.integers(0, len(images), cfg.vae_batch_size)].to(cfg.device) * 2 - 1
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.mode()).sample
        loss = F.l1_loss(recon, batch) + cfg.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def normalise_vae_latents(vae, images: torch.Tensor) -> None:
    """Set shift_factor/scaling_factor so (z - shift) * scale has zero mean and unit variance."""
    latents = torch.cat(
        [vae.encode(batch.to(vae.device) * 2 - 1).latent_dist.mode() for batch in images.split(256)]
    )
    vae.register_to_config(shift_factor=latents.mean().item(), scaling_factor=1.0 / latents.std().item())


def train_flow(editor: Editor, samples, cfg: PretrainConfig, rng: np.random.Generator) -> list[float]:
    """Rectified-flow training of the transformer on (source, instruction) -> target; returns the loss curve."""
    with torch.no_grad():
        conds = [
            editor.encode_condition(
                _stack(chunk, "source"), [s.instruction for s in chunk], cfg.guidance_scale
            )
            for chunk in (samples[i : i + 256] for i in range(0, len(samples), 256))
        ]
        targets = torch.cat(
            [
                editor.pack(editor.encode_images(_stack(samples[i : i + 256], "target")))
                for i in range(0, len(samples), 256)
            ]
        )
    prompt_embeds = torch.cat([c.prompt_embeds for c in conds])
    pooled = torch.cat([c.pooled_prompt_embeds for c in conds])
    context = torch.cat([c.context_latents for c in conds])
    text_mask = torch.cat([c.text_mask for c in conds])
    first = conds[0]

    transformer = editor.transformer
    transformer.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=cfg.flow_learning_rate, weight_decay=0.0)
    # linear warm-up over the first 5% of steps, then cosine decay to zero
    warmup = max(1, cfg.flow_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            min(1.0, (step + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(step / cfg.flow_steps, 1.0)))
        ),
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    losses = []
    for _ in tqdm(range(cfg.flow_steps), desc="pretrain transformer", unit="step"):
        idx = torch.from_numpy(rng.integers(0, len(samples), cfg.flow_batch_size))
        x0 = targets[idx]
        z = torch.randn(x0.shape, generator=generator).to(x0.device)
        sigma = torch.rand(len(idx), generator=generator).to(x0.device)
        x_sigma = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * z
        cond = EditCondition(
            prompt_embeds=prompt_embeds[idx],
            pooled_prompt_embeds=pooled[idx],
            text_ids=first.text_ids,
            text_mask=text_mask[idx],
            context_latents=context[idx],
            image_ids=first.image_ids,
            guidance=torch.full((len(idx),), cfg.guidance_scale, device=x0.device),
            height=first.height,
            width=first.width,
        )
        v = editor.velocity(x_sigma, sigma, cond)
        loss = F.mse_loss(v, z - x0)  # v = dx/dsigma along the straight path
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    transformer.eval().requires_grad_(False)
    return losses


def pretrain(out_dir: str | Path, cfg: PretrainConfig) -> tuple[Path, dict]:
    """Train the tiny editor from scratch and save it; returns its directory and training facts."""
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    samples = generate_shapes_edit(
        cfg.train_samples, split="train", seed=cfg.seed, config=ShapesEditConfig(size=cfg.image_size)
    )
    pipe = build_tiny_pipeline(cfg.spec).to(cfg.device)
    images = torch.cat([_stack(samples, "source"), _stack(samples, "target")])
    vae_losses = train_vae(pipe.vae, images, cfg, np.random.default_rng(cfg.seed))
    normalise_vae_latents(pipe.vae, images)
    editor = Editor(pipe, max_sequence_length=cfg.spec.max_sequence_length)
    flow_losses = train_flow(editor, samples, cfg, np.random.default_rng(cfg.seed + 1))
    path = save_editor(pipe.to("cpu"), out_dir, cfg.spec)
    facts = {
        "seconds": round(time.perf_counter() - started, 1),
        "vae_final_loss": float(np.mean(vae_losses[-50:])),
        "flow_final_loss": float(np.mean(flow_losses[-50:])),
        "device": torch.cuda.get_device_name()
        if cfg.device.startswith("cuda")
        else f"cpu ({torch.get_num_threads()} threads)",
    }
    return path, facts


def model_card_scores(editor_dir: str | Path, cfg: PretrainConfig, num_samples: int) -> dict[str, dict]:
    """ShapesEdit held-out scores of the pretrained editor, an untrained one and the ground truth."""
    from rcgrpo.editor import load_editor
    from rcgrpo.evaluate import evaluate, score_edits

    samples = generate_shapes_edit(
        num_samples, split="test", seed=cfg.seed, config=ShapesEditConfig(size=cfg.image_size)
    )
    untrained = Editor(build_tiny_pipeline(cfg.spec), max_sequence_length=cfg.spec.max_sequence_length)
    return {
        "untrained": evaluate(untrained, samples, compbench=False).overall,
        "pretrained": evaluate(load_editor(editor_dir), samples, compbench=False).overall,
        "ground truth": score_edits(samples, [s.target for s in samples], compbench=False).overall,
    }


def write_model_card(
    editor_dir: str | Path, cfg: PretrainConfig, facts: dict, command: str, scores: dict, num_samples: int
) -> Path:
    """README.md beside the weights: how it was made and how well it edits (scores: model_card_scores)."""
    metrics = ("region_adherence", "background_psnr", "background_ssim")
    rows = "\n".join(
        f"| {name} | " + " | ".join(f"{s[m]:.4f}" for m in metrics) + " |" for name, s in scores.items()
    )
    params = sum(p.numel() for p in build_tiny_pipeline(cfg.spec).transformer.parameters())
    card = f"""# tiny-kontext-shapes

A tiny FluxKontextPipeline (same architecture family as FLUX.1-Kontext-dev, {params:,} transformer
parameters) pretrained by rcgrpo on ShapesEdit with supervised flow matching. It is the base editor of
every default rcgrpo command. It is only partly competent on purpose: RL has headroom.

- command: `{command}`
- seed: {cfg.seed}; training samples: {cfg.train_samples}; VAE steps: {cfg.vae_steps}; transformer steps: {cfg.flow_steps}
- training time: {facts["seconds"]} s on {facts["device"]}
- final losses: VAE {facts["vae_final_loss"]:.4f}, flow {facts["flow_final_loss"]:.4f}

## ShapesEdit held-out scores ({num_samples} test-split samples, {MethodConfig().num_steps} Euler steps)

| editor | region adherence | background PSNR (dB) | background SSIM |
|---|---|---|---|
{rows}
"""
    path = Path(editor_dir) / "README.md"
    path.write_text(card)
    (Path(editor_dir) / "model_card.json").write_text(
        json.dumps({"facts": facts, "scores": scores, "command": command}, indent=2)
    )
    return path
