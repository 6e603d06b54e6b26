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
