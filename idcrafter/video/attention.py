"""Hierarchical identity-preserving attention (ID-Crafter, docs/design.md 4).

1. intra-subject:        F_k <- F_k + SelfAttn(norm(F_k)), each subject on its own
2. gated inter-subject:  F_k <- F_k + (W_g F_k) * CrossAttn(Q = F_k, KV = {F_j, j != k})
3. cross-modal:          Z   <- Z + CrossAttn(Q = norm(Z), KV = [F_1..F_N ; VLM tokens])

Stages 1-2 form the `SubjectTower`: K layers that run once per generation and yield F^l for
every DiT layer l < K. Stage 3 runs inside the stock text cross-attention `attn2` of block l,
through `SubjectCrossAttnProcessor`, reading F^l's keys and values from a `SubjectStream`
computed once. It takes one of two forms (`IDCrafterConfig.stage3_projections`):
- "attn2" (`SharedQueryCrossAttention`): attn2's own query, a separate softmax over the subject
  keys, added per head through a gate to the text attention before attn2's output projection. ID-Crafter Sec. 3.2 writes stage 3 as one cross-attention with KV = [F; f_text] on
  the block's query; this keeps the text softmax as it is and costs the video tokens no projection
  of their own (docs/design.md 4).
- "own" (`CrossModalAttention`): a cross-attention with its own query and output projections whose
  output is added to attn2's.
The output projections of stages 1 and 3 ("own"), the stage-3 value projection or gate ("attn2",
`IDCrafterConfig.stage3_init`) and the gate W_g of stage 2 start at zero, so with any subjects the model equals the base model at step 0.
Each of these attentions is a diffusers `AttentionModuleMixin` whose processor calls diffusers'
`dispatch_attention_fn` (`idcrafter.core.attention.DispatchAttnProcessor`), so the model's
`set_attention_backend` picks their kernel too (docs/design.md 3.7).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import _get_qkv_projections
from torch import nn
from torch.utils.checkpoint import checkpoint

from idcrafter.core.attention import DispatchAttnProcessor, ref_attention_share
from idcrafter.core.sequence_parallel import gather_sequence
from idcrafter.video.config import STAGE3_INITS


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, H*D] -> [B, H, L, D]."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _safe_mask(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keep [B, L_q|1, L_k] -> (attention mask [B, 1, L_q|1, L_k], has_key [B, L_q|1, 1]).

    A query that may see no key (a subject with no other subject, a sample with no subjects) would
    get the NaN of an all-masked softmax; it attends to everything instead and the caller multiplies
    its final output (after the output projection and its bias) by `has_key`, so "no key" means
    "no contribution".
    """
    has_key = keep.any(dim=-1)  # [B, L_q|1]
    return (keep | ~has_key[..., None])[:, None], has_key[..., None]


def _zero_where_no_key(x: torch.Tensor, has_key: torch.Tensor | None) -> torch.Tensor:
    return x if has_key is None else x * has_key.to(x.dtype)


class _Attention(nn.Module, AttentionModuleMixin):
    """Projections + per-head RMS QK-norm (as Wan's `rms_norm_across_heads`), zero-initialised output.

    An `AttentionModuleMixin` with a `DispatchAttnProcessor`: diffusers' `set_attention_backend`,
    `reset_attention_backend` and `enable_parallelism` find it as they find the stock attentions.
    The projections are never fused (`fuse_qkv_projections` leaves it alone).
    """

    _default_processor_cls = DispatchAttnProcessor
    _available_processors = [DispatchAttnProcessor]
    _supports_qkv_fusion = False

    def __init__(self, dim: int, heads: int, eps: float = 1e-6, zero_out: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.processor = DispatchAttnProcessor()
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.to_out = nn.Linear(dim, dim)
        if zero_out:
            nn.init.zeros_(self.to_out.weight)
            nn.init.zeros_(self.to_out.bias)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return _split_heads(self.norm_q(self.to_q(x)), self.heads)

    def key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _split_heads(self.norm_k(self.to_k(x)), self.heads), _split_heads(self.to_v(x), self.heads)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The kernel, through the processor: q [B, H, L_q, D], k / v [B, H, L_k, D] and `keep`
        [B, L_q|1, L_k] (which keys each query may see, None = all) -> (out [B, L_q, H*D] before
        `to_out`, has_key [B, L_q|1, 1] or None: see `_safe_mask`)."""
        mask, has_key = (None, None) if keep is None else _safe_mask(keep)
        # Transposed views: diffusers' layout is [B, L, H, D]; its SDPA backends transpose back.
        out = self.processor(self, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        return out.flatten(2), has_key


class SubjectTowerLayer(nn.Module):
    """Stages 1-2 on subject tokens F [B, N, T, D] with subject_mask [B, N] (False = padding).

    `intra` / `inter` False leave a stage out (its modules are not built): ID-Crafter Tab. S.5's
    "w/o Stage 1" and "w/o Stage 2".
    """

    def __init__(self, dim: int, heads: int, intra: bool = True, inter: bool = True):
        super().__init__()
        self.intra, self.inter = intra, inter
        if intra:
            self.norm_intra = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.intra_subject_attn = _Attention(dim, heads)
        if inter:
            self.norm_inter = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            # The gate W_g starts at zero, which alone makes stage 2 contribute nothing at step 0. Its
            # attention keeps a live output projection: with both zero, each one's gradient is a
            # multiple of the other and neither could ever move.
            self.inter_subject_attn = _Attention(dim, heads, zero_out=False)
            self.inter_subject_gate = nn.Linear(dim, dim)  # W_g
            nn.init.zeros_(self.inter_subject_gate.weight)
            nn.init.zeros_(self.inter_subject_gate.bias)

    def forward(self, feats: torch.Tensor, subject_mask: torch.Tensor) -> torch.Tensor:
        b, n, t, d = feats.shape
        if self.intra:
            # 1. intra-subject: each subject attends to its own tokens only.
            x = self.norm_intra(feats).flatten(0, 1)  # [B*N, T, D]
            attn = self.intra_subject_attn
            out, _ = attn.attend(attn.query(x), *attn.key_value(x))
            feats = feats + attn.to_out(out).unflatten(0, (b, n))
        if not self.inter:
            return feats
        # 2. gated inter-subject: subject k reads the other (existing) subjects' tokens.
        x = self.norm_inter(feats).flatten(1, 2)  # [B, N*T, D]
        attn = self.inter_subject_attn
        owner = torch.arange(n, device=feats.device).repeat_interleave(t)  # [N*T]
        other = owner[:, None] != owner[None, :]  # [N*T, N*T]
        keep = other[None] & subject_mask.repeat_interleave(t, dim=1)[:, None, :]  # [B, N*T, N*T]
        out, has_key = attn.attend(attn.query(x), *attn.key_value(x), keep)
        cross = _zero_where_no_key(attn.to_out(out), has_key).unflatten(1, (n, t))
        return feats + self.inter_subject_gate(feats) * cross


class SubjectTower(nn.Module):
    """K tower layers: tokens [B, N, T, D] -> [F^0, ..., F^{K-1}], each [B, N, T, D]."""

    def __init__(self, dim: int, heads: int, num_layers: int, intra: bool = True, inter: bool = True):
        super().__init__()
        self.layers = nn.ModuleList([SubjectTowerLayer(dim, heads, intra, inter) for _ in range(num_layers)])
        self.gradient_checkpointing = False

    def forward(self, feats: torch.Tensor, subject_mask: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                feats = checkpoint(layer, feats, subject_mask, use_reentrant=False)
            else:
                feats = layer(feats, subject_mask)
            outs.append(feats)
        return outs


@dataclass
class LayerKV:
    """Stage-3 keys/values of one DiT layer: k, v [B, H, L_kv, Dh]; keep [B, L_kv] (None = all).

    In the `plain` ablation k holds the subject tokens [B, L, D] themselves, v is None.
    """

    k: torch.Tensor
    v: torch.Tensor
    keep: torch.Tensor | None


@dataclass
class SubjectStream:
    """Everything the video tokens read from the subjects, computed once per generation.

    kv[l] are the stage-3 keys/values of DiT layer l; the key sequence is [F_1..F_N ; VLM], so
    subject k owns keys `ref_ranges[k]`.
    """

    kv: list[LayerKV]
    ref_ranges: list[tuple[int, int]]
    subject_mask: torch.Tensor  # [B, N]
    captures: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return self.subject_mask.shape[0]

    def select(self, index: torch.Tensor | list[int]) -> SubjectStream:
        """The stream for a subset / reordering / repetition of the batch (guidance passes)."""
        index = torch.as_tensor(index, device=self.subject_mask.device)
        kv = [
            LayerKV(
                layer.k.index_select(0, index),
                None if layer.v is None else layer.v.index_select(0, index),
                None if layer.keep is None else layer.keep.index_select(0, index),
            )
            for layer in self.kv
        ]
        return SubjectStream(kv, self.ref_ranges, self.subject_mask.index_select(0, index), self.captures)


    def drop_rows(self, rows: torch.Tensor) -> SubjectStream:
        """Same stream with rows (bool [B]) that see no subject and no VLM token (guidance's null rows)."""
        rows = rows.to(self.subject_mask.device).bool()
        kv = []
        for layer in self.kv:
            keep = layer.keep if layer.keep is not None else torch.ones(layer.k.shape[0], layer.k.shape[2], dtype=torch.bool, device=layer.k.device)
            kv.append(LayerKV(layer.k, layer.v, keep & ~rows[:, None]))
        return SubjectStream(kv, self.ref_ranges, self.subject_mask & ~rows[:, None], self.captures)


def stage3_kv(attn, feats: torch.Tensor, subject_mask: torch.Tensor, vlm: torch.Tensor | None,
              vlm_mask: torch.Tensor | None) -> LayerKV:
    """Stage-3 keys / values of one layer through `attn.key_value`: feats [B, N, T, D], subject_mask
    [B, N], vlm [B, L_v, D] | None, vlm_mask [B, L_v] | None -> k, v [B, H, N*T (+ L_v), Dh]."""
    b, n, t, _ = feats.shape
    tokens = feats.flatten(1, 2)
    keep = subject_mask.repeat_interleave(t, dim=1)
    if vlm is not None:
        tokens = torch.cat([tokens, vlm.to(tokens.dtype)], dim=1)
        vm = torch.ones(vlm.shape[:2], dtype=torch.bool, device=vlm.device) if vlm_mask is None else vlm_mask.bool()
        keep = torch.cat([keep, vm], dim=1)
    k, v = attn.key_value(tokens)
    # Eagerly, a mask that keeps every key is dropped (the unmasked kernel, and no mask for
    # backends that take none); compiled, that data-dependent test would break the graph, and on
    # the meta device (shape checks of full-size models) there are no values to test: an
    # all-True mask gives the same attention.
    if not torch.compiler.is_compiling() and not keep.is_meta and bool(keep.all()):
        return LayerKV(k, v, None)
    return LayerKV(k, v, keep)


class CrossModalAttention(_Attention):
    """Stage 3, "own" form: video tokens Z [B, L, D] (normed, as fed to attn2) attend to [F^l ; VLM]
    through their own query and output projections; the output is added to attn2's."""

    kv = stage3_kv

    def forward(self, hidden_states: torch.Tensor, kv: LayerKV, ref_ranges=None, capture: dict | None = None, name: str = "") -> torch.Tensor:
        q = self.query(hidden_states)
        keep = None if kv.keep is None else kv.keep[:, None, :]
        out, has_key = self.attend(q, kv.k, kv.v, keep)
        if capture is not None and ref_ranges:
            capture[name] = ref_attention_share(q, kv.k, ref_ranges, key_mask=kv.keep)
        return _zero_where_no_key(self.to_out(out), has_key)


class SharedQueryCrossAttention(nn.Module, AttentionModuleMixin):
    """Stage 3, "attn2" form: keys / values of [F^l ; VLM] read by attn2's own query.

    Only the subject keys and values have projections here (with a per-head RMS norm on the keys,
    as attn2's); the query is attn2's after its `norm_q`, and the output joins the text attention's
    before attn2's `to_out`:

        attn2(x) = to_out(softmax(q k_txt^T) v_txt + g_h * softmax(q k_subj^T) v_subj)

    Two softmaxes, not one over [text ; subjects]: the text attention stays the stock one and a gate
    g (one per head) says how much each head reads of the subjects. The model is the base model at
    step 0 because one factor of g_h * v_subj starts at zero (`zero`, `IDCrafterConfig.stage3_init`):
    "value", the value projection (gates at one): its gradient is a full D x D matrix from the first
    step, like the "own" form's zero output projection; or "gate", the H gates (value projection
    random): Adam moves each gate about lr a step, so the subjects are read only once they open.
    """

    _default_processor_cls = DispatchAttnProcessor
    _available_processors = [DispatchAttnProcessor]
    _supports_qkv_fusion = False

    def __init__(self, dim: int, heads: int, eps: float = 1e-6, zero: str = "value"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        if zero not in STAGE3_INITS:
            raise ValueError(f"zero must be one of {', '.join(STAGE3_INITS)}, got {zero!r}")
        self.heads = heads
        self.processor = DispatchAttnProcessor()
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.gate = nn.Parameter(torch.zeros(heads) if zero == "gate" else torch.ones(heads))
        if zero == "value":
            nn.init.zeros_(self.to_v.weight)
            nn.init.zeros_(self.to_v.bias)

    key_value = _Attention.key_value
    attend = _Attention.attend
    kv = stage3_kv

    def forward(self, query: torch.Tensor, kv: LayerKV, ref_ranges=None, capture: dict | None = None,
                name: str = "") -> torch.Tensor:
        """query [B, L, H, Dh]: attn2's (after norm_q, diffusers' layout) -> the gated subject
        attention [B, L, H*Dh], to be added to the text attention before attn2's `to_out`."""
        q = query.transpose(1, 2)  # [B, H, L, Dh], a view
        keep = None if kv.keep is None else kv.keep[:, None, :]
        out, has_key = self.attend(q, kv.k.to(q.dtype), kv.v.to(q.dtype), keep)
        if capture is not None and ref_ranges:
            capture[name] = ref_attention_share(q, kv.k.to(q.dtype), ref_ranges, key_mask=kv.keep)
        # No bias before to_out here, so zeroing the output of a query without keys is enough.
        out = _zero_where_no_key(out, has_key).unflatten(-1, (self.heads, -1)) * self.gate.to(out.dtype)[:, None]
        return out.flatten(2)


class SubjectCrossAttnProcessor:
    """Processor for a Wan block's `attn2`: stock text cross-attention plus stage 3.

    It receives a `SubjectContext` in place of `encoder_hidden_states` (see
    `IDCrafterTransformer`); with a plain tensor it is exactly the stock processor. Not an
    nn.Module on purpose: the stage-3 weights live in the adapter, so the base model's
    state dict keeps its stock names.
    """

    def __init__(self, stock, stage3: CrossModalAttention | None, layer: int, plain_keys: bool = False):
        self.stock = stock
        self.stage3 = stage3
        self.layer = layer
        self.plain_keys = plain_keys

    # diffusers' `set_attention_backend` / `enable_parallelism` set these on every processor that has
    # them; they steer the stock processor, which runs the text attention (stage 3 is a module of its
    # own, which the same calls reach).
    @property
    def _attention_backend(self):
        return self.stock._attention_backend

    @_attention_backend.setter
    def _attention_backend(self, backend) -> None:
        self.stock._attention_backend = backend

    @property
    def _parallel_config(self):
        return self.stock._parallel_config

    @_parallel_config.setter
    def _parallel_config(self, config) -> None:
        self.stock._parallel_config = config

    def _whole_sequence(self, share: torch.Tensor) -> torch.Tensor:
        """A captured share [B, N, L_local] of this rank's video tokens -> [B, N, L] of all of them.

        Under sequence parallelism (idcrafter.core.sequence_parallel) every head of a local token is
        here, so its share (mean over heads) is complete; only the tokens are gathered."""
        config = self._parallel_config
        mesh = None if config is None else config.context_parallel_config._ulysses_mesh
        return gather_sequence(share, 2, mesh)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        ctx = encoder_hidden_states
        if not isinstance(ctx, SubjectContext):
            return self.stock(attn, hidden_states, ctx, attention_mask, rotary_emb)
        if self.plain_keys and ctx.stream is not None:
            return self._plain_keys(attn, hidden_states, ctx)
        if self.stage3 is None or ctx.stream is None:
            return self.stock(attn, hidden_states, ctx.text, attention_mask, rotary_emb)
        stream = ctx.stream
        name = f"blocks.{self.layer}.stage3"
        capture = stream.captures
        if isinstance(self.stage3, SharedQueryCrossAttention):
            out = self._shared_query(attn, hidden_states, ctx.text, attention_mask, stream, name)
        else:
            out = self.stock(attn, hidden_states, ctx.text, attention_mask, rotary_emb)
            out = out + self.stage3(hidden_states, stream.kv[self.layer], stream.ref_ranges, capture, name).to(out.dtype)
        if capture is not None and name in capture:  # under sequence parallelism: the shares of every rank's tokens
            capture[name] = self._whole_sequence(capture[name])
        return out

    def _shared_query(self, attn, hidden_states: torch.Tensor, text: torch.Tensor, attention_mask,
                      stream: SubjectStream, name: str) -> torch.Tensor:
        """Stage 3 on attn2's query: `WanAttnProcessor.__call__` for a text-to-video cross-attention
        (no image keys, no rotary embedding), with the gated subject attention added before
        `to_out`. hidden_states [B, L, D], text [B, L_txt, D] -> [B, L, D]."""
        query, key, value = _get_qkv_projections(attn, hidden_states, text)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                    backend=self.stock._attention_backend, parallel_config=None)
        out = out.flatten(2, 3).type_as(query)
        out = out + self.stage3(query, stream.kv[self.layer], stream.ref_ranges, stream.captures, name).to(out.dtype)
        return attn.to_out[1](attn.to_out[0](out))


    def _plain_keys(self, attn, hidden_states: torch.Tensor, ctx: SubjectContext) -> torch.Tensor:
        """Ablation: subject tokens appended to the text keys of the stock cross-attention."""
        layer = ctx.stream.kv[self.layer]
        tokens, keep = layer.k.to(ctx.text.dtype), layer.keep
        text_keep = torch.ones(ctx.text.shape[:2], dtype=torch.bool, device=tokens.device)
        mask = torch.cat([text_keep, keep], dim=1)[:, None, None, :]  # [B, 1, 1, L_txt + L_subj]
        out = self.stock(attn, hidden_states, torch.cat([ctx.text, tokens], dim=1), mask, None)
        if ctx.stream.captures is not None:
            # The share of the subject keys inside attn2, for the leakage metric.
            q = _split_heads(attn.norm_q(attn.to_q(hidden_states)), attn.heads)
            k = _split_heads(attn.norm_k(attn.to_k(tokens)), attn.heads)
            share = ref_attention_share(q, k, ctx.stream.ref_ranges, key_mask=keep)
            ctx.stream.captures[f"blocks.{self.layer}.attn2"] = self._whole_sequence(share)
        return out


@dataclass
class SubjectContext:
    """Travels through the stock Wan forward in place of the projected text states.

    Passing it as an argument (not as module state) keeps activation checkpointing exact: a
    block recomputed in backward sees the same subject stream as in forward.
    """

    text: torch.Tensor
    stream: SubjectStream | None
