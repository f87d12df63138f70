"""mcimage as a diffusers citizen, on tiny real models: DiffusionPipeline.from_pretrained returns
MCImagePipeline; the model's save / load (torch_dtype, variant, shards, subfolder); the older
layout (stock FLUX folder + mcimage_adapter/) converts to the same model; the diffusers LoRA export
loads with FluxPipeline.load_lora_weights; diffusers' cache and attention-backend hooks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline, FluxTransformer2DModel
from diffusers.hooks import FirstBlockCacheConfig
from diffusers.models.attention_dispatch import AttentionBackendName
from PIL import Image
from safetensors import safe_open
from tiny_data import save_older_layout

from idcrafter.core.moe_lora import DIFFUSERS_LORA_WEIGHTS_NAME, moe_lora_layers
from idcrafter.utils.cli import InputError
from idcrafter.utils.errors import ConfigError, FileFormatError
from mcimage.config import MCImageConfig
from mcimage.infer import BUILTIN_MODEL
from mcimage.pipeline import MCImagePipeline
from mcimage.presets import TINY_T5_LENGTH, build_tiny_components
from mcimage.transformer import MCImageTransformer

H = W = 16
def gen(**kw) -> dict:
    """Sampling arguments with a fresh generator of seed 0 (a generator is consumed by each call)."""
    return dict(height=H, width=W, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np",
                max_sequence_length=TINY_T5_LENGTH) | kw
REFS = dict(refs=[Image.new("RGB", (12, 20), (200, 30, 30)), Image.new("RGB", (20, 12), (30, 30, 200))],
            categories=["face", "upper"])


def _perturb(model: MCImageTransformer, seed: int = 5, scale: float = 0.05) -> MCImageTransformer:
    """Non-zero adapter and DAM weights: a load that dropped them would change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_state_dict().values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def _pipe(preset: str = "tiny-one-for-all", **overrides) -> MCImagePipeline:
    pipe = MCImagePipeline.from_components(build_tiny_components(MCImageConfig.from_preset(preset, **overrides), seed=0))
    _perturb(pipe.transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inputs(model: MCImageTransformer, refs: bool = True, seed: int = 1) -> tuple[tuple, dict]:
    """(args, kwargs) of one forward on a 4x4 target with two 2x2 references (or none)."""
    f = model.config
    g = torch.Generator().manual_seed(seed)
    args = (torch.randn(2, 16, f["in_channels"], generator=g),
            [torch.randn(2, 4, f["in_channels"], generator=g) for _ in range(2)] if refs else None,
            torch.randn(2, 12, f["joint_attention_dim"], generator=g), torch.randn(2, f["pooled_projection_dim"], generator=g),
            torch.tensor([0.7, 0.3]), torch.full((2,), 3.5))
    kwargs = dict(target_hw=(4, 4))
    if refs:
        kwargs.update(ref_hws=[(2, 2)] * 2, categories=["face", "upper"] if model.mc_config.uses_categories else None)
    return args, kwargs


def _stock_inputs(args: tuple) -> dict:
    """The same prompt-only forward for a stock FluxTransformer2DModel (target ids, zero text ids)."""
    x, _, text, pooled, t, guidance = args
    ids = torch.cat([torch.zeros(16, 1), torch.cartesian_prod(torch.arange(4.0), torch.arange(4.0))], 1)
    return dict(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t, guidance=guidance,
                img_ids=ids, txt_ids=torch.zeros(text.shape[1], 3), return_dict=False)


# ---------------------------------------------------------------------------------------------
# pipeline folders


def test_diffusion_pipeline_from_pretrained_returns_mcimage_pipeline(tmp_path):
    pipe = _pipe("tiny-one-for-all")
    folder = pipe.save_pretrained(tmp_path / "model")
    ours = MCImagePipeline.from_pretrained(folder)
    theirs = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(theirs) is MCImagePipeline and type(theirs.transformer) is MCImageTransformer
    assert theirs.mc_config == pipe.mc_config
    prompt = "a man <face>with hair</face>"
    expected = pipe(prompt, **REFS, **gen()).images
    np.testing.assert_allclose(ours(prompt, **REFS, **gen()).images, expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(theirs(prompt, **REFS, **gen()).images, ours(prompt, **REFS, **gen()).images, atol=1e-6, rtol=0)
    # diffusers runs a folder's module file only when trusted (docs/design.md 10).
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(folder)


def test_pipeline_variant_and_shards_round_trip(tmp_path):
    pipe = _pipe("tiny-multicrafter")
    folder = pipe.save_pretrained(tmp_path / "model", variant="v1", max_shard_size="40KB")
    shards = sorted(p.name for p in (folder / "transformer").glob("*.safetensors"))
    assert len(shards) > 1 and all(name.startswith("diffusion_pytorch_model.v1-") for name in shards)
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.v1.json").is_file()
    loaded = MCImagePipeline.from_pretrained(folder, variant="v1")
    np.testing.assert_allclose(loaded("a man", **REFS, **gen()).images, pipe("a man", **REFS, **gen()).images,
                               atol=1e-6, rtol=0)


def test_hub_ids_that_cannot_load_offline_are_one_line_input_errors(tmp_path):
    for load in (MCImagePipeline.from_pretrained, MCImageTransformer.from_pretrained):
        with pytest.raises(FileFormatError, match="nobody-here/no-such-model: not a local folder nor a Hugging Face "
                                                  "model in the local cache") as err:
            load("nobody-here/no-such-model")
        assert "\n" not in str(err.value)
    with pytest.raises(FileFormatError, match="not a local folder$"):
        MCImageTransformer.from_pretrained(tmp_path / "missing" / "transformer")


# ---------------------------------------------------------------------------------------------
# the model's own save / load


def test_model_save_load_dtype_variant_shards_subfolder(tmp_path):
    model = _perturb(MCImageTransformer.from_mc_config(MCImageConfig.from_preset("tiny-one-for-all"), seed=0))
    state = model.state_dict()
    model.save_pretrained(tmp_path / "m", variant="v1", max_shard_size="40KB")
    assert len(list((tmp_path / "m").glob("diffusion_pytorch_model.v1-*.safetensors"))) > 1
    back = MCImageTransformer.from_pretrained(tmp_path / "m", variant="v1")
    assert back.mc_config == model.mc_config and back.state_dict().keys() == state.keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in state.items())

    half = MCImageTransformer.from_pretrained(tmp_path / "m", variant="v1", torch_dtype=torch.bfloat16)
    lora = {n for n, _ in half.named_parameters() if ".lora_" in n}
    assert lora and half.dtype == torch.bfloat16
    for name, p in half.named_parameters():  # MoE-LoRA stays float32 (its weights exactly), the rest bf16
        assert p.dtype == (torch.float32 if name in lora else torch.bfloat16), name
        assert torch.equal(p, state[name].to(p.dtype)), name

    pipe = MCImagePipeline.from_components({**build_tiny_components(model.mc_config, seed=0), "transformer": model})
    folder = pipe.save_pretrained(tmp_path / "pipe")
    sub = MCImageTransformer.from_pretrained(folder, subfolder="transformer")
    assert all(torch.equal(sub.state_dict()[k], v) for k, v in state.items())
    args, kwargs = _inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(sub(*args, **kwargs), model(*args, **kwargs), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# the older layout: one conversion


@pytest.mark.parametrize("preset, overrides", [("tiny-multicrafter", {}), ("tiny-one-for-all", {}),
                                               ("tiny-one-for-all", dict(position_ids="index", ccpa=False))])
def test_older_layout_converts_to_the_same_model(preset, overrides, tmp_path):
    pipe = _pipe(preset, **overrides)
    new = MCImagePipeline.from_pretrained(pipe.save_pretrained(tmp_path / "new"))
    older_folder = save_older_layout(pipe, tmp_path / "older")
    older = MCImagePipeline.from_pretrained(older_folder)
    assert older.mc_config == new.mc_config == pipe.mc_config
    a, b = new.transformer.state_dict(), older.transformer.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Equal weights; 1e-6: tensors read from a file or memory-mapped may take other SIMD paths.
    np.testing.assert_allclose(older("a man", **REFS, **gen()).images, new("a man", **REFS, **gen()).images,
                               atol=1e-6, rtol=0)
    # The model class reads the older transformer folder too, the adapter found next to it.
    direct = MCImageTransformer.from_pretrained(older_folder / "transformer")
    assert all(torch.equal(direct.state_dict()[k], a[k]) for k in a)
    # A converted model's diffusers config builds the same model (the field is not a default).
    assert MCImageTransformer.from_config(direct.config).mc_config == direct.mc_config


def test_adapter_given_with_a_new_folder_replaces_its_adapter(tmp_path):
    pipe = _pipe("tiny-multicrafter")
    other = _perturb(MCImageTransformer.from_mc_config(pipe.mc_config, seed=0), seed=9)
    other.save_adapter(tmp_path / "adapter")
    new = MCImageTransformer.from_pretrained(pipe.save_pretrained(tmp_path / "new"), subfolder="transformer",
                                             adapter=tmp_path / "adapter")
    older = MCImageTransformer.from_pretrained(save_older_layout(pipe, tmp_path / "older"), subfolder="transformer",
                                               adapter=tmp_path / "adapter")
    expected = {**pipe.transformer.base_state_dict(), **other.adapter_state_dict()}
    for model in (new, older):
        got = {**model.base_state_dict(), **model.adapter_state_dict()}
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_builtin_model_older_layout_saves_and_reloads_equal(tmp_path):
    builtin = MCImagePipeline.from_pretrained(BUILTIN_MODEL)
    reloaded = MCImagePipeline.from_pretrained(builtin.save_pretrained(tmp_path / "toy"))
    a, b = builtin.transformer.state_dict(), reloaded.transformer.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert reloaded.mc_config == builtin.mc_config
    kw = lambda: gen(height=32, width=32, num_inference_steps=2, max_sequence_length=builtin.mc_config.text_length)  # noqa: E731
    refs = dict(refs=REFS["refs"][:1], categories=None if not builtin.mc_config.uses_categories else ["face"])
    np.testing.assert_allclose(reloaded("a red thing", **refs, **kw()).images, builtin("a red thing", **refs, **kw()).images,
                               atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# diffusers LoRA export


def _lora_model(num_experts: int = 1, seed: int = 5) -> MCImageTransformer:
    """A tiny model whose only addition is a trained-looking (MoE-)LoRA (alpha / r = 2: the scaling
    must survive), no DAM."""
    adapter = dict(adapter="lora") if num_experts == 1 else dict(adapter="moe_lora", num_experts=num_experts)
    cfg = MCImageConfig.from_preset("tiny-multicrafter", dam=False, idar=False, lora_alpha=8.0, **adapter)
    return _perturb(MCImageTransformer.from_mc_config(cfg, seed=0), seed=seed, scale=0.2).eval()


def _stock_with_lora(model: MCImageTransformer, folder) -> FluxTransformer2DModel:
    stock = model.to_flux()
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=stock)
    pipe.load_lora_weights(folder)
    return stock


def test_plain_lora_export_loads_with_flux_pipeline_load_lora_weights(tmp_path):
    model = _lora_model()
    folder = model.save_adapter(tmp_path / "adapter")
    with safe_open(str(folder / DIFFUSERS_LORA_WEIGHTS_NAME), framework="pt") as f:
        keys = set(f.keys())
    assert keys == {f"transformer.{name}.lora_{ab}.weight" for name in moe_lora_layers(model) for ab in "AB"}
    stock = _stock_with_lora(model, folder)
    assert sum("lora_A" in n for n, _ in stock.named_parameters()) == len(moe_lora_layers(model))
    args, kwargs = _inputs(model, refs=False)
    with torch.no_grad():
        ours = model(*args, **kwargs)
        torch.testing.assert_close(stock(**_stock_inputs(args))[0], ours, atol=1e-5, rtol=0)
        assert (ours - model.to_flux()(**_stock_inputs(args))[0]).abs().max() > 1e-3  # the LoRA matters


def test_plain_lora_export_prompt_only_generation_equals_stock_flux_pipeline(tmp_path):
    cfg = MCImageConfig.from_preset("tiny-one-for-all", dam=False, lora_alpha=8.0)
    parts = build_tiny_components(cfg, seed=0)
    _perturb(parts["transformer"], scale=0.2)
    ours = MCImagePipeline.from_components(parts)
    folder = ours.transformer.save_adapter(tmp_path / "adapter")
    stock = FluxPipeline(**{**parts, "transformer": ours.transformer.to_flux()})
    stock.load_lora_weights(folder)
    for pipe in (ours, stock):
        pipe.set_progress_bar_config(disable=True)
    kw = dict(height=H, width=W, num_inference_steps=3, output_type="np", max_sequence_length=TINY_T5_LENGTH,
              guidance_scale=cfg.guidance_scale)
    expected = ours("a man in a red hoodie", generator=torch.Generator().manual_seed(0), **kw).images
    got = stock("a man in a red hoodie", generator=torch.Generator().manual_seed(0), **kw).images
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_merged_experts_export_at_one_hot_routing_is_that_experts_lora(tmp_path):
    moe = _lora_model(num_experts=2)
    folder = moe.save_adapter(tmp_path / "moe", merged_routing=[0.0, 1.0])
    single = _lora_model(num_experts=1)
    with torch.no_grad():  # expert 1's LoRA as a plain LoRA
        for name, layer in moe_lora_layers(single).items():
            layer.lora_A.copy_(moe_lora_layers(moe)[name].lora_A[1:])
            layer.lora_B.copy_(moe_lora_layers(moe)[name].lora_B[1:])
    stock = _stock_with_lora(moe, folder)
    args, kwargs = _inputs(moe, refs=False)
    with torch.no_grad():
        expected = single(*args, **kwargs)
        torch.testing.assert_close(stock(**_stock_inputs(args))[0], expected, atol=1e-5, rtol=0)
        # An approximation: the routed model mixes both experts per token.
        assert (moe(*args, **kwargs) - expected).abs().max() > 1e-3
    with safe_open(str(folder / DIFFUSERS_LORA_WEIGHTS_NAME), framework="pt") as f:
        assert json.loads(f.metadata()["lora_adapter_metadata"])["transformer.r"] == 2 * moe.mc_config.lora_rank

    # Without a routing a MoE-LoRA writes no diffusers file (and removes a stale one).
    moe.save_adapter(folder)
    assert not (folder / DIFFUSERS_LORA_WEIGHTS_NAME).exists()
    with pytest.raises(ValueError, match=r"must be 2 finite gate values"):
        moe.save_adapter(tmp_path / "bad", merged_routing=[1.0])
    with pytest.raises(ValueError, match="merges MoE-LoRA experts; this model's adapter is 'lora'"):
        single.save_adapter(tmp_path / "bad", merged_routing=[1.0])


# ---------------------------------------------------------------------------------------------
# diffusers' model hooks


def test_first_block_cache_at_threshold_zero_equals_plain_sampling():
    pipe = _pipe("tiny-one-for-all")
    plain = pipe("a man", **REFS, **gen()).images
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    try:
        np.testing.assert_array_equal(pipe("a man", **REFS, **gen()).images, plain)
    finally:
        pipe.transformer.disable_cache()
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))  # every later step reuses the first
    try:
        assert np.abs(pipe("a man", **REFS, **gen()).images - plain).max() > 1e-4
    finally:
        pipe.transformer.disable_cache()
    np.testing.assert_array_equal(pipe("a man", **REFS, **gen()).images, plain)


def test_set_attention_backend_native_gives_the_same_output():
    model = _perturb(MCImageTransformer.from_mc_config(
        MCImageConfig.from_preset("tiny-one-for-all", idar=True, idar_blocks="all"), seed=0)).eval()
    args, kwargs = _inputs(model)
    shares, shares_native = {}, {}
    with torch.no_grad():
        expected = model(*args, **kwargs, attention_capture=shares)
        model.set_attention_backend("native")
        try:
            assert {p._attention_backend for p in model.processors.values()} == {AttentionBackendName.NATIVE}
            got = model(*args, **kwargs, attention_capture=shares_native)
        finally:
            model.reset_attention_backend()
    assert {p._attention_backend for p in model.processors.values()} == {None}
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert shares.keys() == shares_native.keys() and len(shares) == 4
    for name in shares:
        torch.testing.assert_close(shares_native[name], shares[name], atol=1e-6, rtol=0)


def test_toyworld_assemble_writes_the_current_layout_with_the_rl_adapter(tmp_path):
    from mcimage.toyworld import REF_SIZE, assemble

    pipe = _pipe("tiny-multicrafter")
    rl = _perturb(MCImageTransformer.from_mc_config(pipe.mc_config, seed=0), seed=9)
    rl.save_adapter(tmp_path / "rl_adapter")
    for layout, source in (("new", pipe.save_pretrained(tmp_path / "new")),
                           ("older", save_older_layout(pipe, tmp_path / "older"))):
        model = MCImagePipeline.from_pretrained(assemble(source, tmp_path / "rl_adapter", tmp_path / f"model_{layout}"))
        assert model.mc_config.ref_size == (REF_SIZE, REF_SIZE) and pipe.mc_config.ref_size is None
        got, expected = model.transformer.adapter_state_dict(), rl.adapter_state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_training_export_flag_merges_the_experts(tmp_path, monkeypatch):
    from idcrafter.cli import train_image as script
    from mcimage.training import ImageDataArgs, ImageModelArgs, ImageTrainingSpec

    assert script.parse_routing("0.25, 0.75") == (0.25, 0.75) and script.parse_routing(None) is None
    for bad, why in (("0.5,x", "'x' is not a number"), ("0.5,-1", "must be at least 0, got -1"), ("0,nan", "finite"),
                     ("0,0", "every gate is 0")):
        with pytest.raises(InputError, match=why):
            script.parse_routing(bad)
    spec = ImageTrainingSpec(ImageModelArgs(preset="tiny-multicrafter", merged_lora_routing=(0.0, 0.0, 0.0, 1.0)),
                             ImageDataArgs(data="unused.jsonl", height=16, width=16))
    model = _perturb(MCImageTransformer.from_mc_config(spec.config, seed=0))
    spec.export(model, tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / DIFFUSERS_LORA_WEIGHTS_NAME), framework="pt") as f:
        key = next(k for k in f.keys() if k.endswith("lora_B.weight"))
        b = f.get_tensor(key)
    r = spec.config.lora_rank
    assert b.shape[1] == 4 * r and float(b[:, : 3 * r].abs().max()) == 0 and float(b[:, 3 * r:].abs().max()) > 0
    with pytest.raises(ConfigError, match="--merged-lora-routing: 2 gates, but the adapter is 'moe_lora' with 4 experts"):
        ImageTrainingSpec(ImageModelArgs(preset="tiny-multicrafter", merged_lora_routing=(0.5, 0.5)),
                          ImageDataArgs(data="unused.jsonl"))


def test_layerwise_casting_and_group_offload_apply_to_the_model():
    cfg = MCImageConfig.from_preset("tiny-one-for-all")
    model = _perturb(MCImageTransformer.from_mc_config(cfg, seed=0)).eval()
    args, kwargs = _inputs(model)
    with torch.no_grad():
        expected = model(*args, **kwargs)
        cast = _perturb(MCImageTransformer.from_mc_config(cfg, seed=0)).eval()
        cast.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
        assert cast.transformer_blocks[0].attn.to_q.base_layer.weight.dtype == torch.bfloat16
        diff = (cast(*args, **kwargs) - expected).abs().max()
        assert 0 < diff < 2e-2  # bf16 storage of the FLUX weights, float32 maths
        offloaded = _perturb(MCImageTransformer.from_mc_config(cfg, seed=0)).eval()
        offloaded.enable_group_offload(torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
        torch.testing.assert_close(offloaded(*args, **kwargs), expected, atol=0, rtol=0)
