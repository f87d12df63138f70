"""Reading references and videos, writing mp4s: the pipeline's and the CLI's file IO."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from idcrafter.utils.cli import InputError
from idcrafter.utils.deps import is_available
from idcrafter.utils.io import atomic_write

# 16-bit PNGs open in these modes; convert("RGB") would clip them to white instead of scaling.
HIGH_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
# PIL modes `to_rgb` converts faithfully (16-bit greyscale is rescaled, alpha composited on white);
# others (e.g. "F" float images) have no agreed range and are refused by the image branch.
RGB_CONVERTIBLE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "La", "CMYK", "YCbCr", "LAB", "HSV",
                         *HIGH_BIT_MODES)


def load_image(path: str | Path) -> Image.Image:
    """Open an image fully (so a truncated file fails here, not later); InputError names the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"reference image {path} does not exist")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InputError(f"reference image {path} cannot be read ({err.__class__.__name__}: {err})") from None


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL image -> RGB; transparent images are composited on `background` (white)."""
    if image.mode == "RGB":
        return image
    if image.mode in HIGH_BIT_MODES:
        scaled = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(scaled, 0, 255).round().astype(np.uint8), "L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


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
