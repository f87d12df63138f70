"""IDCrafterPipeline.__call__ with diffusers' calling conventions (WanPipeline.__call__): prompt lists,
num_videos_per_prompt, generators, latents, prompt_embeds, output types, return_dict, callbacks,
attention_kwargs, progress bar, offload. Tiny preset, two steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerate.hooks import CpuOffload
from tiny_data import video_refs as refs

from idcrafter.video.config import IDCrafterConfig
from idcrafter.video.pipeline import IDCrafterPipeline
from idcrafter.video.presets import build_components

CFG = IDCrafterConfig.from_preset("tiny", num_inference_steps=2)
A, B = "a red ball and a blue box", "two squares dance"


def make_pipe():
    pipe = IDCrafterPipeline.from_components(build_components(CFG, seed=0))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(5)  # trained-looking adapter: subjects change the output
    with torch.no_grad():
        for p in pipe.transformer.adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


def gen(seed):
    return torch.Generator().manual_seed(seed)


def latents(pipe, prompt=A, seed=3, **kw):
    kw.setdefault("generator", gen(seed))
    return pipe(prompt, kw.pop("refs", refs()), output_type="latent", **kw).frames


def test_a_prompt_list_equals_single_calls(pipe):
    both = latents(pipe, [A, B], generator=[gen(1), gen(2)], negative_prompt=["blurry", "dark"])
    one = [latents(pipe, A, 1, negative_prompt="blurry"), latents(pipe, B, 2, negative_prompt="dark")]
    assert both.shape == (2, 16, 3, 8, 8)
    torch.testing.assert_close(both, torch.cat(one), atol=1e-5, rtol=0)
    assert (one[0] - one[1]).abs().max() > 1e-2
    # One reference list per prompt.
    mixed = latents(pipe, [A, B], refs=[refs(), refs()[::-1]], generator=[gen(1), gen(2)])
    single = [latents(pipe, A, 1), latents(pipe, B, 2, refs=refs()[::-1])]
    torch.testing.assert_close(mixed, torch.cat(single), atol=1e-5, rtol=0)
    assert (single[1] - latents(pipe, B, 2)).abs().max() > 1e-3  # the second prompt's references mattered
    with pytest.raises(ValueError, match="one length"):
        latents(pipe, [A, B], refs=[refs(), refs()[:1]], generator=[gen(1), gen(2)])
    with pytest.raises(ValueError, match="2 generators for a batch of 4"):
        latents(pipe, [A, B], num_videos_per_prompt=2, generator=[gen(1), gen(2)])


def test_num_videos_per_prompt(pipe):
    two = latents(pipe, num_videos_per_prompt=2, generator=[gen(1), gen(2)])
    torch.testing.assert_close(two, torch.cat([latents(pipe, seed=1), latents(pipe, seed=2)]), atol=1e-5, rtol=0)
    frames = pipe(A, refs(), num_videos_per_prompt=2, generator=gen(4)).frames
    assert frames.shape == (2, 9, 64, 64, 3) and np.abs(frames[0] - frames[1]).max() > 1e-2
    # Prompts x videos: each prompt's videos in a row, text-only as well.
    grid = latents(pipe, [A, B], refs=[], num_videos_per_prompt=2, generator=[gen(i) for i in range(4)])
    rows = [latents(pipe, p, i, refs=[]) for i, p in enumerate([A, A, B, B])]
    torch.testing.assert_close(grid, torch.cat(rows), atol=1e-5, rtol=0)


def test_latents_replace_the_generator(pipe):
    noise = torch.randn(1, 16, 3, 8, 8, generator=gen(3))  # what generator=gen(3) draws
    assert torch.equal(latents(pipe, latents=noise, generator=None), latents(pipe, seed=3))
    video = (np.random.default_rng(0).random((9, 64, 64, 3)) * 255).astype(np.uint8)
    edit = dict(video=video, strength=0.5)
    assert torch.equal(latents(pipe, latents=noise, generator=None, **edit), latents(pipe, seed=3, **edit))
    assert (latents(pipe, latents=noise * 0.5, generator=None) - latents(pipe, seed=3)).abs().max() > 1e-2
    with pytest.raises(ValueError, match=r"latents have shape \(1, 16, 3, 4, 4\)"):
        latents(pipe, latents=torch.zeros(1, 16, 3, 4, 4))


def test_prompt_embeds_skip_the_text_encoder(pipe):
    text, negative = pipe.encode_prompt([A]), pipe.encode_prompt(["blurry"])
    calls = []
    handle = pipe.text_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        got = latents(pipe, None, prompt_embeds=text, negative_prompt_embeds=negative)
        assert calls == []
        assert torch.equal(got, latents(pipe, A, negative_prompt="blurry"))
        assert len(calls) == 2  # prompt and negative prompt, once each
    finally:
        handle.remove()
    assert (latents(pipe, None, prompt_embeds=text * 0.5) - got).abs().max() > 1e-3
    with pytest.raises(ValueError, match="not both"):
        latents(pipe, A, prompt_embeds=text)


def test_output_types_and_return_dict(pipe):
    lat = latents(pipe)
    frames = pipe(A, refs(), generator=gen(3)).frames
    pt = pipe(A, refs(), generator=gen(3), output_type="pt").frames
    pil = pipe(A, refs(), generator=gen(3), output_type="pil").frames
    assert lat.shape == (1, 16, 3, 8, 8) and frames.shape == (1, 9, 64, 64, 3) and pt.shape == (1, 9, 3, 64, 64)
    assert isinstance(frames, np.ndarray) and isinstance(pt, torch.Tensor)
    np.testing.assert_allclose(pt.permute(0, 1, 3, 4, 2).numpy(), frames, atol=1e-6)
    np.testing.assert_allclose(pipe.decode_latents(lat).numpy(), frames, atol=1e-6)
    assert len(pil) == 1 and len(pil[0]) == 9 and pil[0][0].size == (64, 64)
    np.testing.assert_array_equal(np.stack([np.asarray(f) for f in pil[0]]), (frames[0] * 255).round().astype(np.uint8))
    out = pipe(A, refs(), generator=gen(3), output_type="latent", return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and torch.equal(out[0], lat)
    with pytest.raises(ValueError, match="output_type 'mp4'"):
        pipe(A, refs(), output_type="mp4")


def test_callback_on_step_end(pipe):
    seen = []

    def record(p, step, t, tensors):
        seen.append((step, float(t), sorted(tensors), tensors["latents"].clone()))
        assert p is pipe and p.num_timesteps == 2 and p.current_timestep == t
        return {}

    plain = latents(pipe, callback_on_step_end=record,
                    callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "negative_prompt_embeds"])
    assert [s[0] for s in seen] == [0, 1] and [s[1] for s in seen] == pipe.scheduler.timesteps.tolist()
    assert all(s[2] == ["latents", "negative_prompt_embeds", "prompt_embeds"] for s in seen)
    assert torch.equal(seen[-1][3], plain)  # the latents after the last step are the output

    halve = latents(pipe, callback_on_step_end=lambda p, i, t, d: {"latents": d["latents"] * 0.5} if i == 0 else {})
    assert (halve - plain).abs().max() > 1e-2

    def stop(p, i, t, d):  # diffusers' interrupt: the remaining steps are skipped
        p._interrupt = True
        return {}

    torch.testing.assert_close(latents(pipe, callback_on_step_end=stop), seen[0][3])
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        latents(pipe, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["noise"])


def test_attention_kwargs_reach_the_transformer():
    from peft import LoraConfig

    pipe = make_pipe()
    base = latents(pipe)
    # a LoRA on the base model's self-attention (the subject encoding runs outside forward, where
    # diffusers' attention_kwargs "scale" does not reach)
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=r"blocks\.\d+\.attn1\.to_q", init_lora_weights=False)
    pipe.transformer.add_adapter(lora)
    assert (latents(pipe) - base).abs().max() > 1e-3
    torch.testing.assert_close(latents(pipe, attention_kwargs={"scale": 0.0}), base, atol=1e-6, rtol=0)


def test_unknown_keyword_arguments_raise_type_error(pipe):
    for kwargs in ({"seed": 3}, {"device": "cpu"}, {"callback": print}, {"guidance_scale": 5.0}):
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            pipe(A, refs(), **kwargs)


def test_progress_bar_follows_set_progress_bar_config(capsys):
    pipe = make_pipe()
    pipe.set_progress_bar_config(disable=False)
    latents(pipe)
    assert "2/2" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    latents(pipe)
    assert capsys.readouterr().err == ""


def accelerate_sequential_offload_runs() -> bool:
    """accelerate's sequential offload on a bare Linear: with accelerate 1.15 and torch 2.13 its
    post_forward (weights back to the meta device) raises TypeError inside set_module_tensor_to_device,
    whatever the execution device, so no module runs under it there."""
    from accelerate import cpu_offload

    layer = torch.nn.Sequential(torch.nn.Linear(2, 2))
    cpu_offload(layer, torch.device("cpu", 0))
    try:
        layer(torch.zeros(1, 2))
    except TypeError:
        return False
    return True


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_gives_the_plain_output(mode):
    """diffusers' offload with device="cpu" (hooks as on an accelerator, execution device cpu:0). Under
    sequential offload the weights sit on the meta device between forwards, so the subject encoding,
    which reads them outside transformer.forward, only runs because the pipeline loads them."""
    pipe = make_pipe()
    plain = latents(pipe)
    text_only = latents(pipe, refs=[])
    if mode == "model":
        pipe.enable_model_cpu_offload(device="cpu")
        hook = pipe.transformer._hf_hook
        assert isinstance(hook, CpuOffload) and hook.prev_module_hook.model is pipe.text_encoder
        assert pipe.vae._hf_hook.prev_module_hook.model is pipe.transformer
    else:
        pipe.enable_sequential_cpu_offload(device="cpu")
        assert pipe.transformer.adapter.subject_encoder.patch_embedding.weight.device.type == "meta"
    assert pipe._execution_device == torch.device("cpu", 0)
    if mode == "sequential" and not accelerate_sequential_offload_runs():
        pytest.skip("accelerate's sequential offload cannot run a forward with this accelerate / torch")
    onloads = []
    original = pipe._onloaded

    def counting(module, part=None):
        onloads.append(module)
        return original(module, part)

    pipe._onloaded = counting
    torch.testing.assert_close(latents(pipe), plain, atol=1e-6, rtol=0)
    assert onloads == [pipe.transformer]
    torch.testing.assert_close(latents(pipe, refs=[]), text_only, atol=1e-6, rtol=0)
    if mode == "sequential":
        assert pipe.transformer.adapter.subject_encoder.patch_embedding.weight.device.type == "meta"  # put back
