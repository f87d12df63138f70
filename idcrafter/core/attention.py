"""The attention kernel of every processor of ours, and the ref-restricted attention share.

Every softmax attention of ours runs through diffusers' `dispatch_attention_fn` (docs/design.md 3.7):
`dispatch_attention` is that call, and `DispatchAttnProcessor` is the processor of our attention
modules, carrying the backend that diffusers' `set_attention_backend` sets on it, so one call picks
the kernel for the stock blocks and ours alike (flash-attn through diffusers' "flash" backend, an
optional install). `ref_attention_share` computes what the IDAR loss supervises (docs/design.md 3.2),
which no kernel returns, without ever forming an L x L matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import (
    AttentionBackendName,
    _AttentionBackendRegistry,
    dispatch_attention_fn,
)
from torch.utils.checkpoint import checkpoint

__all__ = ["MASK_BACKENDS", "DispatchAttnProcessor", "dispatch_attention", "ref_attention_share", "ref_segments"]

# Backends whose kernel takes a boolean mask of any shape broadcastable to [B, H, L_q, L_k]: SDPA's.
# The flash / sage / xla kernels refuse masks, the varlen ones read only key padding, and xformers
# would add a boolean mask as 0 / 1: a masked call on any of them runs on "native" SDPA instead.
MASK_BACKENDS = frozenset(
    {AttentionBackendName.NATIVE, AttentionBackendName._NATIVE_MATH, AttentionBackendName._NATIVE_EFFICIENT}
)


def dispatch_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    backend: AttentionBackendName | str | None = None,
    parallel_config=None,
) -> torch.Tensor:
    """`softmax(q k^T / sqrt(D) + mask) v` through diffusers' `dispatch_attention_fn`.

    Args:
        query: [B, L_q, H, D]; key, value: [B, L_k, H, D] (diffusers' layout).
        attn_mask: optional boolean (True = keep) or additive mask broadcastable to [B, H, L_q, L_k].
        backend: a diffusers `AttentionBackendName` (or its value); None is diffusers' active
            backend ("native" unless `DIFFUSERS_ATTN_BACKEND` or `attention_backend(...)` says
            otherwise). With a mask, a backend outside `MASK_BACKENDS` gives way to "native".
        parallel_config: diffusers' context-parallel config, for attention over sharded sequences.

    Returns:
        [B, L_q, H, D].
    """
    if attn_mask is not None:
        # No Enum call on a member: dynamo does not always trace one in a full graph (as in diffusers).
        chosen = backend if isinstance(backend, AttentionBackendName) else (
            _AttentionBackendRegistry._active_backend if backend is None else AttentionBackendName(backend))
        if chosen not in MASK_BACKENDS:
            backend = AttentionBackendName.NATIVE
    return dispatch_attention_fn(
        query, key, value, attn_mask=attn_mask, backend=backend, parallel_config=parallel_config
    )


class DispatchAttnProcessor:
    """Processor of our attention modules (`AttentionModuleMixin`): the kernel call alone.

    diffusers' `set_attention_backend` / `reset_attention_backend` set `_attention_backend` on the
    processor of every `AttentionModuleMixin` module of a model, and `enable_parallelism` sets
    `_parallel_config`; this processor hands the backend to `dispatch_attention`. The parallel config
    is not: our attention reads keys that context parallelism does not shard (subject tokens, the
    subject stream), the case in which diffusers' Wan processor passes none either.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self, attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """query [B, L_q, H, D], key / value [B, L_k, H, D] -> [B, L_q, H, D]."""
        return dispatch_attention(query, key, value, attn_mask=attn_mask, backend=self._attention_backend)


def ref_segments(ref_ranges: Sequence[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """Validate `(start, end)` reference ranges against a key length `length`."""
    if len(ref_ranges) == 0:
        raise ValueError("ref_attention_share: ref_ranges is empty; give one (start, end) per subject")
    out = []
    for i, (start, end) in enumerate(ref_ranges):
        start, end = int(start), int(end)
        if not 0 <= start < end <= length:
            raise ValueError(f"ref_attention_share: ref_ranges[{i}] = ({start}, {end}) is outside [0, {length})")
        out.append((start, end))
    return out


def _gather_refs(k: torch.Tensor, ranges: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference keys [B, H, R, D] and the one-hot subject membership [R, N] of each key.

    One `index_select` rather than a cat of slices: its backward scatters into a single
    k-sized buffer instead of one per subject.
    """
    index = torch.cat([torch.arange(s, e, device=k.device) for s, e in ranges])
    sizes = torch.tensor([e - s for s, e in ranges], device=k.device)
    # output_size from the Python ranges: no device sync to read `sizes`, and meta tensors (shape
    # checks of full-size models) have no values to read.
    subject = torch.repeat_interleave(torch.arange(len(ranges), device=k.device), sizes, output_size=index.numel())
    return k.index_select(2, index), F.one_hot(subject, len(ranges))


def _share_chunk(
    q: torch.Tensor,
    k_ref: torch.Tensor,
    member: torch.Tensor,
    scale: float,
    tau: torch.Tensor | None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Share of one query chunk: q [B, H, c, D] -> [B, c, N] (mean over heads).

    The softmax runs over reference keys only: the global normaliser of the full attention row
    cancels in share_h(i, k), so neither the other keys nor a log-sum-exp over them are needed.
    """
    if tau is not None:
        q = q / tau
    # At least float32: bf16 logits would round the shares the loss takes the log of.
    dtype = torch.promote_types(q.dtype, torch.float32)
    logits = torch.einsum("bhqd,bhrd->bhqr", q.to(dtype), k_ref.to(dtype)) * scale
    if keep is not None:  # [B, 1, 1, R]: padded subjects' keys take no share
        logits = logits.masked_fill(~keep, torch.finfo(dtype).min)
    probs = logits.softmax(dim=-1)
    share = probs @ member.to(probs.dtype)  # [B, H, c, N]: sum of probabilities per subject
    return share.mean(dim=1)


def _expand_temperature(tau: torch.Tensor, b: int, h: int, lq: int) -> torch.Tensor:
    """Bring a temperature to [B, H|1, L_q, 1] so it divides queries token by token."""
    if tau.dim() == 2:  # [B, L_q]: one temperature per token, shared by heads
        tau = tau[:, None, :, None]
    elif tau.dim() == 3:  # [B, L_q, H|1]: DAM output layout
        tau = tau.permute(0, 2, 1)[..., None]
    elif tau.dim() != 4:  # [B, H|1, L_q, 1] already
        raise ValueError(f"ref_attention_share: temperature must be [B, L_q], [B, L_q, H] or [B, H, L_q, 1], got {tuple(tau.shape)}")
    if tau.shape[0] not in (1, b) or tau.shape[1] not in (1, h) or tau.shape[2] != lq:
        raise ValueError(
            f"ref_attention_share: temperature shape {tuple(tau.shape)} does not match q [B={b}, H={h}, L_q={lq}]"
        )
    return tau


def ref_attention_share(
    q: torch.Tensor,
    k: torch.Tensor,
    ref_ranges: Sequence[tuple[int, int]],
    scale: float | None = None,
    temperature: torch.Tensor | None = None,
    chunk_size: int = 256,
    checkpointed: bool | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ref-restricted attention share (docs/design.md 3.2), mean over heads.

        share_h(i, k) = sum_{j in R_k} exp(s q_i.k_j) / sum_{j in R_1 u ... u R_N} exp(s q_i.k_j)
        share(i, k)   = mean_h share_h(i, k),   s = scale / tau_i

    Args:
        q: [B, H, L_q, D] queries (usually the target tokens only, after RoPE).
        k: [B, H, L_k, D] keys of the whole sequence (after RoPE).
        ref_ranges: N pairs (start, end) into L_k, one per subject.
        scale: defaults to 1 / sqrt(D).
        temperature: optional DAM temperature per query token: [B, L_q], [B, L_q, H|1] or
            [B, H|1, L_q, 1]; queries are divided by it, as in the attention itself.
        chunk_size: queries per chunk. Each chunk runs under activation checkpointing when grad
            is enabled, so memory is O(B N L_q) plus one chunk's [B, H, chunk, R] logits.
        checkpointed: force checkpointing on/off (default: on when autograd records).
        key_mask: optional [B, L_k] bool, False for keys that do not exist (padded subjects);
            a subject whose keys are all masked gets share 0.

    Returns:
        [B, N, L_q] shares (float32, or float64 for float64 inputs); they sum to 1 over N.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"ref_attention_share: q and k must be [B, H, L, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    b, h, lq, d = q.shape
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        raise ValueError(f"ref_attention_share: q {tuple(q.shape)} and k {tuple(k.shape)} disagree in B, H or D")
    if chunk_size <= 0:
        raise ValueError(f"ref_attention_share: chunk_size must be positive, got {chunk_size}")
    ranges = ref_segments(ref_ranges, k.shape[2])
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    tau = None if temperature is None else _expand_temperature(temperature, b, h, lq)
    k_ref, member = _gather_refs(k, ranges)
    keep = None
    if key_mask is not None:
        if key_mask.shape != (b, k.shape[2]):
            raise ValueError(f"ref_attention_share: key_mask must be [B, L_k] = [{b}, {k.shape[2]}], got {tuple(key_mask.shape)}")
        index = torch.cat([torch.arange(s, e, device=k.device) for s, e in ranges])
        keep = key_mask.to(torch.bool).index_select(1, index)[:, None, None, :]
    if checkpointed is None:
        checkpointed = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or (tau is not None and tau.requires_grad))
    chunks = []
    for start in range(0, lq, chunk_size):
        end = min(start + chunk_size, lq)
        tau_c = None if tau is None else tau[:, :, start:end]
        args = (q[:, :, start:end], k_ref, member, scale, tau_c, keep)
        if checkpointed:
            chunks.append(checkpoint(_share_chunk, *args, use_reentrant=False))
        else:
            chunks.append(_share_chunk(*args))
    return torch.cat(chunks, dim=1).transpose(1, 2)
