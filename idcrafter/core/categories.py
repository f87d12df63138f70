"""One-for-All's category table and the prompt markup of item descriptors, without torch, so that
request validation can check categories and markup before any model code loads.
`idcrafter.core.positions` turns them into position ids."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "CATEGORY_ALIASES",
    "CATEGORY_IDS",
    "DescriptorSpan",
    "canonical_category",
    "category_index",
    "parse_descriptor_markup",
    "register_category",
]

# --------------------------------------------------------------------------------------------
# Category table (One-for-All)
# --------------------------------------------------------------------------------------------

# Canonical category name -> index c of eq. 2. c >= 1 so every category's diagonal block is
# shifted away from the origin, where the target grid lives (on the other time index).
CATEGORY_IDS: dict[str, int] = {"face": 1, "upper": 2, "lower": 3, "bag": 4}

# Normalised alias -> canonical name. Keys are written the way `_normalize` returns them.
CATEGORY_ALIASES: dict[str, str] = {"upper_garment": "upper", "lower_garment": "lower"}


def _normalize(name: str) -> str:
    """'Upper Garment', 'upper-garment', 'upper_garment' -> 'upper_garment'."""
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def _known_categories() -> str:
    known = ", ".join(sorted(CATEGORY_IDS))
    if CATEGORY_ALIASES:
        known += f" (aliases: {', '.join(sorted(CATEGORY_ALIASES))})"
    return known


def canonical_category(name: str) -> str:
    """The canonical table name for a category or alias, case- and separator-insensitive.

    Raises `ValueError` naming the category and listing the known ones.
    """
    key = _normalize(name)
    key = CATEGORY_ALIASES.get(key, key)
    if key not in CATEGORY_IDS:
        raise ValueError(
            f"unknown category {name!r}; known categories: {_known_categories()}; "
            "add one with register_category()"
        )
    return key


def category_index(name: str) -> int:
    """The index c of eq. 2 for a category name or alias (`'upper garment'` -> 2)."""
    return CATEGORY_IDS[canonical_category(name)]


def register_category(name: str, index: int, aliases: Iterable[str] = ()) -> None:
    """Add a category (and optional aliases) to the table.

    Re-registering a name with its current index only adds aliases. Changing an existing
    index, or giving two categories one index, raises: either would silently move the RoPE block
    a trained checkpoint expects, or make two categories share positions (attribute leakage).
    """
    key = _normalize(name)
    if isinstance(index, bool) or not isinstance(index, int) or index < 1:
        raise ValueError(f"category index must be an int >= 1, got {index!r} for {name!r}")
    if key in CATEGORY_ALIASES:
        raise ValueError(f"{name!r} is already an alias of category {CATEGORY_ALIASES[key]!r}")
    if key in CATEGORY_IDS and CATEGORY_IDS[key] != index:
        raise ValueError(f"category {key!r} already has index {CATEGORY_IDS[key]}, not {index}")
    owner = next((other for other, c in CATEGORY_IDS.items() if c == index and other != key), None)
    if owner is not None:
        raise ValueError(f"category index {index} is already used by {owner!r}")
    new_aliases = [_normalize(a) for a in aliases]
    for alias in new_aliases:
        target = CATEGORY_ALIASES.get(alias, alias if alias in CATEGORY_IDS else None)
        if target is not None and target != key:
            raise ValueError(f"alias {alias!r} already names category {target!r}")
    CATEGORY_IDS[key] = index
    for alias in new_aliases:
        if alias != key:
            CATEGORY_ALIASES[alias] = key


@dataclass(frozen=True)
class DescriptorSpan:
    """An item descriptor: `clean_prompt[char_start:char_end] == text`, whitespace-trimmed."""

    category: str
    char_start: int
    char_end: int
    text: str


# A tag is `<name>` or `</name>` with a name like `face` or `upper_garment`. Anything else with a
# `<` (e.g. "a < b") is ordinary prompt text.
_TAG = re.compile(r"<(/?)([A-Za-z][\w-]*)>")


def _tag_category(name: str, tag: str, pos: int, allowed: set[str] | None) -> str:
    try:
        category = canonical_category(name)
    except ValueError:
        category = None
    if category is None or (allowed is not None and category not in allowed):
        known = ", ".join(sorted(allowed)) if allowed is not None else _known_categories()
        raise ValueError(f"unknown category tag {tag} at char {pos}; known: {known}")
    return category


def parse_descriptor_markup(
    prompt: str, categories: Iterable[str] | None = None
) -> tuple[str, list[DescriptorSpan]]:
    """Strip `<category>...</category>` tags; return the clean prompt and descriptor spans.

    `a man <face>with short hair</face> wearing <upper>a red hoodie</upper>` ->
    (`a man with short hair wearing a red hoodie`,
     [DescriptorSpan('face', 6, 21, 'with short hair'), DescriptorSpan('upper', 30, 42, 'a red hoodie')])

    Offsets index the clean prompt; spans are trimmed of surrounding whitespace so a tokenizer
    token that starts at the following space is not counted in. Tag names go through
    `canonical_category` (aliases, any case); `categories` restricts which are allowed.

    Raises `ValueError`, naming the tag and its character position in `prompt`, for: unknown
    category tags, nested tags, a closing tag without an opening one, a closing tag that does
    not match the open one, an unclosed tag, an empty descriptor, and a category tagged twice.
    The last is an error because CCPA puts all of a category's descriptor tokens on one
    centroid of one reference block: two descriptors of one category would claim one subject,
    which is almost always a typo; write one tag.
    """
    allowed = None if categories is None else {canonical_category(c) for c in categories}
    pieces: list[str] = []
    clean_len = 0
    last = 0
    spans: list[DescriptorSpan] = []
    opened_at: dict[str, int] = {}
    # (category, tag text, its position in prompt, clean-prompt start) of the open tag.
    open_tag: tuple[str, str, int, int] | None = None

    for match in _TAG.finditer(prompt):
        pieces.append(prompt[last : match.start()])
        clean_len += match.start() - last
        last = match.end()
        tag, pos = match.group(0), match.start()
        category = _tag_category(match.group(2), tag, pos, allowed)

        if not match.group(1):  # opening tag
            if open_tag is not None:
                raise ValueError(
                    f"nested tag {tag} at char {pos} inside {open_tag[1]} opened at char {open_tag[2]}"
                )
            if category in opened_at:
                raise ValueError(
                    f"category {category!r} tagged twice: {tag} at char {pos}, first at char "
                    f"{opened_at[category]}; use one descriptor per category"
                )
            opened_at[category] = pos
            open_tag = (category, tag, pos, clean_len)
            continue

        if open_tag is None:
            raise ValueError(f"closing tag {tag} at char {pos} has no opening tag")
        open_category, open_text, open_pos, start = open_tag
        if category != open_category:
            raise ValueError(
                f"closing tag {tag} at char {pos} does not match {open_text} opened at char {open_pos}"
            )
        # Nesting is rejected, so no tag sits between the two: the text is the last piece.
        raw = pieces[-1]
        text = raw.strip()
        if not text:
            raise ValueError(f"empty descriptor {open_text} at char {open_pos}")
        char_start = start + (len(raw) - len(raw.lstrip()))
        spans.append(DescriptorSpan(category, char_start, char_start + len(text), text))
        open_tag = None

    if open_tag is not None:
        raise ValueError(f"unclosed tag {open_tag[1]} at char {open_tag[2]}")
    pieces.append(prompt[last:])
    return "".join(pieces), spans
