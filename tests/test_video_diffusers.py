"""The video branch as a diffusers citizen: IDCrafterTransformer is a WanTransformer3DModel with
diffusers' own files and hooks, and a saved IDCrafterPipeline folder loads through
`diffusers.DiffusionPipeline.from_pretrained`. Older folders (a stock Wan transformer with the
adapter beside it) load to the same model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, WanTransformer3DModel
from diffusers.hooks import FirstBlockCacheConfig
from diffusers.models.attention_dispatch import AttentionBackendName
from tiny_data import video_refs as refs

from idcrafter.utils.cli import InputError
from idcrafter.utils.errors import ConfigError, FileFormatError
from idcrafter.video.config import IDCrafterConfig, read_model_config
from idcrafter.video.pipeline import PIPELINE_MODULE, IDCrafterPipeline
from idcrafter.video.presets import build_components
from idcrafter.video.transformer import IDCrafterTransformer

CFG = IDCrafterConfig.from_preset("tiny")
PROMPT = "a red ball and a blue box"


def perturb(params, std=0.2, seed=3):
    """Trained-looking weights: subjects (or LoRA) must change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * std)


def model_and_inputs(trained=True, config=CFG):
    model = IDCrafterTransformer.from_idcrafter_config(config, seed=0).eval()
    if trained:
        perturb(model.adapter.parameters())
    g = torch.Generator().manual_seed(1)
    x = dict(hidden_states=torch.randn(2, 16, 3, 8, 8, generator=g), timestep=torch.tensor([700.0, 150.0]),
             encoder_hidden_states=torch.randn(2, 7, 32, generator=g))
    return model, x, torch.randn(2, 2, 16, 8, 8, generator=g)


def out(model, x, subjects=None, t=None):
    kw = dict(x, timestep=torch.tensor([t, t])) if t is not None else x
    if subjects is not None:
        kw = dict(kw, subjects=subjects)
    with torch.no_grad():
        return model(**kw, return_dict=False)[0]


def make_pipe(preset="tiny", trained=True):
    pipe = IDCrafterPipeline.from_components(build_components(IDCrafterConfig.from_preset(preset), seed=0))
    pipe.set_progress_bar_config(disable=True)
    if trained:
        perturb(pipe.transformer.adapter.parameters(), std=0.3, seed=5)
    return pipe


def latents(pipe, **kw):
    pipe.set_progress_bar_config(disable=True)
    kw.setdefault("num_inference_steps", 2)
    return pipe(PROMPT, kw.pop("refs", refs()), generator=torch.Generator().manual_seed(3), output_type="latent", **kw).frames


def save_old_layout(pipe: IDCrafterPipeline, folder: Path) -> Path:
    """The layout IDCrafterPipeline wrote before the adapter moved into the transformer (and the one of
    the committed toy-world model): a stock Wan folder + idcrafter_adapter/."""
    pipe.tokenizer.save_pretrained(folder / "tokenizer")
    pipe.text_encoder.save_pretrained(folder / "text_encoder")
    pipe.vae.save_pretrained(folder / "vae")
    pipe.scheduler.save_pretrained(folder / "scheduler")
    pipe.transformer.to_wan().save_pretrained(folder / "transformer")
    pipe.transformer.save_adapter(folder / "idcrafter_adapter")
    index = {"_class_name": "WanPipeline", "tokenizer": ["transformers", type(pipe.tokenizer).__name__],
             "text_encoder": ["transformers", "UMT5EncoderModel"], "vae": ["diffusers", "AutoencoderKLWan"],
             "transformer": ["diffusers", "WanTransformer3DModel"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


# ---------------------------------------------------------------------------------- the model


def test_model_is_a_wan_subclass_with_the_idcrafter_config_in_its_diffusers_config():
    model, x, subjects = model_and_inputs(trained=False)
    assert isinstance(model, WanTransformer3DModel) and len(model.blocks) == CFG.wan["num_layers"]
    assert model.config.idcrafter["num_blocks"] == 2 and "wan" not in model.config.idcrafter
    # Its `wan` is the model's own Wan config (every argument of the stock class, the preset's among them).
    assert model.idcrafter_config == dataclasses.replace(CFG, wan=model.wan_config)
    assert CFG.wan.items() <= model.wan_config.items()
    # Sampling defaults can change in place (and are recorded); the adapter's shape cannot.
    model.idcrafter_config = dataclasses.replace(model.idcrafter_config, text_length=48)
    assert model.config.idcrafter["text_length"] == 48 == model.idcrafter_config.text_length
    with pytest.raises(ValueError, match="max_subjects change the adapter; use replace_adapter"):
        model.idcrafter_config = dataclasses.replace(model.idcrafter_config, max_subjects=2)
    # Zero-start adapter: with subjects the model is the stock one on the same weights.
    stock = out(model.to_wan(), x)
    assert torch.equal(out(model, x), stock)
    torch.testing.assert_close(out(model, x, subjects), stock, atol=1e-5, rtol=0)


def test_save_pretrained_is_diffusers_own_and_reloads_exactly(tmp_path):
    model, x, subjects = model_and_inputs()
    model.vlm_folder = "/models/qwen"
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["_class_name"] == "IDCrafterTransformer" and config["vlm_folder"] == "/models/qwen"
    loaded = IDCrafterTransformer.from_pretrained(tmp_path / "m")
    assert loaded.idcrafter_config == model.idcrafter_config and loaded.vlm_folder == "/models/qwen"
    assert torch.equal(out(loaded, x, subjects), out(model, x, subjects))
    assert (out(model, x, subjects) - out(model, x)).abs().max() > 1e-3  # the adapter weights came along


def test_variant_dtype_and_sharded_files_round_trip_exactly(tmp_path):
    model, x, subjects = model_and_inputs()
    model.save_pretrained(tmp_path / "shards", max_shard_size="50KB")
    shards = sorted((tmp_path / "shards").glob("*.safetensors"))
    assert len(shards) > 3 and (tmp_path / "shards" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    sharded = IDCrafterTransformer.from_pretrained(tmp_path / "shards")
    assert torch.equal(out(sharded, x, subjects), out(model, x, subjects))

    half = IDCrafterTransformer.from_pretrained(tmp_path / "shards", torch_dtype=torch.float16)
    half.save_pretrained(tmp_path / "fp16", variant="fp16")
    assert [p.name for p in (tmp_path / "fp16").glob("*.safetensors")] == ["diffusion_pytorch_model.fp16.safetensors"]
    again = IDCrafterTransformer.from_pretrained(tmp_path / "fp16", variant="fp16", torch_dtype=torch.float16)
    assert again.dtype == torch.float16 and again.adapter.cross_modal_attn[0].to_k.weight.dtype == torch.float16
    a, b = half.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    # Read back as float32 it is the half-precision model's values exactly.
    wide = IDCrafterTransformer.from_pretrained(tmp_path / "fp16", variant="fp16", torch_dtype=torch.float32)
    assert all(torch.equal(v, a[k].float()) for k, v in wide.state_dict().items())


def test_lora_layers_travel_in_the_config_and_the_weights(tmp_path):
    model, x, subjects = model_and_inputs()
    before = out(model, x, subjects)
    model.add_lora(rank=4)
    perturb([p for n, p in model.named_parameters() if "lora_B" in n], std=0.05)
    assert (out(model, x, subjects) - before).abs().max() > 1e-4
    model.save_pretrained(tmp_path / "m")
    loaded = IDCrafterTransformer.from_pretrained(tmp_path / "m")
    assert loaded.lora_config == model.lora_config and loaded.config.lora["rank"] == 4
    assert torch.equal(out(loaded, x, subjects), out(model, x, subjects))


def test_stock_folder_and_adapter_folder_convert_to_the_same_model(tmp_path):
    """One conversion path: a stock Wan transformer + an adapter folder (training's export) loads to the
    model that save_pretrained writes in one folder."""
    model, x, subjects = model_and_inputs()
    model.to_wan().save_pretrained(tmp_path / "stock")
    adapter = model.save_adapter(tmp_path / "adapter")
    model.save_pretrained(tmp_path / "new")
    old = IDCrafterTransformer.from_pretrained(tmp_path / "stock", adapter=adapter)
    new = IDCrafterTransformer.from_pretrained(tmp_path / "new")
    assert old.state_dict().keys() == new.state_dict().keys()
    assert all(torch.equal(v, new.state_dict()[k]) for k, v in old.state_dict().items())
    assert torch.equal(out(old, x, subjects), out(new, x, subjects))
    # Without an adapter a stock folder gives a fresh, zero-start adapter: the stock model.
    fresh = IDCrafterTransformer.from_pretrained(tmp_path / "stock")
    torch.testing.assert_close(out(fresh, x, subjects), out(model, x), atol=1e-5, rtol=0)


def test_first_block_cache_skips_blocks_and_is_exact_at_threshold_zero():
    model, x, subjects = model_and_inputs()
    calls = []
    for i, block in enumerate(model.blocks):
        block.attn1.register_forward_hook(lambda *_, i=i: calls.append(i))
    timesteps = (700.0, 690.0, 300.0)
    plain = [out(model, x, subjects, t) for t in timesteps]

    def cached(threshold):
        calls.clear()
        model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        try:
            results = []
            for t in timesteps:  # one denoising call per step, as the pipeline makes them
                with model.cache_context("cond"):
                    results.append(out(model, x, subjects, t))
            return results
        finally:
            model.disable_cache()

    assert all(torch.equal(a, b) for a, b in zip(cached(0.0), plain)) and calls == [0, 1, 2] * 3
    skipping = cached(1e9)
    assert calls == [0, 1, 2, 0, 0]  # after the first step only the first block runs
    assert torch.equal(skipping[0], plain[0])
    for got, want in zip(skipping[1:], plain[1:]):
        error = float((got - want).abs().max() / want.abs().max())
        assert 1e-4 < error < 0.05, error  # cached residuals: close to, not equal to, the full model


def test_first_block_cache_in_the_pipeline():
    """The pipeline gives every pass its own cache context (diffusers' caches need one): threshold 0
    changes nothing, a huge threshold reuses the first step's residuals."""
    pipe = make_pipe()
    plain = {batched: latents(pipe, batched_guidance=batched, num_inference_steps=3) for batched in (True, False)}
    for threshold in (0.0, 1e9):
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        try:
            for batched, expected in plain.items():
                got = latents(pipe, batched_guidance=batched, num_inference_steps=3)
                assert torch.equal(got, expected) if threshold == 0 else (got - expected).abs().max() > 1e-4
        finally:
            pipe.transformer.disable_cache()
    assert torch.equal(latents(pipe, num_inference_steps=3), plain[True])


def test_set_attention_backend_reaches_the_wrapped_text_attention():
    model, x, subjects = model_and_inputs()
    expected = out(model, x, subjects)
    model.set_attention_backend("native")
    try:
        assert model.blocks[0].attn2.processor.stock._attention_backend == AttentionBackendName.NATIVE
        assert model.blocks[0].attn1.processor._attention_backend == AttentionBackendName.NATIVE
        assert torch.equal(out(model, x, subjects), expected)
    finally:
        model.reset_attention_backend()
    assert model.blocks[0].attn2.processor.stock._attention_backend is None


def test_layerwise_casting_stores_float8_and_keeps_the_zero_start():
    fresh, x, subjects = model_and_inputs(trained=False)
    trained, _, _ = model_and_inputs()
    full = out(trained, x, subjects)
    for model in (fresh, trained):
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert trained.blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    assert trained.adapter.cross_modal_attn[0].to_k.weight.dtype == torch.float8_e4m3fn
    # A zero-initialised output projection is zero in float8 too: subjects still change nothing.
    assert torch.equal(out(fresh, x, subjects), out(fresh, x))
    got = out(trained, x, subjects)
    error = float((got - full).abs().max() / full.abs().max())
    assert torch.isfinite(got).all() and 1e-3 < error < 0.3, error  # float8 weights: close, not equal


def test_peft_lora_adapter_saves_and_loads_through_diffusers(tmp_path):
    from peft import LoraConfig

    model, x, subjects = model_and_inputs()
    before = out(model, x, subjects)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    tuned = out(model, x, subjects)
    assert (tuned - before).abs().max() > 1e-4
    model.save_lora_adapter(tmp_path / "lora")
    other, _, _ = model_and_inputs()
    other.load_lora_adapter(str(tmp_path / "lora"), weight_name="pytorch_lora_weights.safetensors", prefix=None)
    torch.testing.assert_close(out(other, x, subjects), tuned, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------- the pipeline


@pytest.mark.parametrize("preset", ["tiny", "toyworld"])
def test_diffusion_pipeline_loads_a_saved_folder_as_idcrafter_pipeline(preset, tmp_path):
    pipe = make_pipe(preset)
    folder = pipe.save_pretrained(tmp_path / "model")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == [PIPELINE_MODULE, "IDCrafterPipeline"]
    assert index["transformer"] == ["idcrafter.video.transformer", "IDCrafterTransformer"]
    ours = IDCrafterPipeline.from_pretrained(folder)
    theirs = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(theirs) is IDCrafterPipeline and type(theirs.transformer) is IDCrafterTransformer
    assert theirs.transformer.idcrafter_config == pipe.transformer.idcrafter_config
    expected = latents(pipe)
    assert torch.equal(latents(ours), expected) and torch.equal(latents(theirs), expected)
    assert (latents(pipe, refs=refs()[:1]) - expected).abs().max() > 1e-3  # the references mattered
    with pytest.raises(ValueError, match="trust_remote_code=True"):  # diffusers runs no folder code unasked
        DiffusionPipeline.from_pretrained(folder)


def test_pipeline_variant_and_shards_load_in_both_loaders(tmp_path):
    pipe = make_pipe()
    folder = pipe.save_pretrained(tmp_path / "model", variant="fp16", max_shard_size="100KB")
    assert len(list((folder / "transformer").glob("diffusion_pytorch_model.fp16-*.safetensors"))) > 1
    expected = latents(pipe)
    assert torch.equal(latents(IDCrafterPipeline.from_pretrained(folder, variant="fp16")), expected)
    theirs = DiffusionPipeline.from_pretrained(folder, variant="fp16", trust_remote_code=True)
    assert torch.equal(latents(theirs), expected)


def test_old_layout_and_new_layout_give_identical_outputs(tmp_path):
    pipe = make_pipe()
    old = save_old_layout(pipe, tmp_path / "old")
    new = pipe.save_pretrained(tmp_path / "new")
    assert read_model_config(old / "transformer") is None and read_model_config(new / "transformer") is not None
    from_old = IDCrafterPipeline.from_pretrained(old)
    from_new = IDCrafterPipeline.from_pretrained(new)
    expected = latents(pipe)
    assert torch.equal(latents(from_old), expected) and torch.equal(latents(from_new), expected)
    # Converting: load the old folder, save it, and diffusers loads the result.
    from_old.save_pretrained(tmp_path / "converted")
    converted = DiffusionPipeline.from_pretrained(tmp_path / "converted", trust_remote_code=True)
    assert torch.equal(latents(converted), expected)


def test_assembled_toy_model_holds_the_fine_tuned_base_and_adapter(tmp_path):
    """toyworld.build.assemble_model: a base folder + a full fine-tune's export -> one model folder."""
    from idcrafter.toyworld.build import assemble_model

    base = make_pipe(trained=False).save_pretrained(tmp_path / "base")
    tuned = make_pipe()
    perturb(tuned.transformer.base_parameters(), std=0.01, seed=7)
    tuned.transformer.save_adapter(tmp_path / "run" / "adapter", include_base=True)
    model = assemble_model(tmp_path, base, tmp_path / "run")
    assert torch.equal(latents(DiffusionPipeline.from_pretrained(model, trust_remote_code=True)), latents(tuned))


def test_hub_style_arguments_are_refused_in_one_line(tmp_path):
    folder = make_pipe(trained=False).save_pretrained(tmp_path / "model")
    cases = [  # a missing folder or the wrong kind: FileFormatError; a Hub option: ConfigError; a typo: TypeError
        (IDCrafterPipeline.from_pretrained, ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers",), {}, FileFormatError, "not a local folder"),
        (IDCrafterPipeline.from_pretrained, (folder,), {"revision": "main"}, ConfigError,
         "revision= is a Hugging Face Hub option"),
        (IDCrafterPipeline.from_pretrained, (folder,), {"custom_pipeline": "lpw_stable_diffusion"}, ConfigError,
         "custom_pipeline="),
        (IDCrafterPipeline.from_pretrained, (folder,), {"colour": "red"}, TypeError, "unknown option"),
        (IDCrafterPipeline.from_pretrained, (tmp_path,), {}, FileFormatError, "no transformer/ subfolder"),
        (IDCrafterTransformer.from_pretrained, ("org/model",), {}, FileFormatError, "not a local folder"),
        (IDCrafterTransformer.from_pretrained, (folder,), {"subfolder": "transformer", "token": "x"}, ConfigError, "token="),
        (IDCrafterTransformer.from_pretrained, (folder,), {"subfolder": "unet"}, FileFormatError, "no unet/ subfolder"),
        (IDCrafterTransformer.from_pretrained, (folder,), {"subfolder": "vae"}, FileFormatError,
         "AutoencoderKLWan, not a Wan"),
    ]
    for load, args, kwargs, error, message in cases:
        with pytest.raises(error, match=message) as err:
            load(*args, **kwargs)
        assert "\n" not in str(err.value)


def test_inference_reads_the_config_of_a_saved_model_folder(tmp_path):
    from idcrafter.video.infer import InferenceRequest, check_vlm, validate

    pipe = IDCrafterPipeline.from_components(build_components(IDCrafterConfig.from_preset("tiny", num_inference_steps=3)))
    pipe.transformer.add_vlm_connector(64)
    pipe.transformer.vlm_folder = str(tmp_path / "qwen")
    folder = pipe.save_pretrained(tmp_path / "model")
    ref = tmp_path / "ref.png"
    refs()[0].save(ref)
    req = InferenceRequest(refs=[str(ref)], prompt="x", out=str(tmp_path / "o.mp4"), model=str(folder),
                           vlm=None)
    with pytest.raises(InputError, match=f"trained with the VLM encoder {tmp_path / 'qwen'}, which does not exist"):
        validate(req)  # the model config (use_vlm) and its recorded VLM folder come from transformer/config.json
    config = json.loads((folder / "transformer" / "config.json").read_text())
    config["idcrafter"]["use_vlm"] = False
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    assert validate(req).num_inference_steps == 3 and req.resolved["steps"] == 3
    assert check_vlm(None, validate(req), None, folder) is None
    req.preset = "toyworld"
    with pytest.raises(InputError, match="--preset toyworld conflicts"):
        validate(req)
    req.preset = None
    config["idcrafter"]["hierarchy"] = 7
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="--model .*bad transformer/config.json"):
        validate(req)


def test_a_checkpoint_missing_the_adapter_weights_is_refused(tmp_path):
    """diffusers would leave weights a checkpoint lacks on the meta device; loading says which."""
    from safetensors.torch import save_file

    model, _, _ = model_and_inputs()
    model.save_pretrained(tmp_path / "m")
    base = {k: v.contiguous() for k, v in model.to_wan().state_dict().items()}
    save_file(base, str(tmp_path / "m" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FileFormatError, match=r"lacks weights for \['adapter\.") as err:
        IDCrafterTransformer.from_pretrained(tmp_path / "m")
    assert "\n" not in str(err.value)
