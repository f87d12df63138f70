"""Training clips: which source frames to take, and decoding only those (decord when installed, else PyAV).

A clip of F = 4n + 1 frames (Wan's VAE groups the first frame alone and then 4 frames per latent
frame) at `target_fps` is taken from a source at `source_fps` by stepping `source_fps / target_fps`
source frames per output frame and rounding to the nearest frame. A clip is only taken when its
last sampling time lies inside the video; otherwise `VideoTooShort` is raised and the sample is
skipped, never padded by repeating frames.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from idcrafter.data.manifest import is_video_path
from idcrafter.utils.deps import is_available
from idcrafter.utils.errors import FileFormatError

__all__ = [
    "VideoInfo",
    "VideoTooShort",
    "load_clip",
    "max_clip_start",
    "media_size",
    "probe_video",
    "sample_frame_indices",
]


class VideoTooShort(FileFormatError):
    """The video has fewer frames than the requested clip spans."""

    def __init__(self, message: str, num_source_frames: int, needed: int):
        super().__init__(message)
        self.num_source_frames = num_source_frames
        self.needed = needed


@dataclass(frozen=True)
class VideoInfo:
    """What the container header says; `num_frames` is 0 and `fps` None when it does not say."""

    height: int
    width: int
    num_frames: int
    fps: float | None


def _check_clip_args(source_fps: float, target_fps: float, num_frames: int, start: int) -> float:
    if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % 4:
        raise ValueError(f"num_frames {num_frames} must be 4n+1 (e.g. 1, 9, 17, 81) for the Wan VAE")
    if not (source_fps > 0 and target_fps > 0):
        raise ValueError(f"frame rates must be positive, got source {source_fps}, target {target_fps}")
    if not isinstance(start, int) or start < 0:
        raise ValueError(f"start {start} must be a non-negative integer frame index")
    return source_fps / target_fps


def _positions(stride: float, num_frames: int, start: int) -> list[float]:
    return [start + i * stride for i in range(num_frames)]


def sample_frame_indices(
    num_source_frames: int, source_fps: float, target_fps: float, num_frames: int, start: int = 0
) -> list[int]:
    """Source frame indices of a `num_frames` clip at `target_fps`, starting at source frame `start`.

    Index i is round(start + i * source_fps / target_fps) (halves round up), clipped to the last
    frame. E.g. 30 fps -> 16 fps, 9 frames: [0, 2, 4, 6, 8, 9, 11, 13, 15]. A source slower than
    the target repeats frames. Raises `ValueError` for a frame count that is not 4n+1 and
    `VideoTooShort` when the clip's last position start + (num_frames - 1) * stride is not inside
    the video (i.e. >= num_source_frames).
    """
    stride = _check_clip_args(source_fps, target_fps, num_frames, start)
    if num_source_frames < 0:
        raise ValueError(f"num_source_frames {num_source_frames} must be >= 0")
    positions = _positions(stride, num_frames, start)
    if positions[-1] >= num_source_frames:
        needed = math.floor(positions[-1]) + 1
        raise VideoTooShort(
            f"video has {num_source_frames} frames; {num_frames} frames at {target_fps:g} fps from a "
            f"{source_fps:g} fps source starting at frame {start} need {needed}",
            num_source_frames, needed,
        )
    return [min(math.floor(p + 0.5), num_source_frames - 1) for p in positions]


def max_clip_start(num_source_frames: int, source_fps: float, target_fps: float, num_frames: int) -> int:
    """The largest `start` for which `sample_frame_indices` succeeds; -1 when the video is too short."""
    stride = _check_clip_args(source_fps, target_fps, num_frames, 0)
    # the clip fits while start + (num_frames - 1) * stride < num_source_frames
    return math.ceil(num_source_frames - (num_frames - 1) * stride) - 1


def _open_error(path: Path, err: Exception) -> FileFormatError:
    return FileFormatError(f"video {path} cannot be decoded ({err.__class__.__name__}: {err})")


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Size, frame count and frame rate from the container header, without decoding frames."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"video {path} does not exist")
    try:
        # PyAV (a hard dependency) even when decord decodes: decord has no header-only size query.
        import av

        with av.open(str(path)) as container:
            if not container.streams.video:
                raise FileFormatError(f"video {path} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            return VideoInfo(
                int(stream.codec_context.height), int(stream.codec_context.width), int(stream.frames or 0),
                float(rate) if rate else None,
            )
    except FileFormatError:
        raise
    except Exception as err:  # decoders raise many types for corrupt files
        raise _open_error(path, err) from None


def media_size(path: str | os.PathLike, is_video: bool | None = None) -> tuple[int, int]:
    """(height, width) of a video (container header) or an image (file header), without decoding.

    `is_video` None decides from the file extension.
    """
    path = Path(path)
    if is_video_path(path) if is_video is None else is_video:
        info = probe_video(path)
        if info.height <= 0 or info.width <= 0:
            raise FileFormatError(f"video {path}: the header gives no frame size")
        return info.height, info.width
    from PIL import Image

    from idcrafter.utils.cli import path_problem

    problem = path_problem(path)
    if problem:
        raise FileFormatError(f"image {path} {problem}")
    try:
        with Image.open(path) as img:
            # EXIF orientations 5-8 turn the image by 90 degrees: `load_image` returns it upright.
            turned = img.getexif().get(0x0112) in (5, 6, 7, 8)
            return (img.width, img.height) if turned else (img.height, img.width)
    except Exception as err:
        raise FileFormatError(f"image {path} cannot be read ({err.__class__.__name__}: {err})") from None


def _decode_pyav(path: Path, wanted: set[int], last: int) -> tuple[dict[int, np.ndarray], int]:
    """Decode frames 0..last in order, keeping `wanted`; returns them and how many frames were decoded."""
    import av

    kept: dict[int, np.ndarray] = {}
    count = 0
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise FileFormatError(f"video {path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        previous = None
        for index, frame in enumerate(container.decode(stream)):
            count = index + 1
            if index in wanted:
                kept[index] = frame.to_ndarray(format="rgb24")
            previous = frame
            if index >= last:
                break
        # the last frame stands in for clipped indices when the header over-counted the frames
        if previous is not None and count - 1 not in kept:
            kept[count - 1] = previous.to_ndarray(format="rgb24")
    return kept, count


def load_clip(
    path: str | os.PathLike,
    num_frames: int,
    target_fps: float,
    start: int = 0,
    source_fps: float | None = None,
    is_video: bool | None = None,
) -> np.ndarray:
    """Decode a clip of `num_frames` (4n+1) frames at `target_fps` -> uint8 [F, H, W, 3].

    Only the needed frames are kept (a 1080p source is not held in memory whole). `source_fps`
    overrides the container's frame rate. An image file gives a one-frame clip [1, H, W, 3];
    `is_video` None tells a video from an image by the file extension.
    Raises `FileFormatError` naming the file for a missing or undecodable file, `VideoTooShort` when
    the video is shorter than the clip.
    """
    path = Path(path)
    if not (is_video_path(path) if is_video is None else is_video):
        from idcrafter.utils.media import load_rgb

        return np.asarray(load_rgb(path, "image"))[None]
    _check_clip_args(source_fps or 1.0, target_fps, num_frames, start)
    info = probe_video(path)
    fps = source_fps or info.fps
    if not fps:
        raise FileFormatError(f"video {path}: the container gives no frame rate; set 'fps' in the manifest")
    try:
        if is_available("decord"):
            import decord

            reader = decord.VideoReader(str(path))
            indices = sample_frame_indices(len(reader), fps, target_fps, num_frames, start)
            return reader.get_batch(indices).asnumpy()
        if info.num_frames > 0:
            indices = sample_frame_indices(info.num_frames, fps, target_fps, num_frames, start)
        else:  # no count in the header: decode as far as the clip reaches and let decoding tell
            stride = _check_clip_args(fps, target_fps, num_frames, start)
            indices = [math.floor(p + 0.5) for p in _positions(stride, num_frames, start)]
        kept, count = _decode_pyav(path, set(indices), max(indices))
        if count == 0:
            raise FileFormatError(f"video {path} has no frames")
        if count <= max(indices):  # the header promised more frames than the stream holds
            indices = sample_frame_indices(count, fps, target_fps, num_frames, start)
        return np.stack([kept[i] for i in indices])
    except VideoTooShort as err:
        raise VideoTooShort(f"video {path}: {err}", err.num_source_frames, err.needed) from None
    except FileFormatError:
        raise
    except Exception as err:  # decoders raise many types for corrupt files
        raise _open_error(path, err) from None
