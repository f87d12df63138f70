"""FLUX position ids: worked examples by hand, markup parsing, token mapping, RoPE compatibility."""

from __future__ import annotations

import pytest
import torch

from idcrafter.core.positions import (
    DescriptorSpan,
    canonical_category,
    category_index,
    ccpa_descriptor_ids,
    condition_ids,
    descriptor_token_indices,
    parse_descriptor_markup,
    register_category,
    target_ids,
    text_ids,
    tokenize_with_descriptors,
    uno_diagonal_ids,
)


def rows(*r: tuple[float, float, float]) -> torch.Tensor:
    return torch.tensor(r, dtype=torch.float32)


# ------------------------------------------------------------------------------------------
# image-side ids
# ------------------------------------------------------------------------------------------


def test_target_ids_row_major():
    ids = target_ids(2, 3)
    assert ids.dtype == torch.float32
    expected = rows((0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (0, 1, 1), (0, 1, 2))
    assert torch.equal(ids, expected)
    assert torch.equal(target_ids(1, 2, t=1), rows((1, 0, 0), (1, 0, 1)))


def test_target_ids_match_diffusers_flux_pipeline():
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    stock = FluxPipeline._prepare_latent_image_ids(1, 4, 5, torch.device("cpu"), torch.float32)
    assert torch.equal(target_ids(4, 5), stock)


def test_uno_diagonal_worked_example():
    # target 2x3; ref 1 is 2x2 and starts at (H, W) = (2, 3); ref 2 is 1x2 at (2+2, 3+2) = (4, 5).
    ref1, ref2 = uno_diagonal_ids((2, 3), [(2, 2), (1, 2)])
    assert torch.equal(ref1, rows((0, 2, 3), (0, 2, 4), (0, 3, 3), (0, 3, 4)))
    assert torch.equal(ref2, rows((0, 4, 5), (0, 4, 6)))
    assert uno_diagonal_ids((2, 3), []) == []


def test_uno_diagonal_never_shares_rows_or_columns():
    target = target_ids(3, 4)
    refs = uno_diagonal_ids((3, 4), [(2, 5), (4, 1), (3, 3)])
    seen_h = set(target[:, 1].tolist())
    seen_w = set(target[:, 2].tolist())
    for ref in refs:
        assert seen_h.isdisjoint(ref[:, 1].tolist()) and seen_w.isdisjoint(ref[:, 2].tolist())
        seen_h |= set(ref[:, 1].tolist())
        seen_w |= set(ref[:, 2].tolist())


def test_condition_ids_face_2x2():
    # c = 1, h_ref = w_ref = 2: (1, i + 2, j + 2).
    expected = rows((1, 2, 2), (1, 2, 3), (1, 3, 2), (1, 3, 3))
    assert torch.equal(condition_ids("face", (2, 2)), expected)


def test_condition_ids_upper_3x4():
    # c = 2, h_ref = 3, w_ref = 4: h in 6..8, w in 8..11.
    ids = condition_ids("upper", (3, 4))
    assert ids.shape == (12, 3)
    assert torch.equal(ids[0], torch.tensor([1.0, 6, 8]))
    assert torch.equal(ids[3], torch.tensor([1.0, 6, 11]))
    assert torch.equal(ids[4], torch.tensor([1.0, 7, 8]))
    assert torch.equal(ids[-1], torch.tensor([1.0, 8, 11]))


def test_condition_ids_base_offset():
    # Target 2x3 adds (2, 3): face 2x2 -> (1, i + 2 + 2, j + 2 + 3).
    expected = rows((1, 4, 5), (1, 4, 6), (1, 5, 5), (1, 5, 6))
    assert torch.equal(condition_ids("face", (2, 2), base_offset=(2, 3)), expected)


# ------------------------------------------------------------------------------------------
# CCPA
# ------------------------------------------------------------------------------------------


def test_ccpa_centroids_worked_examples():
    assert torch.equal(ccpa_descriptor_ids("face", (2, 2), 3), rows(*[(1, 2.5, 2.5)] * 3))
    # upper, 3x4: (1, 2*3 + 1, 2*4 + 1.5)
    assert torch.equal(ccpa_descriptor_ids("upper", (3, 4), 2), rows((1, 7, 9.5), (1, 7, 9.5)))
    # lower, 1x1: a single token's block centre is the token itself: (1, 3, 3).
    assert torch.equal(ccpa_descriptor_ids("lower", (1, 1), 1), rows((1, 3, 3)))
    # face 2x2 with the target 2x3 as base offset: (1, 2.5 + 2, 2.5 + 3).
    assert torch.equal(ccpa_descriptor_ids("face", (2, 2), 1, base_offset=(2, 3)), rows((1, 4.5, 5.5)))
    assert ccpa_descriptor_ids("bag", (2, 2), 0).shape == (0, 3)


@pytest.mark.parametrize("category", ["face", "upper", "lower", "bag"])
@pytest.mark.parametrize("ref_hw", [(1, 1), (2, 2), (3, 4), (5, 2)])
@pytest.mark.parametrize("base_offset", [None, (2, 3)])
def test_ccpa_centroid_is_mean_of_condition_ids(category, ref_hw, base_offset):
    block_mean = condition_ids(category, ref_hw, base_offset).mean(dim=0)
    descriptor = ccpa_descriptor_ids(category, ref_hw, 4, base_offset)
    assert torch.allclose(descriptor, block_mean.expand(4, 3), atol=0, rtol=0)


def test_text_ids_places_descriptors_and_keeps_the_rest_at_zero():
    ids = text_ids(8, {"face": [1, 2], "upper garment": [5]}, ref_hws={"face": (2, 2), "upper": (3, 4)})
    expected = torch.zeros(8, 3)
    expected[1] = expected[2] = torch.tensor([1, 2.5, 2.5])
    expected[5] = torch.tensor([1, 7, 9.5])
    assert torch.equal(ids, expected)
    assert torch.equal(text_ids(4), torch.zeros(4, 3))
    with_offset = text_ids(3, {"face": [0]}, ref_hws={"face": (2, 2)}, base_offset=(2, 3))
    assert torch.equal(with_offset, rows((1, 4.5, 5.5), (0, 0, 0), (0, 0, 0)))


def test_text_ids_errors():
    with pytest.raises(ValueError, match="no reference size for descriptor category 'upper'"):
        text_ids(4, {"upper": [0]}, ref_hws={"face": (2, 2)})
    with pytest.raises(ValueError, match=r"index 4 of 'face' is outside \[0, 4\)"):
        text_ids(4, {"face": [4]}, ref_hws={"face": (2, 2)})
    with pytest.raises(ValueError, match="token 1 is claimed by descriptors 'face' and 'bag'"):
        text_ids(4, {"face": [1], "bag": [1]}, ref_hws={"face": (2, 2), "bag": (2, 2)})
    with pytest.raises(ValueError, match="'upper' given twice"):
        text_ids(4, {"upper": [0], "upper_garment": [1]}, ref_hws={"upper": (2, 2)})


# ------------------------------------------------------------------------------------------
# categories
# ------------------------------------------------------------------------------------------


def test_category_aliases():
    assert [category_index(n) for n in ("face", "upper", "lower", "bag")] == [1, 2, 3, 4]
    for name in ("upper_garment", "upper garment", "Upper-Garment", "UPPER"):
        assert category_index(name) == 2
        assert canonical_category(name) == "upper"
    assert category_index("lower_garment") == category_index("Lower Garment") == 3


def test_unknown_category_names_it_and_lists_known():
    with pytest.raises(
        ValueError, match=r"unknown category 'hat'; known categories: bag, face, lower, upper"
    ):
        category_index("hat")
    with pytest.raises(ValueError, match="unknown category 'hat'"):
        condition_ids("hat", (2, 2))


@pytest.fixture
def scratch_table(monkeypatch):
    """Give register_category a private copy of the tables so tests do not leak categories."""
    from idcrafter.core import categories

    monkeypatch.setattr(categories, "CATEGORY_IDS", dict(categories.CATEGORY_IDS))
    monkeypatch.setattr(categories, "CATEGORY_ALIASES", dict(categories.CATEGORY_ALIASES))


def test_register_category(scratch_table):
    register_category("Shoes", 5, aliases=["footwear", "pair of shoes"])
    assert category_index("shoes") == category_index("pair of shoes") == category_index("FOOTWEAR") == 5
    # Block 5 for a 2x2 ref: rows start at (1, 10, 10); centroid (1, 10.5, 10.5).
    assert torch.equal(condition_ids("footwear", (2, 2))[0], torch.tensor([1.0, 10, 10]))
    assert torch.equal(ccpa_descriptor_ids("shoes", (2, 2), 1), rows((1, 10.5, 10.5)))
    register_category("shoes", 5, aliases=["sneakers"])  # idempotent, adds an alias
    assert category_index("sneakers") == 5

    with pytest.raises(ValueError, match="already has index 5"):
        register_category("shoes", 6)
    with pytest.raises(ValueError, match="index 1 is already used by 'face'"):
        register_category("hat", 1)
    with pytest.raises(ValueError, match="alias 'face' already names category 'face'"):
        register_category("hat", 7, aliases=["face"])
    with pytest.raises(ValueError, match="must be an int >= 1"):
        register_category("hat", 0)


def test_register_category_does_not_leak_between_tests():
    with pytest.raises(ValueError):
        category_index("shoes")


def test_size_validation():
    with pytest.raises(ValueError, match="ref_hw must be positive"):
        condition_ids("face", (0, 2))
    with pytest.raises(ValueError, match=r"ref_hws\[1\] must be a pair of ints"):
        uno_diagonal_ids((2, 2), [(1, 1), (1.5, 2)])
    with pytest.raises(ValueError, match="base_offset must be non-negative"):
        condition_ids("face", (2, 2), base_offset=(-1, 0))


# ------------------------------------------------------------------------------------------
# markup
# ------------------------------------------------------------------------------------------

PROMPT = "a man <face>with short hair</face> wearing <upper>a red hoodie</upper>"
CLEAN = "a man with short hair wearing a red hoodie"


def test_parse_markup_offsets():
    clean, spans = parse_descriptor_markup(PROMPT)
    assert clean == CLEAN
    assert spans == [
        DescriptorSpan("face", 6, 21, "with short hair"),
        DescriptorSpan("upper", 30, 42, "a red hoodie"),
    ]
    for span in spans:
        assert clean[span.char_start : span.char_end] == span.text


def test_parse_markup_aliases_trimming_and_plain_text():
    clean, spans = parse_descriptor_markup("A <Upper_Garment> blue coat </upper> and <bag>tote</bag>, 3 < 4")
    assert clean == "A  blue coat  and tote, 3 < 4"
    assert spans == [DescriptorSpan("upper", 3, 12, "blue coat"), DescriptorSpan("bag", 18, 22, "tote")]
    assert parse_descriptor_markup("no tags here") == ("no tags here", [])


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("a <face>man", r"unclosed tag <face> at char 2"),
        ("a man</face>", r"closing tag </face> at char 5 has no opening tag"),
        ("<face>a man</upper>", r"closing tag </upper> at char 11 does not match <face> opened at char 0"),
        ("<face>a <upper>red</upper></face>", r"nested tag <upper> at char 8 inside <face> opened at char 0"),
        ("a <hat>cap</hat>", r"unknown category tag <hat> at char 2; known: bag, face, lower, upper"),
        (
            "<face>a</face> <face>b</face>",
            r"category 'face' tagged twice: <face> at char 15, first at char 0",
        ),
        ("a <face>  </face>", r"empty descriptor <face> at char 2"),
    ],
)
def test_parse_markup_errors(prompt, message):
    with pytest.raises(ValueError, match=message):
        parse_descriptor_markup(prompt)


def test_parse_markup_restricted_categories():
    with pytest.raises(ValueError, match=r"unknown category tag <upper> at char 18; known: face$"):
        parse_descriptor_markup("<face>a man</face><upper>coat</upper>", categories=["face"])


# ------------------------------------------------------------------------------------------
# token mapping
# ------------------------------------------------------------------------------------------


def test_descriptor_token_indices_overlap_rule():
    spans = [DescriptorSpan("face", 4, 7, "x"), DescriptorSpan("bag", 10, 12, "y")]
    # special (0, 0) at both ends; token 2 (3-6) and token 3 (6-9) are cut by the face span edges.
    offsets = [(0, 0), (0, 3), (3, 6), (6, 9), (9, 12), (0, 0)]
    assert descriptor_token_indices(spans, offsets) == {"face": [2, 3], "bag": [4]}
    assert descriptor_token_indices(spans, torch.tensor(offsets)) == {"face": [2, 3], "bag": [4]}


def test_descriptor_token_indices_errors():
    offsets = [(0, 0), (0, 5), (5, 9)]
    with pytest.raises(ValueError, match="token 1 \\(chars 0-5\\) overlaps descriptors 'face' and 'upper'"):
        descriptor_token_indices(
            [DescriptorSpan("face", 0, 2, "ha"), DescriptorSpan("upper", 2, 5, "coat")], offsets
        )
    with pytest.raises(ValueError, match="'bag' .* maps to no token; was the prompt truncated"):
        descriptor_token_indices([DescriptorSpan("bag", 12, 15, "bag")], offsets)


@pytest.fixture(scope="module")
def word_tokenizer():
    """A real HF fast tokenizer built offline: WordLevel + whitespace, T5-like `</s>` plus a BOS."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    words = "[PAD] [UNK] <s> </s> a man with short hair wearing red hoodie".split()
    core = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = Whitespace()
    core.post_processor = TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )


def test_tokenize_with_descriptors_real_tokenizer(word_tokenizer):
    input_ids, tokens = tokenize_with_descriptors(word_tokenizer, PROMPT, max_length=14)
    # <s> a man with short hair wearing a red hoodie </s> [PAD] x3
    assert input_ids.tolist() == [2, 4, 5, 6, 7, 8, 9, 4, 10, 11, 3, 0, 0, 0]
    assert tokens == {"face": [3, 4, 5], "upper": [7, 8, 9]}

    ids = text_ids(14, tokens, ref_hws={"face": (2, 2), "upper": (3, 4)})
    assert ids[[3, 4, 5]].tolist() == [[1, 2.5, 2.5]] * 3
    assert ids[[7, 8, 9]].tolist() == [[1, 7, 9.5]] * 3
    others = [i for i in range(14) if i not in (3, 4, 5, 7, 8, 9)]
    assert not ids[others].any()


def test_tokenize_with_descriptors_truncation_is_an_error(word_tokenizer):
    # max_length 6 keeps "<s> a man with short </s>": face survives in part, upper not at all.
    with pytest.raises(ValueError, match="'upper' .* maps to no token"):
        tokenize_with_descriptors(word_tokenizer, PROMPT, max_length=6)


def test_tokenize_with_descriptors_needs_fast_tokenizer():
    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="Slow is not a fast tokenizer"):
        tokenize_with_descriptors(Slow(), PROMPT)


# ------------------------------------------------------------------------------------------
# diffusers compatibility
# ------------------------------------------------------------------------------------------


def _one_for_all_ids() -> tuple[torch.Tensor, torch.Tensor]:
    """Text (6 tokens, face descriptor at 2..3) and image ids (target 2x3, face ref 2x2)."""
    txt = text_ids(6, {"face": [2, 3]}, ref_hws={"face": (2, 2)}, base_offset=(2, 3))
    img = torch.cat([target_ids(2, 3), condition_ids("face", (2, 2), base_offset=(2, 3))])
    return txt, img


def test_flux_pos_embed_accepts_fractional_ccpa_rows():
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    txt, img = _one_for_all_ids()
    ids = torch.cat([txt, img])  # the order FluxTransformer2DModel concatenates them in
    assert ids.shape == (16, 3) and ids[2].tolist() == [1, 4.5, 5.5]
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=[4, 6, 6])(ids)
    assert cos.shape == sin.shape == (16, 16)
    assert torch.isfinite(cos).all() and torch.isfinite(sin).all()
    assert torch.allclose(cos**2 + sin**2, torch.ones_like(cos), atol=1e-6)
    # Fractional rows get their own rotation: not the one of any integer neighbour.
    assert not torch.allclose(cos[2], cos[0]) and not torch.allclose(cos[2], cos[12])


def test_tiny_flux_transformer_runs_with_these_ids():
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=8,
        pooled_projection_dim=8,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    txt, img = _one_for_all_ids()
    inputs = dict(
        hidden_states=torch.randn(1, 10, 4),
        encoder_hidden_states=torch.randn(1, 6, 8),
        pooled_projections=torch.randn(1, 8),
        timestep=torch.tensor([0.5]),
    )
    with torch.no_grad():
        out = model(**inputs, txt_ids=txt, img_ids=img).sample
        flat = model(**inputs, txt_ids=torch.zeros_like(txt), img_ids=img).sample
    assert out.shape == (1, 10, 4) and torch.isfinite(out).all()
    # The CCPA rows reach the attention: moving the descriptor to (0, 0, 0) changes the output.
    assert not torch.allclose(out, flat)
