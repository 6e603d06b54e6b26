"""The attention concentration reward R_ACD (docs/METHOD.md section 4).

With A(p) the captured text -> target-image attention map (rcgrpo.attention) and M the editing mask at
token resolution (rcgrpo.noise.token_weights):

    rho_in  = sum_{p in M} A(p) / |M|,   rho_out = sum_{p not in M} A(p) / (N - |M|),
    R_ACD   = rho_in / (rho_in + rho_out)   in [0, 1];  0.5 = no concentration (uniform attention).

A soft mask (feathered or dilated weights m(p) in [0, 1]) counts token p as m(p) inside and 1 - m(p)
outside, which is the formula above for a hard {0, 1} mask.
"""

from __future__ import annotations

import torch

# Reward for an empty or full mask: inside-vs-outside concentration is undefined, so every
# candidate gets the "no concentration" value and ACD adds nothing to the group's advantages.
NO_CONCENTRATION = 0.5


def acd_reward(attention_map: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """R_ACD per candidate: attention_map (G, N) non-negative rows, token_mask (N,) in [0, 1] -> (G,)."""
    if attention_map.ndim != 2:
        raise ValueError(f"attention_map must be (G, N), got shape {tuple(attention_map.shape)}")
    if token_mask.shape != attention_map.shape[1:]:
        raise ValueError(
            f"token_mask of shape {tuple(token_mask.shape)} does not match the attention map's "
            f"{attention_map.shape[1]} target tokens"
        )
    m = token_mask.to(attention_map.device, torch.float32)
    if (m < 0).any() or (m > 1).any():
        raise ValueError("token_mask values must be in [0, 1]")
    a = attention_map.float()
    if (a < 0).any():
        raise ValueError("attention_map has negative entries; it must be attention probabilities")
    if (a.sum(dim=1) <= 0).any():
        raise ValueError("attention_map has a row with no attention mass")
    size_in, size_out = m.sum(), (1 - m).sum()
    if size_in == 0 or size_out == 0:
        return torch.full((a.shape[0],), NO_CONCENTRATION, device=a.device)
    rho_in = (a * m).sum(dim=1) / size_in
    rho_out = (a * (1 - m)).sum(dim=1) / size_out
    return rho_in / (rho_in + rho_out)
