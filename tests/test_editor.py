import json

import numpy as np
import pytest
import torch
from PIL import Image

from rcgrpo.editor import load_editor
from rcgrpo.sampler import rollout, states_of_steps


def _source(seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    # 8-bit values so the PIL round trip through the stock pipeline is exact
    return (torch.rand(1, 3, size, size, generator=g) * 255).round() / 255


def _latents(editor, n, seed=0, size=64):
    h, w = editor.latent_size(size, size)
    return torch.randn(n, editor.latent_channels, h, w, generator=torch.Generator().manual_seed(seed))


def test_tiny_editor_round_trips_through_the_loader(tiny_editor_dir, tiny_editor):
    sidecar = json.loads((tiny_editor_dir / "rcgrpo_editor.json").read_text())
    assert sidecar["max_sequence_length"] == tiny_editor.max_sequence_length == 32
    for module in (
        tiny_editor.transformer,
        tiny_editor.vae,
        tiny_editor.pipe.text_encoder,
        tiny_editor.pipe.text_encoder_2,
    ):
        assert not module.training
    again = load_editor(tiny_editor_dir)
    cond = tiny_editor.encode_condition(_source(), ["turn the blue circle red"], 2.5)
    cond2 = again.encode_condition(_source(), ["turn the blue circle red"], 2.5)
    a = rollout(tiny_editor, cond, _latents(tiny_editor, 2), num_steps=4)
    b = rollout(again, cond2, _latents(again, 2), num_steps=4)
    assert torch.equal(a.images, b.images)  # same seed, same output


def test_instruction_padding_is_masked(tiny_editor):
    cond = tiny_editor.encode_condition(_source(), ["turn the blue circle red"], 2.5)
    assert cond.text_mask.shape == (1, 32)
    # five whole-word tokens plus the end-of-sequence token; the rest is padding
    assert cond.text_mask.sum().item() == 6


def test_rollout_equals_the_stock_pipeline(tiny_editor):
    source, instruction, group = _source(1), "remove the small green square", 3
    initial = _latents(tiny_editor, group, seed=3)
    cond = tiny_editor.encode_condition(source, [instruction], 2.5)
    ours = rollout(tiny_editor, cond, initial, num_steps=8)
    pil = Image.fromarray((source[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    stock = tiny_editor.pipe(
        image=pil,
        prompt=[instruction] * group,
        latents=tiny_editor.pack(initial),
        num_inference_steps=8,
        guidance_scale=2.5,
        height=64,
        width=64,
        max_area=64 * 64,
        _auto_resize=False,
        max_sequence_length=32,
        output_type="pt",
    ).images
    assert (stock - ours.images).abs().max().item() <= 1e-5
    assert ours.states.shape == (9, group, 64, 4 * tiny_editor.latent_channels)
    assert torch.equal(ours.states[8], ours.final_latents)
    assert ours.sigmas[0] == 1.0 and ours.sigmas[-1] == 0.0


def test_rollout_keeps_only_requested_states(tiny_editor):
    cond = tiny_editor.encode_condition(_source(), ["add a red star"], 2.5)
    keep = states_of_steps(8, [2, 5])
    assert keep == [2, 3, 5, 6]
    full = rollout(tiny_editor, cond, _latents(tiny_editor, 2), num_steps=8)
    part = rollout(tiny_editor, cond, _latents(tiny_editor, 2), num_steps=8, kept_states=keep)
    assert part.states.shape[0] == 4
    for j in keep:
        assert torch.equal(part.states[keep.index(j)], full.states[j])
    with pytest.raises(ValueError, match="outside the 8-step grid"):
        states_of_steps(8, [8])


def test_bad_inputs_name_the_problem(tiny_editor, tmp_path):
    with pytest.raises(FileNotFoundError, match="local directories only"):
        load_editor("black-forest-labs/FLUX.1-Kontext-dev")
    (tmp_path / "transformer").mkdir()
    with pytest.raises(FileNotFoundError, match="missing vae"):
        load_editor(tmp_path)
    with pytest.raises(ValueError, match="multiple of 8"):
        tiny_editor.encode_condition(torch.rand(1, 3, 60, 64), ["x"], 2.5)
    cond = tiny_editor.encode_condition(_source(), ["x"], 2.5)
    with pytest.raises(ValueError, match="do not match the editor's latent shape"):
        rollout(tiny_editor, cond, torch.randn(2, tiny_editor.latent_channels, 8, 8), num_steps=2)
    with pytest.raises(ValueError, match="2 instructions for 1 source"):
        tiny_editor.encode_condition(_source(), ["x", "y"], 2.5)
