"""MCImagePipeline on tiny random components: shapes, determinism, references, input errors,
save / load (one diffusers folder; the older stock FLUX folder + adapter), and descriptor markup (CCPA)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from PIL import Image
from tiny_data import save_older_layout

from mcimage.config import ADAPTER_CONFIG_NAME, FLUX_CONFIGS, MCImageConfig
from mcimage.pipeline import ADAPTER_SUBFOLDER, PIPELINE_MODULE, MCImagePipeline, load_component
from mcimage.presets import TINY_T5_LENGTH, build_tiny_components
from mcimage.transformer import MCImageTransformer

H = W = 16


def _pipe(preset: str) -> MCImagePipeline:
    return MCImagePipeline.from_components(build_tiny_components(MCImageConfig.from_preset(preset), seed=0))


def _ref(color, mode="RGB", size=(12, 20)) -> Image.Image:
    return Image.new(mode, size, color)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _kw(seed: int = 0, **kw) -> dict:
    """Sampling arguments, noise from a fresh generator of `seed`."""
    return dict(height=H, width=W, num_inference_steps=2, generator=_gen(seed), output_type="np",
                max_sequence_length=TINY_T5_LENGTH) | kw


def _run(pipe, refs=(), categories=None, seed: int = 0, **kw):
    return pipe("a man in a red hoodie", refs=refs, categories=categories, **_kw(seed, **kw)).images


@pytest.fixture(scope="module")
def mc():
    return _pipe("tiny-multicrafter")


@pytest.fixture(scope="module")
def ofa():
    return _pipe("tiny-one-for-all")


def test_output_shape_range_multicrafter(mc):
    out = _run(mc, refs=[_ref((200, 30, 30)), _ref((30, 30, 200))])
    assert out.shape == (1, H, W, 3) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    pil = _run(mc, refs=[_ref((200, 30, 30))], output_type="pil")
    assert len(pil) == 1 and pil[0].size == (W, H) and pil[0].mode == "RGB"


def test_output_shape_one_for_all_and_batch(ofa):
    out = ofa(["a man", "a woman"], refs=[_ref((200, 30, 30)), _ref((30, 200, 30))], categories=["face", "upper"],
              **_kw()).images
    assert out.shape == (2, H, W, 3) and out.min() >= 0 and out.max() <= 1


def test_seed_determinism(mc):
    refs = [_ref((200, 30, 30))]
    a, b = _run(mc, refs, seed=3), _run(mc, refs, seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, _run(mc, refs, seed=4))


def test_references_change_output(mc, ofa):
    base = _run(mc)
    red = _run(mc, refs=[_ref((220, 20, 20))])
    blue = _run(mc, refs=[_ref((20, 20, 220))])
    assert not np.allclose(base, red) and not np.allclose(red, blue)
    a = _run(ofa, refs=[_ref((220, 20, 20))], categories=["face"])
    b = _run(ofa, refs=[_ref((20, 20, 220))], categories=["face"])
    assert not np.allclose(a, b)


def test_image_modes_converted(mc, tmp_path):
    cmyk = _ref((0, 255, 255, 0), mode="CMYK")
    grey16 = Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16))
    path = tmp_path / "ref.png"
    _ref((10, 200, 10, 128), mode="RGBA").save(path)
    arr = np.full((8, 8, 3), 120, dtype=np.uint8)
    out = _run(mc, refs=[cmyk, grey16, str(path), arr])
    assert out.shape == (1, H, W, 3)
    np.testing.assert_array_equal(_run(mc, refs=[cmyk]), _run(mc, refs=[cmyk.convert("RGB")]))


def test_bad_inputs(mc, ofa):
    with pytest.raises(ValueError, match="at most 4"):
        _run(mc, refs=[_ref((0, 0, 0))] * 5)
    with pytest.raises(ValueError, match=r"categories\[1\]"):
        _run(ofa, refs=[_ref((0, 0, 0))] * 2, categories=["face", "spaceship"])
    with pytest.raises(ValueError, match="need a category per reference"):
        _run(ofa, refs=[_ref((0, 0, 0))])
    with pytest.raises(ValueError, match="2 categories for 1"):
        _run(ofa, refs=[_ref((0, 0, 0))], categories=["face", "upper"])
    with pytest.raises(ValueError, match="repeat a category"):
        _run(ofa, refs=[_ref((0, 0, 0))] * 2, categories=["face", "face"])
    with pytest.raises(ValueError, match="unsupported image mode 'F'"):
        _run(mc, refs=[Image.new("F", (8, 8), 0.5)])
    with pytest.raises(ValueError, match="uint8"):
        _run(mc, refs=[np.zeros((8, 8, 3), dtype=np.float32)])
    with pytest.raises(ValueError, match="does not exist"):
        _run(mc, refs=["/nonexistent/ref.png"])
    with pytest.raises(ValueError, match="multiples of 4"):
        _run(mc, height=18)
    with pytest.raises(ValueError, match="output_type"):
        _run(mc, output_type="jpeg")


# ---------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained


def _perturb_adapter(pipe: MCImagePipeline, seed: int = 5) -> None:
    """Non-zero adapter and DAM weights, so a reload that dropped them would change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pipe.transformer.adapter_state_dict().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


REFS2 = dict(refs=[_ref((200, 30, 30)), _ref((30, 30, 200), size=(20, 12))], categories=["face", "upper"])


@pytest.mark.parametrize("preset", ["tiny-multicrafter", "tiny-one-for-all"])
def test_save_pretrained_round_trip(preset, tmp_path):
    pipe = _pipe(preset)
    _perturb_adapter(pipe)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    folder = pipe.save_pretrained(tmp_path / "model")
    after = pipe.transformer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == [PIPELINE_MODULE, "MCImagePipeline"]
    assert index["transformer"] == ["mcimage.transformer", "MCImageTransformer"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert (folder / f"{PIPELINE_MODULE}.py").is_file() and not (folder / ADAPTER_SUBFOLDER).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left

    # transformer/ is the whole model: base, adapter and DAM weights, the MCImageConfig in its config.
    config = json.loads((folder / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "MCImageTransformer" and config["mcimage"] == pipe.mc_config.to_model_dict()
    model, info = MCImageTransformer.from_pretrained(folder / "transformer", output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    loaded_sd = model.state_dict()
    assert loaded_sd.keys() == after.keys() and all(torch.equal(after[k], loaded_sd[k]) for k in after)

    loaded = MCImagePipeline.from_pretrained(folder)
    assert loaded.mc_config == pipe.mc_config
    prompt = "a man <face>with hair</face>" if pipe.mc_config.ccpa else "a man with hair"
    a = pipe(prompt, **REFS2, **_kw()).images
    b = loaded(prompt, **REFS2, **_kw()).images
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    fresh = _run(_pipe(preset), **REFS2)
    assert np.abs(_run(loaded, **REFS2) - fresh).max() > 1e-3  # the adapter weights did come back


def test_older_layout_is_a_stock_flux_folder_and_loads(tmp_path):
    from diffusers import FluxPipeline

    pipe = _pipe("tiny-one-for-all")
    _perturb_adapter(pipe)
    folder = save_older_layout(pipe, tmp_path / "model")
    stock = FluxPipeline.from_pretrained(folder)
    assert type(stock.transformer) is FluxTransformer2DModel and type(stock.vae).__name__ == "AutoencoderKL"
    # transformer/ holds the base weights under their stock names, nothing of ours.
    base = pipe.transformer.base_state_dict()
    assert base.keys() == stock.transformer.state_dict().keys()
    assert all(torch.equal(base[k], v) for k, v in stock.transformer.state_dict().items())
    loaded = MCImagePipeline.from_pretrained(folder)
    assert loaded.mc_config == pipe.mc_config
    np.testing.assert_allclose(_run(loaded, **REFS2), _run(pipe, **REFS2), atol=1e-6, rtol=0)


def test_from_pretrained_config_when_no_adapter(tmp_path):
    pipe = _pipe("tiny-multicrafter")
    _perturb_adapter(pipe)
    ofa = MCImageConfig.from_preset("tiny-one-for-all")
    # The model's own config wins over `config`, in either layout.
    assert MCImagePipeline.from_pretrained(pipe.save_pretrained(tmp_path / "new"), config=ofa).mc_config.position_ids \
        == "uno"
    folder = save_older_layout(pipe, tmp_path / "model")
    assert MCImagePipeline.from_pretrained(folder, config=ofa).mc_config.position_ids == "uno"

    shutil.rmtree(folder / ADAPTER_SUBFOLDER)
    plain = MCImagePipeline.from_pretrained(folder)  # MCImageConfig(): nothing attached
    fresh = MCImagePipeline.from_pretrained(folder, config=MCImageConfig.from_preset("tiny-multicrafter"))
    assert plain.mc_config.adapter == "none" and fresh.mc_config.adapter == "moe_lora"
    assert fresh.mc_config.flux["num_layers"] == 2  # the architecture comes from transformer/
    assert all(float(p.abs().sum()) == 0 for k, p in fresh.transformer.adapter_state_dict().items() if "lora_B" in k)
    # A fresh adapter contributes nothing: the result is the base model's.
    np.testing.assert_allclose(_run(fresh, refs=REFS2["refs"]), _run(plain, refs=REFS2["refs"]), atol=1e-6, rtol=0)
    ofa_loaded = MCImagePipeline.from_pretrained(folder, config=ofa)
    assert (ofa_loaded.mc_config.position_ids, ofa_loaded.mc_config.ccpa) == ("condition", True)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no transformer/ subfolder"):
        MCImagePipeline.from_pretrained(tmp_path)
    folder = save_older_layout(_pipe("tiny-multicrafter"), tmp_path / "model")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        MCImagePipeline.from_pretrained(folder, adapter=tmp_path / "nowhere")

    deeper = MCImageConfig.from_preset("tiny-multicrafter", flux=dict(FLUX_CONFIGS["tiny"], num_layers=3))
    MCImageTransformer.from_mc_config(deeper).save_adapter(tmp_path / "deep_adapter")
    with pytest.raises(ValueError, match="deep_adapter: adapter was trained on a different FLUX architecture.*num_layers"):
        MCImagePipeline.from_pretrained(folder, adapter=tmp_path / "deep_adapter")
    other = tmp_path / "ofa_adapter"
    _pipe("tiny-one-for-all").transformer.save_adapter(other)
    shutil.copy(folder / ADAPTER_SUBFOLDER / "mcimage_adapter.safetensors", other)  # MoE-LoRA weights, LoRA config
    with pytest.raises(ValueError, match="ofa_adapter.*does not fit"):
        MCImagePipeline.from_pretrained(folder, adapter=other)
    (other / ADAPTER_CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="ofa_adapter: broken mcimage adapter config"):
        MCImagePipeline.from_pretrained(folder, adapter=other)
    index = (folder / "model_index.json").read_text()
    (folder / "model_index.json").write_text(json.dumps(dict(json.loads(index), vae=["os", "system"])))
    with pytest.raises(ValueError, match="component 'vae'.*packages"):  # never imports an arbitrary module
        MCImagePipeline.from_pretrained(folder)
    (folder / "model_index.json").write_text(index)
    (folder / ADAPTER_SUBFOLDER / "mcimage_adapter.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="mcimage_adapter: broken mcimage adapter weights"):
        MCImagePipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match="no loadable class 'Nope'"):
        load_component(folder, "vae", "diffusers", "Nope")


def test_custom_codec_loads_by_model_index(tmp_path):
    from idcrafter.toyworld.codec import PixelUnshuffleImageCodec

    # 2x2 pixel-unshuffle of RGB = 12 latent channels, packed 2x2 -> 48 transformer channels.
    config = MCImageConfig.from_preset("tiny-multicrafter", flux=dict(FLUX_CONFIGS["tiny"], in_channels=48))
    parts = build_tiny_components(config, seed=0)
    parts["vae"] = PixelUnshuffleImageCodec(factor=2).eval()
    pipe = MCImagePipeline.from_components(parts)
    _perturb_adapter(pipe)
    folder = pipe.save_pretrained(tmp_path / "model")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["vae"] == ["idcrafter.toyworld.codec", "PixelUnshuffleImageCodec"]
    for loaded in (MCImagePipeline.from_pretrained(folder), MCImagePipeline.from_pretrained(
            save_older_layout(pipe, tmp_path / "older"))):
        assert type(loaded.vae) is PixelUnshuffleImageCodec and loaded.vae_scale_factor == 2
        np.testing.assert_allclose(_run(pipe, refs=REFS2["refs"]), _run(loaded, refs=REFS2["refs"]), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# descriptor markup


def _txt_ids_seen(pipe, prompt, **kw):
    """The txt_ids FLUX's forward receives (first step: the leading rows of the ids its rotary
    embedding gets, [txt_ids; img_ids]) and the pipeline output."""
    seen = []
    hook = pipe.transformer.pos_embed.register_forward_pre_hook(
        lambda module, args: seen.append(args[0][:TINY_T5_LENGTH].clone())
    )
    try:
        out = _run(pipe, **kw) if prompt is None else pipe(prompt, **_kw(**kw)).images
    finally:
        hook.remove()
    return seen[0], out


def test_markup_places_descriptor_tokens_at_ccpa_centroid(ofa):
    ids, marked = _txt_ids_seen(ofa, "a man <face>with hair</face>", **REFS2)
    # Character tokenizer, no BOS: "a man with hair" -> the descriptor is tokens 6..14. References
    # are 16x16 pixels -> 8x8 latents -> 4x4 packed grids; face is category 1, so eq. 3 puts every
    # descriptor token at (1, 1*4 + (4-1)/2, 1*4 + (4-1)/2) = (1, 5.5, 5.5).
    expected = torch.zeros(TINY_T5_LENGTH, 3)
    expected[6:15] = torch.tensor([1.0, 5.5, 5.5])
    torch.testing.assert_close(ids, expected, rtol=0, atol=0)
    seq = ofa.transformer.prepare(torch.zeros(1, 16, 4), [torch.zeros(1, 16, 4)] * 2, torch.zeros(1, TINY_T5_LENGTH, 32),
                                  target_hw=(4, 4), ref_hws=[(4, 4)] * 2, categories=["face", "upper"],
                                  descriptor_tokens={"face": list(range(6, 15))})
    torch.testing.assert_close(seq.txt_ids, expected, rtol=0, atol=0)
    plain_ids, plain = _txt_ids_seen(ofa, "a man with hair", **REFS2)
    assert float(plain_ids.abs().sum()) == 0
    assert np.abs(marked - plain).max() > 1e-4  # same text, moved descriptor: a different image


def test_markup_stripped_and_ignored_without_ccpa(mc):
    ids, marked = _txt_ids_seen(mc, "a man <face>with hair</face>", **REFS2)
    _, plain = _txt_ids_seen(mc, "a man with hair", **REFS2)
    assert float(ids.abs().sum()) == 0
    np.testing.assert_array_equal(marked, plain)


def test_markup_batch_and_errors(ofa):
    kw = dict(REFS2, **_kw(num_inference_steps=1))
    out = ofa(["a <face>man</face> walks", "a <face>dog</face> walks"], **kw).images  # same tokens: fine
    assert out.shape == (2, H, W, 3)
    with pytest.raises(ValueError, match="different tokens"):
        ofa(["a <face>man</face>", "a dog"], **kw)
    with pytest.raises(ValueError, match="'bag' but no reference has that category"):
        ofa("a man with a <bag>red bag</bag>", **kw)
    with pytest.raises(ValueError, match="unclosed tag <face>"):
        ofa("a <face>man", **kw)
    with pytest.raises(ValueError, match="not both"):
        ofa("a <face>man</face>", descriptor_tokens={"face": [2]}, **kw)
