"""How far the trained LoRA moves the editor's velocity, at every step of the grid, inside and outside
the edit region: the diagnostic that shows whether steps the surrogate never trains (or the background
it never rewards) move anyway.

Along the trained editor's own ODE path (the sampler as evaluation runs it, LoRA on the steps
`cfg.lora_steps` says), at each grid index j:

    drift_in(j)  = sum_u w(u) ||v_theta(x_j, u) - v_ref(x_j, u)||^2 / sum_u w(u)
    drift_out(j) = the same with b(u), the token's share of background pixels,

per-element mean over the token dim, v_ref the base editor (LoRA off) at the same x_j.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rcgrpo.config import MethodConfig
from rcgrpo.data.sample import EditSample
from rcgrpo.editor import Editor
from rcgrpo.lora import base_weights
from rcgrpo.noise import latent_mask, token_background, token_weights
from rcgrpo.sampler import rollout


@torch.no_grad()
def velocity_drift(
    editor: Editor, samples: Sequence[EditSample], cfg: MethodConfig, seed: int = 0
) -> dict[str, list[float]]:
    """Mean over `samples` of drift_in(j) and drift_out(j) for j = 0..T-1: {"inside": [...], "outside":
    [...], "trained": [j, ...]} (the grid indices the surrogate trains). One sample at a time, its
    initial noise seeded by (seed, its index)."""
    inside, outside = torch.zeros(cfg.num_steps), torch.zeros(cfg.num_steps)
    for n, sample in enumerate(samples):
        cond = editor.encode_condition(sample.source[None], [sample.instruction], cfg.guidance_scale)
        h, w = editor.latent_size(cond.height, cond.width)
        mask_latent = latent_mask(sample.mask, (h, w), cfg.mask_dilation, cfg.mask_feather)
        w_in = token_weights(mask_latent).to(editor.device)
        w_out = token_background(sample.mask, (h, w)).to(editor.device)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + n)
        noise = torch.randn(1, editor.latent_channels, h, w, generator=generator)
        path = rollout(editor, cond, noise, cfg.num_steps, lora_steps=cfg.lora_step_indices, decode=False)
        for j in range(cfg.num_steps):
            x, sigma = path.states[j], path.sigmas[j].to(editor.device)
            v_theta = editor.velocity(x, sigma, cond)
            with base_weights(editor.transformer):
                v_ref = editor.velocity(x, sigma, cond)
            per_token = (v_theta.float() - v_ref.float()).pow(2).mean(dim=-1)[0]  # (N,)
            inside[j] += (per_token * w_in).sum().item() / max(w_in.sum().item(), 1e-12)
            outside[j] += (per_token * w_out).sum().item() / max(w_out.sum().item(), 1e-12)
    count = max(len(samples), 1)
    return {
        "inside": (inside / count).tolist(),
        "outside": (outside / count).tolist(),
        "trained": cfg.trained_steps,
    }
