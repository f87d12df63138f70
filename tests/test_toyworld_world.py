"""Toy world generator: identities and pools, sprites, references, clips with visible masks, prompts, datasets."""

from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pytest
from PIL import Image

from idcrafter.data.manifest import load_manifest
from idcrafter.toyworld.world import (
    IDENTITY_WORDS,
    PALETTE,
    SHAPES,
    TEXTURE_ORIENTATIONS,
    TEXTURES,
    Identity,
    Motion,
    identity_space,
    make_clip,
    make_reference,
    make_sample,
    prompt_words,
    render_identity,
    split_pools,
    write_dataset,
)
from idcrafter.utils.media import read_video


def rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    return write_dataset(folder / "a", 4, seed=3), write_dataset(folder / "b", 4, seed=3)


# -- identities and pools -----------------------------------------------------------------------


def test_identity_space_is_complete_and_keys_round_trip():
    space = identity_space()
    per_palette = sum(len(o) for o in TEXTURE_ORIENTATIONS.values())
    assert len(space) == len(SHAPES) * len(PALETTE) * (len(PALETTE) - 1) * per_palette == 9360
    assert len({i.key for i in space}) == len(space)
    assert all(Identity.from_key(i.key) == i for i in space[::97])
    assert all(i.primary != i.secondary for i in space)


@pytest.mark.parametrize(
    "args",
    [("blob", "red", "blue", "solid", 0), ("circle", "red", "mauve", "solid", 0),
     ("circle", "red", "red", "solid", 0), ("circle", "red", "blue", "plaid", 0),
     ("circle", "red", "blue", "solid", 45), ("circle", "red", "blue", "checker", 90)],
)
def test_identity_rejects_bad_attributes(args):
    with pytest.raises(ValueError):
        Identity(*args)


def test_pools_are_disjoint_cover_the_space_and_hold_out_whole_groups():
    train, held_out = split_pools(seed=0, held_out_fraction=0.2)
    assert set(train).isdisjoint(held_out)
    assert set(train) | set(held_out) == set(identity_space())
    assert len(held_out) / len(identity_space()) == pytest.approx(0.2, abs=0.01)
    # a held-out identity differs from every training identity in shape or colours
    assert {i.group for i in train}.isdisjoint({i.group for i in held_out})
    # every attribute value is still seen in training
    assert {i.shape for i in train} == set(SHAPES)
    assert {i.primary for i in train} == {i.secondary for i in train} == set(PALETTE)
    assert {i.texture for i in train} == set(TEXTURES)
    assert split_pools(seed=0) == (train, held_out)
    assert split_pools(seed=1)[1] != held_out


# -- sprites and references ---------------------------------------------------------------------


def on_white(sprite: np.ndarray) -> np.ndarray:
    alpha = sprite[..., 3:] / 255.0
    return sprite[..., :3] * alpha + 255.0 * (1.0 - alpha)


def test_render_identity_is_an_antialiased_sprite():
    sprite = render_identity(Identity("star", "red", "blue", "stripes", 45), 24)
    assert sprite.shape == (24, 24, 4) and sprite.dtype == np.uint8
    assert sprite[0, 0, 3] == 0 and sprite[12, 12, 3] == 255
    assert ((sprite[..., 3] > 0) & (sprite[..., 3] < 255)).sum() > 10  # a soft rim
    assert render_identity(Identity("ring", "red", "blue", "solid"), 24)[12, 12, 3] == 0  # the ring's hole


def test_render_identity_different_identities_differ_more_than_a_small_turn():
    a = on_white(render_identity(Identity("star", "red", "blue", "stripes", 45), 24))
    b = on_white(render_identity(Identity("circle", "green", "yellow", "dots", 0), 24))
    assert mad(a, b) > 30.0
    space = identity_space()
    picks = rng(0).choice(len(space), size=(20, 2), replace=False)
    for i, j in picks:
        sprite = on_white(render_identity(space[i], 24))
        turned = on_white(render_identity(space[i], 24, angle=3.0))
        other = on_white(render_identity(space[j], 24))
        assert mad(sprite, turned) < mad(sprite, other), (space[i].key, space[j].key)


def test_every_variant_of_a_shape_and_palette_is_distinct_at_16px():
    """Recognisable when small: the 13 texture variants of each shape stay apart at 16 px."""
    for shape in SHAPES:
        sprites = [render_identity(Identity(shape, "yellow", "black", t, o), 16)
                   for t in TEXTURES for o in TEXTURE_ORIENTATIONS[t]]
        assert min(mad(x, y) for x, y in combinations(sprites, 2)) > 3.0, shape


def test_reference_is_augmented_on_white_and_never_the_clip_crop():
    identity = Identity("hexagon", "orange", "purple", "half", 45)
    ref = make_reference(identity, 64, rng(0))
    assert ref.shape == (64, 64, 3) and ref.dtype == np.uint8
    assert (ref[0, 0] == 255).all() and (ref[-1, -1] == 255).all()
    assert not np.array_equal(ref, make_reference(identity, 64, rng(1)))
    assert np.array_equal(ref, make_reference(identity, 64, rng(0)))
    clip = make_clip([identity], 9, 64, rng(2), background=(255, 255, 255))
    motion = clip.motions[0]
    x, y, _ = motion.at(0, 9)
    crop = clip.frames[0, y : y + motion.sprite_size, x : x + motion.sprite_size]
    small = np.asarray(Image.fromarray(ref).resize(crop.shape[:2][::-1], Image.BILINEAR))
    assert not np.array_equal(small, crop) and mad(small, crop) > 1.0


# -- clips --------------------------------------------------------------------------------------


def test_make_clip_is_deterministic_and_shaped():
    ids = identity_space()[::3001][:3]
    a, b, c = (make_clip(ids, 9, 64, rng(s)) for s in (5, 5, 6))
    assert a.frames.shape == (9, 64, 64, 3) and a.frames.dtype == np.uint8
    assert a.masks.shape == (3, 9, 64, 64) and a.masks.dtype == bool
    assert a.boxes.shape == (3, 9, 4)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.masks, b.masks) and a.prompt == b.prompt
    assert not np.array_equal(a.frames, c.frames)
    assert not (a.masks.sum(axis=0) > 1).any()  # visible masks are disjoint
    assert (a.masks.sum(axis=(2, 3)) > 0).all()  # every identity visible in every frame


@pytest.mark.parametrize("frames", [0, 2, 8, 10, 16])
def test_make_clip_rejects_frame_counts_that_are_not_4n_plus_1(frames):
    with pytest.raises(ValueError, match="4n\\+1"):
        make_clip(identity_space()[:1], frames, 64, rng(0))


def test_masks_are_visible_pixels_under_occlusion():
    back = Identity("square", "blue", "yellow", "solid", 0)
    front = Identity("circle", "red", "green", "border", 0)
    motions = [Motion("still", (10.0, 20.0), (10.0, 20.0), 26, depth=0),
               Motion("left_to_right", (20.0, 22.0), (30.0, 22.0), 26, depth=1)]
    clip = make_clip([back, front], 5, 64, rng(0), background=(240, 240, 240), motions=motions)
    whole_back = render_identity(back, 26)[..., 3] > 127
    for f in range(5):
        x, y, _ = motions[1].at(f, 5)
        occluder = np.zeros((64, 64), bool)
        occluder[y : y + 26, x : x + 26] = render_identity(front, 26)[..., 3] > 127
        assert not (clip.masks[0, f] & occluder).any()  # the occluder's pixels are not the back's
        assert 0 < clip.masks[0, f].sum() < whole_back.sum()
        assert (clip.masks[1, f] == occluder).mean() > 0.99  # the front identity is whole
    # the box is the whole identity, occlusion ignored
    assert clip.boxes[0, 0, 2] - clip.boxes[0, 0, 0] > np.ptp(np.nonzero(clip.masks[0, 0])[1])
    assert clip.prompt == ("two objects: the first stays on the left, the second moves from left to right "
                           "through the middle; the second is in front of the first.")


def test_prompts_describe_layout_and_motion_only():
    for index in range(24):
        sample = make_sample(index, seed=11)
        words = prompt_words(sample.clip.prompt)
        assert not IDENTITY_WORDS & set(words), sample.clip.prompt
        n = len(sample.identities)
        assert words[0] == ("one", "two", "three")[n - 1]
        for k, ordinal in enumerate(("first", "second", "third")):
            assert (ordinal in words) == (1 < n and k < n), sample.clip.prompt


# -- datasets -----------------------------------------------------------------------------------


def test_written_dataset_loads_and_is_deterministic(dataset):
    first, second = dataset
    samples, errors = load_manifest(first)
    assert errors == [] and len(samples) == 4
    assert all(s.split == "train" and s.fps == 8 and s.has_masks for s in samples)
    assert first.read_bytes() == second.read_bytes()
    assert (first.parent / "identities.json").read_bytes() == (second.parent / "identities.json").read_bytes()
    other = write_dataset(first.parent.parent / "c", 4, seed=4)
    assert other.read_bytes() != first.read_bytes()
    for index in range(2):  # same arguments -> same frames
        a, b = make_sample(index, 3), make_sample(index, 3)
        assert np.array_equal(a.clip.frames, b.clip.frames)
        assert all(np.array_equal(x, y) for x, y in zip(a.references, b.references))


def test_decoded_mask_videos_match_the_true_masks(dataset):
    samples, _ = load_manifest(dataset[0])
    for index, sample in enumerate(samples):
        truth = make_sample(index, 3)
        assert sample.id == truth.id and sample.prompt == truth.clip.prompt
        video = read_video(sample.video)
        assert video.shape == truth.clip.frames.shape and mad(video, truth.clip.frames) < 12.0
        for k, subject in enumerate(sample.subjects):
            decoded = read_video(subject.mask).astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
            assert ((decoded / 255.0 >= 0.5) == truth.clip.masks[k]).mean() >= 0.98
            ref = np.asarray(Image.open(subject.image))
            assert np.array_equal(ref, truth.references[k])


def test_pool_datasets_use_only_their_pool(dataset, tmp_path):
    train, held_out = (set(pool) for pool in split_pools(seed=0))
    meta = json.loads((dataset[0].parent / "identities.json").read_text())
    keys = {key for record in meta["samples"] for key in record["identities"]}
    assert keys and all(Identity.from_key(k) in train for k in keys)
    for index in range(12):  # more samples, no files
        assert set(make_sample(index, 7).identities) <= train
        assert set(make_sample(index, 7, pool="held_out").identities) <= held_out
    manifest = write_dataset(tmp_path, 2, seed=0, pool="held_out", subjects=(2, 2))
    samples, errors = load_manifest(manifest)
    assert errors == [] and all(s.split == "held_out" and len(s.subjects) == 2 for s in samples)
    meta = json.loads((tmp_path / "identities.json").read_text())
    assert all(Identity.from_key(k) in held_out for r in meta["samples"] for k in r["identities"])


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_frames=8), dict(size=60), dict(pool="test"), dict(subjects=(0, 2)), dict(subjects=(2, 4)),
     dict(num_samples=0)],
)
def test_write_dataset_validates_arguments_before_writing(kwargs, tmp_path):
    args = dict(num_samples=1, seed=0) | kwargs
    with pytest.raises(ValueError):
        write_dataset(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()
