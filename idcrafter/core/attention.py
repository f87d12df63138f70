"""The attention call used by every processor, and the ref-restricted attention share.

`attention` is the single dispatch point (flash-attn on CUDA when installed, else torch SDPA), so
no model code imports a kernel. `ref_attention_share` computes what the IDAR loss supervises
(docs/design.md 3.2) without ever forming an L x L matrix.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from idcrafter.utils.deps import is_available

__all__ = ["attention", "flash_attn_available", "ref_attention_share", "ref_segments"]


@functools.lru_cache(maxsize=1)
def flash_attn_available() -> bool:
    return is_available("flash_attn")


def _flash_ok(q: torch.Tensor, attn_mask: torch.Tensor | None, dropout_p: float) -> bool:
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and attn_mask is None
        and q.shape[-1] <= 256
        and flash_attn_available()
    )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Softmax attention, `softmax(q k^T * scale + mask) v`.

    Args:
        q: [B, H, L_q, D]; k, v: [B, H, L_k, D].
        attn_mask: optional boolean (True = keep) or additive mask broadcastable to [B, H, L_q, L_k].
        scale: defaults to 1 / sqrt(D).
        backend: None picks flash-attn when it is installed and applicable (CUDA, fp16/bf16, no
            mask), else SDPA; "sdpa" or "flash" force one.

    Returns:
        [B, H, L_q, D].
    """
    use_flash = backend == "flash" or (backend is None and _flash_ok(q, attn_mask, dropout_p))
    if use_flash:
        from flash_attn import flash_attn_func  # optional; `flash` extra

        out = flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, softmax_scale=scale
        )
        return out.transpose(1, 2)
    if backend not in (None, "sdpa", "flash"):
        raise ValueError(f"attention: unknown backend {backend!r}; use None, 'sdpa' or 'flash'")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)


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
    subject = torch.repeat_interleave(torch.arange(len(ranges), device=k.device), sizes)
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
