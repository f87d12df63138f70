"""MCImagePipeline.__call__ follows diffusers' FluxPipeline conventions, on tiny real components:
generators (one or one per image), num_images_per_prompt, latents, prompt_embeds, true CFG,
output_type / return_dict, step-end callbacks and interrupt, the progress bar, joint_attention_kwargs,
cache_context, unknown arguments, and model CPU offload."""

from __future__ import annotations

import contextlib
import inspect
import io

import numpy as np
import pytest
import torch
from PIL import Image

from mcimage.config import MCImageConfig
from mcimage.pipeline import MCImagePipeline
from mcimage.presets import TINY_T5_LENGTH, build_tiny_components
from mcimage.transformer import pack_latents

H = W = 16
REFS = dict(refs=[Image.new("RGB", (12, 20), (200, 30, 30)), Image.new("RGB", (20, 12), (30, 30, 200))],
            categories=["face", "upper"])


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pipe(**overrides) -> MCImagePipeline:
    parts = build_tiny_components(MCImageConfig.from_preset("tiny-one-for-all"), seed=0)
    pipe = MCImagePipeline.from_components({**parts, **overrides})
    g = _g(5)
    with torch.no_grad():  # non-zero adapter and DAM weights: the references matter
        for p in pipe.transformer.adapter_state_dict().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return _pipe()


def _call(pipe, prompt="a man <face>with hair</face>", seed=0, **kw):
    kw = dict(REFS, height=H, width=W, num_inference_steps=2, output_type="np",
              max_sequence_length=TINY_T5_LENGTH) | kw
    if "generator" not in kw and "latents" not in kw:
        kw["generator"] = _g(seed)
    return pipe(prompt, **kw).images


def test_prompt_list_equals_single_calls_with_the_same_generators(pipe):
    prompts = ["a <face>man</face> walks", "a <face>dog</face> walks"]  # markup on the same tokens
    batch = _call(pipe, prompts, generator=[_g(1), _g(2)])
    singles = np.concatenate([_call(pipe, prompts[0], seed=1), _call(pipe, prompts[1], seed=2)])
    assert batch.shape == (2, H, W, 3)
    np.testing.assert_allclose(batch, singles, atol=1e-5, rtol=0)
    assert np.abs(batch[0] - batch[1]).max() > 1e-3
    # One generator for the batch draws the whole noise at once (the batch's rows differ).
    one = _call(pipe, prompts, seed=1)
    np.testing.assert_allclose(one[0], singles[0], atol=1e-5, rtol=0)
    assert np.abs(one[1] - singles[1]).max() > 1e-3


def test_num_images_per_prompt(pipe):
    prompts = ["a man", "a dog"]
    out = _call(pipe, prompts, num_images_per_prompt=2, generator=[_g(s) for s in range(4)])
    assert out.shape == (4, H, W, 3)
    # Image 2k + j is prompt k with generator 2k + j (FluxPipeline's order: a prompt's images adjacent).
    for k in range(2):
        for j in range(2):
            np.testing.assert_allclose(out[2 * k + j], _call(pipe, prompts[k], seed=2 * k + j)[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="2 generators for a batch of 4 images"):
        _call(pipe, prompts, num_images_per_prompt=2, generator=[_g(0), _g(1)])
    with pytest.raises(ValueError, match="num_images_per_prompt must be a positive integer"):
        _call(pipe, num_images_per_prompt=0)


def test_no_generator_draws_from_the_global_rng(pipe):
    torch.manual_seed(3)
    a = _call(pipe, generator=None)
    torch.manual_seed(3)
    np.testing.assert_array_equal(_call(pipe, generator=None), a)
    np.testing.assert_array_equal(_call(pipe, seed=3), a)  # CPU default generator, same seed
    assert np.abs(_call(pipe, generator=None) - a).max() > 1e-3


def test_latents_given_equal_the_generator_path(pipe):
    # 16x16 pixels, VAE factor 2 -> 8x8 latents of in_channels / 4 = 1 channel, packed 4x4 x 4.
    expected = _call(pipe, seed=4, output_type="latent")
    noise = torch.randn((1, 1, 8, 8), generator=_g(4))
    packed = pack_latents(noise)[0]
    assert packed.shape == (1, 16, 4)
    for latents in (noise, packed):
        torch.testing.assert_close(_call(pipe, latents=latents, output_type="latent"), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"latents must be packed \[1, 16, 4\] or unpacked \[1, 1, 8, 8\]"):
        _call(pipe, latents=torch.zeros(1, 1, 4, 4))


def test_prompt_embeds_skip_the_text_encoders(pipe):
    clean = "a man with hair"
    embeds, pooled, _ = pipe.encode_prompt(prompt=[clean], prompt_2=None, device=pipe.device,
                                           max_sequence_length=TINY_T5_LENGTH)
    # Markup is stripped for encoding; with embeddings the descriptor goes by its T5 token indices
    # (character tokenizer: "with hair" is tokens 6..14).
    expected = _call(pipe, "a man <face>with hair</face>", num_images_per_prompt=2, generator=[_g(0), _g(1)])
    no_text = _pipe(tokenizer=None, text_encoder=None, tokenizer_2=None, text_encoder_2=None)
    for p in (pipe, no_text):
        out = _call(p, None, prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_images_per_prompt=2,
                    generator=[_g(0), _g(1)], descriptor_tokens={"face": list(range(6, 15))})
        np.testing.assert_allclose(out, expected, atol=1e-6, rtol=0)
    plain = _call(pipe, clean)  # the descriptor position does change the image
    assert np.abs(plain - expected[:1]).max() > 1e-4
    with pytest.raises(ValueError, match="prompt or prompt_embeds, not both"):
        _call(pipe, clean, prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    with pytest.raises(ValueError, match="need pooled_prompt_embeds"):
        _call(pipe, None, prompt_embeds=embeds)
    with pytest.raises(ValueError, match="give a prompt or prompt_embeds"):
        _call(pipe, None)


def test_prompt_2_goes_to_t5(pipe):
    # prompt_2 replaces what T5 reads; CLIP still reads prompt (only its pooled state is used).
    same = _call(pipe, "a man", prompt_2="a man")
    np.testing.assert_array_equal(same, _call(pipe, "a man"))
    assert np.abs(_call(pipe, "a man", prompt_2="a red box") - same).max() > 1e-4
    assert np.abs(_call(pipe, "a red box", prompt_2="a man") - same).max() > 1e-4
    with pytest.raises(ValueError, match="prompt_2 must be a string or a list of 2 strings"):
        _call(pipe, ["a", "b"], prompt_2=["c"])


def test_true_cfg_combines_the_two_velocities(pipe):
    # One Euler step is linear in the velocity: x1 = x0 + dt * v, so with true CFG the result is
    # neg + s * (pos - neg) of the runs that use each prompt alone.
    kw = dict(num_inference_steps=1, output_type="latent", seed=7)
    pos = _call(pipe, "a man", **kw)
    neg = _call(pipe, "a blurry photo", **kw)
    cfg = _call(pipe, "a man", negative_prompt="a blurry photo", true_cfg_scale=2.5, **kw)
    torch.testing.assert_close(cfg, neg + 2.5 * (pos - neg), rtol=0, atol=1e-5)
    assert (cfg - pos).abs().max() > 1e-3
    # true_cfg_scale 1 (the default) ignores the negative prompt, as FluxPipeline.
    torch.testing.assert_close(_call(pipe, "a man", negative_prompt="a blurry photo", **kw), pos, rtol=0, atol=0)


def test_output_types_agree_and_return_dict(pipe):
    arrays = _call(pipe, ["a man", "a dog"], seed=2)
    assert arrays.dtype == np.float32 and arrays.shape == (2, H, W, 3) and 0 <= arrays.min() and arrays.max() <= 1
    pt = _call(pipe, ["a man", "a dog"], seed=2, output_type="pt")
    assert isinstance(pt, torch.Tensor) and pt.shape == (2, 3, H, W)
    np.testing.assert_array_equal(pt.permute(0, 2, 3, 1).numpy(), arrays)
    pil = _call(pipe, ["a man", "a dog"], seed=2, output_type="pil")
    assert [im.size for im in pil] == [(W, H)] * 2
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in pil]), (arrays * 255).round().astype(np.uint8))
    latents = _call(pipe, ["a man", "a dog"], seed=2, output_type="latent")
    assert latents.shape == (2, 16, 4)
    np.testing.assert_array_equal(pipe.decode_latents(latents, H, W, "np"), arrays)
    out = pipe(["a man", "a dog"], **REFS, height=H, width=W, num_inference_steps=2, generator=_g(2),
               output_type="np", max_sequence_length=TINY_T5_LENGTH, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1
    np.testing.assert_array_equal(out[0], arrays)
    with pytest.raises(ValueError, match="output_type must be one of"):
        _call(pipe, output_type="jpeg")


def test_callback_on_step_end(pipe):
    calls = []

    def record(p, step, timestep, kwargs):
        calls.append((step, float(timestep), sorted(kwargs)))
        return {}

    base = _call(pipe, num_inference_steps=3, output_type="latent", callback_on_step_end=record)
    assert [c[0] for c in calls] == [0, 1, 2] and all(c[2] == ["latents"] for c in calls)
    assert [c[1] for c in calls] == pipe.scheduler.timesteps.tolist()
    assert pipe.num_timesteps == 3 and pipe.guidance_scale == pipe.mc_config.guidance_scale == 6.0
    calls.clear()
    _call(pipe, num_inference_steps=3, callback_on_step_end=record,
          callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], guidance_scale=2.0)
    assert all(c[2] == ["latents", "prompt_embeds"] for c in calls) and pipe.guidance_scale == 2.0

    # Replaced latents are the pipeline's from then on: at the last step, they are the output.
    marker = torch.full_like(base, 0.25)
    out = _call(pipe, num_inference_steps=3, output_type="latent",
                callback_on_step_end=lambda p, i, t, kw: {"latents": marker} if i == 2 else {})
    torch.testing.assert_close(out, marker, rtol=0, atol=0)
    halved = _call(pipe, num_inference_steps=3, output_type="latent",
                   callback_on_step_end=lambda p, i, t, kw: {"latents": kw["latents"] * 0.5} if i == 0 else {})
    assert (halved - base).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"callback_on_step_end_tensor_inputs must be in .*\['noise'\]"):
        _call(pipe, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["noise"])


def test_interrupt_skips_the_remaining_steps(pipe):
    forwards = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, args: forwards.append(1))

    def stop(p, step, timestep, kwargs):
        p._interrupt = True
        return {}

    try:
        _call(pipe, num_inference_steps=4, callback_on_step_end=stop)
        assert len(forwards) == 1 and pipe.interrupt
        forwards.clear()
        _call(pipe, num_inference_steps=4)
        assert len(forwards) == 4 and not pipe.interrupt
    finally:
        hook.remove()


def test_transformer_calls_in_cache_context_and_hooks_freed(pipe, monkeypatch):
    seen, freed = [], []
    original = pipe.transformer.cache_context

    @contextlib.contextmanager
    def recording(name, **kw):
        seen.append((name, kw["step_index"]))
        with original(name, **kw):
            yield

    monkeypatch.setattr(pipe.transformer, "cache_context", recording)
    monkeypatch.setattr(pipe, "maybe_free_model_hooks", lambda: freed.append(1))
    _call(pipe, num_inference_steps=2)
    assert seen == [("cond", 0), ("cond", 1)] and freed == [1]
    seen.clear()
    _call(pipe, num_inference_steps=2, negative_prompt="blurry", true_cfg_scale=3.0)
    assert seen == [("cond", 0), ("uncond", 0), ("cond", 1), ("uncond", 1)]


def test_joint_attention_kwargs_reach_the_transformer(pipe):
    got = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: got.append(kwargs["joint_attention_kwargs"]), with_kwargs=True)
    try:
        _call(pipe, joint_attention_kwargs={"scale": 1.0})
    finally:
        hook.remove()
    assert got == [{"scale": 1.0}] * 2 and pipe.joint_attention_kwargs == {"scale": 1.0}


def test_progress_bar_follows_its_config():
    p = _pipe()
    shown, hidden = io.StringIO(), io.StringIO()
    p.set_progress_bar_config(file=shown, disable=False, ascii=True)
    _call(p, num_inference_steps=3)
    assert "3/3" in shown.getvalue()
    p.set_progress_bar_config(file=hidden, disable=True)
    _call(p, num_inference_steps=3)
    assert hidden.getvalue() == ""


def test_unknown_arguments_raise_type_error(pipe):
    with pytest.raises(TypeError, match="seed"):  # a seed is the caller's: generator=torch.Generator().manual_seed(s)
        pipe("a man", height=H, width=W, seed=0)
    with pytest.raises(TypeError, match="num_image_per_prompt"):
        pipe("a man", height=H, width=W, num_image_per_prompt=2)
    for method in (MCImagePipeline.__call__, MCImagePipeline.from_pretrained, MCImagePipeline.save_pretrained,
                   MCImagePipeline.check_inputs, MCImagePipeline.__init__):
        kinds = {p.kind for p in inspect.signature(method).parameters.values()}
        assert inspect.Parameter.VAR_KEYWORD not in kinds, method.__name__


def test_model_cpu_offload_equals_plain():
    """diffusers' model offload with device="cpu" (the hooks and their chain run; on this CPU-only
    machine the "accelerator" is the CPU itself, so the device moves are not exercised)."""
    plain = _call(_pipe(), seed=3)
    p = _pipe()
    p.enable_model_cpu_offload(device="cpu")
    assert p._execution_device == torch.device("cpu", 0)
    assert all(hasattr(getattr(p, n), "_hf_hook") for n in ("text_encoder", "text_encoder_2", "transformer", "vae"))
    np.testing.assert_array_equal(_call(p, seed=3), plain)
    np.testing.assert_array_equal(_call(p, seed=3), plain)  # hooks re-armed by maybe_free_model_hooks
    assert len(p._all_hooks) == 4


def _sequential_offload_runs_here() -> str | None:
    """None when accelerate's sequential offload runs with the CPU as execution device; else why not.
    (accelerate 1.15 onloads a CPU weight as a plain tensor, then cannot rebuild it as a parameter
    when offloading it to meta again; on an accelerator the weight stays a parameter.)"""
    from accelerate import cpu_offload

    try:
        layer = torch.nn.Sequential(torch.nn.Linear(2, 2))
        cpu_offload(layer, torch.device("cpu", 0))
        layer(torch.zeros(1, 2))
    except TypeError as err:
        return f"accelerate's cpu_offload with device cpu fails on a plain nn.Linear ({err})"[:160]
    return None


@pytest.mark.skipif(_sequential_offload_runs_here() is not None, reason=str(_sequential_offload_runs_here()))
def test_sequential_cpu_offload_equals_plain():
    plain = _call(_pipe(), seed=3)
    p = _pipe()
    p.enable_sequential_cpu_offload(device="cpu")
    assert p._execution_device == torch.device("cpu", 0)
    np.testing.assert_allclose(_call(p, seed=3), plain, atol=1e-6, rtol=0)
