"""Reading references and videos, writing mp4s: the pipeline's and the CLI's file IO."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from idcrafter.utils.deps import is_available
from idcrafter.utils.errors import FileFormatError
from idcrafter.utils.io import atomic_write

if TYPE_CHECKING:
    import torch

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
    `load_rgb` for RGB. FileFormatError names `what` and the file: missing, a folder, unreadable."""
    from idcrafter.utils.cli import path_problem

    path = Path(path)
    problem = path_problem(path)
    if problem:
        raise FileFormatError(f"{what} {path} {problem}")
    try:
        with Image.open(path) as img:
            img.load()
            upright = ImageOps.exif_transpose(img)
            return upright if upright is not img else img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error, Image.DecompressionBombError) as err:
        raise FileFormatError(f"{what} {path} cannot be read ({err.__class__.__name__}: {err})") from None


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255), what: str = "image") -> Image.Image:
    """Any PIL image -> RGB by the table above; transparent images are composited on `background`.

    Raises FileFormatError (naming `what`) for the modes that have no faithful RGB reading.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode not in RGB_CONVERTIBLE_MODES:
        hint = "32-bit float images have no agreed value range" if mode == "F" else "an unknown mode"
        raise FileFormatError(f"{what}: unsupported image mode {mode!r} ({hint}); save it as 8- or 16-bit RGB or grey")
    if mode in HIGH_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise FileFormatError(f"{what}: 32-bit integer image with values outside 0..65535; save it as 8- or 16-bit")
        return Image.fromarray((values / 257.0).round().astype(np.uint8), "L").convert("RGB")
    if mode == "La":  # premultiplied grey + alpha: PIL converts it to nothing else
        grey_band, alpha_band = image.split()
        grey, alpha = np.asarray(grey_band, dtype=np.float64), np.asarray(alpha_band, dtype=np.float64)
        straight = np.where(alpha > 0, grey * 255.0 / np.maximum(alpha, 1), 0).clip(0, 255).round().astype(np.uint8)
        image, mode = Image.merge("LA", (Image.fromarray(straight, "L"), alpha_band)), "LA"
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
    import torch  # here, so reading and checking images does not import torch
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)


def read_video(path: str | Path, num_frames: int | None = None) -> np.ndarray:
    """Decode a video to uint8 [F, H, W, 3] with decord when installed, else PyAV."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"video {path} does not exist")
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
    except FileFormatError:
        raise
    except Exception as err:  # decoders raise many types for corrupt files
        raise FileFormatError(f"video {path} cannot be decoded ({err.__class__.__name__}: {err})") from None
    if len(frames) == 0:
        raise FileFormatError(f"video {path} has no frames")
    return frames


# ------------------------------------------------------------------------------------ writing outputs
# Container suffix -> (container format, encoder, pixel format). Each container gets a codec it
# can hold and players expect in it: H.264 in yuv420p (the one H.264 profile every player decodes)
# for .mp4/.mov/.mkv, VP9 for .webm (browsers refuse H.264 there), GIF for .gif. Encoders depend
# on how PyAV's FFmpeg was built, so `video_suffix_problem` asks it before anything is rendered.
VIDEO_CODECS = {
    ".mp4": ("mp4", "libx264", "yuv420p"),
    ".mov": ("mov", "libx264", "yuv420p"),
    ".mkv": ("matroska", "libx264", "yuv420p"),
    ".webm": ("webm", "libvpx-vp9", "yuv420p"),
    ".gif": ("gif", "gif", "pal8"),
}
# crf 23: x264's own default. mbtree=0: x264's macroblock-tree rate control read memory it had not
# written, so identical frames came out as different bitstreams (and decoded pixels) from process to
# process; without it the same frames always give the same file. VP9 needs b=0 for constant quality,
# and cpu-used/row-mt or it encodes many times slower than H.264.
_ENCODER_OPTIONS = {
    "libx264": {"crf": "23", "x264-params": "mbtree=0"},
    "libvpx-vp9": {"crf": "32", "b": "0", "cpu-used": "4", "row-mt": "1"},
    "gif": {},
}
_CONTAINER_OPTIONS = {"mp4": {"movflags": "+faststart"}, "mov": {"movflags": "+faststart"}}
_EVEN_SIZE_ENCODERS = ("libx264",)  # 4:2:0 chroma halves both sides; x264 refuses odd ones
_ENCODERS: dict[str, bool] = {}


class OutputCheckError(RuntimeError):
    """A written file does not decode to what was written: it must not count as a finished output."""


def has_encoder(name: str) -> bool:
    """Whether this PyAV build can encode with `name` (cached: asked once per process)."""
    if name not in _ENCODERS:
        import av

        try:
            av.codec.Codec(name, "w")
        except av.codec.codec.UnknownCodecError:
            _ENCODERS[name] = False
        else:
            _ENCODERS[name] = True
    return _ENCODERS[name]


def video_suffix_problem(suffix: str) -> str | None:
    """Why `write_video` cannot write a file ending in `suffix`, or None when it can."""
    entry = VIDEO_CODECS.get(suffix.lower())
    if entry is None:
        return f"{suffix or 'no suffix'} is not a video format this writer knows (use {', '.join(VIDEO_CODECS)})"
    if not has_encoder(entry[1]):
        return f"{suffix} needs the {entry[1]} encoder, which this PyAV build does not have"
    return None


def image_suffix_problem(suffix: str) -> str | None:
    """Why `write_image` cannot write a file ending in `suffix`, or None when it can."""
    fmt = Image.registered_extensions().get(suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        return f"{suffix or 'no suffix'} is not an image format PIL writes"
    return None


def _uint8_frames(frames) -> np.ndarray:
    """[F, H, W, 3] (or [F, H, W] grey) floats in [0, 1] or uint8 -> uint8 [F, H, W, 3]."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    if frames.ndim == 4 and frames.shape[-1] == 1:
        frames = frames[..., 0]
    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=-1)
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f"frames must be [F, H, W, 3] with F, H, W >= 1, got shape {frames.shape}")
    return np.ascontiguousarray(frames)


def _pal8_frame(rgb: np.ndarray):
    """An RGB frame as a paletted PyAV frame with its own 256-colour palette: GIF's native form,
    far closer to the original than the fixed 3-3-2 palette FFmpeg's converter would pick."""
    import av

    quantised = Image.fromarray(rgb).quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    colours = np.asarray(quantised.getpalette()[: 256 * 3], dtype=np.uint8).reshape(-1, 3)
    argb = np.zeros((256, 4), np.uint8)
    argb[:, 0] = 255
    argb[: len(colours), 1:] = colours
    return av.VideoFrame.from_ndarray((np.asarray(quantised), argb), format="pal8")


def encode_video(frames: np.ndarray, path: str | Path, fps: float) -> Path:
    """Encode uint8 [F, H, W, 3] frames into `path` (not atomic) with the codec its suffix names
    in `VIDEO_CODECS`; the container format comes from the suffix too, not from guessing."""
    from fractions import Fraction

    import av

    path = Path(path)
    problem = video_suffix_problem(path.suffix)
    if problem:
        raise FileFormatError(f"output {path}: {problem}")
    container_format, encoder, pix_fmt = VIDEO_CODECS[path.suffix.lower()]
    _, height, width, _ = frames.shape
    if encoder in _EVEN_SIZE_ENCODERS and (height % 2 or width % 2):
        raise ValueError(f"{path.suffix} ({encoder}, {pix_fmt}) needs an even height and width, got {height}x{width}")
    if not (isinstance(fps, (int, float)) and np.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w", format=container_format, options=_CONTAINER_OPTIONS.get(container_format, {})) as out:
        stream = out.add_stream(encoder, rate=rate, options=_ENCODER_OPTIONS[encoder])
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        for index, rgb in enumerate(frames):
            if pix_fmt == "pal8":
                frame = _pal8_frame(rgb)
            else:
                # Converted here, not by the encoder's implicit reformat, and stamped: left to the
                # encoder, the same frames gave different decoded pixels from run to run.
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format=pix_fmt)
            frame.pts = index
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def verify_video(path: str | Path, frames: int | None = None, size: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """Decode the whole video and return (frames, height, width); `OutputCheckError` when it does
    not decode, has no frames, changes size midway, or differs from the expected `frames` / `size`
    (H, W). Writers call it before the final rename, so an unplayable file never looks finished."""
    import av

    path = Path(path)
    count, sizes = 0, set()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise OutputCheckError(f"{path} has no video stream")
            for frame in container.decode(video=0):
                count += 1
                sizes.add((frame.height, frame.width))
    except av.FFmpegError as err:
        raise OutputCheckError(f"{path} does not decode as a video ({err.__class__.__name__}: {err})") from None
    if count == 0:
        raise OutputCheckError(f"{path} decodes to no frames")
    if len(sizes) != 1:
        raise OutputCheckError(f"{path} changes frame size midway ({sorted(sizes)})")
    height, width = sizes.pop()
    if frames is not None and count != frames:
        raise OutputCheckError(f"{path} decodes to {count} frames, expected {frames}")
    if size is not None and (height, width) != tuple(size):
        raise OutputCheckError(f"{path} decodes to {height}x{width} frames, expected {size[0]}x{size[1]}")
    return count, height, width


def verify_image(path: str | Path, size: tuple[int, int] | None = None) -> tuple[int, int]:
    """Decode the whole image and return (height, width); `OutputCheckError` when it does not
    decode or is not `size` (H, W)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            width, height = img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error, Image.DecompressionBombError) as err:
        raise OutputCheckError(f"{path} does not decode as an image ({err.__class__.__name__}: {err})") from None
    if size is not None and (height, width) != tuple(size):
        raise OutputCheckError(f"{path} decodes to {height}x{width}, expected {size[0]}x{size[1]}")
    return height, width


def write_video(frames: np.ndarray | list, path: str | Path, fps: float = 16) -> Path:
    """Write frames ([F, H, W, 3] float in [0, 1] or uint8) atomically, encoded as `VIDEO_CODECS`
    says for the suffix. The file is decoded (frame count and size) before it takes its name."""
    frames = _uint8_frames(frames)
    path = Path(path)
    problem = video_suffix_problem(path.suffix)
    if problem:
        raise FileFormatError(f"output {path}: {problem}")
    with atomic_write(path) as tmp:
        encode_video(frames, tmp, fps)
        verify_video(tmp, frames=len(frames), size=frames.shape[1:3])
    return path


def write_image(image: Image.Image | np.ndarray, path: str | Path) -> Path:
    """Write one image (PIL, or [H, W, 3] float in [0, 1] / uint8) atomically; format from the
    suffix. The file is decoded (size) before it takes its name."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        image = Image.fromarray(image)
    path = Path(path)
    problem = image_suffix_problem(path.suffix)
    if problem:
        raise FileFormatError(f"output {path}: {problem}")
    with atomic_write(path) as tmp:
        image.convert("RGB").save(tmp, format=Image.registered_extensions()[path.suffix.lower()])
        verify_image(tmp, size=(image.height, image.width))
    return path
