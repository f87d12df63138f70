"""TokenLayout validation and accessors."""

from __future__ import annotations

import pytest
import torch

from idcrafter.core.layout import TokenLayout


def test_concat_flux_order():
    layout = TokenLayout.concat(text_len=5, target_len=8, ref_lens=(4, 2), descriptors=[(1, 2), ()], target_grid=(2, 4))
    assert layout.text == (0, 5) and layout.target == (5, 13)
    assert layout.refs == ((13, 17), (17, 19)) and layout.total == 19
    assert layout.descriptors == ((1, 2), ())
    assert layout.num_subjects == 2 and layout.ref_lens == (4, 2)
    x = torch.arange(19)[None]
    assert layout.slice(x, "target").tolist() == [list(range(5, 13))]
    assert layout.slice(x, 1).tolist() == [[17, 18]]


def test_concat_other_order_shifts_descriptors():
    layout = TokenLayout.concat(text_len=3, target_len=4, ref_lens=(2,), order=("target", "refs", "text"), descriptors=[(0, 2)])
    assert layout.target == (0, 4) and layout.refs == ((4, 6),) and layout.text == (6, 9)
    assert layout.descriptors == ((6, 8),)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(total=10, target=(0, 6), refs=((5, 8),)), "overlap"),
        (dict(total=10, target=(0, 4), text=(3, 6)), "overlap"),
        (dict(total=10, target=(0, 4), refs=((8, 12),)), "outside"),
        (dict(total=10, target=(4, 4)), "empty"),
        (dict(total=10, target=(6, 2)), "empty"),
        (dict(total=10, target=(0, 4), text=(4, 6), refs=((6, 8),), descriptors=((7,),)), "outside the text range"),
        (dict(total=10, target=(0, 4), refs=((6, 8),), descriptors=((1,), (2,))), "descriptor entries"),
        (dict(total=10, target=(0, 4), target_grid=(3, 2)), "target_grid"),
        (dict(total=10, target=(0, 4, 5)), "pair"),
    ],
)
def test_invalid_layouts_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenLayout(**kwargs)


def test_slice_checks_length_and_part():
    layout = TokenLayout.concat(target_len=4, ref_lens=(2,))
    with pytest.raises(ValueError, match="layout total"):
        layout.slice(torch.zeros(1, 7), "target")
    with pytest.raises(ValueError, match="no text"):
        layout.slice(torch.zeros(1, 6), "text")
    with pytest.raises(ValueError, match="unknown part"):
        layout.slice(torch.zeros(1, 6), "refs")
