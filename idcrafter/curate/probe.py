"""Decode and probe an input video (docs/design.md 8.1, stage `probe`).

The first stage of every preset: an input path becomes a `Candidate` holding all its frames, or a
`Dropped` with a short reason the funnel counts (never an exception: a bad input must not stop a
run). Reasons: "missing" (no such file), "unreadable" (the container or the first frame does not
decode), "no video stream" (e.g. an audio-only file), "no frame rate", "too small", "too long"
(decided from the header, before decoding), "too short", "truncated" (fewer frames decode than the
header promised, beyond a 5% margin, or decoding fails midway: the tail is not trusted).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from idcrafter.curate.core import Candidate, Dropped, Outcome, Stage

__all__ = ["Header", "ProbeStage", "even_crop", "input_key", "read_header", "resize_short_side"]


def input_key(path: str | os.PathLike) -> str:
    """A stable sample-id prefix for an input: its file stem and a hash of its absolute path
    (two inputs with the same name in different folders get different keys; a rerun the same)."""
    path = os.path.abspath(os.fspath(path))
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in os.path.splitext(os.path.basename(path))[0])
    return f"{stem[:40] or 'video'}-{hashlib.sha1(path.encode('utf-8')).hexdigest()[:10]}"


@dataclass(frozen=True)
class Header:
    """What the container says about the first video stream; `frames` 0 when it does not say."""

    height: int
    width: int
    frames: int
    fps: float | None
    seconds: float | None


def read_header(container) -> Header | None:
    """The first video stream's header of an open PyAV container, None when it has none."""
    if not container.streams.video:
        return None
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else None
    frames = int(stream.frames or 0)
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / 1_000_000  # av.time_base: microseconds
    elif frames and fps:
        seconds = frames / fps
    else:
        seconds = None
    return Header(int(stream.codec_context.height), int(stream.codec_context.width), frames, fps, seconds)


def resize_short_side(frame: np.ndarray, short_side: int) -> np.ndarray:
    """(H, W, 3) uint8 -> the frame scaled down so min(H, W) == short_side (area filter); frames
    already that small are returned unchanged (never upscaled: that adds no detail)."""
    import cv2

    height, width = frame.shape[:2]
    if min(height, width) <= short_side:
        return frame
    scale = short_side / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)


def even_crop(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) -> (T, H', W', 3) with H', W' even (one row / column dropped at most): the
    clips are written as H.264 4:2:0, which needs even sizes."""
    height, width = frames.shape[1:3]
    return frames[:, : height - height % 2, : width - width % 2]


class ProbeStage(Stage):
    """Input path -> a Candidate with every frame decoded (T, H, W, 3) uint8, or a Dropped.

    min_frames: fewer decoded frames -> "too short". min_side: a header size with a smaller short
    side -> "too small". max_seconds: a longer header duration -> "too long", decided before any
    frame is decoded (all frames are held in memory; split longer videos first). short_side:
    frames are scaled down to this short side while decoding (None: kept as decoded).
    """

    name = "probe"

    def __init__(self, min_frames: int = 2, min_side: int = 32, max_seconds: float | None = None,
                 short_side: int | None = None) -> None:
        super().__init__()
        if min_frames < 1 or min_side < 1:
            raise ValueError(f"min_frames and min_side must be >= 1, got {min_frames}, {min_side}")
        if max_seconds is not None and max_seconds <= 0:
            raise ValueError(f"max_seconds must be positive, got {max_seconds}")
        if short_side is not None and short_side < 2:
            raise ValueError(f"short_side must be >= 2, got {short_side}")
        self.min_frames, self.min_side = min_frames, min_side
        self.max_seconds, self.short_side = max_seconds, short_side

    def process(self, batch: list[Candidate]) -> list[Outcome]:
        return [self.probe(c) for c in batch]

    def probe(self, candidate: Candidate) -> Outcome:
        import av

        path = candidate.source
        frames: list[np.ndarray] = []
        if not os.path.isfile(path):
            return Dropped(candidate, "missing")
        try:
            container = av.open(path)
        except Exception:  # PyAV raises many types for files that are not media
            return Dropped(candidate, "unreadable")
        with container:
            header = read_header(container)
            if header is None:
                return Dropped(candidate, "no video stream")
            if not header.fps or header.fps <= 0:
                return Dropped(candidate, "no frame rate")
            if min(header.height, header.width) < self.min_side:
                return Dropped(candidate, "too small")
            if self.max_seconds is not None and header.seconds is not None and header.seconds > self.max_seconds:
                return Dropped(candidate, "too long")
            broken = False
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # frame-threaded decoding, as idcrafter.data.video decodes
            try:
                for frame in container.decode(stream):
                    rgb = frame.to_ndarray(format="rgb24")
                    frames.append(resize_short_side(rgb, self.short_side) if self.short_side else rgb)
                    if self.max_seconds is not None and len(frames) > self.max_seconds * header.fps + 1:
                        return Dropped(candidate, "too long")  # the header understated the duration
            except Exception:  # a decoder error after some frames: a damaged tail
                broken = True
        if not frames:
            return Dropped(candidate, "unreadable")
        # headers over-count by a frame or so (idcrafter.data.video); a truncated file falls far short
        if broken or (header.frames and len(frames) < header.frames - max(1, header.frames // 20)):
            return Dropped(candidate, "truncated")
        if len(frames) < self.min_frames:
            return Dropped(candidate, "too short")
        candidate.frames = even_crop(np.stack(frames))
        candidate.frame_indices = np.arange(len(frames))
        candidate.fps = header.fps
        candidate.start, candidate.end = 0, len(frames)
        candidate.info.update(source_size=(header.height, header.width), source_frames=len(frames),
                              seconds=len(frames) / header.fps)
        return candidate
