"""Token layout of one joint attention sequence.

Every loss, mask, position id and visualisation reads token ranges from a `TokenLayout`, so no
code re-derives offsets by hand. Ranges are half-open `(start, end)` index pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

Range = tuple[int, int]


def _as_range(value: Sequence[int], what: str) -> Range:
    if len(value) != 2:
        raise ValueError(f"TokenLayout: {what} must be a (start, end) pair, got {tuple(value)!r}")
    start, end = int(value[0]), int(value[1])
    return start, end


@dataclass(frozen=True)
class TokenLayout:
    """Which tokens of a sequence of length `total` are text, target, subject references, descriptors.

    Args:
        total: length of the joint sequence.
        target: range of the target (noisy latent) tokens.
        text: range of the text tokens, or None when text is not part of the sequence.
        refs: one range per subject: that subject's reference tokens.
        descriptors: one entry per subject: the token indices of its item descriptor inside the
            text range (One-for-All), or an empty tuple.
        target_grid: optional (t, h, w) or (h, w) grid of the target tokens, row-major.

    Raises:
        ValueError: a range is empty, reversed or outside [0, total); two of text/target/refs
            overlap; a descriptor index lies outside the text range; counts disagree.
    """

    total: int
    target: Range
    text: Range | None = None
    refs: tuple[Range, ...] = ()
    descriptors: tuple[tuple[int, ...], ...] = field(default=())
    target_grid: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "total", int(self.total))
        object.__setattr__(self, "target", _as_range(self.target, "target"))
        if self.text is not None:
            object.__setattr__(self, "text", _as_range(self.text, "text"))
        refs = tuple(_as_range(r, f"refs[{i}]") for i, r in enumerate(self.refs))
        object.__setattr__(self, "refs", refs)
        descriptors = tuple(tuple(int(i) for i in d) for d in self.descriptors) or tuple(() for _ in refs)
        object.__setattr__(self, "descriptors", descriptors)
        if self.target_grid is not None:
            object.__setattr__(self, "target_grid", tuple(int(g) for g in self.target_grid))
        self._validate()

    # ------------------------------------------------------------------ validation
    def _named_ranges(self) -> list[tuple[str, Range]]:
        named = [("target", self.target)]
        if self.text is not None:
            named.append(("text", self.text))
        named += [(f"refs[{i}]", r) for i, r in enumerate(self.refs)]
        return named

    def _validate(self) -> None:
        if self.total <= 0:
            raise ValueError(f"TokenLayout: total must be positive, got {self.total}")
        named = self._named_ranges()
        for name, (start, end) in named:
            if not 0 <= start < end <= self.total:
                raise ValueError(
                    f"TokenLayout: {name} range ({start}, {end}) is empty or outside [0, {self.total})"
                )
        ordered = sorted(named, key=lambda item: item[1][0])
        for (name_a, (_, end_a)), (name_b, (start_b, _)) in zip(ordered, ordered[1:]):
            if start_b < end_a:
                raise ValueError(f"TokenLayout: {name_a} and {name_b} overlap (at token {start_b})")
        if len(self.descriptors) != len(self.refs):
            raise ValueError(
                f"TokenLayout: {len(self.descriptors)} descriptor entries for {len(self.refs)} subjects"
            )
        for k, indices in enumerate(self.descriptors):
            if indices and self.text is None:
                raise ValueError(f"TokenLayout: descriptors[{k}] given but the layout has no text range")
            for i in indices:
                if not self.text[0] <= i < self.text[1]:
                    raise ValueError(
                        f"TokenLayout: descriptors[{k}] token {i} is outside the text range {self.text}"
                    )
        if self.target_grid is not None:
            n = 1
            for g in self.target_grid:
                n *= g
            if n != self.target_len:
                raise ValueError(
                    f"TokenLayout: target_grid {self.target_grid} has {n} tokens, target range has "
                    f"{self.target_len}"
                )

    # ------------------------------------------------------------------ constructors
    @classmethod
    def concat(
        cls,
        *,
        text_len: int = 0,
        target_len: int,
        ref_lens: Sequence[int] = (),
        order: Sequence[str] = ("text", "target", "refs"),
        descriptors: Sequence[Sequence[int]] = (),
        target_grid: Sequence[int] | None = None,
    ) -> TokenLayout:
        """Layout of segments laid end to end in `order` (FLUX: text, target, then references).

        Descriptor indices are relative to the start of the text segment.
        """
        if sorted(order) != ["refs", "target", "text"]:
            raise ValueError(f"TokenLayout.concat: order must name text, target and refs once, got {order!r}")
        offset, ranges, refs = 0, {}, []
        for part in order:
            if part == "refs":
                for n in ref_lens:
                    refs.append((offset, offset + int(n)))
                    offset += int(n)
            else:
                n = text_len if part == "text" else target_len
                ranges[part] = (offset, offset + int(n))
                offset += int(n)
        text = ranges["text"] if text_len > 0 else None
        shifted = tuple(tuple(text[0] + i for i in d) for d in descriptors) if text else tuple(descriptors)
        return cls(
            total=offset,
            target=ranges["target"],
            text=text,
            refs=tuple(refs),
            descriptors=shifted,
            target_grid=tuple(target_grid) if target_grid is not None else None,
        )

    # ------------------------------------------------------------------ accessors
    @property
    def num_subjects(self) -> int:
        return len(self.refs)

    @property
    def target_len(self) -> int:
        return self.target[1] - self.target[0]

    @property
    def ref_lens(self) -> tuple[int, ...]:
        return tuple(end - start for start, end in self.refs)

    def ref_ranges(self) -> list[Range]:
        """Reference ranges in the form `ref_attention_share` takes."""
        return list(self.refs)

    def slice(self, x: torch.Tensor, part: str | int, dim: int = 1) -> torch.Tensor:
        """Select `part` ("text", "target", or subject index k) of `x` along `dim`."""
        if isinstance(part, int):
            start, end = self.refs[part]
        elif part in ("text", "target"):
            rng = getattr(self, part)
            if rng is None:
                raise ValueError("TokenLayout.slice: the layout has no text range")
            start, end = rng
        else:
            raise ValueError(f"TokenLayout.slice: unknown part {part!r}; use 'text', 'target' or an index")
        if x.shape[dim] != self.total:
            raise ValueError(f"TokenLayout.slice: dim {dim} has length {x.shape[dim]}, layout total {self.total}")
        return x.narrow(dim, start, end - start)
