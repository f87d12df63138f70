"""MoE-LoRA on a tiny real FluxTransformer2DModel: identity at step 0, training, save/load, diffusers
interop (E = 1), routing maths."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from idcrafter.core.moe_lora import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    DIFFUSERS_LORA_WEIGHTS_NAME,
    MoELoRAConfig,
    MoELoRALinear,
    inject_moe_lora,
    load_balancing_loss,
    load_moe_lora,
    merged_expert_lora,
    module_matches,
    moe_lora_disabled,
    moe_lora_layers,
    moe_lora_parameters,
    record_routing,
    remove_moe_lora,
    routing_change,
    save_diffusers_lora,
    save_moe_lora,
    switch_load_balancing_loss,
    top_k_gates,
)

EXPECTED_TARGETS = {
    *(
        f"transformer_blocks.0.attn.{p}"
        for p in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    ),
    "transformer_blocks.0.ff.net.0.proj",
    "transformer_blocks.0.ff.net.2",
    "transformer_blocks.0.ff_context.net.0.proj",
    "transformer_blocks.0.ff_context.net.2",
    "single_transformer_blocks.0.attn.to_q",
    "single_transformer_blocks.0.attn.to_k",
    "single_transformer_blocks.0.attn.to_v",
    "single_transformer_blocks.0.proj_mlp",
    "single_transformer_blocks.0.proj_out",
}


def tiny_flux(seed: int = 0, attention_head_dim: int = 16) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=attention_head_dim,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 6, 6],
    )
    # The trainer owns the trainable set; here only the adapter trains.
    return model.eval().requires_grad_(False)


def flux_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, 16, 4, generator=g),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
        "pooled_projections": torch.randn(1, 32, generator=g),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.randn(16, 3, generator=g),
        "txt_ids": torch.zeros(8, 3),
    }


def run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).sample


def train(
    model: nn.Module, inputs: dict[str, torch.Tensor], steps: int, lb_weight: float = 0.0
) -> list[float]:
    """AdamW on MSE to a fixed random target; returns the MSE of each step."""
    target = torch.randn(run(model, inputs).shape, generator=torch.Generator().manual_seed(7))
    opt = torch.optim.AdamW(moe_lora_parameters(model), lr=2e-2)
    losses = []
    for _ in range(steps):
        mse = torch.nn.functional.mse_loss(run(model, inputs), target)
        loss = mse + lb_weight * load_balancing_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(mse.item())
    return losses


def config(num_experts: int = 4, **kwargs) -> MoELoRAConfig:
    top_k = 2 if num_experts > 1 else None
    return MoELoRAConfig(**{"rank": 4, "alpha": 8.0, "num_experts": num_experts, "top_k": top_k, **kwargs})


# ---------------------------------------------------------------------------------------------
# 1. Injection


@pytest.mark.parametrize("num_experts", [4, 1])
def test_injection_leaves_output_unchanged_at_step_zero(num_experts):
    model, inputs = tiny_flux(), flux_inputs()
    base = run(model, inputs)
    names = inject_moe_lora(model, config(num_experts))
    assert set(names) == EXPECTED_TARGETS
    assert isinstance(model.proj_out, nn.Linear)  # the latent head is not a target
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    torch.testing.assert_close(run(model, inputs), base, rtol=0, atol=1e-6)
    routers = [layer.lora_router for layer in moe_lora_layers(model).values()]
    assert all(r is None for r in routers) if num_experts == 1 else all(r is not None for r in routers)


def test_target_pattern_rule():
    patterns = ("to_q", "ff.net.2", r"single_transformer_blocks\.\d+\.proj_out")
    assert module_matches("transformer_blocks.0.attn.to_q", patterns)
    assert module_matches("to_q", patterns)
    assert not module_matches("transformer_blocks.0.attn.add_to_q", patterns)  # suffix only at a dot
    assert module_matches("transformer_blocks.3.ff.net.2", patterns)
    assert module_matches("single_transformer_blocks.12.proj_out", patterns)
    assert not module_matches("proj_out", patterns)


def test_injection_errors_name_the_problem():
    model = tiny_flux()
    with pytest.raises(ValueError, match="matches target_modules .*nope_"):
        inject_moe_lora(model, config(target_modules=(r"nope_\d",)))
    inject_moe_lora(model, config())
    with pytest.raises(ValueError, match="already has MoE-LoRA"):
        inject_moe_lora(model, config())
    assert set(remove_moe_lora(model)) == EXPECTED_TARGETS
    assert not moe_lora_layers(model)


def test_config_validation_and_round_trip():
    cfg = config(dropout=0.1, load_balance_weight=0.01)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert MoELoRAConfig.from_dict(data) == cfg
    for bad in ({"rank": 0}, {"num_experts": 0}, {"top_k": 5}, {"dropout": 1.0}, {"alpha": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MoELoRAConfig(**bad)
    with pytest.raises(ValueError, match="not a valid regex"):
        MoELoRAConfig(target_modules=("to_q[",))
    with pytest.raises(ValueError, match="unknown key"):
        MoELoRAConfig.from_dict({**data, "rnak": 3})


def test_any_leading_dims_and_bf16():
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(8, 6), rank=2, alpha=4.0, num_experts=3, top_k=2)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 3, 5, 8)
    y = layer(x)
    assert y.shape == (2, 3, 5, 6)
    gates = layer.route(x)[0]
    expected = layer.base_layer(x) + layer.scaling * sum(
        gates[..., e : e + 1] * (x @ layer.lora_A[e].T @ layer.lora_B[e].T) for e in range(3)
    )
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)

    layer.base_layer.to(torch.bfloat16)
    y16 = layer(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    torch.testing.assert_close(y16.float(), expected, rtol=5e-2, atol=5e-2)



def test_router_runs_as_a_module_call():
    """Module hooks (offload onloads a weight only around its module's forward) see the router: it is
    called, not read, and computes x W^T with its float32 weight cast to the input's dtype."""
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(8, 6), rank=2, num_experts=3).to(torch.bfloat16)
    layer.lora_router.float()
    inputs = []
    hook = layer.lora_router.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    x = torch.randn(5, 8).to(torch.bfloat16)
    try:
        probs = layer.route(x)[1]
        layer(x)
    finally:
        hook.remove()
    assert len(inputs) == 2 and inputs[0] is x
    expected = (x @ layer.lora_router.weight.to(torch.bfloat16).T).float().softmax(-1)
    torch.testing.assert_close(probs, expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# 2. Training


@pytest.mark.slow  # kept out of CI for time; run with -m slow
def test_training_reduces_loss_and_touches_only_lora():
    model, inputs = tiny_flux(), flux_inputs()
    inject_moe_lora(model, config(load_balance_weight=0.01))
    frozen = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    routers = {n: p.clone() for n, p in model.named_parameters() if "lora_router" in n}
    losses = train(model, inputs, steps=20, lb_weight=0.01)
    assert losses[-1] < 0.5 * losses[0], losses
    for name, param in model.named_parameters():
        assert (param.grad is not None) == ("lora_" in name), name
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    # The router learns too (its gradient is zero only while every B_e is zero).
    assert any(not torch.equal(p, routers[n]) for n, p in model.named_parameters() if n in routers)
    assert len(routers) == len(EXPECTED_TARGETS)


def test_disabled_adapter_gives_the_base_model():
    model, inputs = tiny_flux(), flux_inputs()
    base = run(model, inputs)
    inject_moe_lora(model, config())
    train(model, inputs, steps=2)
    with torch.no_grad(), moe_lora_disabled(model):
        assert torch.equal(run(model, inputs), base)
    with torch.no_grad():
        assert not torch.allclose(run(model, inputs), base)


# ---------------------------------------------------------------------------------------------
# 3. Save / load


def trained_flux(
    cfg: MoELoRAConfig, steps: int = 3
) -> tuple[FluxTransformer2DModel, dict[str, torch.Tensor]]:
    model, inputs = tiny_flux(), flux_inputs()
    inject_moe_lora(model, cfg)
    train(model, inputs, steps=steps)
    return model, inputs


def test_save_then_load_reproduces_outputs_exactly(tmp_path):
    cfg = config(load_balance_weight=0.01)
    model, inputs = trained_flux(cfg)
    folder = save_moe_lora(model, tmp_path / "adapter", cfg)
    assert sorted(p.name for p in folder.iterdir()) == [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]

    fresh = tiny_flux()
    assert load_moe_lora(fresh, folder) == cfg
    with torch.no_grad():
        assert torch.equal(run(fresh, inputs), run(model, inputs))
    # Loading into an already injected model works as well.
    fresh2 = tiny_flux()
    inject_moe_lora(fresh2, cfg)
    load_moe_lora(fresh2, folder)
    with torch.no_grad():
        assert torch.equal(run(fresh2, inputs), run(model, inputs))


def test_load_rejects_other_rank(tmp_path):
    cfg = config()
    model, _ = trained_flux(cfg, steps=1)
    save_moe_lora(model, tmp_path, cfg)
    other = tiny_flux()
    inject_moe_lora(other, config(rank=8))
    with pytest.raises(
        ValueError, match=r"layer '.*' lora_A has shape \[4, 4, \d+\] in the file but \[4, 8, \d+\]"
    ):
        load_moe_lora(other, tmp_path)


def test_load_rejects_other_width_and_leaves_model_clean(tmp_path):
    cfg = config()
    model, _ = trained_flux(cfg, steps=1)
    save_moe_lora(model, tmp_path, cfg)
    wide = tiny_flux(attention_head_dim=32)
    with pytest.raises(
        ValueError, match=r"layer '.*' .* has shape \[.*32.*\] in the file but \[.*64.*\] in the model"
    ):
        load_moe_lora(wide, tmp_path)
    assert not moe_lora_layers(wide)


def test_load_rejects_missing_layer_and_other_alpha(tmp_path):
    cfg = config()
    model, _ = trained_flux(cfg, steps=1)
    save_moe_lora(model, tmp_path, cfg)
    path = tmp_path / ADAPTER_WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file({k: v for k, v in tensors.items() if "ff.net.2" not in k}, str(path))
    with pytest.raises(ValueError, match=r"no weights for layer\(s\) \['transformer_blocks.0.ff.net.2'\]"):
        load_moe_lora(tiny_flux(), tmp_path)

    save_file(tensors, str(path))
    other = tiny_flux()
    inject_moe_lora(other, config(alpha=1.0))
    with pytest.raises(ValueError, match="alpha=1.0"):
        load_moe_lora(other, tmp_path)


# ---------------------------------------------------------------------------------------------
# 4. diffusers interop (E = 1)


def test_plain_lora_loads_with_diffusers(tmp_path):
    cfg = config(num_experts=1)  # alpha / r = 2: the scaling must survive
    model, inputs = trained_flux(cfg)
    assert any(layer.lora_B.abs().sum() > 0 for layer in moe_lora_layers(model).values())
    folder = save_moe_lora(model, tmp_path / "adapter", cfg)
    with torch.no_grad():
        ours = run(model, inputs)

    stock = tiny_flux()
    pipe = FluxPipeline(
        scheduler=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=stock,
    )
    pipe.load_lora_weights(folder)
    by_file = tiny_flux()
    by_file.load_lora_adapter(str(folder / DIFFUSERS_LORA_WEIGHTS_NAME))
    by_folder = tiny_flux()
    by_folder.load_lora_adapter(str(folder), use_safetensors=True)
    with torch.no_grad():
        for loaded in (stock, by_file, by_folder):
            torch.testing.assert_close(run(loaded, inputs), ours, rtol=0, atol=1e-5)
    assert sum("lora_A" in n for n, _ in stock.named_parameters()) == len(EXPECTED_TARGETS)


def test_merged_expert_lora_is_the_gate_weighted_sum_of_experts():
    layer = MoELoRALinear(nn.Linear(6, 5), rank=2, alpha=8.0, num_experts=3)
    with torch.no_grad():
        layer.lora_B.normal_(generator=torch.Generator().manual_seed(3))
    gates = [0.2, 0.0, 0.8]
    lora_A, lora_B = merged_expert_lora(layer, gates)
    assert lora_A.shape == (6, 6) and lora_B.shape == (5, 6)  # rank E * r
    expected = sum(g * 4.0 * layer.lora_B[e] @ layer.lora_A[e] for e, g in enumerate(gates))  # scaling 8 / 2
    torch.testing.assert_close(lora_B @ lora_A, expected.detach(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="must be 3 finite gate values"):
        merged_expert_lora(layer, [0.5, 0.5])


def test_diffusers_export_refuses_experts(tmp_path):
    model = tiny_flux()
    inject_moe_lora(model, config(num_experts=4))
    with pytest.raises(ValueError, match="4 experts"):
        save_diffusers_lora(model, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# 5. Routing


def test_top_k_gates_sum_to_one_with_k_nonzeros():
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(8, 6), rank=2, num_experts=4, top_k=2)
    gates, probs, expert_index = layer.route(torch.randn(3, 5, 8))
    assert gates.shape == probs.shape == (3, 5, 4) and expert_index.shape == (3, 5, 2)
    torch.testing.assert_close(gates.sum(-1), torch.ones(3, 5))
    assert torch.equal((gates > 0).sum(-1), torch.full((3, 5), 2))
    gates, index = top_k_gates(torch.tensor([[0.1, 0.5, 0.3, 0.1]]), 2)
    torch.testing.assert_close(gates, torch.tensor([[0.0, 0.625, 0.375, 0.0]]))
    assert index.tolist() == [[1, 2]]


def test_switch_load_balancing_loss_hand_example():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    # argmax -> experts [0, 0, 1, 0]: f = [0.75, 0.25]; P = [0.65, 0.35]; 2 * (0.4875 + 0.0875)
    loss = switch_load_balancing_loss(probs, probs.argmax(-1, keepdim=True), 2)
    torch.testing.assert_close(loss, torch.tensor(1.15))
    # top-2 of 2 experts: every expert gets half the assignments -> E * sum 0.5 * P = 1.
    loss = switch_load_balancing_loss(probs, torch.tensor([[0, 1]] * 4), 2)
    torch.testing.assert_close(loss, torch.tensor(1.0))


def test_layer_aux_loss_matches_independent_computation():
    torch.manual_seed(0)
    net = nn.Sequential(
        MoELoRALinear(nn.Linear(8, 8), rank=2, num_experts=4, top_k=2, load_balance=True),
        MoELoRALinear(nn.Linear(8, 8), rank=2, num_experts=4, load_balance=True),
    )
    x = torch.randn(2, 6, 8)
    net(x)
    expected = []
    for layer, inp in ((net[0], x), (net[1], net[0](x))):
        probs = torch.softmax(inp.reshape(-1, 8) @ layer.lora_router.weight.T, dim=-1)
        chosen = probs.topk(layer.top_k or 1, dim=-1).indices
        counts = torch.stack([(chosen == e).sum() for e in range(4)]).float() / chosen.numel()
        expected.append(4 * (counts * probs.mean(0)).sum())
    torch.testing.assert_close(net[0].aux_loss, expected[0])
    torch.testing.assert_close(net[1].aux_loss, expected[1])
    torch.testing.assert_close(load_balancing_loss(net), expected[0] + expected[1])


def test_record_routing_gives_per_layer_probs():
    model, inputs = tiny_flux(), flux_inputs()
    inject_moe_lora(model, config())
    with torch.no_grad(), record_routing(model) as record:
        run(model, inputs)
        run(model, flux_inputs(seed=2))
    probs = record.mean()
    assert set(probs) == EXPECTED_TARGETS
    for name, p in probs.items():
        assert p.shape == (4,), name
        torch.testing.assert_close(p.sum(), torch.tensor(1.0))
    assert all(len(h) == 2 for h in record.history.values())
    with torch.no_grad():
        run(model, inputs)  # outside the context nothing is recorded
    assert all(len(h) == 2 for h in record.history.values())


def test_routing_change_hand_numbers():
    p_a = torch.tensor([0.5, 0.25, 0.25, 0.0])
    p_b = torch.tensor([0.25, 0.25, 0.5, 0.0])
    change = routing_change(p_a, p_b)
    torch.testing.assert_close(change, torch.tensor([0.25 / (0.5 + 1e-6), 0.0, 0.25 / (0.25 + 1e-6), 0.0]))
    torch.testing.assert_close(routing_change(p_a[:3], p_b[:3], eps=0.0), torch.tensor([0.5, 0.0, 1.0]))


def test_moe_lora_contributes_tells_a_fresh_adapter_from_a_trained_one():
    """RL's KL reference: switching the adapters off is the starting policy only while B = 0."""
    from idcrafter.core.moe_lora import moe_lora_contributes

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    inject_moe_lora(model, MoELoRAConfig(rank=2, num_experts=2, target_modules=("0", "2")))
    x = torch.randn(5, 8)
    assert not moe_lora_contributes(model)
    with moe_lora_disabled(model):
        off = model(x)
    torch.testing.assert_close(model(x), off)  # fresh: off == on
    with torch.no_grad():
        model[2].lora_B[1, 0, 0] = 0.5
    assert moe_lora_contributes(model)
    with moe_lora_disabled(model):
        torch.testing.assert_close(model(x), off)  # off is unchanged by B ...
    assert (model(x) - off).abs().max() > 1e-4  # ... and on now differs from it
