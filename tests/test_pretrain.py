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
