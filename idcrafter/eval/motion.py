"""Motion: mean optical-flow magnitude between consecutive frames (OpenS2V-Eval's motion amplitude),
over the pixels whose flow passes a forward-backward consistency check.

The flow is a dense pyramidal Lucas-Kanade in numpy / scipy (`lucas_kanade_flow`), so the number is
the same on every machine. OpenS2V-Eval uses OpenCV's Farneback; `method="farneback"` uses it when
`cv2` is installed (numbers differ slightly between the two, so compare runs made with the same one).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["FLOW_METHODS", "consistent_flow", "farneback_flow", "lucas_kanade_flow", "motion_score", "to_gray"]

FLOW_METHODS = ("lucas-kanade", "farneback")


def to_gray(frame: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] (or [H, W]) -> float32 [H, W] luminance in [0, 1] (ITU-R BT.601 weights)."""
    frame = np.asarray(frame, dtype=np.float32)
    if frame.ndim == 3:
        frame = frame @ np.array([0.299, 0.587, 0.114], np.float32)
    return frame / 255.0


def _as_gray(frame: np.ndarray) -> np.ndarray:
    frame = np.asarray(frame)
    return to_gray(frame) if frame.ndim == 3 or frame.dtype == np.uint8 else frame.astype(np.float32)


def _downsample(image: np.ndarray) -> np.ndarray:
    # Blur before decimating so the coarse level does not alias fine texture into false motion.
    return ndimage.gaussian_filter(image, 1.0, mode="nearest")[::2, ::2]


def _warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """image(x + flow(x)): [H, W] sampled bilinearly at the displaced positions, borders replicated."""
    h, w = image.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return ndimage.map_coordinates(image, [ys + flow[..., 1], xs + flow[..., 0]], order=1, mode="nearest")


def lucas_kanade_flow(prev: np.ndarray, next: np.ndarray, levels: int = 4, sigma: float = 2.0,
                      iterations: int = 3, median: int = 5, eps: float = 1e-4) -> np.ndarray:
    """Dense optical flow from `prev` to `next` by pyramidal, iteratively warped Lucas-Kanade.

    At each pyramid level (coarse to fine) the flow from the level above is doubled and upsampled;
    then, `iterations` times, `next` is warped back by the current flow and the remaining motion is
    solved per pixel from the Gaussian-weighted (std `sigma` pixels) structure tensor:

        [sum Ix Ix   sum Ix Iy] [du]     [sum Ix It]
        [sum Ix Iy   sum Iy Iy] [dv] = - [sum Iy It]

    `eps` is added to the diagonal so flat regions (no texture to track) get ~zero flow instead of
    noise. Each level halves the motion: `levels` = 4 tracks shifts of ~12 pixels on textured frames;
    levels stop before a side drops under 16 pixels. After each update a `median` x `median` median
    filter of the flow removes isolated wrong matches.

    Args:
        prev, next: grey frames float [H, W] (any range; `to_gray` gives [0, 1]) or uint8 [H, W, 3].
    Returns:
        float32 [H, W, 2]: (dx, dy) in pixels, such that prev(x) ~ next(x + flow(x)).
    """
    prev, next = _as_gray(prev), _as_gray(next)
    if prev.shape != next.shape or prev.ndim != 2:
        raise ValueError(f"lucas_kanade_flow: frames must have the same [H, W] shape, got {prev.shape} and {next.shape}")
    pyramid = [(prev, next)]
    for _ in range(levels - 1):
        a, b = pyramid[-1]
        if min(a.shape) < 32:  # a coarsest level under 16 pixels locks in wrong matches at the borders
            break
        pyramid.append((_downsample(a), _downsample(b)))

    flow = np.zeros((*pyramid[-1][0].shape, 2), np.float32)
    for level, (a, b) in enumerate(reversed(pyramid)):
        if level > 0:
            zoom = (a.shape[0] / flow.shape[0], a.shape[1] / flow.shape[1], 1)
            flow = ndimage.zoom(flow, zoom, order=1, mode="nearest") * 2.0
        gy, gx = np.gradient(a)  # gradients of the fixed frame: the system matrix is built once per level
        sxx = ndimage.gaussian_filter(gx * gx, sigma, mode="nearest") + eps
        syy = ndimage.gaussian_filter(gy * gy, sigma, mode="nearest") + eps
        sxy = ndimage.gaussian_filter(gx * gy, sigma, mode="nearest")
        det = sxx * syy - sxy * sxy
        for _ in range(iterations):
            it = _warp(b, flow) - a
            sxt = ndimage.gaussian_filter(gx * it, sigma, mode="nearest")
            syt = ndimage.gaussian_filter(gy * it, sigma, mode="nearest")
            flow[..., 0] -= (syy * sxt - sxy * syt) / det
            flow[..., 1] -= (sxx * syt - sxy * sxt) / det
            # A median over the flow field removes isolated wrong matches before they are propagated
            # to the finer levels ("Secrets of optical flow estimation", Sun et al. 2010).
            flow = np.stack([ndimage.median_filter(flow[..., c], size=median, mode="nearest") for c in (0, 1)], -1)
    return flow


def farneback_flow(prev: np.ndarray, next: np.ndarray) -> np.ndarray:
    """OpenCV's Farneback flow with OpenS2V-Eval's parameters; inputs as `lucas_kanade_flow`
    (float grey frames in [0, 1] or uint8 RGB) -> float32 [H, W, 2] (dx, dy)."""
    from idcrafter.utils.deps import require

    cv2 = require("cv2")
    a, b = (np.clip(_as_gray(f) * 255, 0, 255).round().astype(np.uint8) for f in (prev, next))
    return cv2.calcOpticalFlowFarneback(a, b, None, pyr_scale=0.5, levels=3, winsize=15, iterations=3,
                                        poly_n=5, poly_sigma=1.2, flags=0)


def consistent_flow(forward: np.ndarray, backward: np.ndarray) -> np.ndarray:
    """Pixels whose flow is trustworthy: the forward-backward check of Sundaram, Brox and Keutzer (2010).

        w = forward(x),  w^ = backward(x + w):   |w + w^|^2 < 0.01 (|w|^2 + |w^|^2) + 0.5,  x + w inside the frame

    Where content leaves the frame or is occluded the two flows disagree, and the pixel is left out.

    Args:
        forward: [H, W, 2] flow from frame a to b; backward: [H, W, 2] flow from b to a.
    Returns:
        bool [H, W].
    """
    h, w = forward.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    tx, ty = xs + forward[..., 0], ys + forward[..., 1]
    inside = (tx >= 0) & (tx <= w - 1) & (ty >= 0) & (ty <= h - 1)
    back = np.stack([ndimage.map_coordinates(backward[..., c], [ty, tx], order=1, mode="nearest") for c in (0, 1)], -1)
    error = np.sum((forward + back) ** 2, axis=-1)
    bound = 0.01 * (np.sum(forward**2, axis=-1) + np.sum(back**2, axis=-1)) + 0.5
    return inside & (error < bound)


def motion_score(frames: np.ndarray, method: str = "lucas-kanade", max_side: int = 256) -> float | None:
    """Mean optical-flow magnitude between consecutive frames, in pixels per frame of the input size.

    Per frame pair the flow is computed both ways and the magnitude averaged over the pixels that
    pass the forward-backward check (`consistent_flow`: content that leaves the frame or is occluded
    has no true flow, and its estimate is noise); the pair means are averaged. Frames larger than
    `max_side` are downscaled for the flow (a 480x832 video costs ~10x less) and the magnitude is
    scaled back, so the number stays in pixels of the original frames.

    Args:
        frames: uint8 [F, H, W, 3].
    Returns:
        the mean |flow| (0 for a static clip); None for a still image (F = 1).
    """
    if method not in FLOW_METHODS:
        raise ValueError(f"unknown flow method {method!r}; known: {', '.join(FLOW_METHODS)}")
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"motion_score: frames must be [F, H, W, 3], got {frames.shape}")
    if len(frames) < 2:
        return None
    grey = np.stack([to_gray(f) for f in frames])
    scale = min(1.0, max_side / max(grey.shape[1:]))
    if scale < 1.0:
        grey = ndimage.zoom(grey, (1, scale, scale), order=1)
    flow_fn = farneback_flow if method == "farneback" else lucas_kanade_flow
    magnitudes = []
    for a, b in zip(grey[:-1], grey[1:]):
        forward, backward = flow_fn(a, b), flow_fn(b, a)
        valid = consistent_flow(forward, backward)
        magnitude = np.linalg.norm(forward, axis=-1)
        magnitudes.append(float(magnitude[valid].mean()) if valid.any() else float(magnitude.mean()))
    return float(np.mean(magnitudes)) / scale
