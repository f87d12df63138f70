"""DAM temperature and our FLUX attention processors against stock diffusers FLUX."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import flux_inputs, tiny_flux

from idcrafter.core.attention import ref_attention_share
from idcrafter.core.layout import TokenLayout
from idcrafter.core.temperature import DynamicTemperature, apply_temperature, inverse_softplus
from mcimage.processors import capture_ref_shares, install_processors


def test_inverse_softplus():
    for y in (0.01, 0.99, 5.0):
        assert torch.nn.functional.softplus(torch.tensor(inverse_softplus(y), dtype=torch.float64)).item() == pytest.approx(y, rel=1e-12)


@pytest.mark.parametrize("per_head", [False, True])
def test_dam_is_exactly_one_at_init(per_head):
    dam = DynamicTemperature(32, num_heads=4, per_head=per_head)
    tau = dam(torch.randn(2, 7, 32) * 10)
    assert tau.shape == (2, 7, 4 if per_head else 1)
    assert torch.equal(tau, torch.ones_like(tau))


def test_dam_formula_and_floor():
    """tau = softplus(MLP(x)) + t_min with the trained last layer; never below t_min."""
    dam = DynamicTemperature(16, num_heads=2, per_head=True, t_min=0.01)
    torch.nn.init.normal_(dam.mlp[-1].weight, std=3.0)
    torch.nn.init.normal_(dam.mlp[-1].bias, std=1.0)
    x = torch.randn(3, 5, 16) * 5
    tau = dam(x)
    z = dam.mlp(x).double()
    expected = torch.nn.functional.softplus(z + inverse_softplus(0.99)) + 0.01
    torch.testing.assert_close(tau.double(), expected, atol=1e-6, rtol=1e-6)
    assert tau.min() > 0.01 - 1e-6
    q = torch.randn(3, 5, 2, 8)
    torch.testing.assert_close(apply_temperature(q, tau), q / tau[..., None])


def _stock_output(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


@pytest.mark.parametrize("dam", [False, True])
def test_processors_reproduce_stock_flux(dam):
    inputs = flux_inputs()
    stock = tiny_flux()
    expected = _stock_output(stock, inputs)
    ours = tiny_flux()
    procs = install_processors(ours, dam=dam, dam_per_head=True)
    assert len(procs) == 4
    got = _stock_output(ours, inputs)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    n_dam = sum("temperature" in n for n, _ in ours.named_parameters())
    assert (n_dam > 0) == dam


def test_dam_changes_output_once_trained():
    inputs = flux_inputs()
    model = tiny_flux()
    base = _stock_output(model, inputs)
    procs = install_processors(model, dam=True)
    for proc in procs.values():
        torch.nn.init.normal_(proc.temperature.mlp[-1].weight, std=1.0)
    assert (_stock_output(model, inputs) - base).abs().max() > 1e-3


def test_share_capture_on_double_blocks():
    txt, tgt, refs = 8, 8, (4, 4)
    layout = TokenLayout.concat(text_len=txt, target_len=tgt, ref_lens=refs)
    inputs = flux_inputs(img_len=tgt + sum(refs), txt_len=txt)
    model = tiny_flux()
    install_processors(model, capture_blocks="double")
    proc = model.transformer_blocks[0].attn.processor
    with capture_ref_shares(model, layout, chunk_size=3) as cap:
        model(**inputs)
    assert set(cap.shares) == {"transformer_blocks.0", "transformer_blocks.1"}
    for share in cap.shares.values():
        assert share.shape == (1, 2, tgt)
        torch.testing.assert_close(share.sum(1), torch.ones(1, tgt), atol=1e-5, rtol=0)
    assert proc.active is None  # capture ends with the context

    with pytest.raises(ValueError, match="layout total"):
        bad = TokenLayout.concat(text_len=txt, target_len=tgt, ref_lens=(4, 3))
        with capture_ref_shares(model, bad):
            model(**inputs)


def test_captured_share_equals_recomputation_from_projections():
    """The share recorded in block 0 equals ref_attention_share on q/k rebuilt by hand."""
    from diffusers.models.embeddings import apply_rotary_emb

    txt, tgt, refs = 8, 8, (4, 4)
    layout = TokenLayout.concat(text_len=txt, target_len=tgt, ref_lens=refs)
    inputs = flux_inputs(img_len=tgt + sum(refs), txt_len=txt)
    model = tiny_flux()
    install_processors(model)
    seen = {}
    attn = model.transformer_blocks[0].attn

    def grab(module, args, kwargs):
        seen.update(kwargs)

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad(), capture_ref_shares(model, layout) as cap:
        model(**inputs)
    handle.remove()
    x, ctx, rope = seen["hidden_states"], seen["encoder_hidden_states"], seen["image_rotary_emb"]
    d = attn.head_dim
    q = torch.cat([attn.norm_added_q(attn.add_q_proj(ctx).unflatten(-1, (-1, d))), attn.norm_q(attn.to_q(x).unflatten(-1, (-1, d)))], 1)
    k = torch.cat([attn.norm_added_k(attn.add_k_proj(ctx).unflatten(-1, (-1, d))), attn.norm_k(attn.to_k(x).unflatten(-1, (-1, d)))], 1)
    q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
    q, k = q.transpose(1, 2).double(), k.transpose(1, 2).double()
    probs = torch.softmax(q[:, :, txt : txt + tgt] @ k.transpose(-1, -2) / math.sqrt(d), -1)
    mass = torch.stack([probs[..., s:e].sum(-1) for s, e in layout.refs], -1)
    expected = (mass / mass.sum(-1, keepdim=True)).mean(1).transpose(1, 2)
    torch.testing.assert_close(cap.shares["transformer_blocks.0"].double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ref_attention_share(q[:, :, txt : txt + tgt], k, layout.refs), expected, atol=1e-10, rtol=0)


def test_install_rejects_unknown_selection():
    with pytest.raises(ValueError, match="unknown block selection"):
        install_processors(tiny_flux(), capture_blocks="middle")
