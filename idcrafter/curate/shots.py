"""Shot detection and clip windows (docs/design.md 8.1, stage `shots`).

Cuts come from PySceneDetect's content detector (HSV and edge change between consecutive frames
against a threshold), run on the frames the probe decoded. A clip never crosses a cut: ID-Crafter
adds "a video shot detection stage" for temporal coherence (ID-Crafter App. B.1). Each shot then
gives candidates in one of two modes:

- video: up to `max_clips` windows of `num_frames` (4n+1, Wan's VAE) frames at `target_fps`,
  placed one after another from the shot's start; `context` keeps up to `context_frames` frames
  of the same shot outside the window, where references are cut from (ID-Crafter: a frame outside
  the sampled clip).
- image: the shot's middle frame is the target (`frames`, one frame) and its first frame the
  context for references (MultiCrafter App. C: "an initial frame as the source for reference
  images and a middle frame as the target scene").

Drops (per input): "no shot long enough".
"""

from __future__ import annotations

import numpy as np

from idcrafter.curate.core import Candidate, Dropped, Outcome, Stage
from idcrafter.data.video import VideoTooShort, sample_frame_indices

__all__ = ["ShotStage", "clip_windows", "context_indices", "detect_shots"]


def detect_shots(frames: np.ndarray, fps: float, threshold: float = 27.0, min_shot_frames: int = 15) -> list[tuple[int, int]]:
    """(T, H, W, 3) uint8 RGB -> shots as [start, end) frame ranges covering 0..T in order.

    PySceneDetect's ContentDetector with its default threshold (27) and minimum scene length (15
    frames), on frames downscaled as its SceneManager does by default (auto-downscale to a width of
    at least 256, linear interpolation), as BGR like OpenCV decodes them.
    """
    import cv2
    from scenedetect import ContentDetector, FrameTimecode
    from scenedetect.scene_manager import compute_downscale_factor

    detector = ContentDetector(threshold=threshold, min_scene_len=min_shot_frames)
    cuts: list[int] = []
    factor = compute_downscale_factor(frames.shape[2]) if len(frames) else 1
    size = (max(1, round(frames.shape[2] / factor)), max(1, round(frames.shape[1] / factor))) if len(frames) else None
    for index, frame in enumerate(frames):
        if factor > 1.0:  # per-channel, so resizing before the channel swap gives the same pixels
            frame = cv2.resize(frame, size, interpolation=cv2.INTER_LINEAR)
        bgr = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
        cuts += [c.frame_num for c in detector.process_frame(FrameTimecode(index, fps=fps), bgr)]
    if len(frames):
        cuts += [c.frame_num for c in detector.post_process(FrameTimecode(len(frames) - 1, fps=fps))]
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(frames)}), len(frames)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def clip_windows(start: int, end: int, fps: float, target_fps: float, num_frames: int, max_clips: int) -> list[list[int]]:
    """Source frame indices of up to `max_clips` non-overlapping clips inside the shot [start, end),
    back to back from its start (each as `idcrafter.data.video.sample_frame_indices` samples it)."""
    clips: list[list[int]] = []
    offset = start
    while len(clips) < max_clips:
        try:
            local = sample_frame_indices(end - offset, fps, target_fps, num_frames, 0)
        except VideoTooShort:
            break
        clips.append([offset + i for i in local])
        offset = clips[-1][-1] + 1
    return clips


def context_indices(start: int, end: int, clip: list[int], count: int) -> list[int]:
    """Up to `count` frames of the shot [start, end) outside the clip's span, evenly spread (the
    frames references may be cut from: never a frame the clip shows)."""
    outside = [i for i in range(start, end) if not (clip[0] <= i <= clip[-1])]
    if count <= 0 or not outside:
        return []
    picks = np.linspace(0, len(outside) - 1, num=min(count, len(outside))).round().astype(int)
    return sorted({outside[p] for p in picks})


class ShotStage(Stage):
    """A probed video -> one candidate per clip window (video mode) or per shot (image mode).

    threshold / min_shot_frames: the content detector's. min_shot_seconds: shorter shots give no
    candidate. mode "video": `num_frames` at `target_fps`, `max_clips` per shot, `context_frames`
    context frames. mode "image": middle frame as target, first frame as context.
    """

    name = "shots"

    def __init__(self, mode: str = "video", threshold: float = 27.0, min_shot_frames: int = 15,
                 min_shot_seconds: float = 0.0, num_frames: int = 81, target_fps: float = 16.0, max_clips: int = 1,
                 context_frames: int = 4) -> None:
        super().__init__()
        if mode not in ("video", "image"):
            raise ValueError(f"mode must be 'video' or 'image', got {mode!r}")
        if num_frames < 1 or (num_frames - 1) % 4:
            raise ValueError(f"num_frames {num_frames} must be 4n+1 (e.g. 9, 17, 81) for the Wan VAE")
        if target_fps <= 0 or max_clips < 1 or min_shot_frames < 1:
            raise ValueError("target_fps must be positive, max_clips and min_shot_frames >= 1")
        self.mode, self.threshold, self.min_shot_frames = mode, threshold, min_shot_frames
        self.min_shot_seconds, self.num_frames, self.target_fps = min_shot_seconds, num_frames, target_fps
        self.max_clips, self.context_frames = max_clips, context_frames

    def process(self, batch: list[Candidate]) -> list[Outcome]:
        out: list[Outcome] = []
        for candidate in batch:
            made = self.split(candidate)
            out += made if made else [Dropped(candidate, "no shot long enough")]
        for candidate in batch:  # after the whole batch: a failed batch can be retried unchanged
            candidate.frames = None  # the whole decoded video is no longer needed
        return out

    def split(self, video: Candidate) -> list[Candidate]:
        shots = detect_shots(video.frames, video.fps, self.threshold, self.min_shot_frames)
        made: list[Candidate] = []
        for s, (start, end) in enumerate(shots):
            if (end - start) / video.fps < self.min_shot_seconds:
                continue
            if self.mode == "image":
                if end - start < 2:
                    continue
                made.append(self._child(video, f"{video.key}-s{s:03d}", s, shots, [(start + end - 1) // 2], [start]))
                continue
            for c, clip in enumerate(clip_windows(start, end, video.fps, self.target_fps, self.num_frames, self.max_clips)):
                context = context_indices(start, end, clip, self.context_frames)
                made.append(self._child(video, f"{video.key}-s{s:03d}-c{c:02d}", s, shots, clip, context))
        return made

    def _child(self, video: Candidate, key: str, shot: int, shots: list[tuple[int, int]], indices: list[int],
               context: list[int]) -> Candidate:
        start, end = shots[shot]
        return Candidate(
            source=video.source, key=key, fps=video.fps, start=indices[0], end=indices[-1] + 1,
            frames=video.frames[indices], frame_indices=np.asarray(indices),
            context={i: video.frames[i].copy() for i in context},  # copies: the video's array is freed
            info={**video.info, "shot": shot, "shot_range": (start, end), "num_shots": len(shots), "mode": self.mode,
                  "target_fps": self.target_fps if self.mode == "video" else None},
        )
