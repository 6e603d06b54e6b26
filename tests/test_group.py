"""One rollout group sampled by rcgrpo.group (what the worker, the demo and the benchmarks share), and
its record (services.record): the training tensors the learner rebuilds are the ones sampled."""

import dataclasses

import pytest
import torch
from PIL import Image

from rcgrpo.config import MethodConfig
from rcgrpo.data.shapes import generate_shapes_edit
from rcgrpo.group import sample_group, start_group
from rcgrpo.noise import latent_mask, token_weights
from services.blobstore import BlobStore
from services.codec import CodecError
from services.record import (
    GroupImages,
    GroupKey,
    RolloutGroup,
    decode_rollout_group,
    encode_rollout_group,
    encode_train_tensors,
    group_meta,
    load_train_group,
)

CFG = MethodConfig(group_size=4, num_steps=4)


@pytest.fixture(scope="module")
def sample():
    return generate_shapes_edit(1, split="test", seed=3)[0]


def test_the_group_follows_the_method_config(tiny_editor, sample):
    h, w = tiny_editor.latent_size(*sample.mask.shape)
    soft = CFG.model_copy(update={"mask_dilation": 1, "mask_feather": 0.7})
    start = start_group(tiny_editor, soft, sample, noise_seed=5)
    assert torch.equal(start.mask_latent, latent_mask(sample.mask, (h, w), dilation=1, feather=0.7))
    assert start.initial_latents.shape == (CFG.group_size, tiny_editor.latent_channels, h, w)

    group = sample_group(tiny_editor, soft, sample, noise_seed=5, kept_states=[1, 2])
    assert torch.equal(group.token_weights, token_weights(start.mask_latent))
    hard = sample_group(tiny_editor, CFG, sample, noise_seed=5)
    assert (group.token_weights > hard.token_weights).any()  # dilation and feathering reach w(u)
    assert group.rollout.kept_states == [1, 2] and group.rollout.states.shape[:2] == (2, CFG.group_size)
    assert hard.rollout.kept_states == list(range(CFG.num_steps + 1))
    assert group.acd.shape == (CFG.group_size,) and ((group.acd >= 0) & (group.acd <= 1)).all()
    # a seed is a group: the same seed gives the same candidates
    again = sample_group(tiny_editor, CFG, sample, noise_seed=5)
    assert torch.equal(again.rollout.images, hard.rollout.images) and torch.equal(again.acd, hard.acd)


def test_rdp_keeps_the_groups_background_closer_than_global_noise(tiny_editor, sample, tmp_path):
    from deploy.cli import main

    background = (1 - sample.mask).bool()
    spread = {}
    for rdp in (True, False):
        images = sample_group(tiny_editor, CFG.model_copy(update={"rdp": rdp}), sample, 0).rollout.images
        spread[rdp] = images.std(dim=0)[:, background].mean().item()
    assert spread[True] < 0.5 * spread[False], spread

    # `rcgrpo demo` samples the same way: both groups in one grid, RDP on top
    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out)]) == 0
    with Image.open(out) as grid:
        group_size, size = MethodConfig().group_size, sample.mask.shape[0]
        assert grid.size == (group_size * size, 2 * size)


def test_the_record_carries_what_the_learner_trains_on(tiny_editor, sample, client):
    group = sample_group(tiny_editor, CFG, sample, noise_seed=1, kept_states=[0, 1, 3, 4])
    key = GroupKey(run="record", group_id="task-0000007", policy_version=2)
    train_blobs = BlobStore(client, prefix="train:")
    rewards = {"region_adherence": 1.0, "acd": 0.25}
    record = RolloutGroup(
        group_meta(key, group, sample, rewards),
        train=train_blobs.put(encode_train_tensors(group), name=key.id),
        images=GroupImages(sample.source, sample.mask, list(group.rollout.images), sample.target),
    )
    decoded = decode_rollout_group(encode_rollout_group(record, BlobStore(client)), BlobStore(client))
    assert decoded.meta == record.meta and decoded.meta.rewards == rewards
    assert decoded.train.key == train_blobs.key_for("record:task-0000007:v2")
    assert len(decoded.images.edits) == CFG.group_size
    assert (torch.stack(decoded.images.edits) - group.rollout.images).abs().max() <= 0.5 / 255 + 1e-6

    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    rebuilt = load_train_group(decoded, advantages, tiny_editor.device, train_blobs.get(decoded.train))
    expected = group.train_group(advantages)
    for name in ("sigmas", "states", "token_weights", "background_weights", "advantages"):
        assert torch.equal(getattr(rebuilt, name), getattr(expected, name)), name
    assert rebuilt.kept_states == expected.kept_states == [0, 1, 3, 4]
    for field in dataclasses.fields(expected.cond):
        built, sampled = getattr(rebuilt.cond, field.name), getattr(expected.cond, field.name)
        assert torch.equal(built, sampled) if isinstance(sampled, torch.Tensor) else built == sampled

    # a record whose images do not have the group's size is refused, naming the group
    misfit = dataclasses.replace(record, images=dataclasses.replace(record.images, mask=sample.mask[:32]))
    with pytest.raises(CodecError, match="record:task-0000007:v2.*mask"):
        decode_rollout_group(encode_rollout_group(misfit, BlobStore(client)), BlobStore(client))
