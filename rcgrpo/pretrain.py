"""Supervised pretraining of the tiny Kontext editor on ShapesEdit, so RL starts from an editor that
is partly competent (it copies the scene and roughly follows instructions) and has headroom left.

Two stages, both reproducible from one seed on CPU:
1. the VAE learns to reconstruct ShapesEdit images (L1 + a small KL term), then its latent shift and
   scale are set from the data so normalised latents have zero mean and unit variance (as FLUX's);
2. the transformer learns the rectified flow from noise to the target's latents, conditioned on the
   source image's latents (Kontext context tokens) and the instruction: x_sigma = (1 - sigma) x_0 +
   sigma z, target velocity v = z - x_0 (the direction `rcgrpo.sampler.euler_step` integrates).
By default the text encoders keep their random initialisation (their token features are distinct per
word); with `train_text_encoders` the flow loss also trains them, so the instruction's colour and
shape words get features the transformer can read.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from rcgrpo.config import ConfigSection, MethodConfig
from rcgrpo.data.shapes import ShapesEditConfig, generate_shapes_edit
from rcgrpo.editor import EditCondition, Editor
from rcgrpo.noise import latent_mask, token_weights
from rcgrpo.tiny_editor import TinyEditorSpec, build_tiny_pipeline, save_editor

# The shipped editor's transformer: 3 dual-stream + 3 single-stream blocks of 6 heads x 16. The
# smaller TinyEditorSpec default (2 + 2 blocks of 4 x 16) never learned to recolour, add or replace
# on CPU budgets; this one does, partly.
SHIPPED_SPEC = TinyEditorSpec(
    num_layers=3, num_single_layers=3, num_attention_heads=6, attention_head_dim=16, axes_dims_rope=(4, 6, 6)
)


class PretrainConfig(ConfigSection):
    """What `rcgrpo pretrain` trains; its flags are these fields (--flow-steps is flow_steps)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    spec: TinyEditorSpec = Field(default_factory=lambda: SHIPPED_SPEC)
    seed: int = 0
    image_size: int = Field(64, ge=8)
    train_samples: int = Field(4000, ge=1, description="ShapesEdit samples generated for training")
    vae_from: str | None = Field(
        None, description="reuse the VAE of this trained editor directory (skips the VAE stage)"
    )
    # a shipped editor is refined this way without repeating its training
    init_from: str | None = Field(
        None,
        description="continue training this trained editor directory (its VAE, text encoders and transformer)",
    )
    vae_steps: int = Field(3000, ge=0)
    vae_batch_size: int = Field(64, ge=1)
    vae_learning_rate: float = Field(1e-3, gt=0)
    kl_weight: float = Field(1e-6, ge=0)
    flow_steps: int = Field(9000, ge=1)
    flow_batch_size: int = Field(32, ge=1)
    flow_learning_rate: float = Field(2e-3, gt=0)
    # cosine cycles with warm restarts (SGDR), so a run can stop at any cycle's editor
    flow_cycle_steps: int = Field(
        1500,
        ge=0,
        description="steps per cosine learning-rate cycle; the editor is saved and scored after each (0: one cycle)",
    )
    guidance_scale: float = 2.5
    # the region is ~5% of an image: without extra weight the loss (and the capacity) goes to copying the
    # background
    edit_loss_weight: float = Field(
        2.0, ge=0, description="extra weight of the edit region's tokens in the flow loss"
    )
    # logit_normal (sigmoid of a standard normal) spends the steps on the middle of the path, where the
    # edit is decided
    sigma_sampling: Literal["uniform", "logit_normal"] = Field(
        "logit_normal", description="where sigma is drawn: uniform on [0, 1] or logit_normal"
    )
    # trained in eval mode (no dropout); False keeps their random features, distinct per word but never
    # shaped for the transformer to read
    train_text_encoders: bool = Field(
        False, description="also train the CLIP and T5 text encoders with the flow loss"
    )
    text_encoder_learning_rate: float = Field(1e-3, gt=0)
    # a device run has a fixed time, not a fixed step count: stopping at a cycle's end keeps an annealed editor
    flow_seconds: float | None = Field(
        None,
        gt=0,
        description="stop at the last learning-rate cycle's end that fits this many seconds of transformer training",
    )
    device: str = Field("cpu", description="cpu or cuda")

    @model_validator(mode="after")
    def _one_start(self):
        if self.vae_from is not None and self.init_from is not None:
            raise ValueError("give vae_from or init_from, not both (init_from brings its own VAE)")
        return self


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


def train_flow(
    editor: Editor,
    samples,
    cfg: PretrainConfig,
    rng: np.random.Generator,
    on_cycle_end: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Rectified-flow training of the transformer on (source, instruction) -> target; returns the loss
    curve. `on_cycle_end(step, recent loss)` is called (in eval mode) at the end of every LR cycle."""
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
    # per-token loss weights 1 + edit_loss_weight * m(u), m the editing mask at token resolution
    h, w = editor.latent_size(*samples[0].source.shape[-2:])
    token_masks = torch.stack([token_weights(latent_mask(s.mask, (h, w))) for s in samples])
    loss_weights = (1 + cfg.edit_loss_weight * token_masks).to(targets.device)
    prompt_embeds = torch.cat([c.prompt_embeds for c in conds])
    pooled = torch.cat([c.pooled_prompt_embeds for c in conds])
    context = torch.cat([c.context_latents for c in conds])
    text_mask = torch.cat([c.text_mask for c in conds])
    first = conds[0]

    transformer = editor.transformer
    transformer.train().requires_grad_(True)
    param_groups = [{"params": list(transformer.parameters()), "lr": cfg.flow_learning_rate}]
    instructions = [s.instruction for s in samples]
    if cfg.train_text_encoders:
        encoders = [editor.pipe.text_encoder, editor.pipe.text_encoder_2]
        for encoder in encoders:
            encoder.eval().requires_grad_(True)
        encoder_params = [p for encoder in encoders for p in encoder.parameters()]
        param_groups.append({"params": encoder_params, "lr": cfg.text_encoder_learning_rate})
    trained = [p for group in param_groups for p in group["params"]]
    optimizer = torch.optim.AdamW(param_groups, weight_decay=0.0)
    # each cycle: linear warm-up over its first 5% of steps, then cosine decay to zero (SGDR)
    cycle = cfg.flow_cycle_steps or cfg.flow_steps
    warmup = max(1, cycle // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            min(1.0, (step % cycle + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * (step % cycle) / cycle))
        ),
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    losses = []
    started = time.perf_counter()
    for step in tqdm(range(1, cfg.flow_steps + 1), desc="pretrain transformer", unit="step"):
        idx = torch.from_numpy(rng.integers(0, len(samples), cfg.flow_batch_size))
        x0 = targets[idx]
        z = torch.randn(x0.shape, generator=generator).to(x0.device)
        if cfg.sigma_sampling == "logit_normal":
            sigma = torch.sigmoid(torch.randn(len(idx), generator=generator)).to(x0.device)
        else:
            sigma = torch.rand(len(idx), generator=generator).to(x0.device)
        x_sigma = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * z
        batch_prompt, batch_pooled = prompt_embeds[idx], pooled[idx]
        if cfg.train_text_encoders:  # the instruction's features, with gradient into the encoders
            batch_prompt, batch_pooled, _ = editor.pipe.encode_prompt(
                prompt=[instructions[i] for i in idx.tolist()],
                prompt_2=None,
                device=x0.device,
                max_sequence_length=editor.max_sequence_length,
            )
        cond = EditCondition(
            prompt_embeds=batch_prompt,
            pooled_prompt_embeds=batch_pooled,
            text_ids=first.text_ids,
            text_mask=text_mask[idx],
            context_latents=context[idx],
            image_ids=first.image_ids,
            guidance=torch.full((len(idx),), cfg.guidance_scale, device=x0.device),
            height=first.height,
            width=first.width,
        )
        v = editor.velocity(x_sigma, sigma, cond)
        # v = dx/dsigma along the straight path; tokens weighted by 1 + edit_loss_weight * m(u)
        weight = loss_weights[idx]
        loss = ((v - (z - x0)).pow(2).mean(dim=-1) * weight).sum() / weight.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % cycle == 0 or step == cfg.flow_steps:
            if on_cycle_end is not None:
                transformer.eval()
                on_cycle_end(step, float(np.mean(losses[-50:])))
                transformer.train()
            elapsed = time.perf_counter() - started
            if cfg.flow_seconds is not None and elapsed * (step + cycle) / step > cfg.flow_seconds:
                tqdm.write(
                    f"step {step}: stopping, another cycle would pass flow_seconds {cfg.flow_seconds:g}"
                )
                break
    transformer.eval().requires_grad_(False)
    if cfg.train_text_encoders:
        for encoder in encoders:
            encoder.requires_grad_(False)
    return losses


def pretrain(out_dir: str | Path, cfg: PretrainConfig, eval_samples: int = 64) -> tuple[Path, dict]:
    """Train the tiny editor and save it; returns its directory and training facts.

    At the end of every learning-rate cycle the editor so far is saved under out_dir/cycles/step_N and
    scored on `eval_samples` held-out samples (facts["cycles"]), so a long run shows where it stands.
    """
    from rcgrpo.editor import load_editor
    from rcgrpo.evaluate import evaluate

    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    samples = generate_shapes_edit(
        cfg.train_samples, split="train", seed=cfg.seed, config=ShapesEditConfig(size=cfg.image_size)
    )
    vae_losses = []
    if cfg.init_from is not None:  # VAE, text encoders and transformer all continue
        pipe = load_editor(cfg.init_from, device=cfg.device, dtype=torch.float32).pipe
    else:
        pipe = build_tiny_pipeline(cfg.spec).to(cfg.device)
        if cfg.vae_from is not None:
            pipe.vae = load_editor(cfg.vae_from, device=cfg.device, dtype=torch.float32).vae
        else:
            images = torch.cat([_stack(samples, "source"), _stack(samples, "target")])
            vae_losses = train_vae(pipe.vae, images, cfg, np.random.default_rng(cfg.seed))
            normalise_vae_latents(pipe.vae, images)
    editor = Editor(pipe, max_sequence_length=cfg.spec.max_sequence_length)
    held_out = generate_shapes_edit(
        eval_samples, split="test", seed=cfg.seed, config=ShapesEditConfig(size=cfg.image_size)
    )
    cycles = []

    def checkpoint(step: int, loss: float) -> None:
        save_editor(pipe, Path(out_dir) / "cycles" / f"step_{step:06d}", cfg.spec)
        scores = evaluate(editor, held_out, compbench=False, batch_size=8)
        cycles.append({"step": step, "flow_loss": loss, **scores.overall, "tasks": scores.tasks})
        tqdm.write(
            f"step {step}: flow loss {loss:.4f}, held-out region adherence "
            f"{scores.overall['region_adherence']:.3f}, background PSNR {scores.overall['background_psnr']:.2f}"
        )

    flow_losses = train_flow(
        editor, samples, cfg, np.random.default_rng(cfg.seed + 1), checkpoint if eval_samples else None
    )
    path = save_editor(pipe.to("cpu"), out_dir, cfg.spec)
    facts = {
        "seconds": round(time.perf_counter() - started, 1),
        "vae_final_loss": float(np.mean(vae_losses[-50:])) if vae_losses else None,
        "vae_from": cfg.vae_from,
        "init_from": cfg.init_from,
        "flow_steps_trained": len(flow_losses),
        "flow_final_loss": float(np.mean(flow_losses[-50:])),
        "device": torch.cuda.get_device_name()
        if cfg.device.startswith("cuda")
        else f"cpu ({torch.get_num_threads()} threads)",
        "cycles": cycles,
    }
    return path, facts


def model_card_scores(
    editor_dir: str | Path, cfg: PretrainConfig, num_samples: int, method: MethodConfig
) -> dict:
    """ShapesEdit held-out scores of the pretrained editor, an untrained one and the ground truth
    ("editors"), the pretrained editor's region adherence per task ("tasks"), and its within-group
    spread per task under `method`'s exploration ("spread", `within_group_spread`; pass the default
    run's method)."""
    from rcgrpo.editor import load_editor
    from rcgrpo.evaluate import evaluate, score_edits, within_group_spread

    samples = generate_shapes_edit(
        num_samples, split="test", seed=cfg.seed, config=ShapesEditConfig(size=cfg.image_size)
    )
    untrained = Editor(build_tiny_pipeline(cfg.spec), max_sequence_length=cfg.spec.max_sequence_length)
    pretrained = load_editor(editor_dir)
    scores = evaluate(pretrained, samples, compbench=False)
    return {
        "editors": {
            "untrained": evaluate(untrained, samples, compbench=False).overall,
            "pretrained": scores.overall,
            "ground truth": score_edits(samples, [s.target for s in samples], compbench=False).overall,
        },
        "tasks": {task: metrics["region_adherence"] for task, metrics in scores.tasks.items()},
        "spread": within_group_spread(pretrained, samples, method),
        "spread_method": {"group_size": method.group_size, "s_in": method.s_in, "s_out": method.s_out},
    }


def write_model_card(
    editor_dir: str | Path, cfg: PretrainConfig, facts: dict, command: str, scores: dict, num_samples: int
) -> Path:
    """README.md beside the weights: how it was made and how well it edits (scores: model_card_scores)."""
    from rcgrpo.evaluate import spread_table

    metrics = ("region_adherence", "background_psnr", "background_ssim")
    rows = "\n".join(
        f"| {name} | " + " | ".join(f"{s[m]:.4f}" for m in metrics) + " |"
        for name, s in scores["editors"].items()
    )
    kinds = "\n".join(f"| {task} | {adherence:.3f} |" for task, adherence in scores["tasks"].items())
    params = sum(p.numel() for p in build_tiny_pipeline(cfg.spec).transformer.parameters())
    explored = scores["spread_method"]
    if facts.get("init_from"):
        vae = f"continued from `{facts['init_from']}` (its VAE, text encoders and transformer)"
    elif facts.get("vae_from"):
        vae = f"VAE: reused from `{facts['vae_from']}`"
    else:
        vae = f"VAE steps: {cfg.vae_steps} (final loss {facts['vae_final_loss']:.4f})"
    card = f"""# tiny-kontext-shapes

A tiny FluxKontextPipeline (same architecture family as FLUX.1-Kontext-dev, {params:,} transformer
parameters) pretrained by rcgrpo on ShapesEdit with supervised flow matching. It is the base editor of
every default rcgrpo command. It is only partly competent on purpose: RL has headroom.

- command: `{command}`
- seed: {cfg.seed}; training samples: {cfg.train_samples}; {vae}; transformer steps: {facts["flow_steps_trained"]}
- training time: {facts["seconds"]} s on {facts["device"]}
- final flow loss: {facts["flow_final_loss"]:.4f}

## ShapesEdit held-out scores ({num_samples} test-split samples, {MethodConfig().num_steps} Euler steps)

| editor | region adherence | background PSNR (dB) | background SSIM |
|---|---|---|---|
{rows}

## By kind, and what RL has to select on

Region adherence of one edit per sample:

| kind | region adherence |
|---|---|
{kinds}

RDP groups of the same samples as the default run samples them (G = {explored["group_size"]}, s_in =
{explored["s_in"]}, s_out = {explored["s_out"]}): the candidates' mean adherence, the mean of each
group's best (what selection alone could reach), the within-group std of adherence, the share of candidates that succeed (adherence >= 0.5) and the share of groups holding
at least one success. The update can select a success only in a group that holds one; a kind whose
groups never do gives GRPO nothing to learn the edit from.

{spread_table(scores["spread"])}"""
    path = Path(editor_dir) / "README.md"
    path.write_text(card)
    (Path(editor_dir) / "model_card.json").write_text(
        json.dumps({"facts": facts, "scores": scores, "command": command}, indent=2)
    )
    return path
