"""IDCrafterTransformer: diffusers' `WanTransformer3DModel` with the ID-Crafter adapter inside.

A subclass of the stock model (docs/design.md 4): Wan's blocks are its own `blocks`, so diffusers'
hooks find them (`enable_cache`, `enable_layerwise_casting`, `enable_group_offload`,
`set_attention_backend`, `load_lora_adapter`), and its forward is the stock one
(`super().forward`), never a copy. The adapter reaches the DiT in two places:
- a forward hook on `condition_embedder` swaps the projected text states for a `SubjectContext`
  (text + the subject stream), which the stock forward hands to every block's `attn2`;
- `attn2` of every block gets a `SubjectCrossAttnProcessor`: the stock processor on the text,
  plus stage 3 in the first K blocks.
Called without subjects, the hook is inactive and the stock model runs untouched.

Files: `save_pretrained` / `from_pretrained` are diffusers' own; the folder's config.json holds the
Wan config plus `idcrafter` (the IDCrafterConfig), `lora` and `vlm_folder`, and its safetensors
hold the base and the adapter (`adapter.*`) weights. A stock Wan transformer folder, alone or with an
adapter folder (`save_adapter`: what training exports and older pipeline folders hold), loads
through one conversion path, `from_wan`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import WanTransformer3DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers' pipeline loader looks it up here)
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from safetensors.torch import load_file, save_file
from torch import nn

from idcrafter.core.lora_config import MoELoRAConfig
from idcrafter.core.moe_lora import inject_moe_lora, load_moe_lora, save_moe_lora
from idcrafter.core.sequence_parallel import SequenceParallel, enable_ulysses
from idcrafter.flow.matching import velocity_from_sample
from idcrafter.utils.errors import ConfigError, FileFormatError
from idcrafter.utils.io import atomic_write_dir
from idcrafter.video.attention import (
    CrossModalAttention,
    LayerKV,
    SharedQueryCrossAttention,
    SubjectContext,
    SubjectCrossAttnProcessor,
    SubjectStream,
    SubjectTower,
)
from idcrafter.video.config import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MODEL_CLASS,
    IDCrafterConfig,
    base_signature,
    check_adapter_fits,
    local_model_folder,
    read_adapter_config,
)
from idcrafter.video.subject_encoder import SubjectEncoder
from idcrafter.video.vlm import VLMConnector

LORA_SUBFOLDER = "lora"
# Linear layers of every Wan block that the `new-modules+lora` policy adapts.
WAN_LORA_TARGETS = (
    r"blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out\.0)",
    r"blocks\.\d+\.attn2\.(to_q|to_k|to_v|to_out\.0)",
    r"blocks\.\d+\.ffn\.net\.(0\.proj|2)",
)


def to_velocity(config: IDCrafterConfig, output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The model output as a velocity: as is for "velocity" models, (z_t - x0) / sigma for "sample" ones.

    sample: z_t [B, C, F, H, W]; sigma: [B] (timestep / 1000).
    """
    if config.prediction == "velocity":
        return output
    return velocity_from_sample(sample, output, sigma).to(output.dtype)


class IDCrafterAdapter(nn.Module):
    """All trainable ID-Crafter weights: subject encoder, subject tower, stage 3, VLM connector."""

    def __init__(self, config: IDCrafterConfig, dim: int, heads: int, num_blocks: int):
        super().__init__()
        self.subject_encoder = SubjectEncoder(config.latent_channels, dim, config.max_subjects, config.subject_patch)
        tower_layers = num_blocks if config.uses_tower else 0
        self.subject_tower = SubjectTower(dim, heads, tower_layers, intra=config.hierarchy != "no-intra",
                                          inter=config.hierarchy != "no-inter")
        stage3 = num_blocks if config.uses_stage3 else 0
        if config.stage3_projections == "attn2":
            form = functools.partial(SharedQueryCrossAttention, zero=config.stage3_init)
        else:
            form = CrossModalAttention
        self.cross_modal_attn = nn.ModuleList([form(dim, heads) for _ in range(stage3)])
        self.vlm_connector = VLMConnector(config.vlm_dim, dim) if config.use_vlm else None


# IDCrafterConfig fields that decide the adapter's modules and shapes.
ADAPTER_SHAPE_FIELDS = ("num_blocks", "max_subjects", "use_vlm", "vlm_dim", "latent_channels", "subject_patch", "hierarchy",
                        "stage3_projections")
# The arguments of the stock model's __init__: its config, which IDCrafterTransformer's config extends.
WAN_CONFIG_KEYS = tuple(inspect.signature(WanTransformer3DModel.__init__).parameters)[1:]


def wan_arguments(config) -> dict:
    """The `WanTransformer3DModel` arguments in a diffusers config (ours or a stock one); patch_size a tuple."""
    out = {k: config[k] for k in WAN_CONFIG_KEYS if k in config}
    if out.get("patch_size") is not None:
        out["patch_size"] = tuple(out["patch_size"])
    return out


def _stored(config: IDCrafterConfig) -> dict:
    """The IDCrafterConfig as the JSON object kept in the model config: without `wan`, which is the
    model's own Wan config."""
    data = config.to_dict()
    data.pop("wan")
    return data


@contextmanager
def _weightless() -> Iterator[None]:
    """Build modules with their parameters on the meta device (to be assigned real tensors), leaving
    the global RNG as it was: Wan draws some tables with torch.randn before they move to meta, and a
    model built from another's weights must not shift the draws that follow (the adapter's, training's)."""
    with torch.random.fork_rng(devices=[]), init_empty_weights():
        yield


def _share_buffers(src: nn.Module, dst: nn.Module) -> None:
    """Give `dst` the buffers of `src` (same names): models built on the meta device get the real
    non-persistent buffers (Wan's rotary tables), which no state dict carries."""
    for name, buf in src.named_buffers():
        owner, _, attr = name.rpartition(".")
        dst.get_submodule(owner)._buffers[attr] = buf


class IDCrafterTransformer(WanTransformer3DModel):
    """Wan 2.1 DiT with hierarchical identity-preserving attention in its first K blocks.

    Call it like the stock model (`hidden_states` [B, C, F, H, W], `timestep` [B],
    `encoder_hidden_states` [B, L_txt, text_dim], `return_dict`), plus optionally:
        subjects: reference latents [B, N, C, h, w] (or [B, N, C, 1, h, w]);
        subject_mask: [B, N] bool, False for padded subjects (default: all present);
        vlm_states: [B, L_v, vlm_dim] VLM hidden states, vlm_mask [B, L_v];
        subject_stream: a precomputed `encode_subjects(...)` result (reuse across steps);
        attention_capture: a dict that receives the stage-3 ref shares [B, N, L_video] per block.

    `config` is diffusers' (the Wan arguments plus `idcrafter`, `lora`, `vlm_folder`);
    `idcrafter_config` is the IDCrafterConfig, its `wan` this model's Wan config.
    """

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        idcrafter: dict | None = None,
        lora: dict | None = None,
        vlm_folder: str | None = None,
    ):
        """The Wan arguments are `WanTransformer3DModel`'s; `idcrafter`: the IDCrafterConfig as a dict
        without `wan` (None: the defaults); `lora`: a MoELoRAConfig dict of LoRA layers to build on
        the blocks (their weights come with the checkpoint); `vlm_folder`: the VLM the connector was
        trained with."""
        if image_dim is not None or added_kv_proj_dim is not None:
            raise ValueError("IDCrafterTransformer is a Wan 2.1 text-to-video model (no image embedding)")
        super().__init__(
            patch_size=patch_size, num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim,
            in_channels=in_channels, out_channels=out_channels, text_dim=text_dim, freq_dim=freq_dim,
            ffn_dim=ffn_dim, num_layers=num_layers, cross_attn_norm=cross_attn_norm, qk_norm=qk_norm, eps=eps,
            image_dim=image_dim, added_kv_proj_dim=added_kv_proj_dim, rope_max_seq_len=rope_max_seq_len,
            pos_embed_seq_len=pos_embed_seq_len,
        )
        # A stored config without `stage3_projections` predates it (IDCrafterConfig.from_dict); no
        # config at all means today's defaults.
        stored = _stored(IDCrafterConfig()) if idcrafter is None else idcrafter
        config = IDCrafterConfig.from_dict({**stored, "wan": wan_arguments(self.config)})
        self._pending: SubjectStream | None = None
        self._active = False
        self.condition_embedder.register_forward_hook(self._attach_subjects)
        self._install_adapter(config)
        self.lora_config: MoELoRAConfig | None = None
        if lora is not None:
            self._add_lora_layers(MoELoRAConfig.from_dict(lora))

    # ------------------------------------------------------------------ configuration
    @property
    def idcrafter_config(self) -> IDCrafterConfig:
        return self._idcrafter_config

    @idcrafter_config.setter
    def idcrafter_config(self, config: IDCrafterConfig) -> None:
        """Another config for the same adapter (sampling defaults, sizes); one that changes the
        adapter's shape is refused (`replace_adapter` builds a new adapter)."""
        changed = [f for f in ADAPTER_SHAPE_FIELDS if getattr(config, f) != getattr(self._idcrafter_config, f)]
        if changed:
            raise ValueError(f"idcrafter_config: {', '.join(changed)} change the adapter; use replace_adapter")
        self._set_idcrafter_config(config)

    @property
    def wan_config(self) -> dict:
        """The `WanTransformer3DModel` arguments of this model's base."""
        return wan_arguments(self.config)

    @property
    def vlm_folder(self) -> str | None:
        """The VLM folder the connector was trained with; `save_adapter` and `save_pretrained` record
        it so inference and RL find the VLM without being told (`idcrafter.video.infer.check_vlm`)."""
        return self.config.vlm_folder

    @vlm_folder.setter
    def vlm_folder(self, folder: str | None) -> None:
        self.register_to_config(vlm_folder=folder)

    def _install_adapter(self, config: IDCrafterConfig) -> None:
        """Build a fresh adapter for `config` (zero contribution) and route every block's `attn2`
        through it; records `config` in the model config."""
        base = self.config
        self.num_blocks = min(config.num_blocks, base.num_layers)
        heads = base.num_attention_heads
        adapter = IDCrafterAdapter(config, heads * base.attention_head_dim, heads, self.num_blocks)
        if "adapter" in self._modules:  # replacing one: the new adapter follows the base's device and dtype
            adapter.to(device=self.device, dtype=self.dtype)
        self.adapter = adapter
        for layer, block in enumerate(self.blocks):
            stage3 = adapter.cross_modal_attn[layer] if layer < len(adapter.cross_modal_attn) else None
            plain = not config.uses_stage3 and layer < self.num_blocks  # plain, no-cross: subjects as text keys
            block.attn2.set_processor(SubjectCrossAttnProcessor(WanAttnProcessor(), stage3, layer, plain_keys=plain))
        self._set_idcrafter_config(config)

    def _set_idcrafter_config(self, config: IDCrafterConfig) -> None:
        config = dataclasses.replace(config, wan=self.wan_config)
        self.register_to_config(idcrafter=_stored(config))
        self._idcrafter_config = config

    def replace_adapter(self, config: IDCrafterConfig) -> IDCrafterAdapter:
        """A fresh adapter of another kind on the same base (another hierarchy, more subjects, ...).

        Initialised from the global RNG; the base weights and any LoRA layers stay."""
        self._install_adapter(config)
        return self.adapter

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_wan(cls, wan: WanTransformer3DModel, config: IDCrafterConfig | None = None) -> IDCrafterTransformer:
        """The model on the weights of a stock `wan` (shared with it, not copied) with a fresh adapter.

        The one way a stock Wan transformer becomes an IDCrafterTransformer (`from_pretrained` of a
        stock folder comes here). `config` defaults to IDCrafterConfig's defaults; its `wan` is
        replaced by `wan`'s config. The adapter is initialised from the global RNG, on `wan`'s
        device and dtype.
        """
        if type(wan) is not WanTransformer3DModel:
            raise TypeError(f"from_wan takes a stock WanTransformer3DModel, got {type(wan).__name__}")
        base = wan_arguments(wan.config)
        config = config or IDCrafterConfig(wan=base)
        with _weightless():  # the base weights are wan's: no second copy is built
            model = cls(**base, idcrafter=_stored(config))
        missing, unexpected = model.load_state_dict(wan.state_dict(), strict=False, assign=True)
        if unexpected or any(not k.startswith("adapter.") for k in missing):
            raise ValueError(f"from_wan: weights do not fit, missing {missing[:3]}, unexpected {unexpected[:3]}")
        _share_buffers(wan, model)
        del model.adapter  # the meta-device one; a real one takes its place
        model._install_adapter(config)
        model.adapter.to(device=wan.device, dtype=wan.dtype)
        return model.train(wan.training)

    @classmethod
    def from_idcrafter_config(cls, config: IDCrafterConfig, seed: int | None = None) -> IDCrafterTransformer:
        """A randomly initialised model of `config.wan` (tests, toy models, benchmarks).

        The base is drawn before the adapter, as `from_wan(WanTransformer3DModel(**config.wan))`
        draws them."""
        if not config.wan:
            raise ValueError("IDCrafterTransformer.from_idcrafter_config: the config has no `wan` model config")
        if seed is not None:
            torch.manual_seed(seed)
        return cls(**config.wan, idcrafter=_stored(config))

    def to_wan(self) -> WanTransformer3DModel:
        """A stock `WanTransformer3DModel` on this model's base weights (shared, not copied)."""
        if self.lora_config is not None:
            raise ValueError("to_wan: this model has LoRA layers; the stock model has no place for them")
        with _weightless():
            wan = WanTransformer3DModel(**self.wan_config)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("adapter.")}
        wan.load_state_dict(state, strict=True, assign=True)
        _share_buffers(self, wan)
        return wan.train(self.training)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, adapter: str | Path | None = None, **kwargs):
        """diffusers' `from_pretrained` (torch_dtype, variant, subfolder, sharded files, ...) for a
        folder saved by `save_pretrained`; a stock Wan transformer folder goes through `from_wan`.

        `adapter`: an adapter folder (`save_adapter`) whose config and weights replace the folder's
        adapter, or, on a stock folder, join it; an adapter that carries its own fine-tuned
        transformer (`adapter/transformer`) brings the base weights too. Models load from local
        folders only: a hub id or a Hub option (revision=, token=, ...) is a ConfigError.
        """
        what = f"{cls.__name__}.from_pretrained"
        folder = local_model_folder(pretrained_model_name_or_path, what, kwargs)
        config_path = folder / (kwargs.get("subfolder") or "") / "config.json"
        if not config_path.is_file():
            raise FileFormatError(f"{what}: {config_path.parent} has no config.json (not a diffusers model folder)")
        name = json.loads(config_path.read_text()).get("_class_name")
        if name == MODEL_CLASS:
            model = cls._load_own(folder, kwargs)
            if adapter is not None:
                model.replace_adapter(read_adapter_config(adapter)[0])
                model.load_adapter(adapter)
            return model
        if name != "WanTransformer3DModel":
            raise FileFormatError(f"{what}: {config_path} is a {name}, not a Wan transformer")
        # A stock Wan transformer, with or without an adapter folder: the conversion path.
        tuned = adapter is not None and (Path(adapter) / "transformer").is_dir()
        if tuned:  # a full fine-tune: the adapter's own transformer is the base
            folder, kwargs = Path(adapter), {**kwargs, "subfolder": "transformer"}
        wan = WanTransformer3DModel.from_pretrained(folder, **kwargs)
        if adapter is None:
            return cls.from_wan(wan).eval()
        model = cls.from_wan(wan, read_adapter_config(adapter)[0])
        model.load_adapter(adapter, load_base=not tuned)
        return model.eval()

    @classmethod
    def _load_own(cls, folder: Path, kwargs: dict) -> IDCrafterTransformer:
        """diffusers' loading; a checkpoint that leaves weights out (which diffusers would leave
        uninitialised on the meta device) is a FileFormatError."""
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(folder, output_loading_info=True, **kwargs)
        if info["missing_keys"]:
            missing = sorted(info["missing_keys"])
            raise FileFormatError(f"{cls.__name__}.from_pretrained: {folder} lacks weights for {missing[:3]}"
                                  f"{'...' if len(missing) > 3 else ''} ({len(missing)} tensors)")
        return (model, info) if wants_info else model

    # ------------------------------------------------------------------ training
    def add_lora(self, rank: int = 64, alpha: float | None = None, targets=WAN_LORA_TARGETS) -> list[str]:
        """Plain LoRA (B = 0 at first) on the base blocks' attention and FFN projections."""
        config = MoELoRAConfig(rank=rank, alpha=alpha or float(rank), num_experts=1, target_modules=tuple(targets))
        names = self._add_lora_layers(config)
        for module in self.modules():  # new layers follow the base model's device and dtype
            if hasattr(module, "lora_A"):
                module.to(device=self.device, dtype=self.dtype)
        return names

    def _add_lora_layers(self, config: MoELoRAConfig) -> list[str]:
        names = inject_moe_lora(self, config)
        self._set_lora_config(config)
        return names

    def _set_lora_config(self, config: MoELoRAConfig | None) -> None:
        self.lora_config = config
        self.register_to_config(lora=None if config is None else config.to_dict())

    def add_vlm_connector(self, vlm_dim: int) -> VLMConnector:
        """Switch on the VLM encoder for a model built without it (a fresh, trainable connector).

        Training with a VLM starts here from a preset or from an adapter trained without one; an
        adapter that has a connector keeps its own. Initialised from the global RNG.
        """
        if self.adapter.vlm_connector is not None:
            raise ValueError("add_vlm_connector: this model already has a VLM connector")
        dim = self.config.num_attention_heads * self.config.attention_head_dim
        self._set_idcrafter_config(dataclasses.replace(self.idcrafter_config, use_vlm=True, vlm_dim=int(vlm_dim)))
        self.adapter.vlm_connector = VLMConnector(int(vlm_dim), dim).to(device=self.device, dtype=self.dtype)
        return self.adapter.vlm_connector

    def base_parameters(self) -> Iterator[nn.Parameter]:
        """The stock Wan weights: neither the adapter nor LoRA layers."""
        return (p for n, p in self.named_parameters() if not n.startswith("adapter.") and "lora_" not in n)

    def trainable_parameters(self, policy: str) -> list[nn.Parameter]:
        """Set requires_grad for a policy and return the trainable parameters.

        new-modules: the adapter only; new-modules+lora: adapter + LoRA (call add_lora first);
        lora: LoRA only, so disabling it gives back the starting model exactly (RL's reference
        policy); full: adapter + every base weight.
        """
        if policy not in ("new-modules", "new-modules+lora", "lora", "full"):
            raise ValueError(f"unknown trainable policy {policy!r}; use new-modules, new-modules+lora, lora or full")
        if "lora" in policy and self.lora_config is None:
            raise ValueError(f"policy {policy} needs add_lora() first")
        for name, p in self.named_parameters():
            if name.startswith("adapter."):
                p.requires_grad_(policy != "lora")
            elif "lora" in policy:
                p.requires_grad_("lora_" in name)
            else:
                p.requires_grad_(policy == "full")
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ sequence parallelism
    def enable_sequence_parallel(self, sp: SequenceParallel) -> None:
        """Split the video tokens of every forward over `sp`'s group (DeepSpeed-Ulysses on diffusers'
        context-parallel hooks and attention; idcrafter.core.sequence_parallel).

        diffusers' plan for Wan: the rotary tables and the hidden states entering block 0 are split
        along the tokens, `proj_out`'s output is gathered, so the model takes and returns whole
        tensors. Its "" entry (split a per-token timestep [B, L]) is Wan 2.2's; Wan 2.1's timestep
        is [B] and stays whole. Self-attention does the all-to-all; the text cross-attention and
        stage 3 read keys every rank holds whole (text, the subject stream, which the subject tower
        computes replicated); captured IDAR shares are gathered (`SubjectCrossAttnProcessor`).
        The video token count must be divisible by `sp.size`, the heads too.
        """
        heads = self.config.num_attention_heads
        if heads % sp.size:
            raise ConfigError(f"sequence parallel size {sp.size} does not divide the model's {heads} attention heads")
        plan = {k: v for k, v in self._cp_plan.items() if k != ""}
        enable_ulysses(self, sp, plan)

    # ------------------------------------------------------------------ subject stream
    def encode_subjects(
        self,
        subjects: torch.Tensor | None,
        subject_mask: torch.Tensor | None = None,
        vlm_states: torch.Tensor | None = None,
        vlm_mask: torch.Tensor | None = None,
    ) -> SubjectStream:
        """Stages 1-2 and the stage-3 keys/values of every adapted layer, once per generation.

        Independent of the timestep and the noisy latent, so one stream serves every denoising
        step and guidance pass.
        """
        if subjects is None:
            raise ValueError("encode_subjects: no subjects given")
        feats = self.adapter.subject_encoder(subjects)  # [B, N, T, D]
        b, n, t, _ = feats.shape
        if subject_mask is None:
            subject_mask = torch.ones(b, n, dtype=torch.bool, device=feats.device)
        if subject_mask.shape != (b, n):
            raise ValueError(f"subject_mask must be [B, N] = [{b}, {n}], got {tuple(subject_mask.shape)}")
        subject_mask = subject_mask.bool()
        vlm = None
        if vlm_states is not None:
            if self.adapter.vlm_connector is None:
                raise ValueError("vlm_states given but this model was built without the VLM (use_vlm=False)")
            vlm = self.adapter.vlm_connector(vlm_states.to(self.dtype), vlm_mask)
        ranges = [(k * t, (k + 1) * t) for k in range(n)]
        config = self.idcrafter_config
        if config.uses_tower:
            per_layer = self.adapter.subject_tower(feats, subject_mask)
        else:  # stage3 and plain ablations: every layer reads the encoded references
            per_layer = [feats] * self.num_blocks
        if not config.uses_stage3:  # plain, no-cross: the tokens themselves become extra text keys
            keep = subject_mask.repeat_interleave(t, dim=1)
            tokens = [LayerKV(f.flatten(1, 2), None, keep) for f in per_layer]
            return SubjectStream(kv=tokens, ref_ranges=ranges, subject_mask=subject_mask)
        kv = [attn.kv(f, subject_mask, vlm, vlm_mask) for attn, f in zip(self.adapter.cross_modal_attn, per_layer)]
        return SubjectStream(kv=kv, ref_ranges=ranges, subject_mask=subject_mask)

    def _attach_subjects(self, module, args, output):
        if not self._active:
            return output
        temb, timestep_proj, text, image = output
        return temb, timestep_proj, SubjectContext(text=text, stream=self._pending), image

    @contextmanager
    def _subjects_active(self, stream: SubjectStream | None) -> Iterator[None]:
        self._pending, self._active = stream, True
        try:
            yield
        finally:
            self._pending, self._active = None, False

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict | None = None,
        *,
        subjects: torch.Tensor | None = None,
        subject_mask: torch.Tensor | None = None,
        vlm_states: torch.Tensor | None = None,
        vlm_mask: torch.Tensor | None = None,
        subject_stream: SubjectStream | None = None,
        attention_capture: dict | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        if subject_stream is None and (subjects is not None or vlm_states is not None):
            if subjects is None:
                raise ValueError("vlm_states need subjects: the VLM tokens sit beside the subject tokens")
            subject_stream = self.encode_subjects(subjects, subject_mask, vlm_states, vlm_mask)
        # by keyword: diffusers' apply_lora_scale reads attention_kwargs (LoRA "scale") from the keywords only
        base = functools.partial(super().forward, hidden_states, timestep, encoder_hidden_states,
                                 encoder_hidden_states_image, return_dict=return_dict, attention_kwargs=attention_kwargs)
        if subject_stream is None:
            return base()
        if subject_stream.batch_size != hidden_states.shape[0]:
            raise ValueError(
                f"subject stream has batch {subject_stream.batch_size}, hidden_states {hidden_states.shape[0]}"
            )
        if attention_capture is not None:
            subject_stream = SubjectStream(subject_stream.kv, subject_stream.ref_ranges, subject_stream.subject_mask,
                                           attention_capture)
        with self._subjects_active(subject_stream):
            return base()

    # ------------------------------------------------------------------ adapter files
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous() for k, v in self.adapter.state_dict().items()}

    def _base_signature(self) -> dict:
        return base_signature(self.config)

    def save_adapter(
        self, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None, include_base: bool = False
    ) -> Path:
        """Write the adapter alone (safetensors + config) atomically: the training export, loadable
        onto a stock Wan base with `from_pretrained(base, adapter=folder)` or `load_adapter`.

        Base weights are not included unless `include_base` (after full fine-tuning): then the
        base is saved as a stock diffusers transformer under `folder/transformer`, and loading the
        adapter onto any base uses it in place of the base's transformer. A model with the VLM
        encoder records the VLM folder it was trained with (`vlm_folder`, an absolute path).
        """
        folder = Path(folder)
        state = state_dict if state_dict is not None else self.adapter_state_dict()
        config = self.idcrafter_config
        with atomic_write_dir(folder) as tmp:
            save_file({k: v.cpu() for k, v in state.items()}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            meta = {"config": config.to_dict(), "base": self._base_signature(), "num_blocks": self.num_blocks}
            if config.use_vlm and self.vlm_folder:
                meta["vlm_folder"] = self.vlm_folder
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2))
            if self.lora_config is not None:
                save_moe_lora(self, tmp / LORA_SUBFOLDER, self.lora_config)
            if include_base:
                if self.lora_config is not None:
                    raise ValueError("include_base with LoRA layers: save the merged base separately")
                self.to_wan().save_pretrained(tmp / "transformer")
        return folder

    read_adapter_config = staticmethod(read_adapter_config)

    def load_adapter(self, folder: str | Path, load_base: bool = True) -> None:
        """Load adapter weights saved by `save_adapter`; a mismatch with the base model fails clearly.

        The adapter's stage-3 form (`stage3_projections`) replaces this model's when they differ.

        `load_base`: take the adapter's fine-tuned transformer (`folder/transformer`) when it has one.
        """
        folder = Path(folder)
        trained, meta = self.read_adapter_config(folder)
        check_adapter_fits(meta, self.config, folder)
        if trained.stage3_projections != self.idcrafter_config.stage3_projections and trained.uses_stage3:
            # An adapter of the other stage-3 form (one saved before the option existed is "own"):
            # this model takes its form, so a preset's model loads it as it was trained.
            self.replace_adapter(dataclasses.replace(self.idcrafter_config, stage3_projections=trained.stage3_projections))
        if trained.use_vlm and self.adapter.vlm_connector is None:
            # An adapter trained with the VLM encoder brings its connector, also onto a model built
            # from a preset without one (the built-in tiny model of scripts/infer.py).
            self.add_vlm_connector(trained.vlm_dim)
        if load_base and (folder / "transformer").is_dir():  # fully fine-tuned: the base weights travel along
            tuned = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=self.dtype)
            self._load_base_state(tuned.state_dict(), folder / "transformer")
        state = load_file(str(folder / ADAPTER_WEIGHTS))
        expected = self.adapter.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise FileFormatError(
                f"adapter {folder} does not match this model: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
            )
        for key, tensor in state.items():
            if tensor.shape != expected[key].shape:
                raise FileFormatError(
                    f"adapter {folder}: {key} has shape {list(tensor.shape)} in the file but {list(expected[key].shape)} in the model"
                )
        self.adapter.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
        recorded = meta.get("vlm_folder")
        self.vlm_folder = recorded if self.idcrafter_config.use_vlm and isinstance(recorded, str) else None
        if (folder / LORA_SUBFOLDER).is_dir():
            self._set_lora_config(load_moe_lora(self, folder / LORA_SUBFOLDER))

    def _load_base_state(self, state: dict[str, torch.Tensor], source: Path) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("adapter.")]
        if missing or unexpected:
            raise FileFormatError(f"{source}: the transformer does not fit this model (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]})")
