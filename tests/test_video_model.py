"""IDCrafterTransformer against the stock diffusers WanTransformer3DModel, training, caching, files."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from idcrafter.video.config import IDCrafterConfig
from idcrafter.video.transformer import IDCrafterTransformer

CFG = IDCrafterConfig.from_preset("tiny")


def stock_and_ours(seed=0, config=CFG):
    torch.manual_seed(seed)
    stock = WanTransformer3DModel(**config.wan).eval()
    torch.manual_seed(seed)
    ours = IDCrafterTransformer.from_wan(WanTransformer3DModel(**config.wan), config).eval()
    return stock, ours


def inputs(batch=2, subjects=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 16, 3, 8, 8, generator=g),
        timestep=torch.tensor([700.0, 150.0][:batch]),
        encoder_hidden_states=torch.randn(batch, 7, 32, generator=g),
    ), torch.randn(batch, subjects, 16, 8, 8, generator=g)


def perturb_adapter(model, std=0.2, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def test_parity_without_and_with_subjects_at_init():
    stock, ours = stock_and_ours()
    x, subjects = inputs()
    with torch.no_grad():
        expected = stock(**x, return_dict=False)[0]
        assert torch.allclose(ours(**x, return_dict=False)[0], expected, atol=1e-5, rtol=0)
        assert torch.allclose(ours(**x, return_dict=True).sample, expected, atol=1e-5, rtol=0)
        with_subjects = ours(**x, return_dict=False, subjects=subjects)[0]
    torch.testing.assert_close(with_subjects, expected, atol=1e-5, rtol=0)


def test_blocks_clipped_to_depth():
    config = IDCrafterConfig.from_preset("tiny", num_blocks=20)
    _, ours = stock_and_ours(config=config)
    assert ours.num_blocks == config.wan["num_layers"] == len(ours.adapter.cross_modal_attn)


def test_training_makes_the_path_live_and_reaches_every_module():
    _, model = stock_and_ours()
    model.train()
    for p in model.base_parameters():
        p.requires_grad_(False)
    x, subjects = inputs()
    target = torch.randn_like(x["hidden_states"])
    opt = torch.optim.AdamW(model.adapter.parameters(), lr=1e-2)
    for _ in range(4):
        loss = (model(**x, return_dict=False, subjects=subjects)[0] - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad()
    (model(**x, return_dict=False, subjects=subjects)[0] - target).square().mean().backward()
    no_grad = [n for n, p in model.adapter.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert no_grad == []
    assert all(p.grad is None for p in model.base_parameters())
    model.eval()
    with torch.no_grad():
        plain = model(**x, return_dict=False)[0]
        conditioned = model(**x, return_dict=False, subjects=subjects)[0]
        other = model(**x, return_dict=False, subjects=subjects.flip(1))[0]
    assert (conditioned - plain).abs().max() > 1e-3
    assert (conditioned - other).abs().max() > 1e-4  # which reference goes with which slot matters


def test_subject_stream_cache_equals_recompute():
    _, model = stock_and_ours()
    perturb_adapter(model)
    x, subjects = inputs()
    with torch.no_grad():
        stream = model.encode_subjects(subjects)
        for t in (900.0, 400.0, 10.0):
            x["timestep"] = torch.tensor([t, t])
            cached = model(**x, return_dict=False, subject_stream=stream)[0]
            fresh = model(**x, return_dict=False, subjects=subjects)[0]
            assert torch.equal(cached, fresh)


def test_padded_subject_is_ignored():
    """A batch padded to 3 subjects (mask False) gives the same output as the unpadded batch."""
    _, model = stock_and_ours()
    perturb_adapter(model)
    x, subjects = inputs(batch=1, subjects=2)
    padded = torch.cat([subjects, torch.randn(1, 1, 16, 8, 8)], dim=1)
    mask = torch.tensor([[True, True, False]])
    with torch.no_grad():
        a = model(**x, return_dict=False, subjects=subjects)[0]
        b = model(**x, return_dict=False, subjects=padded, subject_mask=mask)[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    _, model = stock_and_ours()
    perturb_adapter(model, std=0.1)
    x, subjects = inputs()
    grads = []
    for checkpointing in (False, True):
        model.train()
        model.enable_gradient_checkpointing() if checkpointing else model.disable_gradient_checkpointing()
        model.zero_grad()
        capture = {}
        out = model(**x, return_dict=False, subjects=subjects, attention_capture=capture)[0]
        (out.square().mean() + sum(s.mean() for s in capture.values())).backward()
        grads.append({n: p.grad.clone() for n, p in model.adapter.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_attention_capture_shares():
    _, model = stock_and_ours()
    perturb_adapter(model)
    x, subjects = inputs()
    capture = {}
    with torch.no_grad():
        model(**x, return_dict=False, subjects=subjects, attention_capture=capture)
    assert sorted(capture) == ["blocks.0.stage3", "blocks.1.stage3"]
    for share in capture.values():
        assert share.shape == (2, 2, 3 * 4 * 4)  # [B, N, video tokens]
        torch.testing.assert_close(share.sum(1), torch.ones(2, 48), atol=1e-5, rtol=0)


def test_adapter_round_trip_and_mismatch(tmp_path):
    _, model = stock_and_ours()
    perturb_adapter(model)
    x, subjects = inputs()
    folder = model.save_adapter(tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == ["idcrafter_adapter.safetensors", "idcrafter_config.json"]
    model.to_wan().save_pretrained(tmp_path / "base" / "transformer")
    loaded = IDCrafterTransformer.from_pretrained(tmp_path / "base", folder, subfolder="transformer")
    with torch.no_grad():
        assert torch.equal(model(**x, return_dict=False, subjects=subjects)[0], loaded(**x, return_dict=False, subjects=subjects)[0])

    wider = dict(CFG.wan, attention_head_dim=8)
    other = IDCrafterTransformer.from_wan(WanTransformer3DModel(**wider), IDCrafterConfig.from_preset("tiny", wan=wider))
    with pytest.raises(ValueError, match="dim=32.*dim=16"):
        other.load_adapter(folder)
    fewer = IDCrafterTransformer.from_wan(WanTransformer3DModel(**CFG.wan), IDCrafterConfig.from_preset("tiny", max_subjects=2))
    with pytest.raises(ValueError, match="index_embedding.weight has shape \\[3, 32\\] in the file but \\[2, 32\\]"):
        fewer.load_adapter(folder)


def test_too_many_subjects_and_bad_shapes_raise():
    _, model = stock_and_ours()
    x, _ = inputs()
    with pytest.raises(ValueError, match="at most 3"):
        model(**x, subjects=torch.randn(2, 4, 16, 8, 8))
    with pytest.raises(ValueError, match="batch"):
        model(**x, subject_stream=model.encode_subjects(torch.randn(1, 1, 16, 8, 8)))


def test_adapter_with_fine_tuned_base(tmp_path):
    """After full fine-tuning the adapter carries the base transformer; loading uses it."""
    _, model = stock_and_ours()
    perturb_adapter(model)
    with torch.no_grad():
        for p in model.base_parameters():
            p.mul_(1.1)
    x, subjects = inputs()
    folder = model.save_adapter(tmp_path / "adapter", include_base=True)
    assert (folder / "transformer" / "config.json").is_file()
    untouched, fresh = stock_and_ours()
    untouched.save_pretrained(tmp_path / "base" / "transformer")  # the original base
    fresh.load_adapter(folder)
    again = IDCrafterTransformer.from_pretrained(tmp_path / "base", folder, subfolder="transformer")
    with torch.no_grad():
        expected = model(**x, return_dict=False, subjects=subjects)[0]
        assert torch.equal(fresh(**x, return_dict=False, subjects=subjects)[0], expected)
        assert torch.equal(again(**x, return_dict=False, subjects=subjects)[0], expected)


@pytest.mark.parametrize("hierarchy", ["stage3", "plain"])
def test_ablation_hierarchies(hierarchy):
    """stage3 keeps the zero-start guarantee; plain keys (no new attention) do not, by design."""
    config = IDCrafterConfig.from_preset("tiny", hierarchy=hierarchy)
    stock, ours = stock_and_ours(config=config)
    x, subjects = inputs()
    capture = {}
    with torch.no_grad():
        expected = stock(**x, return_dict=False)[0]
        got = ours(**x, return_dict=False, subjects=subjects, attention_capture=capture)[0]
    assert len(ours.adapter.subject_tower.layers) == 0
    if hierarchy == "stage3":
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert sorted(capture) == ["blocks.0.stage3", "blocks.1.stage3"]
    else:
        assert len(ours.adapter.cross_modal_attn) == 0 and (got - expected).abs().max() > 1e-3
        assert sorted(capture) == ["blocks.0.attn2", "blocks.1.attn2"]
    for share in capture.values():
        torch.testing.assert_close(share.sum(1), torch.ones(2, 48), atol=1e-5, rtol=0)


def _with_weights_of(full, config):
    """A model of `config` on the same Wan weights, holding `full`'s adapter weights where it has them."""
    torch.manual_seed(0)
    model = IDCrafterTransformer.from_wan(WanTransformer3DModel(**config.wan), config).eval()
    model.to_wan().load_state_dict(full.to_wan().state_dict())  # to_wan shares the weights: this sets model's
    state = full.adapter.state_dict()
    mine = model.adapter.state_dict()
    model.adapter.load_state_dict({k: state[k] for k in mine})
    return model, sorted(set(state) - set(mine))


@pytest.mark.parametrize("hierarchy, removed", [("no-intra", "intra"), ("no-inter", "inter_subject"), ("no-cross", "cross_modal")])
def test_tab_s5_ablations_remove_exactly_their_stage(hierarchy, removed):
    """ID-Crafter Tab. S.5's "w/o Stage 1/2/3": the stage's weights are gone and the output is the
    full model's with that stage switched off: stage 1 or 2 by zeroing its output projection or
    gate in the full model (an independent way to remove it); stage 3 replaced by the tower's
    tokens as extra keys of the text cross-attention. At initialisation w/o stage 1 or 2 is the
    base model (stage 3 starts at zero)."""
    config = IDCrafterConfig.from_preset("tiny", hierarchy=hierarchy)
    stock, fresh = stock_and_ours(config=config)
    x, subjects = inputs()
    with torch.no_grad():
        base = stock(**x, return_dict=False)[0]
        if hierarchy != "no-cross":
            torch.testing.assert_close(fresh(**x, return_dict=False, subjects=subjects)[0], base, atol=1e-5, rtol=0)
    _, full = stock_and_ours()
    perturb_adapter(full)
    variant, gone = _with_weights_of(full, config)
    assert gone and all(removed in k for k in gone), gone
    with torch.no_grad():
        got = variant(**x, return_dict=False, subjects=subjects)[0]
        with_all = full(**x, return_dict=False, subjects=subjects)[0]
        assert (got - with_all).abs().max() > 1e-3  # the stage mattered
        if hierarchy != "no-cross":
            for layer in full.adapter.subject_tower.layers:  # switch the stage off inside the full model
                zero = layer.intra_subject_attn.to_out if hierarchy == "no-intra" else layer.inter_subject_gate
                zero.weight.zero_()
                zero.bias.zero_()
            torch.testing.assert_close(got, full(**x, return_dict=False, subjects=subjects)[0], atol=1e-5, rtol=0)
        else:
            assert len(variant.adapter.cross_modal_attn) == 0 and len(variant.adapter.subject_tower.layers) == 2
            assert (got - base).abs().max() > 1e-3  # the tower's tokens reach the video through the text keys
