"""MCImagePipeline on tiny random components: shapes, determinism, references, input errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mcimage.config import MCImageConfig
from mcimage.pipeline import MCImagePipeline
from mcimage.presets import TINY_T5_LENGTH, build_tiny_components

H = W = 16


def _pipe(preset: str) -> MCImagePipeline:
    return MCImagePipeline.from_components(build_tiny_components(MCImageConfig.from_preset(preset), seed=0))


def _ref(color, mode="RGB", size=(12, 20)) -> Image.Image:
    return Image.new(mode, size, color)


def _run(pipe, refs=(), categories=None, **kw):
    kw = dict(dict(height=H, width=W, num_inference_steps=2, seed=0, output_type="np",
                   max_sequence_length=TINY_T5_LENGTH), **kw)
    return pipe("a man in a red hoodie", refs=refs, categories=categories, **kw).images


@pytest.fixture(scope="module")
def mc():
    return _pipe("tiny-multicrafter")


@pytest.fixture(scope="module")
def ofa():
    return _pipe("tiny-one-for-all")


def test_output_shape_range_multicrafter(mc):
    out = _run(mc, refs=[_ref((200, 30, 30)), _ref((30, 30, 200))])
    assert out.shape == (1, H, W, 3) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    pil = _run(mc, refs=[_ref((200, 30, 30))], output_type="pil")
    assert len(pil) == 1 and pil[0].size == (W, H) and pil[0].mode == "RGB"


def test_output_shape_one_for_all_and_batch(ofa):
    out = ofa(["a man", "a woman"], refs=[_ref((200, 30, 30)), _ref((30, 200, 30))], categories=["face", "upper"],
              height=H, width=W, num_inference_steps=2, seed=0, output_type="np",
              max_sequence_length=TINY_T5_LENGTH).images
    assert out.shape == (2, H, W, 3) and out.min() >= 0 and out.max() <= 1


def test_seed_determinism(mc):
    refs = [_ref((200, 30, 30))]
    a, b = _run(mc, refs, seed=3), _run(mc, refs, seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, _run(mc, refs, seed=4))


def test_references_change_output(mc, ofa):
    base = _run(mc)
    red = _run(mc, refs=[_ref((220, 20, 20))])
    blue = _run(mc, refs=[_ref((20, 20, 220))])
    assert not np.allclose(base, red) and not np.allclose(red, blue)
    a = _run(ofa, refs=[_ref((220, 20, 20))], categories=["face"])
    b = _run(ofa, refs=[_ref((20, 20, 220))], categories=["face"])
    assert not np.allclose(a, b)


def test_image_modes_converted(mc, tmp_path):
    cmyk = _ref((0, 255, 255, 0), mode="CMYK")
    grey16 = Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16))
    path = tmp_path / "ref.png"
    _ref((10, 200, 10, 128), mode="RGBA").save(path)
    arr = np.full((8, 8, 3), 120, dtype=np.uint8)
    out = _run(mc, refs=[cmyk, grey16, str(path), arr])
    assert out.shape == (1, H, W, 3)
    np.testing.assert_array_equal(_run(mc, refs=[cmyk]), _run(mc, refs=[cmyk.convert("RGB")]))


def test_bad_inputs(mc, ofa):
    with pytest.raises(ValueError, match="at most 4"):
        _run(mc, refs=[_ref((0, 0, 0))] * 5)
    with pytest.raises(ValueError, match=r"categories\[1\]"):
        _run(ofa, refs=[_ref((0, 0, 0))] * 2, categories=["face", "spaceship"])
    with pytest.raises(ValueError, match="needs categories"):
        _run(ofa, refs=[_ref((0, 0, 0))])
    with pytest.raises(ValueError, match="2 categories for 1"):
        _run(ofa, refs=[_ref((0, 0, 0))], categories=["face", "upper"])
    with pytest.raises(ValueError, match="repeat a category"):
        _run(ofa, refs=[_ref((0, 0, 0))] * 2, categories=["face", "face"])
    with pytest.raises(ValueError, match="unsupported image mode 'F'"):
        _run(mc, refs=[Image.new("F", (8, 8), 0.5)])
    with pytest.raises(ValueError, match="uint8"):
        _run(mc, refs=[np.zeros((8, 8, 3), dtype=np.float32)])
    with pytest.raises(ValueError, match="does not exist"):
        _run(mc, refs=["/nonexistent/ref.png"])
    with pytest.raises(ValueError, match="multiples of 4"):
        _run(mc, height=18)
    with pytest.raises(ValueError, match="output_type"):
        _run(mc, output_type="jpeg")
