"""Reading references and videos, writing mp4s: the pipeline's and the CLI's file IO."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from idcrafter.utils.cli import InputError
from idcrafter.utils.deps import is_available
from idcrafter.utils.io import atomic_write

# PIL modes and how `to_rgb` turns them into RGB (every mode Pillow has; tests/test_media.py checks each):
# - converted by PIL: "1", "L", "P", "RGB", "RGBX", "CMYK" (naive, no ICC profile), "YCbCr", "LAB", "HSV";
# - alpha composited on white: "RGBA", "RGBa", "LA", "La", "PA", "P" with a transparent colour;
# - 16-bit grey, rescaled by 1/257 (convert("RGB") would clip it to white): "I;16", "I;16L", "I;16B", "I;16N",
#   and "I" (32-bit) when its values fit in 16 bits, as 16-bit PNGs and TIFFs open;
# - refused: "F" (32-bit float has no agreed range: [0, 1] and [0, 255] are both common) and "I" beyond 16 bits.
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
RGB_CONVERTIBLE_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", *ALPHA_MODES, *HIGH_BIT_MODES)


def load_image(path: str | Path, what: str = "reference image") -> Image.Image:
    """Open an image fully (so a truncated file fails here, not later) and turn it upright by its
    EXIF orientation (phone photos are stored sideways with a tag saying so). Any PIL mode; see
    `load_rgb` for RGB. InputError names `what` and the file: missing, a folder, unreadable."""
    from idcrafter.utils.cli import path_problem

    path = Path(path)
    problem = path_problem(path)
    if problem:
        raise InputError(f"{what} {path} {problem}")
    try:
        with Image.open(path) as img:
            img.load()
            upright = ImageOps.exif_transpose(img)
            return upright if upright is not img else img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error, Image.DecompressionBombError) as err:
        raise InputError(f"{what} {path} cannot be read ({err.__class__.__name__}: {err})") from None


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255), what: str = "image") -> Image.Image:
    """Any PIL image -> RGB by the table above; transparent images are composited on `background`.

    Raises InputError (naming `what`) for the modes that have no faithful RGB reading.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode not in RGB_CONVERTIBLE_MODES:
        hint = "32-bit float images have no agreed value range" if mode == "F" else "an unknown mode"
        raise InputError(f"{what}: unsupported image mode {mode!r} ({hint}); save it as 8- or 16-bit RGB or grey")
    if mode in HIGH_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise InputError(f"{what}: 32-bit integer image with values outside 0..65535; save it as 8- or 16-bit")
        return Image.fromarray((values / 257.0).round().astype(np.uint8), "L").convert("RGB")
    if mode == "La":  # premultiplied grey + alpha: PIL converts it to nothing else
        grey, alpha = (np.asarray(band, dtype=np.float64) for band in image.split())
        straight = np.where(alpha > 0, grey * 255.0 / np.maximum(alpha, 1), 0).clip(0, 255).round().astype(np.uint8)
        image, mode = Image.merge("LA", (Image.fromarray(straight, "L"), image.getchannel("A"))), "LA"
    if mode in ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str | Path, what: str = "reference image") -> Image.Image:
    """`load_image` then `to_rgb`: the one way references, targets and masks-as-images are read
    in inference, training, RL and evaluation, so a file is either read the same everywhere or
    refused everywhere with the same line."""
    return to_rgb(load_image(path, what), what=f"{what} {path}")


def fit_on_canvas(img: Image.Image, height: int, width: int) -> Image.Image:
    """Resize keeping the aspect ratio to fit height x width, centred on a white canvas."""
    img = to_rgb(img)
    scale = min(width / img.width, height / img.height)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(img.resize(size, Image.BICUBIC), ((width - size[0]) // 2, (height - size[1]) // 2))
    return canvas


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] float in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)


def read_video(path: str | Path, num_frames: int | None = None) -> np.ndarray:
    """Decode a video to uint8 [F, H, W, 3] with decord when installed, else PyAV."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"video {path} does not exist")
    try:
        if is_available("decord"):
            import decord

            reader = decord.VideoReader(str(path))
            count = len(reader) if num_frames is None else min(num_frames, len(reader))
            frames = reader.get_batch(list(range(count))).asnumpy()
        else:
            import av

            with av.open(str(path)) as container:
                frames = []
                for frame in container.decode(video=0):
                    frames.append(frame.to_ndarray(format="rgb24"))
                    if num_frames is not None and len(frames) >= num_frames:
                        break
            frames = np.stack(frames) if frames else np.zeros((0, 1, 1, 3), np.uint8)
    except InputError:
        raise
    except Exception as err:  # decoders raise many types for corrupt files
        raise InputError(f"video {path} cannot be decoded ({err.__class__.__name__}: {err})") from None
    if len(frames) == 0:
        raise InputError(f"video {path} has no frames")
    return frames


def write_video(frames: np.ndarray | list, path: str | Path, fps: int = 16) -> Path:
    """Write frames ([F, H, W, 3] float in [0, 1] or uint8) as an H.264 mp4, atomically."""
    from diffusers.utils import export_to_video

    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    path = Path(path)
    with atomic_write(path) as tmp:
        # PIL frames: export_to_video rescales numpy frames as if they were floats in [0, 1].
        export_to_video([Image.fromarray(f) for f in frames], str(tmp), fps=fps)
    return path


def write_image(image: Image.Image | np.ndarray, path: str | Path) -> Path:
    """Write one image (PIL, or [H, W, 3] float in [0, 1] / uint8) atomically; format from the suffix."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        image = Image.fromarray(image)
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"output {path}: {path.suffix or 'no suffix'} is not an image format PIL writes")
    with atomic_write(path) as tmp:
        image.convert("RGB").save(tmp, format=fmt)
    return path
