"""Stage 3's two forms (`IDCrafterConfig.stage3_projections`, docs/design.md 4): on attn2's query and
output projection ("attn2", a gated second softmax inside attn2) and on its own projections ("own"),
against the stock diffusers WanTransformer3DModel and against a hand-written attn2."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_video_model import stock_and_ours

from idcrafter.core.attention import ref_attention_share
from idcrafter.video.attention import (
    CrossModalAttention,
    SharedQueryCrossAttention,
    SubjectContext,
    SubjectStream,
)
from idcrafter.video.config import ADAPTER_CONFIG, IDCrafterConfig
from idcrafter.video.transformer import IDCrafterTransformer

HEADS, DIM = 2, 32  # the tiny preset's Wan


def pair(projections: str, hierarchy: str = "full", seed: int = 0, init: str = "value"):
    """(stock Wan, IDCrafterTransformer on the same weights) for one stage-3 form."""
    config = IDCrafterConfig.from_preset("tiny", stage3_projections=projections, hierarchy=hierarchy, stage3_init=init)
    return stock_and_ours(seed, config)


def inputs(batch=2, subjects=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = dict(hidden_states=torch.randn(batch, 16, 3, 8, 8, generator=g), timestep=torch.tensor([700.0, 150.0][:batch]),
             encoder_hidden_states=torch.randn(batch, 7, 32, generator=g))
    return x, torch.randn(batch, subjects, 16, 8, 8, generator=g)


def perturb(model, std=0.2, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def test_config_field_and_its_default():
    assert IDCrafterConfig().stage3_projections == "attn2"  # the toy world's result (docs/design.md 9)
    assert IDCrafterConfig.from_preset("toyworld").stage3_projections == "own"  # the committed toy model's
    with pytest.raises(ValueError, match="stage3_projections must be one of attn2, own, got 'both'"):
        IDCrafterConfig(stage3_projections="both")
    # A config written before the field existed had stage 3 on its own projections.
    stored = IDCrafterConfig.from_preset("tiny").to_dict()
    del stored["stage3_projections"]
    assert IDCrafterConfig.from_dict(stored).stage3_projections == "own"
    # stage3_init: the zero value projection by default; an "attn2" config written before the field
    # existed was initialised with the zero gate.
    assert IDCrafterConfig().stage3_init == "value"
    with pytest.raises(ValueError, match="stage3_init must be one of value, gate, got 'query'"):
        IDCrafterConfig(stage3_init="query")
    stored = IDCrafterConfig.from_preset("tiny", stage3_projections="attn2").to_dict()
    del stored["stage3_init"]
    assert IDCrafterConfig.from_dict(stored).stage3_init == "gate"
    del stored["stage3_projections"]
    assert IDCrafterConfig.from_dict(stored).stage3_init == "value"
    _, ours = pair("attn2")
    with pytest.raises(ValueError, match="stage3_projections change the adapter"):
        ours.idcrafter_config = IDCrafterConfig.from_preset("tiny", stage3_projections="own")


@pytest.mark.parametrize("hierarchy", ["full", "stage3", "no-intra"])
@pytest.mark.parametrize("projections, init", [("attn2", "value"), ("attn2", "gate"), ("own", "value")])
def test_parity_with_stock_wan_at_init(projections, init, hierarchy):
    """Zero value projection or zero gate ("attn2"), zero output projection ("own"): any subjects, a
    padded one included, give the stock model's output; a trained stage 3 does not (the comparison
    can fail)."""
    stock, ours = pair(projections, hierarchy, init=init)
    kind = SharedQueryCrossAttention if projections == "attn2" else CrossModalAttention
    assert len(ours.adapter.cross_modal_attn) == 2 and all(type(m) is kind for m in ours.adapter.cross_modal_attn)
    x, subjects = inputs()
    mask = torch.tensor([[True, True], [True, False]])
    with torch.no_grad():
        expected = stock(**x, return_dict=False)[0]
        assert expected.abs().mean() > 0.1
        torch.testing.assert_close(ours(**x, return_dict=False, subjects=subjects)[0], expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(**x, return_dict=False, subjects=subjects, subject_mask=mask)[0], expected,
                                   atol=1e-5, rtol=0)
        perturb(ours)
        assert (ours(**x, return_dict=False, subjects=subjects)[0] - expected).abs().max() > 1e-2


def test_attn2_form_has_no_query_or_output_projection():
    _, own = pair("own")
    _, shared = pair("attn2")
    names = sorted(n for n, _ in shared.adapter.cross_modal_attn[0].named_parameters())
    assert names == ["gate", "norm_k.weight", "to_k.bias", "to_k.weight", "to_v.bias", "to_v.weight"]
    assert shared.adapter.cross_modal_attn[0].gate.shape == (HEADS,)
    saved = sum(p.numel() for p in own.adapter.parameters()) - sum(p.numel() for p in shared.adapter.parameters())
    # Per stage-3 block: to_q and to_out (2 x (32 x 32 + 32)) and norm_q (32), less the 2 gate values.
    assert saved == 2 * (2 * (DIM * DIM + DIM) + DIM - HEADS)


def attn2_by_hand(attn, stage3, x, text, stream, layer):
    """attn2 of a Wan block with the attn2 form written out: one query, two softmaxes, one to_out."""
    q = attn.norm_q(attn.to_q(x)).unflatten(-1, (HEADS, -1)).transpose(1, 2)  # [B, H, L, Dh]
    k = attn.norm_k(attn.to_k(text)).unflatten(-1, (HEADS, -1)).transpose(1, 2)
    v = attn.to_v(text).unflatten(-1, (HEADS, -1)).transpose(1, 2)
    kv = stream.kv[layer]
    mask = None if kv.keep is None else kv.keep[:, None, None, :]
    text_out = F.scaled_dot_product_attention(q, k, v)
    subj_out = F.scaled_dot_product_attention(q, kv.k, kv.v, attn_mask=mask) * stage3.gate[None, :, None, None]
    return attn.to_out[0]((text_out + subj_out).transpose(1, 2).flatten(2)), q


def test_attn2_form_reuses_attn2_query_and_matches_the_formula():
    """to_q of attn2 runs once per call (its query is reused, not recomputed), and the output is
    to_out(text attention + gate_h * subject attention) with the subject keys' softmax apart."""
    _, model = pair("attn2")
    perturb(model)
    x, subjects = inputs()
    mask = torch.tensor([[True, True], [True, False]])
    calls = []
    attn = model.blocks[0].attn2
    attn.to_q.register_forward_hook(lambda *_: calls.append(1))
    g = torch.Generator().manual_seed(7)
    hidden, text = torch.randn(2, 48, DIM, generator=g), torch.randn(2, 7, DIM, generator=g)
    with torch.no_grad():
        stream = model.encode_subjects(subjects, mask)
        capture = {}
        stream = SubjectStream(stream.kv, stream.ref_ranges, stream.subject_mask, capture)
        got = attn(hidden, SubjectContext(text=text, stream=stream))
        stage3 = model.adapter.cross_modal_attn[0]
        expected, q = attn2_by_hand(attn, stage3, hidden, text, stream, 0)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert (got - attn(hidden, text)).abs().max() > 1e-2  # stage 3 contributed
    assert len(calls) == 3  # ours, the hand-written one, the stock one
    # The IDAR share is taken on that same query: [B, N, L], summing to 1 over the present subjects.
    share = capture["blocks.0.stage3"]
    assert share.shape == (2, 2, 48)
    torch.testing.assert_close(share, ref_attention_share(q, stream.kv[0].k, stream.ref_ranges, key_mask=stream.kv[0].keep))
    torch.testing.assert_close(share.sum(1), torch.ones(2, 48), atol=1e-5, rtol=0)
    assert float(share[1, 1].abs().max()) == 0.0  # the padded subject gets no share


def test_attn2_form_gate_learns_from_the_first_step():
    """Zero gate: at initialisation only the gate has a gradient (the subject attention's output);
    once it is non-zero the key / value projections get theirs, and the output leaves the stock
    model's."""
    stock, model = pair("attn2", init="gate")
    model.trainable_parameters("new-modules")
    x, subjects = inputs()
    target = torch.randn_like(x["hidden_states"])
    (model(**x, return_dict=False, subjects=subjects)[0] - target).square().mean().backward()
    for layer in model.adapter.cross_modal_attn:
        assert float(layer.gate.grad.abs().min()) > 1e-7  # every head
        assert float(layer.to_k.weight.grad.abs().max()) == 0.0 and float(layer.to_v.weight.grad.abs().max()) == 0.0
    opt = torch.optim.SGD(model.adapter.parameters(), lr=1.0)
    opt.step()
    opt.zero_grad()
    (model(**x, return_dict=False, subjects=subjects)[0] - target).square().mean().backward()
    layer = model.adapter.cross_modal_attn[0]
    assert float(layer.to_k.weight.grad.abs().max()) > 0 and float(layer.to_v.weight.grad.abs().max()) > 0
    with torch.no_grad():
        moved = (model(**x, return_dict=False, subjects=subjects)[0] - stock(**x, return_dict=False)[0]).abs().max()
    assert moved > 1e-3


def test_attn2_form_value_projection_learns_from_the_first_step():
    """Zero value projection (the default): at initialisation the value projection has a full
    D x D gradient (the gates and keys none: the subject attention outputs zero), as the "own"
    form's zero output projection has; after one step the keys and gates get theirs."""
    stock, model = pair("attn2")
    model.trainable_parameters("new-modules")
    x, subjects = inputs()
    target = torch.randn_like(x["hidden_states"])
    (model(**x, return_dict=False, subjects=subjects)[0] - target).square().mean().backward()
    for layer in model.adapter.cross_modal_attn:
        assert torch.equal(layer.gate.detach(), torch.ones(HEADS))
        assert float(layer.gate.grad.abs().max()) == 0.0 and float(layer.to_k.weight.grad.abs().max()) == 0.0
        grad = layer.to_v.weight.grad  # a matrix of high rank with every entry moving, not H scalars
        assert bool((grad != 0).all()) and int(torch.linalg.matrix_rank(grad)) >= DIM - 1
    opt = torch.optim.SGD(model.adapter.parameters(), lr=1.0)
    opt.step()
    opt.zero_grad()
    (model(**x, return_dict=False, subjects=subjects)[0] - target).square().mean().backward()
    layer = model.adapter.cross_modal_attn[0]
    assert float(layer.to_k.weight.grad.abs().max()) > 0 and float(layer.gate.grad.abs().min()) > 0
    with torch.no_grad():
        moved = (model(**x, return_dict=False, subjects=subjects)[0] - stock(**x, return_dict=False)[0]).abs().max()
    assert moved > 1e-3


def adam_fit(init: str, steps: int = 20, lr: float = 1e-3) -> list[float]:
    """Losses of `steps` Adam steps of stage 3 alone (attn2 form) towards a fixed target that only
    the subjects can explain: the stock model's output plus a perturbed stage 3's contribution."""
    stock, model = pair("attn2", init=init)
    x, subjects = inputs()
    _, teacher = pair("attn2")
    perturb(teacher, std=0.5)
    with torch.no_grad():
        target = teacher(**x, return_dict=False, subjects=subjects)[0]
    params = [p for m in model.adapter.cross_modal_attn for p in m.parameters()]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = (model(**x, return_dict=False, subjects=subjects)[0] - target).square().mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


def test_under_adam_the_zero_value_projection_learns_faster_than_the_zero_gate():
    """Adam moves a parameter about lr per step whatever its gradient: H zero gates open slowly, a
    zero D x D value projection reads the subjects at once (docs/design.md 4). Same start, same
    target: after 20 steps the loss has fallen several times further with the zero value projection."""
    value, gate = adam_fit("value"), adam_fit("gate")
    assert value[0] == pytest.approx(gate[0], rel=1e-6)  # both start as the stock model
    drop_value, drop_gate = value[0] - value[-1], gate[0] - gate[-1]
    assert drop_value > 0 and drop_value > 3 * drop_gate, (drop_value, drop_gate)


def test_idar_share_trains_stage3_keys_and_attn2_query():
    """The IDAR loss on the attn2 form reaches the subject keys and attn2's query projection."""
    _, model = pair("attn2")
    perturb(model)
    model.trainable_parameters("full")
    x, subjects = inputs()
    capture = {}
    model(**x, return_dict=False, subjects=subjects, attention_capture=capture)
    assert sorted(capture) == ["blocks.0.stage3", "blocks.1.stage3"]
    sum(s[:, 0].mean() for s in capture.values()).backward()
    assert float(model.adapter.cross_modal_attn[0].to_k.weight.grad.abs().max()) > 0
    assert float(model.blocks[0].attn2.to_q.weight.grad.abs().max()) > 0
    last = model.adapter.cross_modal_attn[-1].to_v.weight.grad  # the last share reads keys, not values
    assert last is None or float(last.abs().max()) == 0


@pytest.mark.parametrize("hierarchy", ["no-cross", "plain"])
def test_hierarchies_without_stage3_ignore_the_option(hierarchy):
    """no-cross and plain put subject tokens into attn2's text keys: both settings build the same
    adapter and give the same output."""
    x, subjects = inputs()
    outs = []
    for projections in ("attn2", "own"):
        _, model = pair(projections, hierarchy)
        perturb(model)
        assert len(model.adapter.cross_modal_attn) == 0
        with torch.no_grad():
            outs.append(model(**x, return_dict=False, subjects=subjects)[0])
    assert torch.equal(*outs)


def test_adapter_saved_before_the_option_loads_unchanged(tmp_path):
    """An adapter written before `stage3_projections` existed (own projections, no such key in its
    config) loads onto a stock base with the same outputs; so does a model folder of that time."""
    _, old = pair("own")
    perturb(old)
    x, subjects = inputs()
    folder = old.save_adapter(tmp_path / "adapter")
    meta = json.loads((folder / ADAPTER_CONFIG).read_text())
    del meta["config"]["stage3_projections"]
    (folder / ADAPTER_CONFIG).write_text(json.dumps(meta))
    old.to_wan().save_pretrained(tmp_path / "base" / "transformer")
    loaded = IDCrafterTransformer.from_pretrained(tmp_path / "base", folder, subfolder="transformer")
    assert loaded.idcrafter_config.stage3_projections == "own"
    old.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    del config["idcrafter"]["stage3_projections"]
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    whole = IDCrafterTransformer.from_pretrained(tmp_path / "model")
    assert whole.idcrafter_config.stage3_projections == "own"
    with torch.no_grad():
        expected = old(**x, return_dict=False, subjects=subjects)[0]
        assert torch.equal(loaded(**x, return_dict=False, subjects=subjects)[0], expected)
        assert torch.equal(whole(**x, return_dict=False, subjects=subjects)[0], expected)
    # A model of the other form takes the file's form.
    _, new = pair("attn2")
    new.load_adapter(folder)
    assert new.idcrafter_config.stage3_projections == "own"
    assert type(new.adapter.cross_modal_attn[0]) is CrossModalAttention
    with torch.no_grad():
        assert torch.equal(new(**x, return_dict=False, subjects=subjects)[0], expected)


def test_gate_scales_each_head_on_its_own():
    """g_h scales head h's subject attention: one head gated on moves only that head's slice of the
    pre-projection output."""
    layer = SharedQueryCrossAttention(DIM, HEADS, zero="gate")
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1, 2, 5, DIM, generator=g)
    kv = layer.kv(feats, torch.tensor([[True, True]]), None, None)
    query = torch.randn(1, 6, HEADS, DIM // HEADS, generator=g)
    with torch.no_grad():
        assert torch.equal(layer(query, kv), torch.zeros(1, 6, DIM))
        layer.gate.copy_(torch.tensor([0.0, 2.0]))
        out = layer(query, kv).unflatten(-1, (HEADS, -1))
    assert float(out[..., 0, :].abs().max()) == 0.0
    k, v = kv.k[:, 1], kv.v[:, 1]  # head 1: [B, L_kv, Dh]
    weights = torch.softmax(query[:, :, 1] @ k.transpose(-1, -2) / math.sqrt(DIM // HEADS), dim=-1)
    torch.testing.assert_close(out[..., 1, :], 2.0 * weights @ v, atol=1e-6, rtol=0)


def test_training_picks_the_form():
    """train_video.py --stage3-projections: the spec rebuilds the adapter in the asked form; a form
    that is not one is a one-line usage error."""
    from idcrafter.cli.train_video import main
    from idcrafter.video.training import VideoDataArgs, VideoModelArgs, VideoTrainingSpec

    for form, kind in (("own", CrossModalAttention), ("attn2", SharedQueryCrossAttention)):
        spec = VideoTrainingSpec(VideoModelArgs(preset="tiny", stage3_projections=form), VideoDataArgs(data="unused.jsonl"))
        model = spec.build_model(torch.device("cpu"), torch.float32)
        assert spec.config.stage3_projections == form and type(model.adapter.cross_modal_attn[0]) is kind
    # --stage3-init gate: a fresh attn2 stage 3 with zero gates and a random value projection.
    spec = VideoTrainingSpec(VideoModelArgs(preset="tiny", stage3_projections="attn2", stage3_init="gate"),
                             VideoDataArgs(data="unused.jsonl"))
    layer = spec.build_model(torch.device("cpu"), torch.float32).adapter.cross_modal_attn[0]
    assert spec.config.stage3_init == "gate" and float(layer.gate.detach().abs().max()) == 0.0
    assert float(layer.to_v.weight.detach().abs().min()) > 0
    assert float(model.adapter.cross_modal_attn[0].to_v.weight.detach().abs().max()) == 0.0  # default: zero values
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", "unused.jsonl", "--output", "unused", "--stage3-projections", "both"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", "unused.jsonl", "--output", "unused", "--stage3-init", "query"])
    assert exit_info.value.code == 2
