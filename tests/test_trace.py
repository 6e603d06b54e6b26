"""The dry run (`rcgrpo plan --trace`): the real rollout and update on the meta device at FLUX's width,
set beside the plan's estimate, and the device-placement check that fails on a CPU tensor in the step."""

import json

import pytest
import torch

from deploy.cli import main as cli_main
from rcgrpo import train_step
from rcgrpo.config import MethodConfig
from rcgrpo.lora import add_lora
from rcgrpo.tiny_editor import SHIPPED_EDITOR_DIR
from rcgrpo.trace import PlacementError, build_meta_editor, trace_update

FLUX_CONFIG = "configs/flux_kontext_compbench.yaml"
# full width (dim 3072, 24 heads, 4096-wide T5 tokens, 512 of them) at 1 + 1 blocks, one group per update
REDUCED = ["--trace-depth", "1,1", "--image-size", "512", "--set", "learner.groups_per_step=1"]
TOLERANCE = 0.15


def test_the_reduced_depth_dry_run_matches_the_plan(capsys):
    """At FLUX's width with one dual- and one single-stream block, the traced peak of the rollout worker
    and of the learner lies within 15% of the plan's estimate; FLOPs and the roofline are reported for
    every phase, and every host sync is listed with the line that makes it."""
    assert cli_main(["plan", "--config", FLUX_CONFIG, "--trace", "--json", *REDUCED]) == 0
    traced = json.loads(capsys.readouterr().out)["image_sizes"]["512"]
    for component in ("rollout_worker", "learner"):
        t = traced[component]
        assert abs(t["traced_peak_bytes"] / t["analytic_peak_bytes"] - 1) <= TOLERANCE, (component, t)
        assert sum(t["breakdown"].values()) == t["traced_peak_bytes"]
        assert t["flops"] > 0 and t["roofline_s"] == pytest.approx(t["flops"] / 989e12)
    rollout, learner = traced["rollout_worker"], traced["learner"]
    assert set(rollout["phases"]) == {"rollout", "vae_decode"}
    assert rollout["phases"]["rollout"]["captured_attention_peak_bytes"] > 0
    assert rollout["phases"]["rollout"]["flops"] > rollout["phases"]["vae_decode"]["flops"]
    assert learner["breakdown"]["lora_and_optimizer"] > 0
    assert any("rcgrpo/train_step.py" in place for place in learner["host_syncs"])


def test_a_cpu_tensor_in_the_step_fails_with_the_line_that_made_it(monkeypatch):
    """A tensor created on the CPU inside the update and mixed with device tensors raises, naming the
    file and line; on a GPU the same op fails only after the weights are loaded."""
    editor = build_meta_editor(SHIPPED_EDITOR_DIR)
    cfg = MethodConfig(group_size=4, num_steps=4, anchors=2, steps_per_anchor=2)
    add_lora(editor.transformer, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    stock = train_step.one_step_prediction

    def planted(*args):
        x_theta = stock(*args)
        return x_theta + torch.zeros(x_theta.shape[-1])  # the planted CPU tensor

    monkeypatch.setattr(train_step, "one_step_prediction", planted)
    with pytest.raises(PlacementError, match=r"tests/test_trace.py:\d+: return x_theta \+ torch.zeros"):
        trace_update(editor, cfg, 64, [0, 1, 2, 3, 4], groups_per_step=1, micro_batch_rows=2)
    monkeypatch.undo()
    traced = trace_update(editor, cfg, 64, [0, 1, 2, 3, 4], groups_per_step=1, micro_batch_rows=2)
    assert traced.peak_bytes > 0
