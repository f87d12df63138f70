"""MoE-LoRA (MultiCrafter): a mixture of LoRA experts on the linear layers of a frozen backbone.

    y = W x + (alpha / r) * sum_e g_e(x) * B_e A_e x,    g(x) = softmax(W_router x)  (optional top-k)

With one expert there is no router and the layer is a plain LoRA, saved so that diffusers'
`load_lora_weights` / `load_lora_adapter` reads it (see `save_diffusers_lora`).

Naming follows peft's `tuners/lora/layer.py`: the wrapped layer is `base_layer`, the adapter
parameters are `lora_A` ([E, r, in]), `lora_B` ([E, out, r]) and `lora_router` (in -> E), and
`scaling = lora_alpha / r`.

Typical use::

    cfg = MoELoRAConfig(rank=16, alpha=16, num_experts=4, top_k=2, load_balance_weight=0.01)
    transformer.requires_grad_(False)  # the trainer owns the trainable set; inject freezes only W
    names = inject_moe_lora(transformer, cfg)
    loss = flow_loss + cfg.load_balance_weight * load_balancing_loss(transformer)
    save_moe_lora(transformer, "out/adapter", cfg)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from idcrafter.core.lora_config import FLUX_TARGET_MODULES as FLUX_TARGET_MODULES  # re-exported
from idcrafter.core.lora_config import MoELoRAConfig, module_matches
from idcrafter.utils.io import atomic_write

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
# The name diffusers' loaders pick first when given a folder (`_best_guess_weight_name`).
DIFFUSERS_LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
# diffusers stores the peft `LoraConfig` kwargs as JSON under this safetensors metadata key
# (`loaders/lora_base.py: LORA_ADAPTER_METADATA_KEY`), each key prefixed with the component name.
_DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
_FORMAT = "idcrafter.moe_lora"
_FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# Pure routing maths


def top_k_gates(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the k largest probabilities and renormalise them to sum to 1.

    probs: [..., E]. Returns gates [..., E] (exactly k non-zeros) and expert_index [..., k].
    """
    top, expert_index = probs.topk(k, dim=-1)
    gates = torch.zeros_like(probs).scatter(-1, expert_index, top / top.sum(-1, keepdim=True))
    return gates, expert_index


def switch_load_balancing_loss(
    probs: torch.Tensor, expert_index: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """Switch-Transformer auxiliary loss E * sum_e f_e * P_e (1 when routing is uniform).

    probs: [N, E] router softmax (before top-k); expert_index: [N, k] experts each token is sent to.
    f_e is the fraction of the N * k assignments that go to expert e (non-differentiable),
    P_e = mean_n probs[n, e] carries the gradient.
    """
    assignments = F.one_hot(expert_index, num_experts).to(probs.dtype)  # [N, k, E]
    fraction = assignments.sum(1).mean(0) / expert_index.shape[-1]
    return num_experts * (fraction * probs.mean(0)).sum()


def routing_change(p_a: torch.Tensor, p_b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Relative routing change |P_A - P_B| / (P_A + eps), elementwise (any shape, e.g. [L, E])."""
    return (p_a - p_b).abs() / (p_a + eps)


# --------------------------------------------------------------------------------------------
# Layer


class _Router(nn.Linear):
    """The router's linear map (in -> E, no bias), its float32 weight cast to the input's dtype. Called
    as a module, not read as a weight, so module hooks (diffusers' / accelerate's offload, which put
    the weight on the device only around the module's own forward) see it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class MoELoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a mixture of E LoRA experts.

    x: [..., in] -> y: [..., out]. The adapter runs in the input dtype (bf16 in, bf16 maths);
    its parameters are kept in float32 (like peft's `autocast_adapter_dtype`) so that optimiser
    updates are not lost to bf16 rounding. The router softmax runs in float32.

    After a forward, `aux_loss` holds the unweighted switch load-balancing loss when
    `load_balance` is set and E > 1 (else None).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int = 16,
        alpha: float = 16.0,
        num_experts: int = 4,
        top_k: int | None = None,
        dropout: float = 0.0,
        load_balance: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"MoELoRALinear wraps nn.Linear, got {type(base_layer).__name__}")
        if top_k is not None and not (1 <= top_k <= num_experts):
            raise ValueError(f"top_k must be None or in [1, {num_experts}], got {top_k}")
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.lora_alpha, self.scaling = rank, alpha, alpha / rank
        self.num_experts = num_experts
        # top_k == E is dense routing; normalising it away skips a pointless topk.
        self.top_k = None if top_k is None or top_k >= num_experts else top_k
        self.load_balance = load_balance
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        factory = {
            "device": base_layer.weight.device,
            "dtype": torch.promote_types(base_layer.weight.dtype, torch.float32),
        }
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(num_experts, self.out_features, rank, **factory))
        self.lora_router = (
            _Router(self.in_features, num_experts, bias=False, **factory) if num_experts > 1 else None
        )
        self.reset_lora_parameters()

        self.disabled = False
        self.aux_loss: torch.Tensor | None = None
        # Set by `record_routing`: a list that receives the mean gates [E] of each forward.
        self._routing_sink: list[torch.Tensor] | None = None

    def reset_lora_parameters(self) -> None:
        """A_e as peft's nn.Linear(in, r) weight, B_e = 0 so the layer starts equal to the base."""
        for expert_A in self.lora_A.data:
            # Per expert: on the stacked [E, r, in] tensor kaiming would take fan_in = r * in.
            nn.init.kaiming_uniform_(expert_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, for code that reads `layer.weight.dtype` / `.device` (as peft exposes it)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gates of the experts for each token.

        x: [..., in]. Returns gates [..., E] (float32, sum 1, k non-zeros with top-k),
        probs [..., E] (the full softmax) and expert_index [..., k] (k = 1 for dense routing:
        the argmax, which is what the switch loss counts).
        """
        if self.lora_router is None:
            ones = x.new_ones(*x.shape[:-1], 1, dtype=torch.float32)
            return ones, ones, torch.zeros_like(ones, dtype=torch.long)
        logits = self.lora_router(x)
        # float32: in bf16 small gates round to 0 and the renormalised top-k no longer sums to 1.
        probs = logits.float().softmax(dim=-1)
        if self.top_k is None:
            return probs, probs, probs.argmax(dim=-1, keepdim=True)
        gates, expert_index = top_k_gates(probs, self.top_k)
        return gates, probs, expert_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] -> [..., out]."""
        y = self.base_layer(x)
        if self.disabled:
            return y
        lora_A, lora_B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        if self.lora_router is None:  # plain LoRA (E = 1): two matmuls, as peft's LoRA runs them
            delta = F.linear(F.linear(self.lora_dropout(x), lora_A[0]), lora_B[0])
            return y + (delta * self.scaling).to(y.dtype)
        h = torch.einsum("...i,eri->...er", self.lora_dropout(x), lora_A)  # [..., E, r]
        gates, probs, expert_index = self.route(x)
        self._after_routing(gates, probs, expert_index)
        h = h * gates.to(x.dtype).unsqueeze(-1)
        # One contraction over experts and rank mixes the gated expert outputs.
        delta = torch.einsum("...er,eor->...o", h, lora_B)
        return y + (delta * self.scaling).to(y.dtype)

    def _after_routing(self, gates: torch.Tensor, probs: torch.Tensor, expert_index: torch.Tensor) -> None:
        num_experts = self.num_experts
        if self.load_balance:
            self.aux_loss = switch_load_balancing_loss(
                probs.reshape(-1, num_experts), expert_index.reshape(-1, expert_index.shape[-1]), num_experts
            )
        if self._routing_sink is not None:
            self._routing_sink.append(gates.detach().reshape(-1, num_experts).mean(0))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, num_experts={self.num_experts}, top_k={self.top_k}"
        )


# --------------------------------------------------------------------------------------------
# Model-level helpers


def moe_lora_layers(model: nn.Module) -> dict[str, MoELoRALinear]:
    """{qualified name: layer} of every MoE-LoRA layer in `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoELoRALinear)}


def _layer_for(base_layer: nn.Linear, config: MoELoRAConfig) -> MoELoRALinear:
    return MoELoRALinear(
        base_layer,
        rank=config.rank,
        alpha=config.alpha,
        num_experts=config.num_experts,
        top_k=config.top_k,
        dropout=config.dropout,
        load_balance=config.load_balance_weight > 0,
    )


def inject_moe_lora(model: nn.Module, config: MoELoRAConfig) -> list[str]:
    """Replace each `nn.Linear` whose name matches `config.target_modules` by a MoELoRALinear.

    Only the wrapped base weights are frozen; the rest of `model` keeps its `requires_grad`
    (the trainer decides what else trains). Returns the qualified names of the wrapped layers.
    Raises ValueError if the model already has MoE-LoRA layers or nothing matched.
    """
    if moe_lora_layers(model):
        raise ValueError("model already has MoE-LoRA layers; remove_moe_lora(model) before injecting again")
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name and module_matches(name, config.target_modules)
    ]
    if not names:
        raise ValueError(
            f"no nn.Linear in {type(model).__name__} matches target_modules {list(config.target_modules)}"
        )
    for name in names:
        _replace_submodule(model, name, _layer_for(model.get_submodule(name), config))
    return names


def remove_moe_lora(model: nn.Module) -> list[str]:
    """Put the original `nn.Linear` layers back (the adapter is dropped). Returns their names."""
    layers = moe_lora_layers(model)
    for name, layer in layers.items():
        _replace_submodule(model, name, layer.base_layer)
    return list(layers)


def _replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    # setattr also works for ModuleList / Sequential children such as "to_out.0".
    setattr(model.get_submodule(parent_name), child, new)


def moe_lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (lora_A, lora_B, lora_router) of every MoE-LoRA layer."""
    return list(moe_lora_state_dict(model, detach=False).values())


def moe_lora_state_dict(model: nn.Module, detach: bool = True) -> dict[str, torch.Tensor]:
    """{"<layer>.lora_A" | "<layer>.lora_B" | "<layer>.lora_router.weight": tensor}, base weights excluded."""
    out = {}
    for name, layer in moe_lora_layers(model).items():
        for param_name, param in layer.named_parameters():
            if not param_name.startswith("base_layer."):
                out[f"{name}.{param_name}"] = param.detach() if detach else param
    return out


def load_balancing_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the layers' unweighted `aux_loss` from the last forward (0 when none is enabled).

    The caller multiplies it by `config.load_balance_weight`.
    """
    losses = [layer.aux_loss for layer in moe_lora_layers(model).values() if layer.aux_loss is not None]
    if not losses:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return torch.stack([loss.float() for loss in losses]).sum()


def moe_lora_contributes(model: nn.Module) -> bool:
    """Whether any MoE-LoRA layer of `model` changes its output (a layer with B = 0 does not):
    with only LoRA training, switching the adapters off is then *not* the starting model."""
    return any(bool(layer.lora_B.detach().abs().max() > 0) for layer in moe_lora_layers(model).values())


@contextlib.contextmanager
def moe_lora_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model (adapters off), e.g. as the KL reference in online RL."""
    layers = list(moe_lora_layers(model).values())
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, was in zip(layers, previous):
            layer.disabled = was


class RoutingRecord:
    """Mean gate probabilities recorded by `record_routing`.

    history: {layer name: [mean gates [E] of each forward]}; `mean()` averages over forwards.
    """

    def __init__(self) -> None:
        self.history: dict[str, list[torch.Tensor]] = {}

    def mean(self) -> dict[str, torch.Tensor]:
        """{layer name: probs [E] (float32, CPU, sums to 1)} over all recorded forwards."""
        return {name: torch.stack(probs).mean(0).cpu() for name, probs in self.history.items() if probs}


@contextlib.contextmanager
def record_routing(model: nn.Module) -> Iterator[RoutingRecord]:
    """Make every routed (E > 1) layer record its gates, averaged over tokens, at each forward.

    The gates are the ones applied (after top-k renormalisation). Use for the routing-change
    heatmap: `routing_change(rec_a.mean()[name], rec_b.mean()[name])`.
    """
    record = RoutingRecord()
    layers = {name: m for name, m in moe_lora_layers(model).items() if m.num_experts > 1}
    for name, layer in layers.items():
        layer._routing_sink = record.history.setdefault(name, [])
    try:
        yield record
    finally:
        for layer in layers.values():
            layer._routing_sink = None


# --------------------------------------------------------------------------------------------
# Save / load (our format)


def save_moe_lora(model: nn.Module, folder: str | os.PathLike, config: MoELoRAConfig) -> Path:
    """Write `adapter_model.safetensors` and `adapter_config.json` to `folder` (each atomically).

    With E = 1 it also writes `pytorch_lora_weights.safetensors` (see `save_diffusers_lora`),
    so `FluxPipeline.load_lora_weights(folder)` works on the folder. The config is written last:
    a folder with a config has its weights.
    """
    layers = moe_lora_layers(model)
    if not layers:
        raise ValueError("model has no MoE-LoRA layers to save; call inject_moe_lora first")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in moe_lora_state_dict(model).items()}
    with atomic_write(folder / ADAPTER_WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    if config.num_experts == 1:
        save_diffusers_lora(model, folder / DIFFUSERS_LORA_WEIGHTS_NAME)
    payload = {
        "format": _FORMAT,
        "version": _FORMAT_VERSION,
        "config": config.to_dict(),
        "modules": list(layers),
    }
    with atomic_write(folder / ADAPTER_CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
    return folder


def read_moe_lora_config(folder: str | os.PathLike) -> MoELoRAConfig:
    """The `MoELoRAConfig` saved in `folder/adapter_config.json`."""
    path = Path(folder) / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{path}: no MoE-LoRA config (expected a folder written by save_moe_lora)")
    payload = json.loads(path.read_text())
    if payload.get("format") != _FORMAT:
        raise ValueError(
            f"{path}: not a MoE-LoRA config (format {payload.get('format')!r}, expected {_FORMAT!r})"
        )
    return MoELoRAConfig.from_dict(payload["config"])


def load_moe_lora(model: nn.Module, folder: str | os.PathLike) -> MoELoRAConfig:
    """Load a folder written by `save_moe_lora` into `model`, injecting the layers if needed.

    Raises ValueError naming the layer when the file and the model disagree (missing or extra
    layers, shapes such as another rank or model width, alpha / experts / top-k). If this call
    injected the layers and loading fails, they are removed again.
    """
    folder = Path(folder)
    config = read_moe_lora_config(folder)
    tensors = _read_safetensors(folder / ADAPTER_WEIGHTS_NAME)
    injected_here = not moe_lora_layers(model)
    if injected_here:
        inject_moe_lora(model, config)
    try:
        params = moe_lora_state_dict(model, detach=False)
        _check_state_dict(params, tensors, folder / ADAPTER_WEIGHTS_NAME)
        _check_layer_settings(model, config, folder)
    except ValueError:
        if injected_here:
            remove_moe_lora(model)
        raise
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key])
    return config


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ValueError(f"{path}: adapter weights not found")
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def _layer_of(key: str) -> str:
    return key.rsplit(".lora_", 1)[0]


def _check_state_dict(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], path: Path) -> None:
    missing = sorted({_layer_of(k) for k in params.keys() - tensors.keys()})
    if missing:
        raise ValueError(
            f"{path}: no weights for layer(s) {missing} of the model (keys missing from the file)"
        )
    extra = sorted({_layer_of(k) for k in tensors.keys() - params.keys()})
    if extra:
        raise ValueError(f"{path}: has weights for layer(s) {extra} that the model does not have")
    for key, param in params.items():
        if tensors[key].shape != param.shape:
            layer = _layer_of(key)
            raise ValueError(
                f"{path}: layer '{layer}' {key[len(layer) + 1 :]} has shape {list(tensors[key].shape)} "
                f"in the file but {list(param.shape)} in the model"
            )


def _check_layer_settings(model: nn.Module, config: MoELoRAConfig, folder: Path) -> None:
    # Shapes already agree; alpha and top-k do not show in shapes but change the output.
    top_k = None if config.top_k is None or config.top_k >= config.num_experts else config.top_k
    for name, layer in moe_lora_layers(model).items():
        if (layer.lora_alpha, layer.top_k) != (config.alpha, top_k):
            raise ValueError(
                f"{folder}: layer '{name}' has alpha={layer.lora_alpha}, top_k={layer.top_k} "
                f"but the adapter was saved with alpha={config.alpha}, top_k={config.top_k}"
            )


# --------------------------------------------------------------------------------------------
# diffusers export (plain LoRA; MoE-LoRA merged at a fixed routing)


def merged_expert_lora(layer: MoELoRALinear, routing: Sequence[float] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One plain LoRA (A [E r, in], B [out, E r]) with B A = scaling * sum_e w_e B_e A_e.

    routing: the gates w [E] held fixed. The layer's update for one token is exactly this when its
    router gives that token the gates w; for other tokens it is an approximation (the router and
    top-k make the real gates token-dependent). The experts are stacked along the rank, so no
    factorisation is lost; with E = 1 and w = [1] it is the layer's own LoRA with alpha / r in B.
    """
    weights = torch.as_tensor(routing, dtype=torch.float32).flatten()
    if weights.numel() != layer.num_experts or not torch.isfinite(weights).all():
        raise ValueError(f"routing {weights.tolist()} must be {layer.num_experts} finite gate values, one per expert")
    lora_A = layer.lora_A.detach().float()  # [E, r, in]
    lora_B = layer.lora_B.detach().float() * (weights.to(lora_A.device)[:, None, None] * layer.scaling)  # [E, out, r]
    e, r, _ = lora_A.shape
    return lora_A.reshape(e * r, -1), lora_B.permute(1, 0, 2).reshape(lora_B.shape[1], e * r)


def _routing_of(name: str, layer: MoELoRALinear, routing) -> Sequence[float] | torch.Tensor:
    if routing is None:
        if layer.num_experts != 1:
            raise ValueError(
                f"layer '{name}' has {layer.num_experts} experts; diffusers' LoRA format holds plain LoRA only "
                "(E = 1), or experts merged at a routing you give"
            )
        return [1.0]
    if isinstance(routing, Mapping):
        if name not in routing:
            raise ValueError(f"routing has no gates for layer '{name}'")
        return routing[name]
    return routing


def diffusers_lora_state_dict(
    model: nn.Module, prefix: str = "transformer", routing: Sequence[float] | Mapping[str, Sequence[float]] | None = None
) -> dict[str, torch.Tensor]:
    """Plain-LoRA layers as diffusers/peft keys.

    `<prefix>.<module>.lora_A.weight` = A [r, in] and `<prefix>.<module>.lora_B.weight` =
    (alpha / r) * B [out, r]; `model` is the component itself (the transformer). The scaling is
    folded into B because diffusers' loaders do not all read alpha: `load_lora_adapter(file)`
    without `use_safetensors=True` drops the safetensors metadata and then assumes alpha = r.
    Folded, every path (and other tools that assume alpha = r) computes the same update.

    routing: None for plain LoRA (every layer E = 1); else MoE-LoRA experts are merged at these
    fixed gates (E values for every layer, or {layer name: E values}) by `merged_expert_lora`, rank
    E * r: an approximation of the routed model, exact for tokens routed with those gates.
    """
    out = {}
    for name, layer in moe_lora_layers(model).items():
        lora_A, lora_B = merged_expert_lora(layer, _routing_of(name, layer, routing))
        out[f"{prefix}.{name}.lora_A.weight"] = lora_A.to(layer.lora_A.dtype).contiguous().cpu()
        out[f"{prefix}.{name}.lora_B.weight"] = lora_B.to(layer.lora_B.dtype).contiguous().cpu()
    return out


def diffusers_lora_metadata(model: nn.Module, prefix: str = "transformer", rank: int | None = None) -> dict[str, str]:
    """safetensors metadata carrying the peft `LoraConfig` as diffusers' `save_lora_weights` writes it.

    JSON under "lora_adapter_metadata", keys prefixed with the component ("transformer.r", ...).
    lora_alpha = r because `diffusers_lora_state_dict` folds alpha / r into B. target_modules is a
    regex naming exactly the wrapped layers (peft full-matches a string; a list would also
    suffix-match, e.g. "proj_out" would catch every block's proj_out). rank: the exported rank
    when it is not the layers' own (merged experts: E * r).
    """
    layers = moe_lora_layers(model)
    ranks = sorted({layer.r for layer in layers.values()})
    if len(ranks) != 1:
        raise ValueError(f"layers have different ranks {ranks}; the diffusers export expects one rank")
    rank = ranks[0] if rank is None else rank
    dropout = next(iter(layers.values())).lora_dropout
    lora_config = {
        "r": rank,
        "lora_alpha": rank,
        "target_modules": "(?:" + "|".join(re.escape(name) for name in layers) + ")",
        "lora_dropout": dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
    }
    packed = {f"{prefix}.{key}": value for key, value in lora_config.items()}
    return {"format": "pt", _DIFFUSERS_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}


def save_diffusers_lora(
    model: nn.Module,
    path: str | os.PathLike,
    prefix: str = "transformer",
    routing: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
) -> Path:
    """Write a plain LoRA (E = 1) as one diffusers LoRA safetensors file, atomically.

    Loads with `FluxPipeline.load_lora_weights(folder or file)`,
    `FluxTransformer2DModel.load_lora_adapter(file)` or `.load_lora_adapter(folder, use_safetensors=True)`
    (the folder form needs the flag: without it diffusers looks for a .bin) and reproduces this
    model's output. With `routing`, a MoE-LoRA's experts merged at those fixed gates
    (`diffusers_lora_state_dict`): an approximation of the routed model.
    """
    if not moe_lora_layers(model):
        raise ValueError("model has no MoE-LoRA layers to save; call inject_moe_lora first")
    path = Path(path)
    tensors = diffusers_lora_state_dict(model, prefix, routing)
    ranks = sorted({t.shape[0] for k, t in tensors.items() if k.endswith(".lora_A.weight")})
    if len(ranks) != 1:
        raise ValueError(f"exported layers have different ranks {ranks}; the diffusers export expects one rank")
    rank = ranks[0]
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=diffusers_lora_metadata(model, prefix, rank))
    return path
