import math

import pytest
import torch

from rcgrpo.advantages import group_advantages, zero_variance_groups
from rcgrpo.config import MethodConfig
from rcgrpo.editor import load_editor
from rcgrpo.lora import add_lora
from rcgrpo.noise import group_noise, latent_mask, token_weights
from rcgrpo.sampler import rollout
from rcgrpo.surrogate import (
    clipped_surrogate_loss,
    masked_distance,
    one_step_prediction,
    policy_log_probs,
)
from rcgrpo.train_step import TrainGroup, make_optimizer, rc_grpo_step

SIZE = 64


# -- advantages ------------------------------------------------------------------------------------
def test_advantages_p2_is_the_z_score():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0])
    # mean 3, centred (-2, -1, 0, 3), ||.||_2 = sqrt(14): A = 2 (r - 3) / sqrt(14)
    expected = torch.tensor([-1.0690450, -0.5345225, 0.0, 1.6035675])
    advantages = group_advantages(rewards, p=2.0)
    assert torch.allclose(advantages, expected, atol=1e-6)
    assert torch.allclose(advantages, (rewards - rewards.mean()) / rewards.std(unbiased=False), atol=1e-6)


def test_advantages_p08_quasi_norm():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.5, 0.5, 0.0, 1.0]])
    # row 0: ||(-2, -1, 0, 3)||_0.8 = (2^0.8 + 1 + 3^0.8)^1.25 = 7.7568959
    norm0 = (2**0.8 + 1 + 3**0.8) ** 1.25
    assert norm0 == pytest.approx(7.7568959, abs=1e-6)
    # row 1: centred (0, 0, -0.5, 0.5), ||.||_0.8 = (2 * 0.5^0.8)^1.25 = 2^1.25 * 0.5
    norm1 = 2**1.25 * 0.5
    expected = torch.tensor(
        [[2 * -2 / norm0, 2 * -1 / norm0, 0.0, 2 * 3 / norm0], [0.0, 0.0, 2 * -0.5 / norm1, 2 * 0.5 / norm1]]
    )
    assert torch.allclose(group_advantages(rewards, p=0.8), expected, atol=1e-6)
    assert torch.allclose(expected[0], torch.tensor([-0.5156702, -0.2578351, 0.0, 0.7735053]), atol=1e-6)


def test_advantages_are_clipped():
    rewards = torch.zeros(100)
    rewards[-1] = 1.0  # one outlier: its z-score is sqrt(99) = 9.95
    advantages = group_advantages(rewards, p=2.0, clip=5.0)
    assert advantages[-1].item() == 5.0
    assert advantages[0].item() == pytest.approx(-1 / math.sqrt(99), abs=1e-6)
    assert group_advantages(rewards, p=2.0, clip=0.05)[0].item() == pytest.approx(-0.05)


def test_zero_variance_groups_get_zero_advantages():
    rewards = torch.tensor([[0.7, 0.7, 0.7, 0.7], [1.0, 1.0 + 1e-9, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]])
    flat = zero_variance_groups(rewards, eps=1e-6)
    assert flat.tolist() == [True, True, False]
    advantages = group_advantages(rewards, p=0.8, eps=1e-6)
    assert torch.isfinite(advantages).all()
    assert (advantages[:2] == 0).all()
    assert advantages[2].abs().min() > 0
    with pytest.raises(ValueError, match="G >= 2"):
        zero_variance_groups(torch.tensor([1.0]), eps=1e-6)
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([1.0, float("nan")]))


def test_std_floor_scales_down_only_groups_with_less_spread():
    # a spread group (deviations +-0.2) and a near-flat one (+-0.01): standardised alike without a floor
    rewards = torch.tensor([[0.3, 0.7, 0.3, 0.7], [0.49, 0.51, 0.49, 0.51]])
    plain = group_advantages(rewards, p=2.0)
    assert torch.allclose(plain[0], plain[1], atol=1e-4)
    floored = group_advantages(rewards, p=2.0, std_floor=0.05)
    assert torch.allclose(floored[0], plain[0])  # std 0.2 > sigma_min: unchanged
    # std 0.01 < sigma_min = 0.05: A_i = (r_i - mean) / sigma_min, a fifth of the unit-scale advantages
    assert torch.allclose(floored[1], plain[1] * 0.2, atol=1e-5)
    # for p < 1 the floor is the norm of deviations all +-sigma_min: a group exactly at it is unchanged
    at_floor = torch.tensor([[0.45, 0.55, 0.45, 0.55]])
    assert torch.allclose(group_advantages(at_floor, std_floor=0.05), group_advantages(at_floor), atol=1e-5)
    with pytest.raises(ValueError, match="std_floor"):
        group_advantages(rewards, std_floor=-1.0)
    with pytest.raises(ValueError, match=r"adv_std_floor\n  Input should be greater than or equal to 0"):
        MethodConfig(adv_std_floor=-0.1)


# -- distance, policy and loss ------------------------------------------------------------------
def test_reward_term_diagnostics_tell_instruction_signal_from_background_noise():
    from rcgrpo.advantages import reward_term_diagnostics

    weights = {"region_adherence": 1.0, "background_psnr": 0.1, "acd": 0.5}
    # group 0: the instruction term spreads, PSNR is flat; group 1: PSNR spreads 10x more than it
    scores = {
        "region_adherence": torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.50, 0.51, 0.50, 0.51]]),
        "background_psnr": torch.tensor([[30.0, 30.0, 30.0, 30.0], [31.0, 28.0, 30.0, 29.0]]),
        "acd": torch.tensor([[0.4, 0.6, 0.5, 0.45], [0.5, 0.5, 0.5, 0.5]]),
    }
    result = reward_term_diagnostics(scores, weights, ["region_adherence"])
    spread = result["term_spread"]
    assert spread["background_psnr"] == pytest.approx(
        (0 + 0.1 * torch.tensor([31.0, 28, 30, 29]).std(unbiased=False).item()) / 2
    )
    assert spread["region_adherence"] > spread["acd"] > 0
    # term_std is the term's own spread, so it is measured for a term of weight 0 too
    psnr_std = torch.tensor([31.0, 28, 30, 29]).std(unbiased=False).item()
    assert result["term_std"]["background_psnr"] == pytest.approx(psnr_std / 2)
    unweighted = reward_term_diagnostics(scores, {**weights, "acd": 0.0}, ["region_adherence"])
    assert (
        unweighted["term_spread"]["acd"] == 0
        and unweighted["term_std"]["acd"] == result["term_std"]["acd"] > 0
    )
    assert result["instruction_dominant"] == 0.5  # group 0 only
    # group 0's total follows the instruction term (and ACD, aligned with it here); group 1's PSNR, 10x
    # larger, runs against the instruction term: its advantages anti-correlate with the instruction's
    total = {name: weights[name] * value for name, value in scores.items()}
    total = sum(total.values())
    corr = [
        torch.corrcoef(torch.stack([total[g], scores["region_adherence"][g]]))[0, 1].item() for g in (0, 1)
    ]
    assert corr[0] == pytest.approx(1.0, abs=1e-3) and corr[1] < -0.8
    assert result["advantage_instruction_corr"] == pytest.approx(sum(corr) / 2, abs=1e-4)
    t, r = total - total.mean(dim=1, keepdim=True), scores["region_adherence"]
    share = (t * (r - r.mean(dim=1, keepdim=True))).sum(dim=1) / t.pow(2).sum(dim=1)
    assert share[0] > 0.8 and share[1] < 0
    assert result["instruction_share"] == pytest.approx(share.mean().item(), abs=1e-5)
    assert result["acd_instruction_corr"] == pytest.approx(
        1.0, abs=1e-4
    )  # group 0; group 1's ACD is constant
    first, second = result["per_group"]
    assert first["instruction_dominant"] and not second["instruction_dominant"]
    assert first["instruction_share"] == pytest.approx(share[0].item(), abs=1e-5)
    assert math.isnan(second["acd_instruction_corr"])  # constant ACD: no correlation to report
    with pytest.raises(ValueError, match="not among the scored rewards"):
        reward_term_diagnostics(scores, weights, ["lc_t"])


def test_masked_distance_by_hand_and_ignores_the_background():
    prediction = torch.zeros(3, 2)  # N = 3 tokens, D = 2
    candidates = torch.zeros(2, 3, 2)
    candidates[0, 0] = torch.tensor([1.0, 3.0])  # token 0: per-element mean (1 + 9) / 2 = 5
    candidates[1, 2] = torch.tensor([4.0, 4.0])  # token 2 (background): 16
    weights = torch.tensor([1.0, 0.5, 0.0])
    d = masked_distance(candidates, prediction, weights)
    assert torch.allclose(d, torch.tensor([5.0 / 1.5, 0.0]))
    # the plain mean (mask_aware=False) sees the background difference
    assert torch.allclose(masked_distance(candidates, prediction, None), torch.tensor([5.0 / 3, 16.0 / 3]))
    # candidates that differ only outside the mask get the same policy probability
    log_probs = policy_log_probs(candidates[1:].expand(2, -1, -1), prediction, weights, tau=1.0)
    assert torch.allclose(log_probs, torch.full((2,), math.log(0.5)))
    with pytest.raises(ValueError, match="sum to zero"):
        masked_distance(candidates, prediction, torch.zeros(3))


def test_policy_is_a_softmax_over_negative_distance():
    candidates = torch.randn(5, 4, 6, 8)  # M = 5, G = 4, N = 6, D = 8
    prediction = torch.randn(5, 6, 8)
    weights = torch.rand(6)
    log_probs = policy_log_probs(candidates, prediction, weights, tau=0.5)
    d = masked_distance(candidates, prediction, weights)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(5))
    assert torch.equal(log_probs.argmax(-1), d.argmin(-1))
    assert torch.allclose(log_probs[:, 0] - log_probs[:, 1], -(d[:, 0] - d[:, 1]) / 0.5, atol=1e-5)


def test_clipped_loss_by_hand():
    old = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    new = torch.log(torch.tensor([[0.5, 0.2, 0.3]]))  # r = (2, 0.8, 0.6)
    advantages = torch.tensor([[1.0, -1.0, 0.5]])
    loss, ratio = clipped_surrogate_loss(new, old, advantages, clip_eps=0.2, log_ratio_clamp=10.0)
    assert torch.allclose(ratio, torch.tensor([[2.0, 0.8, 0.6]]))
    # min(A r, A clip(r)): 1 * min(2, 1.2) = 1.2; -1 * 0.8 = -0.8 (both equal); 0.5 * min(0.6, 0.8) = 0.3
    assert loss.shape == (1,) and loss.item() == pytest.approx(-(1.2 - 0.8 + 0.3) / 3)
    _, ratio = clipped_surrogate_loss(new + 50, old, advantages, clip_eps=0.2, log_ratio_clamp=10.0)
    assert torch.allclose(ratio, torch.full_like(ratio, math.exp(10.0)))


# -- on the tiny editor ---------------------------------------------------------------------------
def _group(editor, cfg, seed, kept_states=None):
    source = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(SIZE, SIZE)
    mask[16:48, 16:40] = 1
    cond = editor.encode_condition(source, ["make the square red"], cfg.guidance_scale)
    mask_latent = latent_mask(mask, editor.latent_size(SIZE, SIZE))
    generator = torch.Generator().manual_seed(seed)
    noise = group_noise(cfg, mask_latent, (editor.latent_channels, *mask_latent.shape), generator)
    result = rollout(editor, cond, noise, cfg.num_steps, kept_states=kept_states, decode=False)
    return cond, result, token_weights(mask_latent)


@pytest.fixture
def lora_editor(tiny_editor_dir):
    """A fresh editor with a zero-initialised LoRA (training mutates it, so never the shared one)."""
    editor = load_editor(tiny_editor_dir)
    cfg = MethodConfig()
    add_lora(editor.transformer, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    return editor


def test_ratio_is_one_before_the_first_update(lora_editor):
    cfg = MethodConfig(group_size=4, num_steps=4, anchors=4, steps_per_anchor=3)
    cond, result, weights = _group(lora_editor, cfg, seed=0)
    # theta == theta_old: the one-step prediction from every stored x^(k)_j is the stored x^(k)_{j+1}
    j = torch.arange(cfg.num_steps).repeat_interleave(cfg.group_size)
    k = torch.arange(cfg.group_size).repeat(cfg.num_steps)
    with torch.no_grad():
        x_theta = one_step_prediction(
            lora_editor, result.states[j, k], result.sigmas[j], result.sigmas[j + 1], cond.repeat(len(j))
        )
    assert (x_theta - result.states[j + 1, k]).abs().max().item() <= 1e-5
    advantages = group_advantages(torch.tensor([0.1, 0.4, 0.2, 0.9]))
    group = TrainGroup(cond, result.sigmas, result.kept_states, result.states, weights, advantages)
    stats = rc_grpo_step(
        lora_editor,
        make_optimizer(lora_editor.transformer, cfg),
        [group],
        cfg,
        torch.Generator().manual_seed(0),
    )
    # equal up to float32 rounding of a differently batched forward pass
    assert abs(stats.ratio_min - 1) <= 1e-5 and abs(stats.ratio_max - 1) <= 1e-5
    assert stats.clip_fraction == 0.0 and stats.num_groups == 1
    assert stats.grad_norm > 0
    # with r = 1 the loss is -mean_i A_i, and the advantages are centred
    assert abs(stats.loss) <= 1e-5


def test_one_step_moves_the_prediction_toward_positive_candidates(lora_editor):
    cfg = MethodConfig(group_size=4, num_steps=4, anchors=4, steps_per_anchor=1, learning_rate=1e-2, tau=0.05)
    j = 1
    cond, result, weights = _group(lora_editor, cfg, seed=1, kept_states=[j, j + 1])
    advantages = torch.tensor([2.0, -2.0, 0.0, 0.0])  # candidate 0 good, candidate 1 bad
    group = TrainGroup(cond, result.sigmas, result.kept_states, result.states, weights, advantages)
    x_j, x_next = result.states[0], result.states[1]  # the kept states j and j + 1
    sigma = result.sigmas[j].expand(cfg.group_size)
    sigma_next = result.sigmas[j + 1].expand(cfg.group_size)

    def distances():
        """d(x^(i)_{j+1}, x_theta) for anchors 2, 3 (neither good nor bad) and i = good, bad."""
        with torch.no_grad():
            x_theta = one_step_prediction(lora_editor, x_j, sigma, sigma_next, cond.repeat(cfg.group_size))
        d = masked_distance(x_next.expand(cfg.group_size, -1, -1, -1), x_theta, weights)
        return d[2:, 0].mean().item(), d[2:, 1].mean().item()

    to_good, to_bad = distances()
    optimizer = make_optimizer(lora_editor.transformer, cfg)
    rc_grpo_step(lora_editor, optimizer, [group], cfg, torch.Generator().manual_seed(0))
    to_good_after, to_bad_after = distances()
    # one small step cannot cross the gap between trajectories; measured: -0.45% and +0.64%
    assert to_good_after < to_good * 0.998
    assert to_bad_after > to_bad * 1.002
