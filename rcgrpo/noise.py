"""Initial noise for a rollout group: region-decoupled perturbation (RDP, docs/METHOD.md section 3).

A group shares one base noise z* and perturbs it per candidate with strength s(u) per latent location:

    z_i(u) = sqrt(1 - s(u)^2) z*(u) + s(u) d_i(u),   s(u) = s_in m(u) + s_out (1 - m(u)),

with m the editing mask at latent resolution and d_i ~ N(0, I). Since (1 - s^2) + s^2 = 1, every element
stays N(0, 1) whatever s is. Inside the mask candidates differ (s_in = 0.3); outside they share (nearly)
the same noise (s_out = 0 to 0.05), so background effects cancel in the group standardisation. Global
(Neighbor GRPO) perturbation is the special case s_in = s_out.

Everything here works on unpacked target latents (C, h, w), i.e. before `Editor.pack`. The context
(source-image) tokens are not part of the initial latents at all - they are appended by
`Editor.velocity` from the condition - so they are never perturbed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rcgrpo.config import MethodConfig
from rcgrpo.editor import Editor


def _check_unit_interval(name: str, values: torch.Tensor) -> None:
    if values.numel() and (values.min() < 0 or values.max() > 1):
        raise ValueError(
            f"{name} values must be in [0, 1], got range [{values.min().item():.3g}, {values.max().item():.3g}]"
        )


def _gaussian_blur(image: torch.Tensor, std: float) -> torch.Tensor:
    """Separable Gaussian blur of a (1, 1, h, w) map, zero outside the image (= background)."""
    radius = max(1, math.ceil(3 * std))
    offsets = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (offsets / std) ** 2)
    kernel = kernel / kernel.sum()
    image = F.conv2d(image, kernel.view(1, 1, 1, -1), padding=(0, radius))
    return F.conv2d(image, kernel.view(1, 1, -1, 1), padding=(radius, 0))


def latent_mask(
    mask: torch.Tensor, latent_hw: tuple[int, int], dilation: int = 0, feather: float = 0.0
) -> torch.Tensor:
    """The editing mask m (H, W) in [0, 1] at latent resolution (h, w), float32.

    Adaptive max-pooling (not averaging) so a thin object - even a 1-pixel line - keeps m = 1 in every
    latent cell it touches. `dilation` grows the mask by that many latent pixels (max-pool with a
    (2 * dilation + 1) window). `feather` > 0 is the std, in latent pixels, of a Gaussian blur that gives
    the mask a soft border; the result is max(m, blur(m)) so feathering only spreads strength outwards
    and never weakens the edit region itself (a blurred thin line would otherwise drop well below 1).
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be a 2-D (H, W) tensor, got shape {tuple(mask.shape)}")
    if len(latent_hw) != 2 or min(latent_hw) < 1:
        raise ValueError(f"latent_hw must be two positive sizes (h, w), got {tuple(latent_hw)}")
    (height, width), (h, w) = mask.shape, latent_hw
    if height % h or width % w or height // h != width // w:
        raise ValueError(
            f"mask of size {height}x{width} does not match latent size {h}x{w}: "
            "both sides must shrink by the same integer factor (the VAE scale)"
        )
    if dilation < 0:
        raise ValueError(f"dilation must be >= 0 latent pixels, got {dilation}")
    if feather < 0:
        raise ValueError(f"feather (Gaussian std in latent pixels) must be >= 0, got {feather}")
    mask = mask.float()
    _check_unit_interval("mask", mask)
    m = F.adaptive_max_pool2d(mask[None, None], (h, w))
    if dilation:
        m = F.max_pool2d(m, kernel_size=2 * dilation + 1, stride=1, padding=dilation)
    if feather:
        m = torch.maximum(m, _gaussian_blur(m, feather))
    return m[0, 0]


def token_weights(mask_latent: torch.Tensor) -> torch.Tensor:
    """The latent mask at packed-token resolution: (h, w) -> (h/2 * w/2,), each 2x2 patch max-pooled.

    Token order is `Editor.pack`'s (row-major over patches), so entry p weights target token p.
    """
    if mask_latent.ndim != 2 or mask_latent.shape[0] % 2 or mask_latent.shape[1] % 2:
        raise ValueError(
            f"latent mask must be (h, w) with even h and w (2x2 patches), got shape {tuple(mask_latent.shape)}"
        )
    return Editor.pack(mask_latent.float()[None, None])[0].amax(dim=-1)


def token_background(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """The share of each target token's pixels outside the editing mask: (H, W) -> (h/2 * w/2,).

    What the background-preservation metrics see of a token; the background anchor weights tokens by
    it, so a token on the mask's border is anchored for its background part (token_weights, max-pooled,
    would leave it free). Token order is `Editor.pack`'s.
    """
    h, w = latent_hw
    if mask.ndim != 2 or h % 2 or w % 2 or mask.shape[0] % (h // 2) or mask.shape[1] % (w // 2):
        raise ValueError(f"mask {tuple(mask.shape)} does not divide into the {h // 2}x{w // 2} token grid")
    coverage = torch.nn.functional.adaptive_avg_pool2d(mask.float()[None, None], (h // 2, w // 2))[0, 0]
    return (1 - coverage).flatten()


def region_decoupled_noise(
    base: torch.Tensor,
    mask_latent: torch.Tensor,
    group_size: int,
    s_in: float,
    s_out: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """G candidates z_i = sqrt(1 - s^2) z* + s d_i around the shared base noise z* = `base` (C, h, w).

    s(u) = s_in m(u) + s_out (1 - m(u)) per latent location, broadcast over channels; d_i is drawn
    from `generator`. Returns (G, C, h, w) on base's device and dtype.
    """
    if base.ndim != 3:
        raise ValueError(f"base noise must be unpacked latents (C, h, w), got shape {tuple(base.shape)}")
    if mask_latent.shape != base.shape[1:]:
        raise ValueError(
            f"latent mask shape {tuple(mask_latent.shape)} does not match the latent size {tuple(base.shape[1:])}"
        )
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group needs candidates to compare), got {group_size}")
    for name, value in (("s_in", s_in), ("s_out", s_out)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    m = mask_latent.float()
    _check_unit_interval("latent mask", m)
    s = (s_in * m + s_out * (1 - m)).to(generator.device)
    d = torch.randn(group_size, *base.shape, generator=generator, device=generator.device)
    z = torch.sqrt(1 - s**2) * base.float().to(generator.device) + s * d
    return z.to(base.device, base.dtype)


def group_noise(
    cfg: MethodConfig,
    mask_latent: torch.Tensor,
    latent_shape: tuple[int, int, int],
    generator: torch.Generator,
) -> torch.Tensor:
    """Initial latents (G, C, h, w) for one group: draws z* then the d_i from `generator`.

    RDP when cfg.rdp (s_in inside the mask, s_out outside); otherwise Neighbor GRPO's global
    perturbation with s = cfg.s_in everywhere.
    """
    if len(latent_shape) != 3:
        raise ValueError(f"latent_shape must be (C, h, w), got {tuple(latent_shape)}")
    base = torch.randn(*latent_shape, generator=generator, device=generator.device)
    s_out = cfg.s_out if cfg.rdp else cfg.s_in
    return region_decoupled_noise(base, mask_latent, cfg.group_size, cfg.s_in, s_out, generator)
