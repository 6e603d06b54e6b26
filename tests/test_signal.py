"""Where an update's gradient comes from, and the rules that keep noise out of it: groups below the
reward's noise floor, collapsed groups under the batch distance scale, the LoRA on the trained steps only."""

import torch
from test_train_step import MASK, SIZE, SOURCE, _brightness_in_mask

from rcgrpo.advantages import group_advantages, groups_without_signal
from rcgrpo.config import MethodConfig
from rcgrpo.drift import velocity_drift
from rcgrpo.editor import load_editor
from rcgrpo.lora import add_lora, base_weights, lora_parameters
from rcgrpo.noise import group_noise, latent_mask, token_weights
from rcgrpo.sampler import rollout
from rcgrpo.train_step import TrainGroup, make_optimizer, rc_grpo_step

SMALL = dict(group_size=8, num_steps=4, anchors=2, steps_per_anchor=2, tau=0.5)


def _editor(tiny_editor_dir, cfg, lora_scale=0.0):
    torch.manual_seed(0)
    editor = load_editor(tiny_editor_dir)
    add_lora(editor.transformer, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    if lora_scale:  # a LoRA that moves the editor (B = 0 at initialisation)
        with torch.no_grad():
            for p in lora_parameters(editor.transformer):
                p.add_(lora_scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return editor


def _group(editor, cfg, s_in, seed):
    """A group of the toy edit at perturbation strength s_in, advantages from in-mask brightness."""
    cfg = MethodConfig(**{**SMALL, "s_in": s_in})
    cond = editor.encode_condition(SOURCE, ["make the square white"], cfg.guidance_scale)
    mask_latent = latent_mask(MASK, editor.latent_size(SIZE, SIZE))
    generator = torch.Generator().manual_seed(seed)
    noise = group_noise(cfg, mask_latent, (editor.latent_channels, *mask_latent.shape), generator)
    result = rollout(editor, cond, noise, cfg.num_steps)
    advantages = group_advantages(_brightness_in_mask(result.images), cfg.adv_p, cfg.adv_clip, 1e-12)
    return TrainGroup(
        cond, result.sigmas, result.kept_states, result.states, token_weights(mask_latent), advantages
    )


def test_a_group_below_the_noise_floor_is_counted_and_dropped_only_when_asked():
    rewards = torch.tensor([[0.0, 0.1, 0.2, 0.3], [1.0, 1.05, 1.1, 1.0]])
    instruction = torch.tensor([[0.1, 0.3, 0.5, 0.7], [0.5, 0.501, 0.499, 0.5]])  # 2nd: spread ~0.0007
    flat, below = groups_without_signal(rewards, instruction, 1e-6, noise_floor=0.004, drop_noise=False)
    assert below.tolist() == [False, True] and flat.tolist() == [False, False]
    flat, below = groups_without_signal(rewards, instruction, 1e-6, noise_floor=0.004, drop_noise=True)
    assert flat.tolist() == [False, True]


def test_the_gradient_is_attributed_to_groups_and_a_dropped_group_carries_none(tiny_editor_dir):
    cfg = MethodConfig(**SMALL)
    editor = _editor(tiny_editor_dir, cfg)
    optimizer = make_optimizer(editor.transformer, cfg)
    first, second = _group(editor, cfg, 0.3, 1), _group(editor, cfg, 0.3, 2)
    dropped = TrainGroup(  # what the learner hands over for a group below the floor: A = 0
        first.cond, first.sigmas, first.kept_states, first.states, first.token_weights, torch.zeros(8)
    )
    stats = rc_grpo_step(editor, optimizer, [first, dropped, second], cfg, torch.Generator().manual_seed(0))
    assert stats.num_groups == 2
    assert stats.group_gradient_norm[1] == 0.0 and stats.group_gradient_share[1] == 0.0
    assert min(stats.group_gradient_norm[0], stats.group_gradient_norm[2]) > 0
    # without the anchor the groups' shares are the whole gradient
    assert abs(sum(stats.group_gradient_share) - 1.0) < 1e-4


def test_the_batch_distance_scale_bounds_a_collapsed_groups_gradient(tiny_editor_dir):
    """A group whose candidates barely differ (s_in 0.003) standardises noise to unit advantages; under its
    own neighbour scale its gradient dwarfs an informative group's, under the batch's it does not."""

    def norms(distance_scale):
        cfg = MethodConfig(**SMALL, distance_scale=distance_scale)
        editor = _editor(tiny_editor_dir, cfg)
        groups = [_group(editor, cfg, 0.3, 1), _group(editor, cfg, 0.003, 1)]
        optimizer = make_optimizer(editor.transformer, cfg)
        stats = rc_grpo_step(editor, optimizer, groups, cfg, torch.Generator().manual_seed(0))
        return stats.group_gradient_norm

    informative, collapsed = norms("neighbours")
    assert collapsed > 3 * informative  # the finding: noise carries the update
    informative, collapsed = norms("batch")
    assert collapsed < informative


def test_with_lora_steps_trained_the_untrained_steps_run_the_base_editor(tiny_editor_dir):
    cfg = MethodConfig(**SMALL, train_steps_from=0.5, lora_steps="trained")
    assert cfg.lora_step_indices == [2, 3]
    editor = _editor(tiny_editor_dir, cfg, lora_scale=0.05)
    cond = editor.encode_condition(SOURCE, ["make the square white"], cfg.guidance_scale)
    noise = torch.randn(
        2, editor.latent_channels, SIZE // 4, SIZE // 4, generator=torch.Generator().manual_seed(5)
    )
    gated = rollout(editor, cond, noise, cfg.num_steps, lora_steps=cfg.lora_step_indices)
    everywhere = rollout(editor, cond, noise, cfg.num_steps)
    with base_weights(editor.transformer):
        base = rollout(editor, cond, noise, cfg.num_steps)
    # x_0..x_2 come from steps 0 and 1, which run the base weights exactly; the trained steps use the LoRA
    assert torch.equal(gated.states[:3], base.states[:3])
    assert not torch.allclose(everywhere.states[2], base.states[2])
    assert not torch.allclose(gated.states[4], base.states[4])

    # the drift diagnostic measures what the LoRA's weights would do at every step (plain diffusers
    # applies them everywhere), along the sampler's own path
    from rcgrpo.data.shapes import generate_shapes_edit

    samples = generate_shapes_edit(2, split="test", seed=0)
    drift = velocity_drift(editor, samples, cfg)
    assert drift["trained"] == [2, 3]
    assert all(d > 0 for d in drift["inside"]) and all(d > 0 for d in drift["outside"])


def test_the_progress_line_of_a_step_without_an_update_says_why_instead_of_nan():
    from services.learner_stats import progress_line

    stats = {
        "reward_mean": 0.9,
        "reward_std": 0.01,
        "instruction_reward_mean": 0.2,
        "instruction_share": 0.5,
        "clip_fraction": 0.025,
        "ratio_deviation_p90": 0.05,
        "staleness_mean": 0.0,
        "images_per_s": 6.0,
        "num_groups": 2,
        "noise_floor_groups": 0,
    }
    assert "clip 2.5%  |r-1| 0.050  stale 0.00" in progress_line(stats)
    idle = progress_line({**stats, "num_groups": 0, "noise_floor_groups": 2, "clip_fraction": float("nan")})
    assert "nan" not in idle and "no update: no group with spread (2 under the noise floor)" in idle
