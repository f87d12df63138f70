"""Toy-world codec, ToyID metric pieces and the evaluation helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idcrafter.toyworld.codec import PixelUnshuffleCodec
from idcrafter.toyworld.embedder import ToyIDEmbedder, crop_to_box
from idcrafter.toyworld.evaluate import shuffled_partner
from idcrafter.toyworld.metrics import ToyIDScorer, background_colour, detect_sprites
from idcrafter.toyworld.world import make_clip, make_reference, split_pools


def test_codec_is_lossless_and_saves(tmp_path):
    codec = PixelUnshuffleCodec(factor=8)
    x = torch.rand(2, 3, 5, 64, 48) * 2 - 1
    z = codec.encode(x).latent_dist.mode()
    assert z.shape == (2, 192, 5, 8, 6)
    assert torch.equal(codec.decode(z).sample, x)
    codec.save_pretrained(tmp_path / "vae")
    again = PixelUnshuffleCodec.from_pretrained(tmp_path / "vae")
    assert again.config.z_dim == 192 and again.config.scale_factor_temporal == 1
    with pytest.raises(ValueError, match="multiple of 8"):
        codec.encode(torch.zeros(1, 3, 1, 60, 64))


def test_pipeline_runs_on_the_codec(tmp_path):
    from idcrafter.video.config import IDCrafterConfig
    from idcrafter.video.pipeline import IDCrafterPipeline
    from idcrafter.video.presets import build_components

    pipe = IDCrafterPipeline.from_components(build_components(IDCrafterConfig.from_preset("toyworld"), seed=0))
    pipe.set_progress_bar_config(disable=True)
    frames = pipe("one object stays in the middle", [np.full((64, 64, 3), 255, np.uint8)], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 5, 64, 64, 3)
    assert pipe.vae.config.z_dim == 48  # the 4x codec
    pipe.save_pretrained(tmp_path / "model")
    loaded = IDCrafterPipeline.from_pretrained(tmp_path / "model")
    loaded.set_progress_bar_config(disable=True)
    again = loaded("one object stays in the middle", [np.full((64, 64, 3), 255, np.uint8)], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).frames
    np.testing.assert_array_equal(frames, again)


def test_detect_sprites_finds_each_visible_identity():
    train, _ = split_pools(0)
    rng = np.random.default_rng(3)
    clip = make_clip([train[0], train[500]], 1, 64, rng)
    frame = clip.frames[0]
    assert np.abs(background_colour(frame).astype(int) - frame[0, 0].astype(int)).max() < 40
    found = detect_sprites(frame)
    assert 1 <= len(found) <= 2
    # every detection overlaps a true mask, and the largest true mask is found
    for mask in found:
        assert max((mask & clip.masks[k, 0]).sum() for k in range(2)) > 0.5 * mask.sum()
    assert detect_sprites(np.full((64, 64, 3), 200, np.uint8)) == []


def test_crop_to_box_whitens_outside_mask():
    img = np.zeros((64, 64, 3), np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[10:20, 30:50] = True
    crop = crop_to_box(img, mask)
    assert crop.shape == (3, 32, 32)
    assert crop.min() == 0.0 and crop.max() == 1.0  # black object on white surround
    assert crop_to_box(img, np.zeros((64, 64), bool)).min() == 1.0


def test_scorer_with_an_untrained_embedder_is_well_defined():
    train, _ = split_pools(0)
    rng = np.random.default_rng(0)
    clip = make_clip([train[1], train[2]], 5, 64, rng)
    refs = [make_reference(train[1], 64, rng), make_reference(train[2], 64, rng)]
    torch.manual_seed(0)
    scorer = ToyIDScorer(ToyIDEmbedder().eval())
    scores = scorer.subject_scores(clip.frames, refs)
    assert scores.shape == (2,) and np.all((scores >= 0) & (scores <= 1))
    blank = np.full((5, 64, 64, 3), 230, np.uint8)
    assert scorer.score(blank, refs) == {"toyid_mean": 0.0, "toyid_min": 0.0}  # nothing detected


def test_shuffled_partner_keeps_subject_count():
    counts = [1, 2, 1, 3, 2]
    assert [shuffled_partner(counts, i) for i in range(5)] == [2, 4, 0, 3, 1]
