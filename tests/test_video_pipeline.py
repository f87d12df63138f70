"""IDCrafterPipeline on the tiny preset: guidance modes, caching, files, editing, VLM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from tiny_data import video_refs as refs

from idcrafter.video.config import IDCrafterConfig, read_model_config
from idcrafter.video.pipeline import IDCrafterPipeline
from idcrafter.video.presets import build_components

CFG = IDCrafterConfig.from_preset("tiny")


def make_pipe(config=CFG, seed=0, perturb=True):
    pipe = IDCrafterPipeline.from_components(build_components(config, seed=seed))
    pipe.set_progress_bar_config(disable=True)
    if perturb:  # trained-looking adapter: subjects must change the output
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in pipe.transformer.adapter.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


def run(pipe, seed=3, **kw):
    kw.setdefault("generator", torch.Generator().manual_seed(seed))
    return pipe("a red ball and a blue box", kw.pop("refs", refs()), **kw).frames


def test_output_shape_and_range(pipe):
    frames = run(pipe)
    assert frames.shape == (1, 9, 64, 64, 3)
    assert frames.min() >= 0 and frames.max() <= 1 and np.isfinite(frames).all()
    frames = run(pipe, height=32, width=48, num_frames=5)
    assert frames.shape == (1, 5, 32, 48, 3)


def test_batched_and_sequential_guidance_agree(pipe):
    np.testing.assert_allclose(run(pipe, batched_guidance=True), run(pipe, batched_guidance=False), atol=1e-5)


def test_three_pass_guidance_formula(pipe):
    """v = v_uncond + s_img (v_ref - v_uncond) + s_txt (v_ref_txt - v_ref), from three separate calls."""
    device = torch.device("cpu")
    text = pipe.encode_prompt(["a red ball and a blue box"], device)
    negative = pipe.encode_prompt([""], device)
    stream = pipe.encode_subjects(refs(), "a red ball and a blue box", 64, 64, device)
    latents = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(700.0)
    model = pipe.transformer
    with torch.no_grad():
        v_uncond = model(latents, t[None], negative, return_dict=False)[0]
        v_ref = model(latents, t[None], negative, return_dict=False, subject_stream=stream)[0]
        v_ref_txt = model(latents, t[None], text, return_dict=False, subject_stream=stream)[0]
        expected = v_uncond + 3.0 * (v_ref - v_uncond) + 1.5 * (v_ref_txt - v_ref)
        for batched in (None, pipe.guidance_stream(stream, True)):
            got = pipe.guided_velocity(latents, t, text, negative, stream, 3.0, 1.5, batched)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        # Guidance off is the single conditional pass.
        torch.testing.assert_close(pipe.guided_velocity(latents, t, text, negative, stream, 1.0, 1.0, None), v_ref_txt)
    # The passes differ by more than the tolerance, so a dropped term would fail the check above.
    assert (v_ref - v_uncond).abs().max() > 1e-3 and (v_ref_txt - v_ref).abs().max() > 1e-4


def test_subject_stream_computed_once_equals_per_step(pipe):
    calls = []
    original = pipe.transformer.encode_subjects

    def counting(*a, **k):
        calls.append(1)
        return original(*a, **k)

    pipe.transformer.encode_subjects = counting
    try:
        cached = run(pipe, output_type="latent")
        assert len(calls) == 1  # once per call, not per step
        per_step = run(pipe, output_type="latent", recompute_subjects_each_step=True)
        assert len(calls) == 1 + 1 + CFG.num_inference_steps
    finally:
        del pipe.transformer.encode_subjects
    assert torch.equal(cached, per_step)


def test_references_and_seed_matter(pipe):
    base = run(pipe)
    assert np.abs(run(pipe, refs=refs()[::-1]) - base).max() > 1e-3
    assert np.abs(run(pipe, refs=[]) - base).max() > 1e-3
    assert np.abs(run(pipe, seed=4) - base).max() > 1e-3
    np.testing.assert_array_equal(run(pipe), base)


def test_save_and_load_reproduce_outputs(pipe, tmp_path):
    folder = pipe.save_pretrained(tmp_path / "model")
    # One model folder: the transformer holds its adapter and config (no idcrafter_adapter/ beside it).
    assert read_model_config(folder / "transformer")[0] == pipe.transformer.idcrafter_config
    assert not (folder / "idcrafter_adapter").exists()
    # The stock class still reads its base weights (diffusers skips the adapter's entries).
    stock = WanTransformer3DModel.from_pretrained(folder / "transformer")
    base = pipe.transformer.to_wan().state_dict()
    assert stock.state_dict().keys() == base.keys() and all(torch.equal(v, base[k]) for k, v in stock.state_dict().items())
    loaded = IDCrafterPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(run(loaded), run(pipe))
    # Another adapter given explicitly replaces the folder's: a zero-start adapter gives the base model.
    fresh = make_pipe(perturb=False)
    adapter = fresh.transformer.save_adapter(tmp_path / "adapter")
    again = IDCrafterPipeline.from_pretrained(folder, adapter=adapter)
    again.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(run(again), run(fresh))
    assert np.abs(run(again) - run(pipe)).max() > 1e-3


def test_editing_mode(pipe):
    g = np.random.default_rng(0)
    video = (g.random((9, 64, 64, 3)) * 255).astype(np.uint8)
    fresh = run(pipe, output_type="latent")
    # strength 1 starts from pure noise: the input video is ignored.
    torch.testing.assert_close(run(pipe, video=video, strength=1.0, output_type="latent"), fresh)
    pixels = torch.from_numpy(video).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]
    clean = pipe.encode_video(pixels, torch.device("cpu"))
    light = run(pipe, video=video, strength=0.25, output_type="latent")
    assert (light - clean).abs().mean() < (fresh - clean).abs().mean()


def test_check_inputs(pipe):
    with pytest.raises(ValueError, match="empty"):
        pipe("  ", refs())
    with pytest.raises(ValueError, match="at most 3"):
        pipe("x", refs() * 2)
    with pytest.raises(ValueError, match="4n\\+1"):
        pipe("x", refs(), num_frames=8)
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe("x", refs(), height=40)


def test_vlm_states_reach_the_video(tmp_path):
    from idcrafter.video.vlm import VLMSemanticEncoder, build_tiny_qwen2_5_vl

    config = IDCrafterConfig.from_preset("tiny", use_vlm=True, vlm_dim=32)
    pipe = make_pipe(config)
    folder = build_tiny_qwen2_5_vl(tmp_path / "qwen")
    with_vlm = run(pipe)  # no VLM component yet: the connector is unused
    pipe.vlm = VLMSemanticEncoder.from_pretrained(folder)
    assert np.abs(run(pipe) - with_vlm).max() > 1e-4


def test_guided_velocity_of_a_batch_equals_its_rows(pipe):
    """RL scores groups: the batched three-pass velocity of B latents equals B single calls."""
    device = torch.device("cpu")
    text = pipe.encode_prompt(["a red ball and a blue box"], device)
    negative = pipe.encode_prompt([""], device)
    stream = pipe.encode_subjects(refs(), "a red ball and a blue box", 64, 64, device)
    latents = torch.randn(3, 16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([900.0, 500.0, 100.0])
    group = stream.select([0, 0, 0])
    with torch.no_grad():
        got = pipe.guided_velocity(latents, t, text, negative, group, 3.0, 1.5, pipe.guidance_stream(group))
        for i in range(3):
            one = pipe.guided_velocity(latents[i : i + 1], t[i], text, negative, stream, 3.0, 1.5, pipe.guidance_stream(stream))
            torch.testing.assert_close(got[i : i + 1], one, atol=1e-5, rtol=1e-5)


def test_reference_canvas_follows_ref_size():
    config = IDCrafterConfig.from_preset("tiny", ref_size=32)
    assert config.ref_canvas(64, 48) == (32, 32)
    assert IDCrafterConfig.from_preset("tiny").ref_canvas(64, 48) == (64, 48)
    with pytest.raises(ValueError, match="ref_size"):
        IDCrafterConfig.from_preset("tiny", ref_size=20)
    pipe = make_pipe(config)
    stream = pipe.encode_subjects(refs(), "x", 64, 64, torch.device("cpu"))
    # 32x32 references -> 4x4 latents (/8) -> 2x2 patches: 4 tokens per subject
    assert stream.ref_ranges == [(0, 4), (4, 8)]
