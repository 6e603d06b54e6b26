"""`rcgrpo pretrain` continuing a trained editor (init_from): it starts from that editor's weights."""

import pytest
import torch

from rcgrpo.editor import load_editor
from rcgrpo.pretrain import PretrainConfig, pretrain
from rcgrpo.tiny_editor import SHIPPED_EDITOR_DIR


def test_init_from_continues_the_given_editor_rather_than_a_fresh_one(tmp_path):
    cfg = PretrainConfig(
        init_from=str(SHIPPED_EDITOR_DIR),
        train_samples=8,
        flow_steps=2,
        flow_batch_size=4,
        flow_cycle_steps=0,
    )
    path, facts = pretrain(tmp_path / "continued", cfg, eval_samples=0)
    assert facts["init_from"] == str(SHIPPED_EDITOR_DIR) and facts["cycles"] == []
    shipped, continued = load_editor(SHIPPED_EDITOR_DIR, device="cpu"), load_editor(path, device="cpu")
    for name, weight in shipped.vae.state_dict().items():  # the VAE stage is skipped: the latent space stays
        assert torch.equal(weight, continued.vae.state_dict()[name]), name
    start = torch.cat([p.flatten() for p in shipped.transformer.parameters()])
    end = torch.cat([p.flatten() for p in continued.transformer.parameters()])
    # two small AdamW steps: moved, but next to where it started (a fresh transformer is far away)
    assert 0 < (end - start).norm() < 0.05 * start.norm()


def test_init_from_and_vae_from_are_exclusive():
    with pytest.raises(ValueError, match="vae_from or init_from"):
        PretrainConfig(init_from="a", vae_from="b")


def test_the_pretrain_flags_are_the_config_fields_with_their_defaults():
    import argparse

    from deploy.commands.pretrain import FLAGS, add_arguments
    from services.config import section_from_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", "x", "--flow-steps", "7", "--train-text-encoders", "--vae-from", "v"])
    cfg = section_from_arguments(PretrainConfig, args, FLAGS)
    assert (cfg.flow_steps, cfg.train_text_encoders, cfg.vae_from) == (7, True, "v")
    assert (
        cfg.model_copy(update={"flow_steps": 9000, "train_text_encoders": False, "vae_from": None})
        == PretrainConfig()
    )
    with pytest.raises(ValueError, match="--flow-steps: Input should be greater than or equal to 1"):
        section_from_arguments(PretrainConfig, parser.parse_args(["--out", "x", "--flow-steps", "0"]), FLAGS)


def test_a_timed_pretraining_stops_at_a_cycle_end_and_its_card_gives_each_kind_and_its_spread(tmp_path):
    from rcgrpo.config import MethodConfig
    from rcgrpo.pretrain import model_card_scores, write_model_card

    # any positive budget is spent by the first cycle: the run stops at its end, not at flow_steps
    cfg = PretrainConfig(
        init_from=str(SHIPPED_EDITOR_DIR),
        train_samples=8,
        flow_steps=50,
        flow_batch_size=2,
        flow_cycle_steps=3,
        flow_seconds=1e-9,
    )
    path, facts = pretrain(tmp_path / "timed", cfg, eval_samples=0)
    assert facts["flow_steps_trained"] == 3
    method = MethodConfig(group_size=4, s_in=0.3)
    scores = model_card_scores(path, cfg, num_samples=4, method=method)
    card = write_model_card(path, cfg, facts, "rcgrpo pretrain ...", scores, num_samples=4).read_text()
    assert "transformer steps: 3" in card
    assert scores["spread_method"] == {"group_size": 4, "s_in": 0.3, "s_out": 0.0}
    for task, spread in scores["spread"].items():
        assert f"| {task} | {scores['tasks'][task]:.3f} |" in card
        assert (
            f"| {task} | {spread['groups']} | {spread['adherence']:.3f} | {spread['best_adherence']:.3f} |"
            in card
        )
    assert sum(spread["groups"] for spread in scores["spread"].values()) == 4


def test_the_within_group_spread_is_zero_without_exploration_and_positive_with_it():
    from rcgrpo.config import MethodConfig
    from rcgrpo.data.shapes import generate_shapes_edit
    from rcgrpo.evaluate import within_group_spread

    editor = load_editor(SHIPPED_EDITOR_DIR, device="cpu")
    samples = generate_shapes_edit(6, split="test", seed=0)
    # s_in = s_out = 0: every candidate starts from the shared z*, so the deterministic ODE gives G equal edits
    still = within_group_spread(editor, samples, MethodConfig(group_size=4, s_in=0.0, s_out=0.0))
    assert all(spread["mean_std"] == 0.0 for spread in still.values())
    # G equal edits: a group's candidates all succeed or all fail, and its best is its mean
    for spread in still.values():
        assert spread["success_share"] == spread["groups_with_success"]
        assert spread["best_adherence"] == pytest.approx(spread["adherence"])
    explored = within_group_spread(editor, samples, MethodConfig(group_size=4, s_in=1.0))
    assert explored.keys() == still.keys() and sum(spread["groups"] for spread in explored.values()) == 6
    assert all(spread["mean_std"] > 0 for spread in explored.values())
    assert all(spread["best_adherence"] > spread["adherence"] for spread in explored.values())
