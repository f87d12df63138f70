"""mcimage config and transformer wrapper against a stock tiny diffusers FluxTransformer2DModel."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import FluxTransformer2DModel

from idcrafter.core.positions import descriptor_token_indices, parse_descriptor_markup
from mcimage.config import PRESETS, MCImageConfig
from mcimage.transformer import MCImageTransformer, build_sequence, pack_latents, unpack_latents

TARGET_HW = (4, 4)
REF_HWS = [(2, 2), (2, 3)]
PROMPT = "a man <face>with short hair</face> wearing <upper>a red hoodie</upper>"


def _plain(preset: str = "tiny-multicrafter", **overrides) -> MCImageConfig:
    """The preset with every added feature off: the wrapper must then be the stock model."""
    values = dict(adapter="none", dam=False, idar=False, ccpa=False)
    values.update(overrides)
    return MCImageConfig.from_preset(preset, **values)


def _base(cfg: MCImageConfig, seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**cfg.flux).eval()


def _inputs(cfg: MCImageConfig, batch: int = 2, txt_len: int = 12, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    c, f = cfg.flux["in_channels"], cfg.flux
    return dict(
        hidden_states=torch.randn(batch, TARGET_HW[0] * TARGET_HW[1], c, generator=g),
        encoder_hidden_states=torch.randn(batch, txt_len, f["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(batch, f["pooled_projection_dim"], generator=g),
        timestep=torch.tensor([0.5, 0.3])[:batch],
        guidance=torch.full((batch,), 3.5),
    )


def _refs(cfg: MCImageConfig, batch: int = 2, seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, h * w, cfg.flux["in_channels"], generator=g) for h, w in REF_HWS]


def _offsets(prompt: str, length: int) -> list[tuple[int, int]]:
    """A whitespace 'tokenizer' offset mapping of the clean prompt, padded with (0, 0)."""
    clean, _ = parse_descriptor_markup(prompt)
    offsets, pos = [], 0
    for word in clean.split(" "):
        offsets.append((pos, pos + len(word)))
        pos += len(word) + 1
    return offsets + [(0, 0)] * (length - len(offsets))


# ------------------------------------------------------------------------------ config


def test_presets_and_roundtrip(tmp_path):
    mc = MCImageConfig.from_preset("multicrafter")
    assert (mc.position_ids, mc.idar, mc.idar_lambda, mc.idar_blocks, mc.dam) == ("uno", True, 0.3, "double", False)
    assert mc.adapter_config().num_experts == 4 and "ff.net.2" in mc.lora_target_modules
    ofa = MCImageConfig.from_preset("one-for-all")
    assert (ofa.position_ids, ofa.ccpa, ofa.dam, ofa.dam_blocks) == ("condition", True, True, "all")
    assert (ofa.adapter_config().num_experts, ofa.adapter_config().rank) == (1, 512)
    assert "Kontext" in ofa.base_model and "FLUX.1-dev" in mc.base_model
    for name in PRESETS:
        cfg = MCImageConfig.from_preset(name)
        cfg.save(tmp_path / f"{name}.json")
        assert MCImageConfig.load(tmp_path / f"{name}.json") == cfg
    # Presets must not share mutable state with the table.
    MCImageConfig.from_preset("tiny-multicrafter").flux["axes_dims_rope"][0] = 99
    assert PRESETS["tiny-multicrafter"]["flux"]["axes_dims_rope"][0] == 4


def test_config_errors():
    with pytest.raises(ValueError, match="unknown preset 'flux-pro'"):
        MCImageConfig.from_preset("flux-pro")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lamda'\]"):
        MCImageConfig.from_dict({"lamda": 0.3})
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['expert'\]"):
        MCImageConfig.from_preset("tiny-multicrafter", expert=3)
    with pytest.raises(ValueError, match="ccpa needs position_ids='condition'"):
        MCImageConfig(ccpa=True)
    with pytest.raises(ValueError, match="position_ids must be one of"):
        MCImageConfig(position_ids="diagonal")


# ------------------------------------------------------------------------------ parity


def test_parity_without_references_features_off():
    cfg = _plain()
    base = _base(cfg)
    stock = copy.deepcopy(base)
    model = MCImageTransformer.from_flux(base, cfg)
    inputs = _inputs(cfg)
    with torch.no_grad():
        got = model(ref_latents=None, target_hw=TARGET_HW, **inputs)
        expected = stock(
            **inputs, img_ids=torch.cat([torch.zeros(16, 1), torch.cartesian_prod(torch.arange(4.0), torch.arange(4.0))], 1),
            txt_ids=torch.zeros(12, 3), return_dict=False,
        )[0]
    assert got.shape == inputs["hidden_states"].shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", ["tiny-multicrafter", "tiny-one-for-all"])
def test_references_equal_manual_concatenated_call(preset):
    cfg = _plain(preset)
    base = _base(cfg)
    stock = copy.deepcopy(base)
    model = MCImageTransformer.from_flux(base, cfg)
    inputs, refs = _inputs(cfg), _refs(cfg)
    extra = dict(target_hw=TARGET_HW, ref_hws=REF_HWS, categories=["face", "upper"])
    seq = model.prepare(inputs["hidden_states"], refs, inputs["encoder_hidden_states"], **extra)
    with torch.no_grad():
        got = model(ref_latents=refs, **inputs, **extra)
        joint = dict(inputs, hidden_states=torch.cat([inputs["hidden_states"], *refs], 1))
        full = stock(**joint, img_ids=seq.img_ids, txt_ids=seq.txt_ids, return_dict=False)[0]
        no_refs = model(ref_latents=None, **inputs, target_hw=TARGET_HW)
    assert full.shape[1] == 16 + 4 + 6
    torch.testing.assert_close(got, full[:, :16], atol=1e-5, rtol=0)
    # The references do reach the target tokens.
    assert (got - no_refs).abs().max() > 1e-4


def test_stacked_reference_tensor_equals_list():
    cfg = _plain()
    model = MCImageTransformer.from_mc_config(cfg, seed=0).eval()
    inputs = _inputs(cfg)
    refs = torch.randn(2, 2, 4, cfg.flux["in_channels"])
    with torch.no_grad():
        a = model(ref_latents=refs, **inputs, target_hw=TARGET_HW)
        b = model(ref_latents=list(refs.unbind(1)), **inputs, target_hw=TARGET_HW)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("preset", ["tiny-multicrafter", "tiny-one-for-all"])
def test_dam_and_moe_lora_at_init_equal_stock(preset):
    cfg = MCImageConfig.from_preset(preset, dam=True, adapter="moe_lora", num_experts=4)
    base = _base(cfg)
    stock = MCImageTransformer.from_flux(copy.deepcopy(base), _plain(preset))
    model = MCImageTransformer.from_flux(base, cfg)
    assert model.adapter_modules and any(p.temperature is not None for p in model.processors.values())
    inputs, refs = _inputs(cfg), _refs(cfg)
    extra = dict(target_hw=TARGET_HW, ref_hws=REF_HWS, categories=["face", "upper"])
    with torch.no_grad():
        got = model(ref_latents=refs, **inputs, **extra)
        expected = stock(ref_latents=refs, **inputs, **extra)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        # Once the adapter has trained, the output moves: the comparison above can fail.
        for name, p in model.named_parameters():
            if ".lora_B" in name:
                p.normal_(std=0.5)
        assert (model(ref_latents=refs, **inputs, **extra) - expected).abs().max() > 1e-3


def test_idar_capture_through_forward():
    cfg = MCImageConfig.from_preset("tiny-multicrafter")
    model = MCImageTransformer.from_mc_config(cfg, seed=0)
    inputs, refs = _inputs(cfg), _refs(cfg)
    shares = {}
    model(ref_latents=refs, **inputs, target_hw=TARGET_HW, ref_hws=REF_HWS, attention_capture=shares)
    assert set(shares) == {"transformer_blocks.0", "transformer_blocks.1"}
    for share in shares.values():
        assert share.shape == (2, 2, 16)
        torch.testing.assert_close(share.sum(1), torch.ones(2, 16), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="needs at least one reference"):
        model(ref_latents=None, **inputs, target_hw=TARGET_HW, attention_capture={})


# ------------------------------------------------------------------------------ position ids


def _rows(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("base_offset", [False, True])
def test_one_for_all_ids_worked_example(base_offset):
    """face (c=1, 2x2 grid) and upper (c=2, 2x3 grid) after a 4x4 target, eq. 2 and eq. 3 by hand."""
    cfg = MCImageConfig.from_preset("tiny-one-for-all", condition_base_offset=base_offset)
    clean, spans = parse_descriptor_markup(PROMPT)
    tokens = descriptor_token_indices(spans, _offsets(PROMPT, 12))
    assert clean == "a man with short hair wearing a red hoodie"
    assert tokens == {"face": [2, 3, 4], "upper": [6, 7, 8]}
    seq = build_sequence(cfg, 16, [4, 6], 12, TARGET_HW, REF_HWS, ["face", "upper"], tokens)

    d = 4 if base_offset else 0  # the optional shift by the target size (4, 4)
    face = _rows((1, 2 + d, 2 + d), (1, 2 + d, 3 + d), (1, 3 + d, 2 + d), (1, 3 + d, 3 + d))
    upper = _rows(
        (1, 4 + d, 6 + d), (1, 4 + d, 7 + d), (1, 4 + d, 8 + d), (1, 5 + d, 6 + d), (1, 5 + d, 7 + d), (1, 5 + d, 8 + d)
    )
    target = torch.stack([torch.zeros(16), torch.arange(4.0).repeat_interleave(4), torch.arange(4.0).repeat(4)], 1)
    torch.testing.assert_close(seq.img_ids, torch.cat([target, face, upper]), atol=0, rtol=0)

    txt = torch.zeros(12, 3)
    txt[[2, 3, 4]] = torch.tensor([1, 2.5 + d, 2.5 + d])  # face centroid: c*h + (h-1)/2
    txt[[6, 7, 8]] = torch.tensor([1, 4.5 + d, 7.0 + d])  # upper: (1, 2*2 + 0.5, 2*3 + 1)
    torch.testing.assert_close(seq.txt_ids, txt, atol=0, rtol=0)
    # The CCPA rows are the centroids of their reference blocks.
    torch.testing.assert_close(seq.txt_ids[2], face.mean(0))
    torch.testing.assert_close(seq.txt_ids[6], upper.mean(0))

    layout = seq.layout
    assert (layout.text, layout.target, layout.refs) == ((0, 12), (12, 28), ((28, 32), (32, 38)))
    assert layout.descriptors == ((2, 3, 4), (6, 7, 8)) and layout.target_grid == TARGET_HW


def test_uno_ids_worked_example():
    cfg = MCImageConfig.from_preset("tiny-multicrafter")
    seq = build_sequence(cfg, 16, [4, 6], 12, TARGET_HW, REF_HWS)
    ref0 = _rows((0, 4, 4), (0, 4, 5), (0, 5, 4), (0, 5, 5))
    ref1 = _rows((0, 6, 6), (0, 6, 7), (0, 6, 8), (0, 7, 6), (0, 7, 7), (0, 7, 8))
    torch.testing.assert_close(seq.img_ids[16:], torch.cat([ref0, ref1]), atol=0, rtol=0)
    assert torch.equal(seq.txt_ids, torch.zeros(12, 3)) and seq.categories is None


# ------------------------------------------------------------------------------ bad input


def test_bad_inputs_raise_clear_errors():
    cfg = MCImageConfig.from_preset("tiny-one-for-all")
    model = MCImageTransformer.from_mc_config(cfg, seed=0)
    inputs, refs = _inputs(cfg), _refs(cfg)
    run = dict(ref_latents=refs, **inputs, target_hw=TARGET_HW, ref_hws=REF_HWS)
    with pytest.raises(ValueError, match=r"1 categories for 2 references \(\['face'\]\); give one category per reference"):
        model(**run, categories=["face"])
    with pytest.raises(ValueError, match=r"categories\[1\]: unknown category 'hat'; known categories: bag, face"):
        model(**run, categories=["face", "hat"])
    with pytest.raises(ValueError, match="need a category per reference"):
        model(**run)
    with pytest.raises(ValueError, match="repeat a category"):
        model(**run, categories=["face", "face"])
    # Markup names 'bag', but the references are face and upper.
    prompt = "a man <face>with short hair</face> holding <bag>a leather bag</bag>"
    _, spans = parse_descriptor_markup(prompt)
    tokens = descriptor_token_indices(spans, _offsets(prompt, 12))
    with pytest.raises(ValueError, match="names category 'bag' but no reference has that category.*face, upper"):
        model(**run, categories=["face", "upper"], descriptor_tokens=tokens)
    with pytest.raises(ValueError, match="grid \\(2, 2\\) has 4 tokens, the tensor has 6"):
        model(**dict(run, ref_hws=[(2, 2), (2, 2)]), categories=["face", "upper"])
    with pytest.raises(ValueError, match=r"reference 1 has shape \(2, 6, 3\)"):
        model(**dict(run, ref_latents=[refs[0], refs[1][..., :3]]), categories=["face", "upper"])
    with pytest.raises(ValueError, match="max_subjects is 1"):
        build_sequence(MCImageConfig.from_preset("tiny-multicrafter", max_subjects=1), 16, [4, 6], 12, TARGET_HW, REF_HWS)
    with pytest.raises(ValueError, match="config.ccpa is off"):
        build_sequence(_plain(), 16, [4, 6], 12, TARGET_HW, REF_HWS, ["face", "upper"], {"face": [2]})


# ------------------------------------------------------------------------------ helpers, training set, IO


def test_pack_unpack_roundtrip():
    latents = torch.randn(2, 3, 8, 6)
    tokens, hw = pack_latents(latents)
    assert tokens.shape == (2, 12, 12) and hw == (4, 3)
    # Token (i, j) holds the 2x2 patch at rows 2i..2i+1, cols 2j..2j+1, channel-major.
    torch.testing.assert_close(tokens[0, 1 * 3 + 2], latents[0, :, 2:4, 4:6].reshape(-1))
    assert torch.equal(unpack_latents(tokens, hw), latents)
    with pytest.raises(ValueError, match="must be even"):
        pack_latents(torch.randn(1, 3, 5, 6))


def test_trainable_parameters_and_adapter_roundtrip(tmp_path):
    cfg = MCImageConfig.from_preset("tiny-one-for-all")
    model = MCImageTransformer.from_mc_config(cfg, seed=0)
    trainable = model.trainable_parameters("adapter")
    names = set(trainable)
    assert any(".lora_A" in n for n in names) and any(".temperature." in n for n in names)
    assert all(p.requires_grad == (n in names) for n, p in model.named_parameters())
    assert set(model.trainable_parameters("dam")) == {n for n in names if ".temperature." in n}
    with pytest.raises(ValueError, match="unknown policy"):
        model.trainable_parameters("bias")
    with pytest.raises(ValueError, match="selects nothing"):
        MCImageTransformer.from_mc_config(_plain(), seed=0).trainable_parameters("adapter")

    with torch.no_grad():
        for p in trainable.values():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_adapter(tmp_path / "adapter")
    fresh = MCImageTransformer.from_flux_and_adapter(_base(cfg), tmp_path / "adapter")
    assert fresh.mc_config == cfg
    inputs, refs = _inputs(cfg), _refs(cfg)
    extra = dict(target_hw=TARGET_HW, ref_hws=REF_HWS, categories=["face", "upper"])
    with torch.no_grad():
        torch.testing.assert_close(fresh(ref_latents=refs, **inputs, **extra), model(ref_latents=refs, **inputs, **extra))
    other = MCImageTransformer.from_mc_config(MCImageConfig.from_preset("tiny-multicrafter"), seed=0)
    with pytest.raises(ValueError, match="does not fit this model"):
        other.load_adapter(tmp_path / "adapter")


def test_one_for_all_variants_position_ids_worked_example():
    """One-for-All Sec. 4.5: Var. 2 puts category c on the virtual time axis only, u = (c, 0, 0);
    Var. 1 puts every reference on the target's own grid, u = (0, 0, 0)."""
    face, upper = _rows((1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)), \
        _rows((2, 0, 0), (2, 0, 1), (2, 0, 2), (2, 1, 0), (2, 1, 1), (2, 1, 2))
    temporal = build_sequence(_plain("tiny-one-for-all", position_ids="temporal"), 16, [4, 6], 12, TARGET_HW, REF_HWS,
                              ["face", "upper"])
    torch.testing.assert_close(temporal.img_ids[16:], torch.cat([face, upper]), atol=0, rtol=0)
    index = build_sequence(_plain("tiny-one-for-all", position_ids="index"), 16, [4, 6], 12, TARGET_HW, REF_HWS,
                           ["face", "upper"])
    on_target_grid = _rows((0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1),
                           (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (0, 1, 1), (0, 1, 2))
    torch.testing.assert_close(index.img_ids[16:], on_target_grid, atol=0, rtol=0)
    with pytest.raises(ValueError, match="need a category per reference"):
        build_sequence(_plain("tiny-one-for-all", position_ids="index"), 16, [4], 12, TARGET_HW, REF_HWS[:1])


def test_var1_index_embedding_starts_at_zero_and_tells_categories_apart(tmp_path):
    """Var. 1's only way to tell references apart is its learned per-category vector added to their
    tokens: zero at initialisation (the stock model on those ids), then which category a reference
    has changes the output; it trains with the adapter and survives an adapter round trip."""
    cfg = _plain("tiny-one-for-all", position_ids="index")
    base = _base(cfg)
    stock = copy.deepcopy(base)
    model = MCImageTransformer.from_flux(base, cfg)
    inputs, refs = _inputs(cfg), _refs(cfg)
    extra = dict(target_hw=TARGET_HW, ref_hws=REF_HWS)
    seq = model.prepare(inputs["hidden_states"], refs, inputs["encoder_hidden_states"], categories=["face", "upper"], **extra)
    with torch.no_grad():
        got = model(ref_latents=refs, **inputs, categories=["face", "upper"], **extra)
        joint = dict(inputs, hidden_states=torch.cat([inputs["hidden_states"], *refs], 1))
        full = stock(**joint, img_ids=seq.img_ids, txt_ids=seq.txt_ids, return_dict=False)[0]
    torch.testing.assert_close(got, full[:, :16], atol=1e-5, rtol=0)
    assert "category_embedding" in model.trainable_parameters("adapter")
    with torch.no_grad():
        model.category_embedding.normal_(generator=torch.Generator().manual_seed(4))
        a = model(ref_latents=refs, **inputs, categories=["face", "upper"], **extra)
        b = model(ref_latents=refs, **inputs, categories=["upper", "face"], **extra)
    assert (a - b).abs().max() > 1e-4 and (a - got).abs().max() > 1e-4
    model.save_adapter(tmp_path / "adapter")
    again = MCImageTransformer.from_flux(_base(cfg), MCImageTransformer.read_adapter_config(tmp_path / "adapter"))
    again.load_adapter(tmp_path / "adapter")
    torch.testing.assert_close(again.category_embedding, model.category_embedding)
