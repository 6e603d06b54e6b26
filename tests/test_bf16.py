"""The shipped tiny editor in bfloat16 on CPU through a rollout group, an RC-GRPO update and the LoRA
exchange: the arithmetic a FLUX run does in bf16 on GPUs, checked where it can break the method.

Tolerances: pi_old's prediction is the stored state bit for bit (the rollout and the learner's
one-step prediction do the same float32 Euler step on the same bf16 velocity, the group's rows being
contiguous copies), so log pi_theta - log pi_old is 0 at theta = theta_old up to the float32 rounding of
the distances (|log r| < 1e-5); the published LoRA is the learner's tensors bit for bit.
"""

from pathlib import Path

import pytest
import torch

import rcgrpo
from learner.learner import Learner
from rcgrpo.config import MethodConfig
from rcgrpo.data.shapes import generate_shapes_edit
from rcgrpo.editor import EditCondition, load_editor
from rcgrpo.group import sample_group
from rcgrpo.lora import add_lora, lora_parameters
from rcgrpo.surrogate import one_step_prediction, policy_log_probs
from rcgrpo.train_step import make_optimizer, rc_grpo_step
from rollout_worker.worker import RolloutWorker
from services.config import load_run_config
from services.redis_server import EmbeddedRedis

SHIPPED = Path(rcgrpo.__file__).parent / "assets" / "tiny_kontext_shapes"
CFG = MethodConfig(group_size=6, num_steps=4, anchors=3, steps_per_anchor=2, background_anchor=1.0)


def _moved_lora(editor) -> None:
    """A LoRA that already moved (lora_B off zero), so theta_old differs from the base editor."""
    add_lora(editor.transformer, CFG.lora_rank, CFG.lora_alpha, CFG.lora_targets)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in editor.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)


@pytest.fixture(scope="module")
def bf16_groups():
    torch.manual_seed(0)
    editor = load_editor(SHIPPED, dtype="bfloat16", device="cpu")
    _moved_lora(editor)
    samples = generate_shapes_edit(2, split="test", seed=3)
    sampled = [sample_group(editor, CFG, s, noise_seed=5 + i) for i, s in enumerate(samples)]
    return editor, sampled


def test_the_bf16_rollout_keeps_a_float32_state_that_the_learner_reproduces_exactly(bf16_groups):
    """pi_old needs no forward pass because theta_old's one-step prediction from a stored x_j is the
    stored x_{j+1}: in bf16 that holds bit for bit, for a row alone, in a micro-batch mixing anchors,
    and in the whole group, although the rollout ran all G candidates in one batch with capture on."""
    editor, sampled = bf16_groups
    assert editor.dtype == torch.bfloat16
    group = sampled[0]
    states, sigmas = group.rollout.states, group.rollout.sigmas
    assert states.dtype == torch.float32
    for j in range(len(group.rollout.kept_states) - 1):
        for rows in ([0], [1, 3], list(range(CFG.group_size))):
            k = torch.tensor(rows)
            with torch.no_grad():
                x_theta = one_step_prediction(
                    editor,
                    states[j, k],
                    sigmas[j].expand(len(k)),
                    sigmas[j + 1].expand(len(k)),
                    EditCondition.cat([group.cond] * len(k)),
                )
            assert x_theta.dtype == torch.float32
            assert torch.equal(x_theta, states[j + 1, k]), (j, rows)
            log_old = policy_log_probs(
                states[j + 1, None].expand(len(k), -1, -1, -1), states[j + 1, k], None, 1.0
            )
            log_new = policy_log_probs(states[j + 1, None].expand(len(k), -1, -1, -1), x_theta, None, 1.0)
            assert (log_new - log_old).abs().max().item() < 1e-5


def test_a_bf16_update_starts_at_ratio_one_and_moves_the_float32_lora(bf16_groups):
    """The first epoch on fresh groups has r = 1 (|r - 1| < 1e-5, the float32 rounding of the distances),
    with micro-batches, gradient checkpointing and the background anchor; the update moves the LoRA."""
    editor, sampled = bf16_groups
    editor.transformer.enable_gradient_checkpointing()
    try:
        before = {n: p.detach().clone() for n, p in editor.transformer.named_parameters() if p.requires_grad}
        advantages = torch.linspace(-1.5, 1.5, CFG.group_size)
        groups = [g.train_group(advantages.roll(i)) for i, g in enumerate(sampled)]
        cfg = MethodConfig(**{**CFG.__dict__, "update_epochs": 1, "learning_rate": 1e-3})
        optimizer = make_optimizer(editor.transformer, cfg)
        stats = rc_grpo_step(
            editor, optimizer, groups, cfg, torch.Generator().manual_seed(3), micro_batch_rows=4
        )
        assert stats.num_updates == 1 and stats.grad_norm > 0
        assert stats.ratio_deviation_max < 1e-5 and stats.clip_fraction == 0.0
        assert stats.background_anchor_loss > 0  # the moved LoRA against the base editor, in float32
        after = dict(zip(before, lora_parameters(editor.transformer), strict=True))
        assert any(not torch.equal(after[n], before[n]) for n in before)
        assert {p.dtype for p in after.values()} == {torch.float32}
    finally:
        editor.transformer.disable_gradient_checkpointing()


def test_workers_sample_with_the_lora_the_learner_trained(tmp_path):
    """The learner publishes its float32 LoRA as trained and a rollout worker (bf16 base) loads it
    unrounded: every adapter tensor the worker samples with equals the learner's bit for bit, although
    the trained values are not representable in bf16."""
    with EmbeddedRedis() as server:
        cfg = load_run_config(
            None,
            [
                "name=bf16-exchange",
                f"runs_dir={tmp_path}",
                f"redis_url={server.url}",
                "dtype=bfloat16",
                "data.num_samples=2",
                "rollout.torch_threads=2",
                "learner.torch_threads=2",
            ],
        )
        learner = Learner(cfg, server.url)
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in lora_parameters(learner.editor.transformer):
                p.add_(torch.randn(p.shape, generator=generator) * 1e-3)
        trained = dict(learner.editor.transformer.named_parameters())
        trained = {n: p.detach().clone() for n, p in trained.items() if p.requires_grad}
        assert any(not torch.equal(t, t.bfloat16().float()) for t in trained.values())
        version = learner.publish_lora()
        worker = RolloutWorker(cfg, server.url, "bf16-worker")
        assert worker.editor.dtype == torch.bfloat16
        assert worker.sync_lora() == version
        sampled_with = {n: p for n, p in worker.editor.transformer.named_parameters() if "lora_" in n}
        assert sampled_with.keys() == trained.keys()
        for name, tensor in trained.items():
            assert sampled_with[name].dtype == torch.float32 and torch.equal(sampled_with[name], tensor), name
