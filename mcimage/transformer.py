"""MultiCrafter / One-for-All transformer: diffusers' `FluxTransformer2DModel` with reference
tokens appended as clean context, method-specific position ids, our attention processors (DAM,
IDAR share capture) and an optional (MoE-)LoRA adapter.

`MCImageTransformer` subclasses the stock model; the stock forward is not copied: ours builds the
joint image sequence [target; refs], its `img_ids` / `txt_ids` (`idcrafter.core.positions`) and a
`TokenLayout`, calls `FluxTransformer2DModel.forward`, and keeps the target tokens' output. FLUX
concatenates [text; image] inside its blocks, so the attention sees [text; target; refs], the
layout `install_processors` expects.

    cfg = MCImageConfig.from_preset("tiny-one-for-all")
    model = MCImageTransformer.from_mc_config(cfg, seed=0)
    v = model(x_t, refs, text, pooled, t, guidance, target_hw=(8, 8), ref_hws=[(4, 4)] * 2,
              categories=["face", "upper"], descriptor_tokens={"face": [2, 3]})   # [B, L_t, C]
    model.save_pretrained("out/transformer")            # one diffusers folder, adapter included
    model = MCImageTransformer.from_pretrained("out/transformer", torch_dtype=torch.bfloat16)

Timestep of the references: in this first version the reference tokens go through the same
AdaLN modulation as the target (FLUX modulates the whole image stream with one timestep
embedding), although they are clean latents. This is what FLUX.1-Kontext does with its
context image; a separate t = 0 modulation for references would need a copied block forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.configuration_utils import register_to_config

# diffusers' pipeline loader finds how to load a component named ["mcimage.transformer",
# "MCImageTransformer"] by looking its base classes up by name in this module
# (`get_class_obj_and_candidates`), so ModelMixin must be importable from here.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
from safetensors.torch import load_file, save_file
from torch import nn

from idcrafter.core.layout import TokenLayout
from idcrafter.core.moe_lora import (
    DIFFUSERS_LORA_WEIGHTS_NAME,
    inject_moe_lora,
    save_diffusers_lora,
)
from idcrafter.core.positions import (
    canonical_category,
    category_index,
    category_time_ids,
    condition_ids,
    target_ids,
    text_ids,
    uno_diagonal_ids,
)
from idcrafter.flow.matching import velocity_from_sample
from idcrafter.utils.errors import FileFormatError
from idcrafter.utils.io import atomic_write
from mcimage.config import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_FORMAT,
    ADAPTER_FORMAT_VERSION,
    ADAPTER_SUBFOLDER,
    MODEL_CONFIG_FIELD,
    MCImageConfig,
    check_adapter_fits,
    check_categories,
    read_adapter_config,
)
from mcimage.processors import MCFluxAttnProcessor, capture_ref_shares, install_processors

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "MCImageSequence",
    "MCImageTransformer",
    "build_sequence",
    "pack_latents",
    "resolve_model_path",
    "unpack_latents",
]

ADAPTER_WEIGHTS_NAME = "mcimage_adapter.safetensors"
_POLICIES = ("adapter", "lora", "dam", "all", "none")


# --------------------------------------------------------------------------------------------
# Latent packing (2x2 patches), via diffusers' FluxPipeline static methods


def pack_latents(latents: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """VAE latents [B, C, H, W] -> packed tokens [B, (H/2)*(W/2), 4C] and their grid (H/2, W/2)."""
    from diffusers import FluxPipeline  # pulls in transformers; only when packing is used

    if latents.ndim != 4:
        raise ValueError(f"pack_latents: expected [B, C, H, W], got shape {tuple(latents.shape)}")
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"pack_latents: latent height and width must be even for 2x2 packing, got {h}x{w}")
    return FluxPipeline._pack_latents(latents, b, c, h, w), (h // 2, w // 2)


def unpack_latents(tokens: torch.Tensor, grid_hw: Sequence[int]) -> torch.Tensor:
    """Inverse of `pack_latents`: [B, h*w, 4C] on grid (h, w) -> [B, C, 2h, 2w]."""
    from diffusers import FluxPipeline

    h, w = (int(v) for v in grid_hw)
    if tokens.ndim != 3 or tokens.shape[1] != h * w or tokens.shape[2] % 4:
        raise ValueError(f"unpack_latents: tokens {tuple(tokens.shape)} do not fit grid {(h, w)} with 4C channels")
    # vae_scale_factor=1: the pipeline's pixel size is then the latent size 2h x 2w.
    return FluxPipeline._unpack_latents(tokens, 2 * h, 2 * w, 1)


# --------------------------------------------------------------------------------------------
# Sequence assembly: ids and layout (pure)


@dataclass(frozen=True)
class MCImageSequence:
    """What one forward feeds the stock model besides the activations.

    img_ids: [L_t + sum L_r, 3] rows (t, h, w) of [target; refs]; txt_ids: [L_txt, 3];
    layout: the joint [text; target; refs] sequence; categories: canonical category per
    reference (None for UNO ids without categories).
    """

    img_ids: torch.Tensor
    txt_ids: torch.Tensor
    layout: TokenLayout
    categories: tuple[str, ...] | None


def _grid_of(length: int, hw: Sequence[int] | None, what: str) -> tuple[int, int]:
    if hw is None:
        side = math.isqrt(length)
        if side * side != length:
            raise ValueError(f"{what}: {length} tokens are not a square grid; pass its (h, w)")
        return side, side
    h, w = (int(v) for v in hw)
    if h * w != length:
        raise ValueError(f"{what}: grid {(h, w)} has {h * w} tokens, the tensor has {length}")
    return h, w


def build_sequence(
    config: MCImageConfig,
    target_len: int,
    ref_lens: Sequence[int],
    text_len: int,
    target_hw: Sequence[int] | None = None,
    ref_hws: Sequence[Sequence[int]] | None = None,
    categories: Sequence[str] | None = None,
    descriptor_tokens: Mapping[str, Sequence[int]] | None = None,
) -> MCImageSequence:
    """Position ids and token layout for a target, N references and a prompt.

    Args:
        target_len, ref_lens, text_len: token counts of the packed target, each reference and
            the text. Grids default to squares when `target_hw` / `ref_hws` are None.
        categories: one category (name or alias) per reference. Required for condition ids
            (One-for-All: one reference per category); optional with UNO ids.
        descriptor_tokens: {category: text token indices} of item descriptors (from
            `tokenize_with_descriptors`); placed by CCPA, so `config.ccpa` must be on.

    Raises:
        ValueError: more references than `config.max_subjects` or than categories, unknown or
            repeated categories, descriptors without CCPA or naming a category with no reference.
    """
    n = len(ref_lens)
    if n > config.max_subjects:
        raise ValueError(f"{n} references but config.max_subjects is {config.max_subjects}")
    target_hw = _grid_of(target_len, target_hw, "target")
    if ref_hws is not None and len(ref_hws) != n:
        raise ValueError(f"ref_hws has {len(ref_hws)} entries for {n} references")
    hws = [_grid_of(length, None if ref_hws is None else ref_hws[k], f"reference {k}") for k, length in enumerate(ref_lens)]

    cats = check_categories(config, n, categories)

    base_offset = target_hw if config.condition_base_offset else None
    if config.position_ids == "condition":
        refs = [condition_ids(c, hw, base_offset=base_offset) for c, hw in zip(cats or (), hws)]
    elif config.position_ids == "temporal":  # One-for-All Var. 2: u = (c, 0, 0)
        refs = [category_time_ids(c, hw) for c, hw in zip(cats or (), hws)]
    elif config.position_ids == "index":  # One-for-All Var. 1: u = (0, 0, 0), categories by embedding
        refs = [target_ids(*hw) for hw in hws]
    else:
        refs = uno_diagonal_ids(target_hw, hws)
    img_ids = torch.cat([target_ids(*target_hw), *refs], dim=0)

    descriptors: list[tuple[int, ...]] = [() for _ in range(n)]
    if descriptor_tokens:
        if not config.ccpa:
            raise ValueError("descriptor_tokens given but config.ccpa is off; item descriptors are placed by CCPA")
        owners = {c: k for k, c in enumerate(cats or ())}
        for name, indices in descriptor_tokens.items():
            category = canonical_category(name)
            if category not in owners:
                have = ", ".join(cats) if cats else "none"
                raise ValueError(
                    f"descriptor markup names category {category!r} but no reference has that category "
                    f"(reference categories: {have})"
                )
            descriptors[owners[category]] = tuple(int(i) for i in indices)
        txt = text_ids(text_len, descriptor_tokens, ref_hws=dict(zip(cats, hws)), base_offset=base_offset)
    else:
        txt = torch.zeros(text_len, 3)

    layout = TokenLayout.concat(
        text_len=text_len,
        target_len=target_len,
        ref_lens=list(ref_lens),
        descriptors=descriptors if n else (),
        target_grid=target_hw,
    )
    return MCImageSequence(img_ids=img_ids, txt_ids=txt, layout=layout, categories=cats)


# --------------------------------------------------------------------------------------------
# Model folders: where a name points


def resolve_model_path(name: str | os.PathLike, what: str = "model") -> Path:
    """A local folder, or a Hugging Face id already in the local cache (resolved without network).

    Raises FileFormatError (one line) for anything else: mcimage never downloads a model behind a
    user's back, and an id that is not cached cannot load offline.
    """
    path = Path(name)
    if path.is_dir():
        return path
    text = str(name)
    hub_like = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.exists()
    if hub_like:
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(text, local_files_only=True))
        except Exception:  # not cached, or not a valid id: huggingface_hub raises several types
            pass
    raise FileFormatError(
        f"{what} {text}: not a local folder"
        + (" nor a Hugging Face model in the local cache (nothing is downloaded; run `hf download "
           f"{text}` first, or pass a folder)" if hub_like else "")
    )


def _flux_arch(model_config: Mapping) -> dict:
    """The FluxTransformer2DModel arguments of a diffusers config (mcimage's field and private keys out)."""
    names = list(inspect.signature(FluxTransformer2DModel.__init__).parameters)[1:]
    return {k: model_config[k] for k in names if k in model_config}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable model config ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


# --------------------------------------------------------------------------------------------
# The model


class MCImageTransformer(FluxTransformer2DModel):
    """`FluxTransformer2DModel` with references as context tokens, DAM / IDAR processors and an adapter.

    A diffusers model: FLUX's blocks are its own, so diffusers' hooks (`enable_cache`,
    `set_attention_backend`, layerwise casting, group / CPU offload, gradient checkpointing) apply,
    and `save_pretrained` / `from_pretrained` (torch_dtype, variant, subfolder, max_shard_size)
    write and read one folder holding base and added weights. Its diffusers config holds FLUX's
    arguments plus the `MCImageConfig` (field "mcimage"), read back as `mc_config`
    (docs/design.md 5). Every module it adds starts at zero contribution, so a fresh model equals the
    base FLUX.

    Build with `from_mc_config(config, seed)` (random weights), `from_flux(flux, config)` (around a
    stock model's weights) or `from_pretrained(folder)`, which also reads the older layout: a stock
    FLUX transformer folder with an `mcimage_adapter/` next to it (see `from_pretrained`).
    """

    # FLUX's context-parallel plan splits `hidden_states` / `img_ids` arguments this forward does not
    # take (it builds [target; refs] and their ids itself), and its tensor-parallel plan names the
    # nn.Linear layers MoE-LoRA wraps: neither applies.
    _cp_plan = None
    _tp_plan = None
    # MoE-LoRA keeps its parameters in float32 whatever the base dtype (see MoELoRALinear): diffusers'
    # loader then reads them as float32 under any `torch_dtype` (matched by parameter name part).
    _keep_in_fp32_modules = ["lora_A", "lora_B", "lora_router"]

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        out_channels: int | None = None,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        mcimage: dict | None = None,
    ):
        """FLUX's arguments (diffusers' `FluxTransformer2DModel`) and `mcimage`, an
        `MCImageConfig.to_model_dict()` (None: `MCImageConfig()`, nothing added but the processors)."""
        super().__init__(
            patch_size=patch_size, in_channels=in_channels, out_channels=out_channels, num_layers=num_layers,
            num_single_layers=num_single_layers, attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads, joint_attention_dim=joint_attention_dim,
            pooled_projection_dim=pooled_projection_dim, guidance_embeds=guidance_embeds, axes_dims_rope=axes_dims_rope,
        )
        self._attach(MCImageConfig.from_model_config(dict(self.config)))

    def _attach(self, config: MCImageConfig) -> None:
        """Install the processors, inject the adapter and add the category embedding of `config`."""
        self._mc_config = config
        # Plain dict: the processors are already submodules of the attention layers.
        self.processors: dict[str, MCFluxAttnProcessor] = install_processors(
            self,
            dam=config.dam,
            dam_per_head=config.dam_per_head,
            dam_blocks=config.dam_blocks,
            capture_blocks=config.capture_blocks,
        )
        adapter = config.adapter_config()
        self.adapter_modules: list[str] = inject_moe_lora(self, adapter) if adapter is not None else []
        # One-for-All's Var. 1: the references share the target's positions and are told apart by a
        # learned vector per category added to their (packed latent) tokens; x_embedder is linear, so
        # this is an index embedding of the hidden states too. Zero at initialisation.
        self.category_embedding = None
        if config.position_ids == "index":
            from idcrafter.core.categories import CATEGORY_IDS

            weight = self.x_embedder.weight
            rows = max(CATEGORY_IDS.values()) + 1
            self.category_embedding = nn.Parameter(
                torch.zeros(rows, self.config.in_channels, device=weight.device, dtype=weight.dtype)
            )

    def _register_mc_config(self, config: MCImageConfig) -> None:
        """Make `config` the model's, in its diffusers config too. diffusers' `from_config` drops the
        fields `_use_default_values` lists, so the field leaves that list once it is set."""
        self._mc_config = config
        defaults = [k for k in self.config.get("_use_default_values", []) if k != MODEL_CONFIG_FIELD]
        self.register_to_config(**{MODEL_CONFIG_FIELD: config.to_model_dict(), "_use_default_values": defaults})

    @property
    def mc_config(self) -> MCImageConfig:
        """The MCImageConfig (diffusers' `.config` is the model's config dict)."""
        return self._mc_config

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_mc_config(cls, config: MCImageConfig, seed: int = 0) -> MCImageTransformer:
        """Random base weights of architecture `config.flux` and fresh adapters, reproducible from `seed`."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(**config.flux, mcimage=config.to_model_dict())

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' `from_config` (a config dict). An MCImageConfig goes to `from_mc_config`."""
        if isinstance(config, MCImageConfig):
            raise TypeError("MCImageTransformer.from_config takes a diffusers config dict; build from an "
                            "MCImageConfig with MCImageTransformer.from_mc_config(config, seed)")
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def from_flux(cls, flux: FluxTransformer2DModel, config: MCImageConfig) -> MCImageTransformer:
        """A model around a stock FLUX: its weights (shared, not copied) plus fresh modules of `config`.

        The architecture is `flux`'s (`config.flux` is replaced). `flux` itself is left as it was.
        """
        if isinstance(flux, MCImageTransformer) or not isinstance(flux, FluxTransformer2DModel):
            raise TypeError(f"from_flux takes a stock FluxTransformer2DModel, got {type(flux).__name__}")
        arch = _flux_arch(flux.config)
        with torch.device("meta"):  # a skeleton with FLUX's modules only: MCImageConfig() adds no weights
            model = cls(**arch)
        model.load_state_dict(flux.state_dict(), strict=True, assign=True)
        left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
        if left:
            raise RuntimeError(f"from_flux: {left[:3]} not set by the stock model's state dict")
        config = dataclasses.replace(config, flux=MCImageConfig.from_model_config(arch).flux)
        model._attach(config)
        model._register_mc_config(config)
        return model.train(flux.training)

    def to_flux(self) -> FluxTransformer2DModel:
        """The stock FLUX under the additions: same base weights (shared), no adapter, stock processors."""
        with torch.device("meta"):
            flux = FluxTransformer2DModel(**_flux_arch(self.config))
        flux.load_state_dict(self.base_state_dict(), strict=True, assign=True)
        return flux.train(self.training)

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The stock FLUX state dict: added weights out, wrapped layers under their stock names."""
        added = set(self._added_parameters("adapter"))
        return {
            key.replace(".base_layer.", "."): value
            for key, value in self.state_dict().items()
            if key not in added and ".processor." not in key
        }

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        adapter: str | os.PathLike | None = None,
        mc_config: MCImageConfig | None = None,
        **kwargs,
    ) -> MCImageTransformer:
        """diffusers' `from_pretrained` (torch_dtype, variant, subfolder, ...) for folders this class
        saved, and the conversion of the older layout.

        The older layout is a stock `FluxTransformer2DModel` folder (FLUX.1-dev's, or a model
        folder's transformer/) plus an adapter folder written by `save_adapter`: `adapter`, else
        `mcimage_adapter/` next to the transformer folder when it exists. The adapter's config
        wins; without one, `mc_config` (default `MCImageConfig()`) says which fresh modules to add.
        A folder of this class carries its own config (`mc_config` is not used); giving `adapter`
        with it replaces its adapter by that one.

        Raises:
            FileFormatError: not a local folder (or cached Hugging Face id).
            ConfigError: an adapter trained on another FLUX architecture.
            FileNotFoundError: `adapter` does not exist.
            ValueError: an unreadable adapter config or weights that do not fit.
        """
        folder = resolve_model_path(pretrained_model_name_or_path)
        subfolder = kwargs.get("subfolder") or ""
        model_config = _read_json(folder / subfolder / cls.config_name)
        ours = model_config.get("_class_name") == cls.__name__
        if not ours and adapter is None:
            sibling = (folder / subfolder).resolve().parent / ADAPTER_SUBFOLDER
            adapter = sibling if (sibling / ADAPTER_CONFIG_NAME).is_file() else None
        loaded = (super() if ours else FluxTransformer2DModel).from_pretrained(folder, **kwargs)
        model, info = loaded if isinstance(loaded, tuple) else (loaded, None)  # output_loading_info=True
        if not ours or adapter is not None:
            model = cls._convert(model.to_flux() if ours else model, adapter, mc_config, folder / subfolder)
        return model if info is None else (model, info)

    @classmethod
    def _convert(
        cls, flux: FluxTransformer2DModel, adapter: str | os.PathLike | None, config: MCImageConfig | None, where: Path
    ) -> MCImageTransformer:
        """The one conversion of the older layout: stock FLUX weights + an adapter folder (or a config)."""
        if adapter is not None:
            adapter = Path(adapter)
            if not adapter.is_dir():
                raise FileNotFoundError(f"{adapter}: mcimage adapter folder not found")
            try:
                config = read_adapter_config(adapter)
            except (ValueError, TypeError, KeyError, OSError) as err:  # JSONDecodeError is a ValueError
                raise ValueError(f"{adapter}: broken mcimage adapter config ({str(err).splitlines()[0]})") from None
            # An adapter trained on another architecture fails to load anyway; say why up front.
            check_adapter_fits(config, dict(flux.config), adapter, where)
        model = cls.from_flux(flux, config if config is not None else MCImageConfig())
        if adapter is not None:
            try:
                model.load_adapter(adapter)
            except ValueError:
                raise  # already names the file and the mismatch
            except Exception as err:  # safetensors reports a corrupt file with its own error type
                raise ValueError(f"{adapter}: broken mcimage adapter weights ({type(err).__name__}: {err})") from None
        return model.eval()

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def _split_refs(ref_latents, hidden_states: torch.Tensor) -> list[torch.Tensor]:
        if ref_latents is None:
            return []
        if isinstance(ref_latents, torch.Tensor):
            if ref_latents.ndim != 4:
                raise ValueError(f"ref_latents tensor must be [B, N, L_r, C], got shape {tuple(ref_latents.shape)}")
            refs = list(ref_latents.unbind(1))
        else:
            refs = list(ref_latents)
        b, _, c = hidden_states.shape
        for k, r in enumerate(refs):
            if r.ndim != 3 or r.shape[0] != b or r.shape[2] != c:
                raise ValueError(
                    f"reference {k} has shape {tuple(r.shape)}; expected [B={b}, L_r, C={c}] packed tokens"
                )
        return [r.to(hidden_states.dtype) for r in refs]

    def prepare(
        self,
        hidden_states: torch.Tensor,
        ref_latents,
        encoder_hidden_states: torch.Tensor,
        target_hw: Sequence[int] | None = None,
        ref_hws: Sequence[Sequence[int]] | None = None,
        categories: Sequence[str] | None = None,
        descriptor_tokens: Mapping[str, Sequence[int]] | None = None,
    ) -> MCImageSequence:
        """The ids and layout `forward` would use for these inputs (for losses and tests)."""
        refs = self._split_refs(ref_latents, hidden_states)
        return build_sequence(
            self.mc_config,
            target_len=hidden_states.shape[1],
            ref_lens=[r.shape[1] for r in refs],
            text_len=encoder_hidden_states.shape[1],
            target_hw=target_hw,
            ref_hws=ref_hws,
            categories=categories,
            descriptor_tokens=descriptor_tokens,
        )

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        ref_latents: torch.Tensor | Sequence[torch.Tensor] | None,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        guidance: torch.Tensor | None = None,
        *,
        target_hw: Sequence[int] | None = None,
        ref_hws: Sequence[Sequence[int]] | None = None,
        categories: Sequence[str] | None = None,
        descriptor_tokens: Mapping[str, Sequence[int]] | None = None,
        attention_capture: dict[str, torch.Tensor] | None = None,
        joint_attention_kwargs: dict | None = None,
    ) -> torch.Tensor:
        """Predict the target tokens' velocity.

        Args:
            hidden_states: [B, L_t, C] packed noisy target latents on grid `target_hw`.
            ref_latents: [B, N, L_r, C] or a list of N [B, L_r_k, C] packed clean references
                (grids `ref_hws`), or None. Appended after the target; their outputs are dropped.
            encoder_hidden_states: [B, L_txt, D_txt] T5 states; pooled_projections: [B, D_pool].
            timestep: [B] in [0, 1] (FLUX scales by 1000 inside), shared by the references.
            guidance: [B] distilled guidance scale (guidance-embedding models), else None.
            categories, descriptor_tokens: see `build_sequence`.
            attention_capture: a dict that, when given, receives {block name: share [B, N, L_t]}
                from the IDAR layers (needs config.idar and at least one reference).

        Returns:
            [B, L_t, C_out] velocity of the target tokens (with config.prediction "sample" the
            model's clean-latent output x0 is returned as (x_t - x0) / t).
        """
        refs = self._split_refs(ref_latents, hidden_states)
        seq = self.prepare(
            hidden_states, refs, encoder_hidden_states, target_hw, ref_hws, categories, descriptor_tokens
        )
        if attention_capture is not None and not refs:
            raise ValueError("attention_capture needs at least one reference (shares are over reference tokens)")
        device = hidden_states.device
        if self.category_embedding is not None and refs:
            refs = [r + self.category_embedding[category_index(c)].to(r.dtype) for r, c in zip(refs, seq.categories)]
        x = torch.cat([hidden_states, *refs], dim=1) if refs else hidden_states
        capture = (
            capture_ref_shares(self, seq.layout, chunk_size=self.mc_config.share_chunk_size)
            if attention_capture is not None
            else contextlib.nullcontext()
        )
        with capture as cap:
            if cap is not None:  # also handed to the processors as an argument: see MCFluxAttnProcessor
                joint_attention_kwargs = {**(joint_attention_kwargs or {}), "share_capture": cap}
            out = super().forward(
                hidden_states=x,
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled_projections,
                timestep=timestep,
                img_ids=seq.img_ids.to(device),
                txt_ids=seq.txt_ids.to(device),
                guidance=guidance,
                joint_attention_kwargs=joint_attention_kwargs,
                return_dict=False,
            )[0]
        if attention_capture is not None:
            attention_capture.update(cap.shares)
        out = out[:, : hidden_states.shape[1]]
        if self.mc_config.prediction == "sample":  # the model predicts the clean latent
            # In float32: under bf16 a rounded t would not be the t the sampler steps with.
            v = velocity_from_sample(hidden_states.float(), out.float(), timestep.float())
            out = v.to(hidden_states.dtype)
        return out

    # ------------------------------------------------------------------ capture
    CAPTURE_FIELDS = ("idar", "idar_blocks", "idar_lambda", "share_chunk_size")

    def set_capture_config(self, config: MCImageConfig) -> None:
        """Adopt `config`, which may differ from the current one only in IDAR capture settings
        (no weights depend on them), and set each processor's capture flag accordingly."""
        import dataclasses

        changed = [f.name for f in dataclasses.fields(config)
                   if getattr(config, f.name) != getattr(self.mc_config, f.name) and f.name not in self.CAPTURE_FIELDS]
        if changed:
            raise ValueError(f"set_capture_config: {changed} change the model's weights or ids; build a new model")
        spec = config.capture_blocks
        if not isinstance(spec, str):
            unknown = sorted(set(spec) - set(self.processors))
            if unknown:
                raise ValueError(f"set_capture_config: unknown block names {unknown[:5]}; blocks are named like "
                                 "'transformer_blocks.0' and 'single_transformer_blocks.0'")
        for name, proc in self.processors.items():
            double = name.startswith("transformer_blocks.")
            proc.capture = (spec in ("all", "double") and double) or (spec in ("all", "single") and not double) \
                if isinstance(spec, str) else name in set(spec)
        self._register_mc_config(config)

    # ------------------------------------------------------------------ parameters
    def _added_parameters(self, kind: str) -> dict[str, nn.Parameter]:
        """Parameters mcimage added to FLUX by kind: "lora", "dam" or "adapter" (both, and the
        `category_embedding` of One-for-All's Var. 1), named as in `named_parameters()`."""
        out = {}
        for name, p in self.named_parameters():
            is_lora = ".lora_" in name
            is_dam = ".processor.temperature." in name
            is_category = name == "category_embedding"
            if (kind in ("lora", "adapter") and is_lora) or (kind in ("dam", "adapter") and is_dam) \
                    or (kind == "adapter" and is_category):
                out[name] = p
        return out

    def trainable_parameters(self, policy: str = "adapter") -> dict[str, nn.Parameter]:
        """Select what trains and freeze the rest: {name: parameter} of the trainable set.

        policy: "adapter" (LoRA / MoE-LoRA and DAM: everything mcimage added), "lora", "dam",
            "all" (full fine-tuning) or "none". Sets `requires_grad` on the whole model.
        """
        if policy not in _POLICIES:
            raise ValueError(f"trainable_parameters: unknown policy {policy!r}; use one of {_POLICIES}")
        if policy == "all":
            selected = dict(self.named_parameters())
        elif policy == "none":
            selected = {}
        else:
            selected = self._added_parameters(policy)
            if not selected:
                raise ValueError(
                    f"trainable_parameters: policy {policy!r} selects nothing "
                    f"(adapter={self.mc_config.adapter!r}, dam={self.mc_config.dam})"
                )
        self.requires_grad_(False)
        for p in selected.values():
            p.requires_grad_(True)
        return selected

    # ------------------------------------------------------------------ adapter IO
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self._added_parameters("adapter").items()}

    def save_adapter(
        self, folder: str | os.PathLike, merged_routing: Sequence[float] | Mapping[str, Sequence[float]] | None = None
    ) -> Path:
        """Write the added weights (safetensors) and the config (JSON, written last) to `folder`.

        A plain LoRA (adapter "lora", E = 1) is also written as `pytorch_lora_weights.safetensors`,
        diffusers' LoRA format: `FluxPipeline.load_lora_weights(folder)` on a stock FLUX then equals
        this model without references and DAM. A MoE-LoRA gets that file only with `merged_routing`:
        its experts merged at those gate values (E numbers, or {layer: E numbers}; e.g. a routing
        mean from `mcimage.analysis`), an approximation of the token-dependent routing
        (`idcrafter.core.moe_lora.merged_expert_lora`).
        """
        # A model without added weights (adapter "none", DAM off) still saves its config: the
        # position ids and IDAR settings are part of the model.
        config = self.mc_config
        if merged_routing is not None and config.adapter != "moe_lora":
            raise ValueError(f"merged_routing merges MoE-LoRA experts; this model's adapter is {config.adapter!r}")
        tensors = {k: v.contiguous().cpu() for k, v in self.adapter_state_dict().items()}
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(folder / ADAPTER_WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        diffusers_file = folder / DIFFUSERS_LORA_WEIGHTS_NAME
        if config.adapter == "lora" or merged_routing is not None:
            save_diffusers_lora(self, diffusers_file, routing=merged_routing)
        else:
            diffusers_file.unlink(missing_ok=True)  # a stale file would not be this adapter
        payload = {"format": ADAPTER_FORMAT, "version": ADAPTER_FORMAT_VERSION, "config": config.to_dict()}
        with atomic_write(folder / ADAPTER_CONFIG_NAME) as tmp:
            tmp.write_text(json.dumps(payload, indent=2) + "\n")
        return folder

    read_adapter_config = staticmethod(read_adapter_config)

    def load_adapter(self, folder: str | os.PathLike) -> None:
        """Load weights written by `save_adapter`; names and shapes must match exactly."""
        path = Path(folder) / ADAPTER_WEIGHTS_NAME
        if not path.is_file():
            raise FileFormatError(f"{path}: adapter weights not found")
        tensors = load_file(str(path))
        params = self._added_parameters("adapter")
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        if missing or unexpected:
            raise FileFormatError(
                f"{path}: adapter does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for name, p in params.items():
            if tensors[name].shape != p.shape:
                raise FileFormatError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, model has {tuple(p.shape)}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name].to(device=p.device, dtype=p.dtype))

    @classmethod
    def from_flux_and_adapter(cls, flux: FluxTransformer2DModel, folder: str | os.PathLike) -> MCImageTransformer:
        """`flux`'s weights with the config and weights saved in `folder` (the older layout's parts)."""
        return cls._convert(flux, folder, None, Path(folder))
