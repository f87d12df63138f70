"""FLUX 3-axis position ids (axes t, h, w) for targets, references and item descriptors.

FLUX rotates every query/key by RoPE over three axes: a time index t and the row h and column w
of the latent grid after 2x2 packing. diffusers' `FluxTransformer2DModel` takes them as
`img_ids: [L_img, 3]` and `txt_ids: [L_txt, 3]` and concatenates `[txt_ids; img_ids]`;
`FluxPosEmbed` casts them with `ids.float()`, so fractional positions are legal. Every function
here returns float32 `[L, 3]` rows `(t, h, w)`:

    target tokens           (0, i, j)                                       i < h, j < w, row-major
    UNO diagonal (ref k)    (0, i + H_k, j + W_k)                           H_k = h_target + h_1 + ... + h_{k-1}
    condition IDs (eq. 2)   (1, i + c*h_ref, j + c*w_ref)                   c = category index
    CCPA (eq. 3)            (1, c*h_ref + (h_ref-1)/2, c*w_ref + (w_ref-1)/2) every descriptor token
    other text tokens       (0, 0, 0)

Item descriptors (One-for-All) are marked up in the prompt,
`a man <face>with short hair</face> wearing <upper>a red hoodie</upper>`, parsed into character
spans of the clean prompt and mapped to token indices through a fast tokenizer's offset mapping.

Assembling a One-for-All sequence::

    input_ids, tokens = tokenize_with_descriptors(tokenizer, prompt, max_length=512)
    txt = text_ids(512, tokens, ref_hws={"face": (32, 32)})
    img = torch.cat([target_ids(64, 64), condition_ids("face", (32, 32))])
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from idcrafter.core.categories import (
    CATEGORY_ALIASES,
    CATEGORY_IDS,
    DescriptorSpan,
    canonical_category,
    category_index,
    parse_descriptor_markup,
    register_category,
)

__all__ = [
    "CATEGORY_ALIASES",
    "CATEGORY_IDS",
    "DescriptorSpan",
    "canonical_category",
    "category_index",
    "category_time_ids",
    "ccpa_descriptor_ids",
    "condition_ids",
    "descriptor_token_indices",
    "parse_descriptor_markup",
    "register_category",
    "target_ids",
    "text_ids",
    "tokenize_with_descriptors",
    "uno_diagonal_ids",
]

# --------------------------------------------------------------------------------------------
# Image-side position ids
# --------------------------------------------------------------------------------------------


def _check_hw(hw: Sequence[int], what: str) -> tuple[int, int]:
    """Validate a (height, width) pair of positive ints (numpy / torch ints accepted)."""
    try:
        h, w = (operator.index(v) for v in hw)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a pair of ints (h, w), got {hw!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"{what} must be positive, got {(h, w)}")
    return h, w


def _check_offset(offset: Sequence[int] | None) -> tuple[int, int]:
    if offset is None:
        return 0, 0
    try:
        dh, dw = (operator.index(v) for v in offset)
    except (TypeError, ValueError):
        raise ValueError(f"base_offset must be a pair of ints (H, W), got {offset!r}") from None
    if dh < 0 or dw < 0:
        raise ValueError(f"base_offset must be non-negative, got {(dh, dw)}")
    return dh, dw


def _grid_ids(h: int, w: int, t: float, h_offset: float, w_offset: float) -> torch.Tensor:
    """Rows (t, i + h_offset, j + w_offset) of an h x w grid in row-major order: [h*w, 3]."""
    ids = torch.zeros(h, w, 3, dtype=torch.float32)
    ids[..., 0] = t
    ids[..., 1] = torch.arange(h, dtype=torch.float32)[:, None] + h_offset
    ids[..., 2] = torch.arange(w, dtype=torch.float32)[None, :] + w_offset
    return ids.reshape(h * w, 3)


def target_ids(h: int, w: int, t: int = 0) -> torch.Tensor:
    """Target (noisy latent) ids (t, i, j), row-major: [h*w, 3].

    Same rows as diffusers' `FluxPipeline._prepare_latent_image_ids(_, h, w, ...)` for t = 0;
    h, w are the packed latent grid (image size / 16 for FLUX).
    """
    h, w = _check_hw((h, w), "target size")
    return _grid_ids(h, w, operator.index(t), 0, 0)


def uno_diagonal_ids(target_hw: Sequence[int], ref_hws: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """UNO's diagonal layout (MultiCrafter default): one [h_k*w_k, 3] tensor per reference.

        reference k, token (i, j)  ->  (0, i + H_k, j + W_k),
        H_k = h_target + sum_{l<k} h_l,   W_k = w_target + sum_{l<k} w_l

    Each reference starts where the target and the earlier references end on both axes, so no
    two grids share a row or a column position, while all stay on time index 0.
    """
    h_shift, w_shift = _check_hw(target_hw, "target_hw")
    out = []
    for k, hw in enumerate(ref_hws):
        h, w = _check_hw(hw, f"ref_hws[{k}]")
        out.append(_grid_ids(h, w, 0, h_shift, w_shift))
        h_shift, w_shift = h_shift + h, w_shift + w
    return out


def category_time_ids(category: str, ref_hw: Sequence[int]) -> torch.Tensor:
    """One-for-All's Var. 2 (Sec. 4.5, Tab. 4): the category on the virtual time axis only,
    u = (t, 0, 0): token (i, j) -> (c, i, j). [h_ref*w_ref, 3]."""
    h, w = _check_hw(ref_hw, "ref_hw")
    return _grid_ids(h, w, category_index(category), 0, 0)


def condition_ids(
    category: str, ref_hw: Sequence[int], base_offset: Sequence[int] | None = None
) -> torch.Tensor:
    """One-for-All condition IDs (eq. 2) for one reference of `category`: [h_ref*w_ref, 3].

        token (i, j) of the h_ref x w_ref grid  ->  (1, i + c*h_ref (+ H), j + c*w_ref (+ W))

    The virtual time index 1 separates context from the target (as in Kontext); the diagonal
    block c separates categories. `base_offset=(H, W)`, usually the target size, adds the extra
    shift the paper's wording allows.
    """
    h, w = _check_hw(ref_hw, "ref_hw")
    dh, dw = _check_offset(base_offset)
    c = category_index(category)
    return _grid_ids(h, w, 1, c * h + dh, c * w + dw)


def _ccpa_centroid(
    category: str, ref_hw: Sequence[int], base_offset: Sequence[int] | None
) -> tuple[float, ...]:
    h, w = _check_hw(ref_hw, "ref_hw")
    dh, dw = _check_offset(base_offset)
    c = category_index(category)
    return 1.0, c * h + (h - 1) / 2 + dh, c * w + (w - 1) / 2 + dw


# --------------------------------------------------------------------------------------------
# Text-side position ids (CCPA)
# --------------------------------------------------------------------------------------------


def ccpa_descriptor_ids(
    category: str, ref_hw: Sequence[int], num_tokens: int, base_offset: Sequence[int] | None = None
) -> torch.Tensor:
    """CCPA ids (eq. 3) for the `num_tokens` tokens of one item descriptor: [num_tokens, 3].

        every token  ->  (1, c*h_ref + (h_ref - 1)/2 (+ H), c*w_ref + (w_ref - 1)/2 (+ W))

    i.e. the centroid (mean) of `condition_ids(category, ref_hw, base_offset)`. Eq. 3 as printed,
    (1, h + c*h_ref/2, w + c*w_ref/2), does not land on that centroid; the text says centroid, so
    we follow the text. All tokens share one position: RoPE then makes the descriptor's relative
    offset to its reference block the same for every word, tying the words to that block.
    """
    n = operator.index(num_tokens)
    if n < 0:
        raise ValueError(f"num_tokens must be >= 0, got {n}")
    centroid = torch.tensor(_ccpa_centroid(category, ref_hw, base_offset), dtype=torch.float32)
    return centroid.expand(n, 3).clone()


def text_ids(
    num_tokens: int,
    descriptor_tokens: Mapping[str, Sequence[int]] | None = None,
    ref_hws: Mapping[str, Sequence[int]] | None = None,
    base_offset: Sequence[int] | None = None,
) -> torch.Tensor:
    """`txt_ids` for one prompt: [num_tokens, 3], zeros except CCPA rows for descriptor tokens.

    descriptor_tokens: category -> token indices of its item descriptor (the mapping
        `tokenize_with_descriptors` returns). One-for-All has one reference per category, so the
        category names the subject.
    ref_hws: category -> (h_ref, w_ref) packed latent grid of that category's reference.
    base_offset: the same (H, W) given to `condition_ids`, so centroids match the blocks.

    Token rows not named stay at (0, 0, 0), as FLUX's text tokens do.
    """
    n = operator.index(num_tokens)
    ids = torch.zeros(n, 3, dtype=torch.float32)
    if not descriptor_tokens:
        return ids
    sizes = {canonical_category(k): v for k, v in (ref_hws or {}).items()}
    owner: dict[int, str] = {}
    seen: set[str] = set()
    for name, indices in descriptor_tokens.items():
        category = canonical_category(name)
        if category in seen:
            raise ValueError(f"descriptor category {category!r} given twice (as {name!r})")
        if category not in sizes:
            raise ValueError(
                f"no reference size for descriptor category {category!r}; pass ref_hws[{category!r}]"
            )
        seen.add(category)
        rows = [operator.index(i) for i in indices]
        for i in rows:
            if not 0 <= i < n:
                raise ValueError(f"descriptor token index {i} of {category!r} is outside [0, {n})")
            if i in owner:
                raise ValueError(f"token {i} is claimed by descriptors {owner[i]!r} and {category!r}")
            owner[i] = category
        ids[rows] = ccpa_descriptor_ids(category, sizes[category], len(rows), base_offset)
    return ids


# --------------------------------------------------------------------------------------------
# Prompt markup -> character spans -> token indices
# --------------------------------------------------------------------------------------------


def descriptor_token_indices(
    spans: Sequence[DescriptorSpan], offset_mapping: Sequence[Sequence[int]] | torch.Tensor
) -> dict[str, list[int]]:
    """Token indices of each descriptor: {category: sorted indices}, in span order.

    offset_mapping: [L, 2] (start, end) character range of each token in the clean prompt, as a
        HF fast tokenizer returns with `return_offsets_mapping=True`. Empty ranges (special and
        padding tokens are (0, 0)) belong to no span.

    A token belongs to a span when the ranges overlap, start < span_end and end > span_start,
    so a subword cut by the span edge still counts. Raises when a token overlaps two spans
    (it can sit at only one position: put a space between the descriptors) or when a span
    gets no token at all (usually the prompt was truncated by max_length).
    """
    if isinstance(offset_mapping, torch.Tensor):
        offset_mapping = offset_mapping.tolist()
    offsets = [(int(s), int(e)) for s, e in offset_mapping]
    result: dict[str, list[int]] = {}
    owner: dict[int, str] = {}
    for span in spans:
        hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < span.char_end and e > span.char_start]
        if not hits:
            raise ValueError(
                f"descriptor {span.category!r} (chars {span.char_start}-{span.char_end}, {span.text!r}) "
                "maps to no token; was the prompt truncated by max_length?"
            )
        for i in hits:
            if owner.get(i, span.category) != span.category:
                raise ValueError(
                    f"token {i} (chars {offsets[i][0]}-{offsets[i][1]}) overlaps descriptors "
                    f"{owner[i]!r} and {span.category!r}; separate them with a space"
                )
            owner[i] = span.category
        result[span.category] = sorted(set(result.get(span.category, [])) | set(hits))
    return result


def tokenize_with_descriptors(
    tokenizer: Any,
    prompt: str,
    max_length: int = 512,
    categories: Iterable[str] | None = None,
) -> tuple[torch.Tensor, dict[str, list[int]]]:
    """Tokenize a marked-up prompt the way the FLUX pipeline tokenizes for T5.

    Tags are stripped, the clean prompt is padded/truncated to `max_length` (as
    `FluxPipeline._get_t5_prompt_embeds` does), and descriptor spans are mapped to tokens.

    Returns input_ids: [max_length] long, and {category: [token indices]} ready for `text_ids`.
    `tokenizer` must be a HF *fast* tokenizer: only those report character offsets.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; offset mappings need one")
    clean, spans = parse_descriptor_markup(prompt, categories)
    encoded = tokenizer(
        clean,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_offsets_mapping=True,
    )
    input_ids = torch.tensor(encoded["input_ids"], dtype=torch.long)
    return input_ids, descriptor_token_indices(spans, encoded["offset_mapping"])
