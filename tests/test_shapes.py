import re

import numpy as np
import pytest
import torch

from rcgrpo.data import EditSample, ShapesEditConfig, generate_shapes_edit
from rcgrpo.data.shapes import HELD_OUT_PAIRS, PALETTE, SHAPES, shape_footprint
from rcgrpo.tiny_editor import WORDS


@pytest.fixture(scope="module")
def train():
    return generate_shapes_edit(200, "train", seed=7)


@pytest.fixture(scope="module")
def test_split():
    return generate_shapes_edit(80, "test", seed=7)


def _looks(objects):
    return {(o["colour"], o["shape"]) for o in objects}


def test_deterministic_and_prefix_stable():
    a = generate_shapes_edit(6, "train", seed=3)
    b = generate_shapes_edit(3, "train", seed=3)
    c = generate_shapes_edit(3, "train", seed=4)
    for x, y in zip(a[:3], b, strict=True):
        assert x.id == y.id and x.instruction == y.instruction and x.meta == y.meta
        assert (
            torch.equal(x.source, y.source)
            and torch.equal(x.target, y.target)
            and torch.equal(x.mask, y.mask)
        )
    assert not torch.equal(a[0].source, c[0].source)
    assert a[0].id == "shapes-train-3-000000"


def test_tensors_types_and_ranges(train):
    for s in train[:40]:
        assert isinstance(s, EditSample)
        assert s.source.shape == s.target.shape == (3, 64, 64) and s.mask.shape == (64, 64)
        assert s.source.dtype == s.target.dtype == s.mask.dtype == torch.float32
        assert 0 <= s.source.min() and s.source.max() <= 1
        assert set(s.mask.unique().tolist()) <= {0.0, 1.0}
        assert 0 < s.mask.mean() < 0.5


def test_edit_confined_to_mask_and_mask_covers_change(train):
    sources = torch.stack([s.source for s in train])
    targets = torch.stack([s.target for s in train])
    masks = torch.stack([s.mask for s in train])
    changed = (sources != targets).any(dim=1)  # (N, H, W)
    assert not (changed & (masks == 0)).any()  # outside the mask source == target exactly
    assert changed.flatten(1).any(dim=1).all()  # every sample changes something


def test_kinds_balanced_and_captions(train):
    kinds = [s.kind for s in train]
    assert {k: kinds.count(k) for k in set(kinds)} == {"recolour": 50, "remove": 50, "add": 50, "replace": 50}
    for s in train:
        after = s.meta["edited_after"]
        if s.kind == "remove":
            assert s.caption == "background" and after is None
            assert s.meta["edited_before"] is not None
        else:
            article = "an" if after["colour"][0] in "aeiou" else "a"
            assert s.caption == f"{article} {after['colour']} {after['shape']}"
        assert len(s.meta["source_objects"]) >= (2 if s.kind != "add" else 1)
        assert max(len(s.meta["source_objects"]), len(s.meta["target_objects"])) <= 5


def test_remove_reveals_the_background_layer(train):
    # A removed object's pixels in the target are background only: muted gradient colours, never
    # the object's flat palette colour.
    for s in (s for s in train if s.kind == "remove"):
        before = s.meta["edited_before"]
        footprint = torch.from_numpy(
            shape_footprint(before["shape"], before["x"], before["y"], before["radius"], 64)
        )
        colour = torch.tensor(PALETTE[before["colour"]])[:, None]
        assert torch.allclose(s.source[:, footprint], colour.expand(-1, int(footprint.sum())))
        revealed = s.target[:, footprint]
        assert revealed.min() > 0.15 and revealed.max() < 0.85


def test_recolour_and_replace_keep_place_and_size(train):
    for s in train:
        if s.kind in ("recolour", "replace"):
            before, after = s.meta["edited_before"], s.meta["edited_after"]
            assert (before["x"], before["y"], before["size"]) == (after["x"], after["y"], after["size"])
            if s.kind == "recolour":
                assert before["shape"] == after["shape"] and before["colour"] != after["colour"]
            else:
                assert before["shape"] != after["shape"]


def test_instructions_use_tokenizer_words_and_name_the_edit(train, test_split):
    vocabulary = set(WORDS)
    for s in train + test_split:
        words = s.instruction.split()
        assert set(words) <= vocabulary, (s.instruction, set(words) - vocabulary)
        after, before = s.meta["edited_after"], s.meta["edited_before"]
        if after is not None:
            assert after["colour"] in words
            assert after["shape"] in words or s.kind == "recolour"
        if before is not None:
            assert before["shape"] in words and before["colour"] in words


def test_references_are_unique(train):
    """An instruction without size or position words names a look that only one object has."""
    size_words = {"small", "little", "tiny", "large", "big"}
    position = re.compile(r"\b(on the (left|right)|at the (top|bottom))\b")
    disambiguated = 0
    for s in train:
        before = s.meta["edited_before"]
        if before is None:
            continue
        same_look = [
            o
            for o in s.meta["source_objects"]
            if (o["colour"], o["shape"]) == (before["colour"], before["shape"])
        ]
        if len(same_look) == 1:
            continue
        disambiguated += 1
        words = set(s.instruction.split())
        same_size = [o for o in same_look if o["size"] == before["size"]]
        if len(same_size) == 1:
            assert words & size_words, s.instruction
        else:
            assert len(same_look) == 2 and position.search(s.instruction), s.instruction
    assert disambiguated > 5  # look-alike distractors do occur


def test_held_out_pairs_split(train, test_split):
    held = set(HELD_OUT_PAIRS)
    for s in train:
        assert not (_looks(s.meta["source_objects"]) | _looks(s.meta["target_objects"])) & held, s.id
    for s in test_split:
        edited = s.meta["edited_after"] or s.meta["edited_before"]
        assert (edited["colour"], edited["shape"]) in held, s.id
    seen = {(s.meta["edited_after"] or s.meta["edited_before"])["shape"] for s in test_split}
    assert seen == set(SHAPES)


def test_config_size_and_validation():
    big = generate_shapes_edit(4, "train", seed=0, config=ShapesEditConfig(size=96, max_objects=3))
    assert big[0].source.shape == (3, 96, 96)
    assert all(len(s.meta["target_objects"]) <= 3 for s in big)
    only_remove = generate_shapes_edit(3, "test", seed=0, config=ShapesEditConfig(kinds=("remove",)))
    assert [s.kind for s in only_remove] == ["remove"] * 3
    with pytest.raises(ValueError, match="unknown edit kind 'blur'"):
        ShapesEditConfig(kinds=("blur",))
    with pytest.raises(ValueError, match="min_objects"):
        ShapesEditConfig(min_objects=4, max_objects=3)
    crowded = ShapesEditConfig(min_objects=5, small_radius=0.3, large_radius=0.4)
    with pytest.raises(ValueError, match="could not lay out a 'recolour' scene in 1000 attempts"):
        generate_shapes_edit(1, "train", config=crowded)
    with pytest.raises(ValueError, match="split must be one of"):
        generate_shapes_edit(1, "val")


def test_shape_footprints_are_distinct():
    masks = {s: shape_footprint(s, 32, 32, 20, 64) for s in SHAPES}
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                assert (masks[a] != masks[b]).sum() > 40, (a, b)
    assert masks["ring"][32, 32] == 0 and masks["circle"][32, 32] == 1
    assert np.array_equal(masks["square"], masks["square"].T)
