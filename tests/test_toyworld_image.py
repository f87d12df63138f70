"""The toy world's image variant: still-image datasets, the image codec, and the toy FLUX presets."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from idcrafter.data.buckets import Bucket
from idcrafter.data.dataset import VideoDataset
from idcrafter.data.manifest import load_manifest
from idcrafter.toyworld.codec import PixelUnshuffleImageCodec
from idcrafter.toyworld.world import (
    IDENTITY_WORDS,
    Identity,
    identity_space,
    make_clip,
    make_sample,
    prompt_words,
    split_pools,
    write_image_dataset,
)

SIZE, REF, SEED = 48, 24, 5


def rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two writes with the same arguments, and a held-out pool write."""
    root = tmp_path_factory.mktemp("toy_image")
    args = dict(num_samples=5, seed=SEED, size=SIZE, ref_size=REF, subjects=(1, 3))
    held = write_image_dataset(root / "held", 4, seed=SEED, pool="held_out", size=SIZE, ref_size=REF, subjects=(2, 3))
    return write_image_dataset(root / "a", **args), write_image_dataset(root / "b", **args), held


def truth(index: int, pool: str = "train", subjects=(1, 3)):
    return make_sample(index, SEED, pool, 1, SIZE, REF, subjects, motion_kind="still")


# -- still clips ---------------------------------------------------------------------------------


def test_still_single_frame_clip_describes_no_turn():
    ids = identity_space()[::2999][:3]
    for seed in range(6):
        clip = make_clip(ids, 1, 64, rng(seed), motion_kind="still")
        assert clip.frames.shape == (1, 64, 64, 3) and clip.masks.shape == (3, 1, 64, 64)
        assert all(m.kind == "still" and m.angle_end == m.angle_start and not m.turns for m in clip.motions)
        assert all(m.start == m.end for m in clip.motions)
        assert "turning" not in prompt_words(clip.prompt)


# -- written image datasets ----------------------------------------------------------------------


def test_image_dataset_is_deterministic(images):
    first, second, _ = images
    assert first.read_bytes() == second.read_bytes()
    assert (first.parent / "identities.json").read_bytes() == (second.parent / "identities.json").read_bytes()
    samples, errors = load_manifest(first)
    assert errors == [] and len(samples) == 5
    for sample in samples:
        other = second.parent / sample.media.relative_to(first.parent)
        assert np.array_equal(png(sample.media), png(other))
        for subject in sample.subjects:
            for path in (subject.image, subject.mask):
                assert np.array_equal(png(path), png(second.parent / path.relative_to(first.parent)))


def test_image_manifest_pngs_and_masks_match_the_sampled_scene(images):
    samples, errors = load_manifest(images[0])
    assert errors == []
    counts = set()
    for index, sample in enumerate(samples):
        want = truth(index)
        assert not sample.is_video and sample.media.suffix == ".png" and sample.split == "train"
        assert sample.id == want.id and sample.prompt == want.clip.prompt
        assert np.array_equal(png(sample.media), want.clip.frames[0])
        assert len(sample.subjects) == len(want.identities)
        counts.add(len(sample.subjects))
        for k, subject in enumerate(sample.subjects):
            mask = png(subject.mask)
            assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) <= {0, 255}
            assert np.array_equal(mask == 255, want.clip.masks[k, 0])
            assert mask.any()
            assert np.array_equal(png(subject.image), want.references[k])
        words = prompt_words(sample.prompt)
        assert "stays" in words and "turning" not in words and "moves" not in words
        assert not IDENTITY_WORDS & set(words), sample.prompt
    assert counts <= {1, 2, 3}


def test_image_dataset_pools_are_disjoint(images):
    train, held_out = (set(p) for p in split_pools(seed=0))
    keys = {}
    for name, manifest in (("train", images[0]), ("held_out", images[2])):
        meta = json.loads((manifest.parent / "identities.json").read_text())
        assert meta["pool"] == name and meta["size"] == SIZE and meta["ref_size"] == REF
        keys[name] = {Identity.from_key(k) for r in meta["samples"] for k in r["identities"]}
        counts = [len(r["identities"]) for r in meta["samples"]]
        assert all((1 if name == "train" else 2) <= c <= 3 for c in counts)
        assert all(len(r["boxes"]) == len(r["identities"]) for r in meta["samples"])
    assert keys["train"] and keys["held_out"]
    assert keys["train"] <= train and keys["held_out"] <= held_out
    assert keys["train"].isdisjoint(keys["held_out"])
    samples, errors = load_manifest(images[2])
    assert errors == [] and all(s.split == "held_out" and len(s.subjects) in (2, 3) for s in samples)


def test_video_dataset_loads_image_samples_aligned_with_the_pngs(images):
    dataset = VideoDataset.from_manifest(images[0], 1, buckets=[Bucket(SIZE, SIZE)], ref_size=(REF, REF))
    for index in range(len(dataset)):
        item = dataset[index]
        want = truth(index)
        n = len(want.identities)
        assert item["video"].shape == (3, 1, SIZE, SIZE)
        assert item["masks"].shape == (n, 1, SIZE, SIZE) and item["refs"].shape == (n, 3, REF, REF)
        frame = torch.from_numpy(want.clip.frames[0]).permute(2, 0, 1).float() / 127.5 - 1.0
        torch.testing.assert_close(item["video"][:, 0], frame, rtol=0, atol=1e-6)
        assert torch.equal(item["masks"][:, 0].bool(), torch.from_numpy(want.clip.masks[:, 0]))
    assert dataset.num_failures == 0


@pytest.mark.parametrize("kwargs", [dict(size=40), dict(pool="test"), dict(subjects=(0, 2)), dict(num_samples=0)])
def test_write_image_dataset_rejects_bad_arguments(kwargs, tmp_path):
    args = dict(num_samples=1, seed=0, size=SIZE, ref_size=REF) | kwargs
    with pytest.raises(ValueError):
        write_image_dataset(tmp_path, **args)
    assert not (tmp_path / "manifest.jsonl").exists()


# -- the image codec -----------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [1, 2, 4, 8])
def test_image_codec_is_an_exact_inverse(factor):
    codec = PixelUnshuffleImageCodec(factor=factor)
    x = torch.rand(2, 3, 32, 16, generator=torch.Generator().manual_seed(factor)) * 2 - 1
    z = codec.encode(x).latent_dist.mode()
    assert z.shape == (2, 3 * factor**2, 32 // factor, 16 // factor)
    assert torch.equal(codec.decode(z).sample, x)
    # channel c * f^2 + i * f + j holds pixel (i, j) of each f x f block
    i, j = factor - 1, 0
    assert torch.equal(z[:, 1 * factor**2 + i * factor + j], x[:, 1, i::factor, j::factor])
    assert 2 ** (len(codec.config.block_out_channels) - 1) == factor
    assert codec.config.latent_channels == 3 * factor**2


def test_image_codec_errors_and_saves(tmp_path):
    for factor in (3, 6, 0):
        with pytest.raises(ValueError, match="power of two"):
            PixelUnshuffleImageCodec(factor=factor)
    with pytest.raises(ValueError, match="latent_channels"):
        PixelUnshuffleImageCodec(factor=4, latent_channels=12)
    with pytest.raises(ValueError, match="block_out_channels"):
        PixelUnshuffleImageCodec(factor=4, block_out_channels=[8, 8])
    codec = PixelUnshuffleImageCodec(factor=4)
    for shape in ((1, 3, 30, 32), (1, 3, 32, 18), (1, 3, 1, 32, 32)):
        with pytest.raises(ValueError, match="multiples of 4"):
            codec.encode(torch.zeros(shape))
    codec.save_pretrained(tmp_path / "vae")
    again = PixelUnshuffleImageCodec.from_pretrained(tmp_path / "vae")
    keys = ("factor", "in_channels", "latent_channels", "block_out_channels", "scaling_factor", "shift_factor")
    assert {k: again.config[k] for k in keys} == {k: codec.config[k] for k in keys}
    assert again.config.block_out_channels == [48, 48, 48] and again.config.scaling_factor == 2.0
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(again.decode(again.encode(x).latent_dist.mode()).sample, x)


# -- capture settings and the toy presets --------------------------------------------------------


def _capturing(model) -> set[str]:
    return {name for name, proc in model.processors.items() if proc.capture}


def test_set_capture_config_selects_blocks():
    from mcimage.config import MCImageConfig
    from mcimage.transformer import MCImageTransformer

    cfg = MCImageConfig.from_preset("tiny-multicrafter", adapter="none", idar=False)
    model = MCImageTransformer.from_mc_config(cfg, seed=0)
    double = {f"transformer_blocks.{i}" for i in range(cfg.flux["num_layers"])}
    single = {f"single_transformer_blocks.{i}" for i in range(cfg.flux["num_single_layers"])}
    assert set(model.processors) == double | single and _capturing(model) == set()
    model.set_capture_config(dataclasses.replace(cfg, idar=True))
    assert _capturing(model) == double and model.mc_config.idar
    model.set_capture_config(dataclasses.replace(cfg, idar=True, idar_blocks="single", idar_lambda=0.1))
    assert _capturing(model) == single and model.mc_config.idar_lambda == 0.1
    model.set_capture_config(dataclasses.replace(cfg, idar=True, idar_blocks="all"))
    assert _capturing(model) == double | single
    chosen = ["transformer_blocks.1", "single_transformer_blocks.0"]
    model.set_capture_config(dataclasses.replace(cfg, idar=True, idar_blocks=chosen))
    assert _capturing(model) == set(chosen)
    # the flags drive what a forward reports
    g = torch.Generator().manual_seed(0)
    c, f = cfg.flux["in_channels"], cfg.flux
    shares: dict[str, torch.Tensor] = {}
    model(torch.randn(1, 16, c, generator=g), [torch.randn(1, 4, c, generator=g)],
          torch.randn(1, 6, f["joint_attention_dim"], generator=g), torch.randn(1, f["pooled_projection_dim"], generator=g),
          torch.tensor([0.5]), torch.tensor([3.5]), attention_capture=shares)
    assert set(shares) == set(chosen)
    model.set_capture_config(cfg)
    assert _capturing(model) == set()
    for change in (dict(position_ids="condition"), dict(prediction="sample"), dict(adapter="lora")):
        with pytest.raises(ValueError, match="set_capture_config"):
            model.set_capture_config(dataclasses.replace(cfg, **change))
    assert model.mc_config == cfg and model.config["mcimage"] == cfg.to_model_dict()


@pytest.mark.parametrize("preset", ["toyworld-multicrafter", "toyworld-one-for-all"])
def test_toy_presets_build_the_codec_and_predict_clean_samples(preset):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from mcimage.config import MCImageConfig
    from mcimage.presets import TOY_FLOW_SHIFT, build_tiny_components

    cfg = MCImageConfig.from_preset(preset)
    assert cfg.prediction == "sample" and cfg.flux["guidance_embeds"] is False and cfg.max_subjects == 3
    parts = build_tiny_components(cfg, seed=0)
    vae, scheduler, model = parts["vae"], parts["scheduler"], parts["transformer"]
    assert type(vae) is PixelUnshuffleImageCodec and 4 * vae.config.latent_channels == cfg.flux["in_channels"]
    assert isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
    assert not scheduler.config.use_dynamic_shifting and scheduler.config.shift == TOY_FLOW_SHIFT
    assert parts["tokenizer_2"].model_max_length == cfg.text_length

    g = torch.Generator().manual_seed(1)
    c, f = cfg.flux["in_channels"], cfg.flux
    x_t = torch.randn(2, 16, c, generator=g)
    refs = [torch.randn(2, 4, c, generator=g), torch.randn(2, 4, c, generator=g)]
    text = torch.randn(2, 7, f["joint_attention_dim"], generator=g)
    pooled = torch.randn(2, f["pooled_projection_dim"], generator=g)
    t = torch.tensor([0.6, 0.02])  # the second is below the 0.05 floor
    kwargs = dict(target_hw=(4, 4), ref_hws=[(2, 2), (2, 2)], categories=["face", "upper"])
    with torch.no_grad():
        v = model(x_t, refs, text, pooled, t, None, **kwargs)
        seq = model.prepare(x_t, refs, text, **kwargs)
        raw = FluxTransformer2DModel.forward(model, hidden_states=torch.cat([x_t, *refs], 1), encoder_hidden_states=text,
                                             pooled_projections=pooled, timestep=t, img_ids=seq.img_ids,
                                             txt_ids=seq.txt_ids, guidance=None, return_dict=False)[0]
    x0_hat = raw[:, :16]
    assert v.shape == x_t.shape
    expected = torch.stack([(x_t[0] - x0_hat[0]) / 0.6, (x_t[1] - x0_hat[1]) / 0.05])
    torch.testing.assert_close(v, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(v, x0_hat)  # the conversion is not the identity


def test_category_world_gives_each_category_its_look(tmp_path):
    """One-for-All's binding needs categories that show: every subject's shape is one of its
    category's, its sprite size and vertical place follow the category's style, and the manifest
    names its category."""
    import json

    from idcrafter.toyworld.world import CATEGORY_STYLES

    cats = ("face", "upper", "lower", "bag")
    path = write_image_dataset(tmp_path, 40, seed=3, size=SIZE, ref_size=REF, subjects=(1, 3), categories=cats)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    meta = json.loads((tmp_path / "identities.json").read_text())["samples"]
    seen = set()
    for line, record in zip(lines, meta):
        names = [s["category"] for s in line["subjects"]]
        assert names == record["categories"] and len(set(names)) == len(names)
        for name, key, (x0, y0, x1, y1) in zip(names, record["identities"], record["boxes"]):
            style = CATEGORY_STYLES[name]
            assert key.split("-")[0] in style.shapes
            seen.add(name)
            # the drawn shape sits inside its sprite box, so its centre is near the box centre
            centre = (y0 + y1) / 2 / SIZE
            lo, hi = style.band
            assert lo - 0.15 <= centre <= hi + 0.15, (name, centre)
            side = max(x1 - x0, y1 - y0) / SIZE
            assert side <= style.size[1] + 0.02, (name, side)
    assert seen == set(cats)
    # the same call without categories draws exactly the old one-kind world
    plain = write_image_dataset(tmp_path / "plain", 3, seed=3, size=SIZE, ref_size=REF, subjects=(1, 3))
    old = [json.loads(line) for line in plain.read_text().splitlines()]
    assert {s["category"] for line in old for s in line["subjects"]} == {"toy"}
