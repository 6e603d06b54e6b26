"""`rcgrpo plan`: sizes from the architecture, the payload layout a group really carries, and the fit
check that stops a run before launch."""

import pytest
import torch

from deploy.cli import main as cli_main
from rcgrpo.config import MethodConfig
from rcgrpo.group import sample_group
from rcgrpo.plan import (
    Calibration,
    architecture,
    fit_problems,
    layout_bytes,
    make_plan,
    train_tensor_layout,
)
from rcgrpo.sampler import states_of_steps
from services.codec import decode_tensors, encode_tensors
from services.config import DEFAULT_RUN_CONFIG, load_run_config
from services.record import encode_train_tensors

MIB = 1024**2
FLUX_CONFIG = "configs/flux_kontext_compbench.yaml"


@pytest.fixture(scope="module")
def flux():
    return architecture(None, 32, MethodConfig().lora_targets)


def test_flux_architecture_from_the_published_configs(flux):
    """FLUX.1 Kontext [dev]: the 12B transformer, T5-XXL + CLIP-L, the 16-channel VAE; a rank-32 LoRA
    on the attention projections is 52.3M parameters, ~209 MB a version in float32."""
    assert flux.params["transformer"] == 11_901_408_320
    assert flux.params["text_encoder_2"] == 4_762_310_656 and flux.params["text_encoder"] == 123_060_480
    assert (flux.dim, flux.blocks, flux.latent_channels, flux.vae_scale_factor) == (3072, 57, 16, 8)
    assert flux.lora_params == 52_297_728
    assert flux.sequence(1024, 1024) == 512 + 2 * 4096


def test_the_layout_is_what_a_group_carries_and_its_bytes(tiny_editor, tiny_editor_dir, flux):
    """train_tensor_layout names exactly the tensors (shape, dtype) a sampled group's training blob
    holds; bytes per group then follow for any size: Kontext-1024 in bf16 (the states in float32) with
    the 9 grid states of 8 steps is 112.6 MiB, with the flagship's kept steps 0..3 (5 states) 64.6 MiB."""
    from rcgrpo.data.shapes import generate_shapes_edit

    cfg = MethodConfig(group_size=4, num_steps=4)
    keep = states_of_steps(cfg.num_steps, [0, 1])
    sample = generate_shapes_edit(1, split="test", seed=3)[0]
    group = sample_group(tiny_editor, cfg, sample, noise_seed=1, kept_states=keep)
    blob = encode_train_tensors(group)
    tensors = decode_tensors(blob)
    arch = architecture(tiny_editor_dir, cfg.lora_rank, cfg.lora_targets)
    height, width = sample.source.shape[-2:]
    layout = train_tensor_layout(
        arch, height, width, cfg.group_size, cfg.num_steps, len(keep), tiny_editor.dtype
    )
    assert {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()} == layout
    assert 0 < len(blob) - layout_bytes(layout) < 4096  # the safetensors header

    sizes = {}
    for states in (9, 5):
        kontext = train_tensor_layout(flux, 1024, 1024, 12, 8, states, torch.bfloat16)
        encoded = encode_tensors({n: torch.zeros(shape, dtype=dt) for n, (shape, dt) in kontext.items()})
        sizes[states] = len(encoded) / MIB
    assert sizes[9] == pytest.approx(112.6, abs=0.05) and sizes[5] == pytest.approx(64.6, abs=0.05)


def _flux_plan(flux, checkpointing: bool):
    return make_plan(
        flux,
        Calibration("given", saved_width=15.0),
        height=1024,
        width=1024,
        dtype=torch.bfloat16,
        group_size=12,
        num_steps=8,
        num_states=5,
        trainable_steps=4,
        anchors=4,
        steps_per_anchor=4,
        groups_per_step=8,
        update_epochs=1,
        background_anchor=False,
        gradient_checkpointing=checkpointing,
        micro_batch_rows=[1, 4, 8, 16, None],
    )


def test_fit_problems_name_the_setting_that_fixes_them(flux):
    checkpointed = _flux_plan(flux, checkpointing=True)
    assert fit_problems(checkpointed, 79, 4) == []
    rows = checkpointed.learner_memory
    assert rows[1]["activations"] < rows[4]["activations"] < rows[16]["activations"]
    (problem,) = fit_problems(checkpointed, 79, 16)
    assert "learner.micro_batch_rows=16" in problem and "learner.micro_batch_rows=8 fits" in problem
    plain = _flux_plan(flux, checkpointing=False)  # one 1024^2 row keeps ~43 GiB
    (problem,) = fit_problems(plain, 79, 4)
    assert "learner.micro_batch_rows=1 fits" in problem
    (problem,) = fit_problems(plain, 64, 1)
    assert "set learner.gradient_checkpointing=true" in problem
    problems = fit_problems(checkpointed, 32, 1)  # too small for the rollout worker too
    assert len(problems) == 2 and "rollout worker" in problems[0]
    assert checkpointed.weight_version_bytes == 4 * 52_297_728  # float32, as trained


def test_train_refuses_a_run_that_cannot_fit_before_anything_starts(tmp_path, capsys):
    code = cli_main(
        [
            "train",
            "--config",
            FLUX_CONFIG,
            "--set",
            f"runs_dir={tmp_path}",
            "--set",
            "learner.micro_batch_rows=16",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "does not fit its GPUs" in err and "learner.micro_batch_rows=8 fits" in err
    assert not any(tmp_path.iterdir())  # no run directory, no Redis, no Ray


def test_kept_steps_must_train_k_steps_per_anchor():
    with pytest.raises(ValueError, match="rollout.kept_steps .* gives 2 trainable steps"):
        load_run_config(FLUX_CONFIG, ["rollout.kept_steps=[4, 5]"])
    with pytest.raises(ValueError, match=r"outside the 8-step grid"):
        load_run_config(FLUX_CONFIG, ["rollout.kept_steps=[0, 1, 2, 8]"])


def test_a_worker_keeps_the_states_of_the_trained_steps_only():
    late = load_run_config(DEFAULT_RUN_CONFIG, ["method.train_steps_from=0.5"])
    assert late.trained_steps == [4, 5, 6, 7] and late.kept_states == [4, 5, 6, 7, 8]
    every = load_run_config(DEFAULT_RUN_CONFIG, ["method.train_steps_from=0"])
    assert every.kept_states == list(range(9))
    # FLUX trains the late half: its workers keep x_4..x_8, and kept early steps leave nothing to train on
    assert load_run_config(FLUX_CONFIG).kept_states == [4, 5, 6, 7, 8]
    with pytest.raises(
        ValueError, match=r"gives 0 trainable steps among method.trained_steps \[4, 5, 6, 7\]"
    ):
        load_run_config(FLUX_CONFIG, ["rollout.kept_steps=[0, 1, 2, 3]"])


def test_the_anchor_passes_the_plan_counts_are_the_distinct_rows_the_update_samples():
    """The plan's reference passes per group (rc_grpo_step makes one per distinct (k, j) row of its epochs)
    match what the update's own row sampler draws, averaged over many updates."""
    from rcgrpo.config import MethodConfig
    from rcgrpo.editor import EditCondition
    from rcgrpo.plan import expected_distinct_rows
    from rcgrpo.train_step import TrainGroup, _sample_rows

    cfg = MethodConfig(group_size=8, num_steps=8, anchors=4, steps_per_anchor=4, update_epochs=4)
    cond = EditCondition(
        torch.zeros(1, 2, 4), torch.zeros(1, 4), torch.zeros(2, 3), torch.ones(1, 2, dtype=torch.bool),
        torch.zeros(1, 3, 4), torch.zeros(6, 3), None, 8, 8,
    )  # fmt: skip
    group = TrainGroup(cond, torch.linspace(1, 0, 9), list(range(9)), torch.zeros(9, 8, 3, 4),
                       torch.zeros(3), torch.zeros(8))  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    counts = []
    for _ in range(400):
        epochs = [_sample_rows([group], cfg, generator) for _ in range(cfg.update_epochs)]
        counts.append(len({(int(k), int(j)) for e in epochs for k, j in zip(e.anchor, e.step, strict=True)}))
    expected = expected_distinct_rows(8, 8, 4, 4, 4)
    assert expected == pytest.approx(64 * (1 - 0.75**4))  # 43.75 of the 64 rows the epochs process
    assert sum(counts) / len(counts) == pytest.approx(expected, abs=0.3)


def test_plan_says_where_the_payloads_wait_and_how_many_bytes(capsys):
    assert cli_main(["plan", "--config", FLUX_CONFIG]) == 0
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("payloads:")]
    # 25 checkpoints' worth of 8 groups, 64.58 MiB each, as files on the runs volume
    assert "= 200 training blobs (12.61 GiB)" in line
    assert "runs/flux-kontext-compbench/payloads (blob_store directory)" in line
    assert cli_main(["plan", "--set", "learner.checkpoint_every=3"]) == 0  # the tiny run (2 per step): Redis
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("payloads:")]
    assert "= 6 training blobs" in line and "in the run's Redis (blob_store redis)" in line


def test_the_instruction_terms_must_be_among_the_runs_rewards():
    """The learner measures the instruction's spread (diagnostics, noise floor) on these terms."""
    assert load_run_config(FLUX_CONFIG).reward.instruction_terms == ["lc_t"]
    with pytest.raises(ValueError, match=r"reward: .*instruction_terms \['region_adherence'\] are not among"):
        load_run_config(FLUX_CONFIG, ["reward.instruction_terms=[region_adherence]"])
