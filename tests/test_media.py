"""Reading images as users hand them over: every PIL mode against an independent computation of
its RGB, EXIF orientation on a real photo, and one rule for references in video inference, image
inference, training data and evaluation."""

from __future__ import annotations

import colorsys
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idcrafter.utils.cli import InputError
from idcrafter.utils.errors import FileFormatError
from idcrafter.utils.media import load_image, load_rgb, to_rgb

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (6, 5, 3)).astype(np.uint8)  # 6x5: orientation mistakes change the shape
ALPHA = RNG.integers(0, 256, (6, 5)).astype(np.uint8)


def over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Straight-alpha compositing on white, rounded as 8-bit."""
    a = alpha[..., None].astype(np.float64) / 255
    return np.round(colour * a + 255 * (1 - a))


def srgb_to_lab_bytes(rgb: np.ndarray) -> np.ndarray:
    """sRGB -> CIE L*a*b* (D50, the ICC connection space, Bradford-adapted from sRGB's D65) in PIL's
    LAB byte layout (L scaled to 0..255, a and b as signed bytes). Textbook formulas (Lindbloom)."""
    c = rgb / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]])
    bradford = np.array([[1.0478112, 0.0228866, -0.0501270], [0.0295424, 0.9904844, -0.0170491],
                         [-0.0092345, 0.0150436, 0.7521316]])
    xyz = lin @ m.T @ bradford.T / np.array([0.96422, 1.0, 0.82521])
    e, k = 216 / 24389, 24389 / 27
    f = np.where(xyz > e, np.cbrt(xyz), (k * xyz + 16) / 116)
    lab = np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)
    return np.stack([np.round(lab[..., 0] * 255 / 100), np.round(lab[..., 1]) % 256, np.round(lab[..., 2]) % 256],
                    -1).astype(np.uint8)


def case(mode: str) -> tuple[Image.Image, np.ndarray | None, float]:
    """(image in `mode`, its RGB computed independently or None when the mode is refused, tolerance)."""
    grey = RGB[..., 0]
    if mode == "1":
        bits = grey > 127
        return Image.fromarray(bits), np.repeat(bits[..., None] * 255, 3, -1), 0
    if mode == "L":
        return Image.fromarray(grey, "L"), np.repeat(grey[..., None], 3, -1), 0
    if mode == "P":
        palette = RNG.integers(0, 256, (256, 3)).astype(np.uint8)
        index = RGB[..., 1]
        image = Image.fromarray(index, "P")
        image.putpalette(palette.flatten().tolist())
        return image, palette[index], 0
    if mode in ("RGB", "RGBX"):
        image = Image.fromarray(RGB, "RGB")
        return (image if mode == "RGB" else image.convert("RGBX")), RGB, 0
    if mode == "CMYK":
        cmyk = np.concatenate([255 - RGB, RGB[..., :1] // 5], -1)
        k = cmyk[..., 3:].astype(np.float64)
        return Image.fromarray(cmyk, "CMYK"), np.round((255 - cmyk[..., :3]) * (255 - k) / 255), 1
    if mode == "YCbCr":  # JPEG's full-range BT.601
        y, cb, cr = (RGB[..., i].astype(np.float64) for i in range(3))
        rgb = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                        y + 1.772 * (cb - 128)], -1)
        return Image.fromarray(RGB, "YCbCr"), np.clip(rgb, 0, 255), 2
    if mode == "LAB":
        # mid-range colours: near the gamut's edge and sRGB's steep dark end, PIL's 8-bit Lab -> RGB
        # transform (LittleCMS) strays by more than 3 from the exact inverse
        mid = (60 + RGB.astype(np.float64) * 135 / 255).round()
        return Image.fromarray(srgb_to_lab_bytes(mid), "LAB"), mid, 3
    if mode == "HSV":
        hsv = np.array([[colorsys.rgb_to_hsv(*(px / 255)) for px in row] for row in RGB])
        return Image.fromarray(np.round(hsv * 255).astype(np.uint8), "HSV"), RGB, 3
    if mode == "RGBA":
        return Image.fromarray(np.dstack([RGB, ALPHA]), "RGBA"), over_white(RGB, ALPHA), 1
    if mode == "RGBa":  # premultiplied: stored colour = colour * alpha
        pre = np.round(RGB * (ALPHA[..., None] / 255.0)).astype(np.uint8)
        visible = ALPHA > 20  # un-premultiplying loses precision where alpha is tiny
        return Image.fromarray(np.dstack([pre, ALPHA]), "RGBa"), np.where(visible[..., None], over_white(RGB, ALPHA), -1), 3
    if mode == "LA":
        return Image.merge("LA", (Image.fromarray(RGB[..., 0]), Image.fromarray(ALPHA))), \
            np.repeat(over_white(RGB[..., :1], ALPHA), 3, -1), 1
    if mode == "La":
        pre = np.round(RGB[..., 0] * (ALPHA / 255.0)).astype(np.uint8)
        image = Image.merge("LA", (Image.fromarray(pre), Image.fromarray(ALPHA)))
        image = Image.frombytes("La", image.size, image.tobytes())
        visible = ALPHA > 20
        return image, np.where(visible[..., None], np.repeat(over_white(RGB[..., :1], ALPHA), 3, -1), -1), 3
    if mode == "PA":
        palette = RNG.integers(0, 256, (256, 3)).astype(np.uint8)
        image = Image.fromarray(RGB[..., 2], "P")
        image.putpalette(palette.flatten().tolist())
        image = image.convert("PA")
        image.putalpha(Image.fromarray(ALPHA))
        return image, over_white(palette[RGB[..., 2]], ALPHA), 1
    if mode == "I" or mode.startswith("I;16"):
        values = RNG.integers(0, 65536, RGB.shape[:2]).astype(np.uint16)
        if mode == "I":  # 32-bit, as 16-bit PNGs and TIFFs open in some Pillow versions
            image = Image.fromarray(values.astype(np.int32), "I")
        else:
            order = {"I;16B": ">u2", "I;16N": "=u2"}.get(mode, "<u2")
            h, w = values.shape
            image = Image.frombytes(mode, (w, h), values.astype(order).tobytes())
        return image, np.repeat(np.round(values / 257.0)[..., None], 3, -1), 0
    if mode == "F":
        return Image.fromarray(RGB[..., 0].astype(np.float32) / 255, "F"), None, 0
    raise AssertionError(f"no test case for PIL mode {mode!r}")


@pytest.mark.parametrize("mode", Image.MODES)  # every mode this Pillow has: a new one fails here first
def test_every_pil_mode_is_read_faithfully_or_refused(mode):
    image, expected, tolerance = case(mode)
    assert image.mode == mode
    if expected is None:
        with pytest.raises(FileFormatError, match=f"unsupported image mode '{mode}'"):
            to_rgb(image)
        return
    got = np.asarray(to_rgb(image)).astype(np.int64)
    assert got.shape == (*RGB.shape[:2], 3)
    known = expected >= 0
    assert np.abs(got - expected)[known].max() <= tolerance, mode


def test_wider_than_16_bit_integers_are_refused():
    with pytest.raises(FileFormatError, match="outside 0..65535"):
        to_rgb(Image.fromarray(np.array([[0, 70000]], np.int32), "I"))
    with pytest.raises(FileFormatError, match="outside 0..65535"):
        to_rgb(Image.fromarray(np.array([[-5, 7]], np.int32), "I"))


def test_16_bit_png_from_disk_is_rescaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    image = load_image(tmp_path / "deep.png")
    assert image.mode == "I;16"
    assert np.asarray(load_rgb(tmp_path / "deep.png"))[0, :, 0].tolist() == [0, 100, 255]


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A real photo (scikit-image's astronaut) stored sideways with EXIF orientation 6, as phones do,
    and the upright original it must come back as."""
    from skimage import data

    upright = data.astronaut()[::4, ::2]  # 128 x 256: not square, so a wrong turn changes the shape
    folder = tmp_path_factory.mktemp("photo")
    # Orientation 6: the stored pixels are the upright picture turned 90 degrees counter-clockwise.
    stored = Image.fromarray(np.rot90(upright, 1))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(folder / "phone.png", exif=exif.tobytes())
    Image.fromarray(upright).save(folder / "upright.png")
    return folder / "phone.png", upright


def test_exif_orientation_turns_a_phone_photo_upright(photo):
    from idcrafter.data.video import media_size

    path, upright = photo
    with Image.open(path) as raw:
        assert raw.size == (upright.shape[0], upright.shape[1])  # stored sideways
    got = np.asarray(load_rgb(path))
    assert got.shape == upright.shape
    np.testing.assert_array_equal(got, upright)
    assert media_size(path) == upright.shape[:2]  # the header read used for buckets agrees


def test_the_same_rule_in_inference_training_and_evaluation(photo, tmp_path):
    """A sideways photo is the same upright reference everywhere; a float image is refused
    everywhere with the same message."""
    import torch

    from idcrafter.data.dataset import VideoDataset
    from idcrafter.data.manifest import load_manifest
    from idcrafter.eval.metrics import read_image
    from idcrafter.utils.media import fit_on_canvas, image_to_tensor
    from idcrafter.video.infer import InferenceRequest
    from idcrafter.video.infer import validate as validate_video
    from mcimage.infer import ImageInferenceRequest
    from mcimage.infer import validate as validate_image

    path, upright = photo
    floats = tmp_path / "float.tif"
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(floats)

    # evaluation reads generated stills the same way
    np.testing.assert_array_equal(read_image(path)[0], upright)
    with pytest.raises(FileFormatError, match="unsupported image mode 'F'"):
        read_image(floats)
    # inference (both branches) refuses the float image at validation
    with pytest.raises(InputError, match="unsupported image mode 'F'"):
        validate_video(InferenceRequest(refs=[str(floats)], prompt="p", out=str(tmp_path / "o.mp4")))
    with pytest.raises(InputError, match="unsupported image mode 'F'"):
        validate_image(ImageInferenceRequest(refs=[str(floats)], prompt="p", out=str(tmp_path / "o.png")))

    # training: the dataset's reference tensor is the upright photo fitted on the canvas; the float
    # reference makes its sample fail with the same reason (skipped and counted, never black)
    Image.fromarray(upright).save(tmp_path / "target.png")
    lines = [{"id": "ok", "image": "target.png", "prompt": "p", "subjects": [{"image": str(path), "category": "x"}]},
             {"id": "bad", "image": "target.png", "prompt": "p", "subjects": [{"image": str(floats), "category": "x"}]}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    samples, errors = load_manifest(tmp_path / "m.jsonl")
    assert not errors
    dataset = VideoDataset(samples, num_frames=1, fps=8, ref_size=(64, 64))
    item = dataset[0]
    expected = image_to_tensor(fit_on_canvas(Image.fromarray(upright), 64, 64))
    torch.testing.assert_close(item["refs"][0], expected)
    assert dataset[1] is None and "unsupported image mode 'F'" in dataset.failures["bad"]


def test_the_same_frames_always_encode_to_the_same_mp4(tmp_path):
    """x264's mbtree read memory it had not written: with small heap blocks filled with other bytes
    between encodes, identical frames came out as different files (with mbtree on, 28 to 40 of 100
    encodes of this clip differed; off, 0 of 200)."""
    import ctypes
    import hashlib

    from idcrafter.curate.toyworld import make_raw_video
    from idcrafter.utils.media import encode_video, read_video

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    rng = np.random.default_rng(0)
    frames = make_raw_video(0, seed=0).frames  # [50, 64, 64, 3] uint8: toy sprites and a hard cut
    digests = set()
    for _ in range(60):
        blocks = []
        for _ in range(2000):  # garbage in the small blocks x264 and FFmpeg allocate next
            size = int(rng.integers(16, 4096))
            block = libc.malloc(size)
            ctypes.memset(block, int(rng.integers(0, 256)), size)
            blocks.append(block)
        for block in blocks:
            libc.free(block)
        digests.add(hashlib.sha1(encode_video(frames, tmp_path / "clip.mp4", fps=16).read_bytes()).hexdigest())
    assert len(digests) == 1
    assert len(read_video(tmp_path / "clip.mp4")) == 50
