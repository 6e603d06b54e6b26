import math

import pytest
import torch

from rcgrpo.config import MethodConfig
from rcgrpo.noise import group_noise, latent_mask, region_decoupled_noise, token_weights
from rcgrpo.sampler import rollout


def _square_mask(size=64, top=16, left=20, side=24):
    mask = torch.zeros(size, size)
    mask[top : top + side, left : left + side] = 1
    return mask


def _ks_statistic(samples: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance between the samples' empirical CDF and N(0, 1)."""
    x = samples.double().flatten().sort().values
    n = x.numel()
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    above = torch.arange(1, n + 1, dtype=torch.float64) / n - cdf
    below = cdf - torch.arange(n, dtype=torch.float64) / n
    return max(above.max().item(), below.max().item())


def test_every_element_stays_standard_normal():
    # a feathered mask so s(u) takes the two end values and everything in between
    m = latent_mask(_square_mask(128, 32, 40, 48), (32, 32), feather=2.0)
    inside, border, outside = m == 1, (m > 0) & (m < 1), m == 0
    assert inside.sum() > 100 and border.sum() > 100 and outside.sum() > 100
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(64, 32, 32, generator=generator)
    z = region_decoupled_noise(base, m, group_size=4, s_in=0.3, s_out=0.05, generator=generator)
    assert z.shape == (4, 64, 32, 32)
    for region in (inside, border, outside):
        for member in z:  # elements of one candidate are independent, so a KS test applies
            values = member[:, region]
            n = values.numel()
            assert abs(values.mean().item()) < 4 / math.sqrt(n)
            assert abs(values.var().item() - 1) < 4 * math.sqrt(2 / n)
            assert _ks_statistic(values) < 1.95 / math.sqrt(n)  # KS critical value at alpha = 0.001


def test_group_correlation_follows_the_strength_per_region():
    m = latent_mask(_square_mask(), (16, 16))
    generator = torch.Generator().manual_seed(1)
    z = region_decoupled_noise(torch.randn(256, 16, 16, generator=generator), m, 2, 0.6, 0.2, generator)
    for region, s in ((m == 1, 0.6), (m == 0, 0.2)):
        a, b = z[0][:, region].flatten(), z[1][:, region].flatten()
        corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
        assert corr == pytest.approx(1 - s**2, abs=0.03)  # corr(z_i, z_j) = 1 - s^2


def test_background_noise_is_shared_when_s_out_is_zero():
    m = latent_mask(_square_mask(), (16, 16))
    z = group_noise(MethodConfig(group_size=6), m, (8, 16, 16), torch.Generator().manual_seed(2))
    outside, inside = z[:, :, m == 0], z[:, :, m == 1]
    assert torch.equal(outside, outside[:1].expand_as(outside))
    assert (inside - inside[:1]).abs().amax(dim=(1, 2))[1:].min() > 0.1  # members differ in the mask
    # global perturbation (Neighbor GRPO) perturbs the background too, by s_in
    g = group_noise(MethodConfig(group_size=6, rdp=False), m, (8, 16, 16), torch.Generator().manual_seed(2))
    c4 = math.sqrt(2 / 5) * math.gamma(3) / math.gamma(2.5)  # E[sample std] of 6 standard normals
    assert g[:, :, m == 0].std(dim=0).mean().item() == pytest.approx(0.3 * c4, rel=0.05)
    assert torch.equal(g[:, :, m == 1], z[:, :, m == 1])  # same draws: identical inside the mask


def test_group_noise_is_reproducible_from_the_generator():
    m = latent_mask(_square_mask(), (16, 16))
    a = group_noise(MethodConfig(), m, (8, 16, 16), torch.Generator().manual_seed(3))
    b = group_noise(MethodConfig(), m, (8, 16, 16), torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (8, 8, 16, 16)


def test_thin_line_survives_latent_mask():
    mask = torch.zeros(64, 64)
    mask[:, 37] = 1  # 1 pixel wide, inside latent column 37 // 4 = 9
    m = latent_mask(mask, (16, 16))
    assert torch.equal(m[:, 9], torch.ones(16))
    assert m.sum().item() == 16
    tokens = token_weights(m)
    assert tokens.shape == (64,)
    # token p = row * 8 + col over 2x2 patches (Editor.pack order): latent column 9 -> patch column 4
    expected = torch.zeros(8, 8)
    expected[:, 4] = 1
    assert torch.equal(tokens, expected.flatten())


def test_token_weights_follow_the_pack_order(tiny_editor):
    m = torch.rand(16, 16, generator=torch.Generator().manual_seed(4))
    packed = tiny_editor.pack(m[None, None].expand(1, tiny_editor.latent_channels, -1, -1))
    assert torch.equal(token_weights(m), packed[0].amax(dim=-1))


def test_dilation_and_feather():
    mask = torch.zeros(64, 64)
    mask[32:36, 32:36] = 1  # one latent pixel at (8, 8)
    assert latent_mask(mask, (16, 16)).sum().item() == 1
    dilated = latent_mask(mask, (16, 16), dilation=2)
    assert torch.equal(dilated[6:11, 6:11], torch.ones(5, 5)) and dilated.sum().item() == 25
    feathered = latent_mask(mask, (16, 16), feather=1.0)
    assert feathered[8, 8].item() == 1.0  # the edit region keeps full strength
    ring = [feathered[8, 8 + k].item() for k in range(4)]
    assert ring[0] > ring[1] > ring[2] > ring[3] > 0  # soft border decaying outwards
    z = sum(math.exp(-(o**2) / 2) for o in range(-3, 4))  # the kernel (radius 3 std) normaliser
    assert ring[1] == pytest.approx(math.exp(-0.5) / z**2, rel=1e-5)  # k(1) k(0) of the separable kernel
    assert torch.allclose(feathered, feathered.T)  # isotropic


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: latent_mask(torch.zeros(1, 64, 64), (16, 16)), "2-D"),
        (lambda: latent_mask(torch.zeros(60, 64), (16, 16)), "does not match latent size 16x16"),
        (lambda: latent_mask(torch.zeros(64, 32), (16, 16)), "same integer factor"),
        (lambda: latent_mask(torch.full((64, 64), 2.0), (16, 16)), r"mask values must be in \[0, 1\]"),
        (lambda: latent_mask(torch.zeros(64, 64), (16, 16), dilation=-1), "dilation"),
        (lambda: latent_mask(torch.zeros(64, 64), (16, 16), feather=-1.0), "feather"),
        (lambda: token_weights(torch.zeros(15, 16)), "even h and w"),
        (
            lambda: region_decoupled_noise(
                torch.zeros(8, 16, 16), torch.zeros(8, 8), 4, 0.3, 0.0, torch.Generator()
            ),
            r"latent mask shape \(8, 8\) does not match the latent size \(16, 16\)",
        ),
        (
            lambda: region_decoupled_noise(
                torch.zeros(8, 16, 16), torch.zeros(16, 16), 1, 0.3, 0.0, torch.Generator()
            ),
            "group_size must be >= 2",
        ),
        (
            lambda: region_decoupled_noise(
                torch.zeros(8, 16, 16), torch.zeros(16, 16), 4, 1.3, 0.0, torch.Generator()
            ),
            r"s_in must be in \[0, 1\]",
        ),
        (
            lambda: region_decoupled_noise(
                torch.zeros(8, 16, 16), torch.zeros(16, 16), 4, 0.3, -0.1, torch.Generator()
            ),
            r"s_out must be in \[0, 1\]",
        ),
        (
            lambda: region_decoupled_noise(
                torch.zeros(1, 8, 16, 16), torch.zeros(16, 16), 4, 0.3, 0, torch.Generator()
            ),
            r"\(C, h, w\)",
        ),
    ],
)
def test_bad_inputs_name_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_rdp_shrinks_the_decoded_background_spread(tiny_editor):
    """The mechanism RDP is for: candidates of a group share (nearly) the same decoded background."""
    source = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    mask = _square_mask()
    cond = tiny_editor.encode_condition(source, ["turn the blue circle red"], 2.5)
    h, w = tiny_editor.latent_size(64, 64)
    m = latent_mask(mask, (h, w))
    spread = {}
    for rdp in (True, False):
        cfg = MethodConfig(rdp=rdp, group_size=8)
        z = group_noise(cfg, m, (tiny_editor.latent_channels, h, w), torch.Generator().manual_seed(5))
        images = rollout(tiny_editor, cond, z, num_steps=8).images
        spread[rdp] = images.std(dim=0)[:, mask == 0].mean().item()  # std across the group, background only
    # measured 0.013 vs 0.056 (ratio ~0.24); the transformer's attention still leaks some edit into the background
    assert spread[True] < 0.5 * spread[False]
    assert spread[True] > 0  # not trivially frozen: the background does see the edit region through attention


def test_token_background_is_the_share_of_pixels_outside_the_mask():
    from rcgrpo.noise import token_background

    mask = torch.zeros(64, 64)  # latent 16x16 -> 8x8 tokens of 8x8 pixels
    mask[0:8, 0:4] = 1  # half of token 0
    mask[8:16, 8:16] = 1  # all of token 9
    background = token_background(mask, (16, 16))
    assert background.shape == (64,)
    assert background[0].item() == 0.5 and background[9].item() == 0.0
    assert background.sum().item() == 64 - 1.5
    with pytest.raises(ValueError, match="token grid"):
        token_background(torch.zeros(60, 64), (16, 16))
