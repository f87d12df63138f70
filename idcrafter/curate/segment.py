"""Subject masks over a clip (docs/design.md 8.1, stage 5).

`SegmentStage` gets each subject's masks over the clip and keeps the largest connected component
of each mask (MultiCrafter App. C: "only the largest connected component of the mask is retained").
With a SAM 2 video model the segmenter propagates each subject from a box prompt on its first
frame through the clip (SAM 2 Sec. 4: a memory of past frames); otherwise SAM segments every frame
from the subject's tracked box (boxes interpolated over short detection gaps). A subject whose mask
is empty in too many of its frames drops the candidate.

`SamSegmenter` is transformers' SAM loaded from a local folder: the image encoder runs on a batch
of frames, the prompt encoder and mask decoder on each frame's boxes, the masks are upscaled to the
frame and binarized at logit 0 as SAM does. `video_model` names a SAM 2 folder (`Sam2VideoModel`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from idcrafter.curate.core import Candidate, Dropped, Outcome, Stage, load_local_model, make_backend

__all__ = ["SamSegmenter", "SegmentStage", "fill_gaps", "largest_component", "sam2_box"]

# 8-connectivity: a limb joined to the body through one diagonal pixel is still the body.
_EIGHT = np.ones((3, 3), dtype=bool)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> the largest 8-connected component of the mask (the first in raster order on a tie)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=_EIGHT)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    return labels == int(np.argmax(sizes)) + 1


def sam2_box(box: np.ndarray, height: int, width: int, size: int) -> np.ndarray:
    """A pixel box [x0, y0, x1, y1] in a `height` x `width` frame -> the same box in SAM 2's square
    `size` x `size` input (frames are resized to the square, not letterboxed)."""
    return np.asarray(box, dtype=np.float64) * np.array([size / width, size / height] * 2)


def fill_gaps(boxes: np.ndarray, max_gap: int) -> np.ndarray:
    """boxes (T, 4) with NaN rows -> NaN rows of gaps up to `max_gap` frames between two found frames
    replaced by linear interpolation (the detector missed the subject for a moment); ends stay NaN."""
    boxes = np.array(boxes, dtype=np.float64)
    found = np.flatnonzero(~np.isnan(boxes).any(1))
    for a, b in zip(found[:-1], found[1:]):
        if 1 < b - a <= max_gap + 1:
            w = (np.arange(a + 1, b) - a)[:, None] / (b - a)
            boxes[a + 1:b] = (1 - w) * boxes[a] + w * boxes[b]
    return boxes


class SegmentStage(Stage):
    """Masks (T, H, W) for every subject of a candidate from its tracked boxes.

    Args:
        segmenter: a BACKENDS["segmenter"] name, or an object with `segment(frames, boxes)`.
        segmenter_options: keyword options of the backend (model path...); `device` is the stage's.
        frame_batch: frames per segmenter call.
        max_gap: detection gaps up to this many frames are bridged by interpolated boxes.
        max_empty: a subject whose mask is empty in more than this fraction of its frames drops the candidate.
        min_area: masks smaller than this fraction of the frame count as empty.
    """

    name = "segment"

    def __init__(self, segmenter: Any = "sam", segmenter_options: Mapping[str, Any] | None = None,
                 frame_batch: int = 8, max_gap: int = 2, max_empty: float = 0.2, min_area: float = 0.0005,
                 batch_size: int = 1) -> None:
        super().__init__()
        self.segmenter = segmenter
        self.segmenter_options = dict(segmenter_options or {})
        self.frame_batch = max(1, int(frame_batch))
        self.max_gap = int(max_gap)
        self.max_empty = float(max_empty)
        self.min_area = float(min_area)
        self.batch_size = int(batch_size)

    def setup(self) -> None:
        if isinstance(self.segmenter, str):
            self.segmenter = make_backend("segmenter", self.segmenter, device=self.device, **self.segmenter_options)

    def masks(self, frames: np.ndarray, boxes: Sequence[np.ndarray]) -> list[np.ndarray]:
        """frames (T, H, W, 3), boxes per subject (T, 4) with NaN rows -> per subject (T, H, W) bool."""
        steps, height, width = frames.shape[:3]
        out = [np.zeros((steps, height, width), dtype=bool) for _ in boxes]
        prompted = [t for t in range(steps) if any(not np.isnan(b[t]).any() for b in boxes)]
        for i in range(0, len(prompted), self.frame_batch):
            chunk = prompted[i:i + self.frame_batch]
            owners = [[k for k, b in enumerate(boxes) if not np.isnan(b[t]).any()] for t in chunk]
            per_frame = self.segmenter.segment(frames[chunk], [np.stack([boxes[k][t] for k in own]) for t, own in zip(chunk, owners)])
            for t, own, masks in zip(chunk, owners, per_frame):
                for k, mask in zip(own, masks):
                    out[k][t] = largest_component(mask)
        return out

    def process(self, batch: list[Candidate]) -> list[Outcome]:
        results: list[Outcome] = []
        for cand in batch:
            if cand.frames is None or not cand.subjects:
                results.append(Dropped(cand, "no subject"))
                continue
            boxes = [fill_gaps(tr.boxes, self.max_gap) for tr in cand.subjects]
            video = getattr(self.segmenter, "propagate", None)
            masks = video(cand.frames, boxes) if video is not None and getattr(self.segmenter, "video_model", None) else None
            if masks is None:
                masks = self.masks(cand.frames, boxes)
            else:
                masks = [np.stack([largest_component(m) for m in mask]) for mask in masks]
            area = self.min_area * cand.frames.shape[1] * cand.frames.shape[2]
            empty = False
            for tr, box, mask in zip(cand.subjects, boxes, masks):
                tr.masks = mask
                wanted = ~np.isnan(box).any(1)
                filled = mask.reshape(len(mask), -1).sum(1) > area
                tr.info["mask_empty_frames"] = int((wanted & ~filled).sum())
                empty |= bool((wanted & ~filled).sum() > self.max_empty * max(1, wanted.sum()))
            results.append(Dropped(cand, "empty mask") if empty else cand)
        return results


class SamSegmenter:
    """Box-prompted masks: transformers' SAM (`SamModel` + `SamProcessor`) from a local folder.

    `segment(frames (N, H, W, 3) uint8, boxes per frame (k, 4) pixel)` -> per frame (k, H, W) bool
    (not yet reduced to one component; the stage does that). `multimask_output=False`: one mask per
    box, as SAM recommends for unambiguous (box) prompts (SAM Sec. 3).
    """

    def __init__(self, model: str | None = None, device: str = "cpu", mask_threshold: float = 0.0,
                 dtype: str | None = None, video_model: str | None = None) -> None:
        if not model and not video_model:
            raise ValueError("the sam segmenter needs model: a local SAM folder (backends.segmenter.model)")
        self.path = Path(model) if model else None
        self.video_model = Path(video_model) if video_model else None
        self.video = None
        self.device = device
        self.mask_threshold = float(mask_threshold)
        self.dtype = dtype
        self.model = self.processor = None

    def load(self) -> None:
        if self.model is not None:
            return
        from transformers import SamModel, SamProcessor

        if self.path is None:
            raise ValueError("per-frame segmentation needs model: a local SAM folder (backends.segmenter.model)")
        self.model = load_local_model(SamModel, self.path, "SAM", self.dtype, self.device)
        self.processor = SamProcessor.from_pretrained(self.path, local_files_only=True)

    def segment(self, frames: np.ndarray, boxes: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [logits > self.mask_threshold for logits in self.logits(frames, boxes)]

    def logits(self, frames: np.ndarray, boxes: Sequence[np.ndarray]) -> list[np.ndarray]:
        """frames (N, H, W, 3), boxes per frame (k, 4) -> per frame mask logits (k, H, W) at frame size."""
        import torch

        self.load()
        if len(frames) == 0:
            return []
        images = self.processor.image_processor(images=list(frames), return_tensors="pt")
        pixels = images["pixel_values"].to(self.device, self.model.dtype)
        with torch.inference_mode():
            embeddings = self.model.get_image_embeddings(pixels)
        out = []
        for i, frame_boxes in enumerate(boxes):
            frame_boxes = np.asarray(frame_boxes, dtype=np.float64).reshape(-1, 4)
            if len(frame_boxes) == 0:
                out.append(np.zeros((0, *frames.shape[1:3]), dtype=np.float32))
                continue
            # Boxes follow the frame's resize to the encoder's longest edge (SamProcessor's rule).
            (old_h, old_w), (new_h, new_w) = images["original_sizes"][i].tolist(), images["reshaped_input_sizes"][i].tolist()
            scaled = frame_boxes * np.array([new_w / old_w, new_h / old_h, new_w / old_w, new_h / old_h])
            prompt = torch.as_tensor(scaled, dtype=torch.float32)[None].to(self.device, self.model.dtype)
            with torch.inference_mode():
                pred = self.model(image_embeddings=embeddings[i:i + 1], input_boxes=prompt, multimask_output=False)
            logits = self.processor.post_process_masks(pred.pred_masks.float().cpu(), images["original_sizes"][i:i + 1],
                                                       images["reshaped_input_sizes"][i:i + 1], binarize=False)[0]
            out.append(logits[:, 0].numpy())
        return out

    # ------------------------------------------------------------------ SAM 2 video propagation
    def load_video(self) -> None:
        if self.video is not None:
            return
        from transformers import Sam2VideoModel

        self.video = load_local_model(Sam2VideoModel, self.video_model, "SAM 2", self.dtype, self.device)

    def video_pixels(self, frames: np.ndarray):
        """frames (T, H, W, 3) uint8 -> (T, 3, S, S) as SAM 2 reads them: resized to its square input
        (bilinear), scaled to [0, 1], normalized with the ImageNet mean / std (Sam2VideoVideoProcessor's
        rule, written out because that processor needs torchvision)."""
        import torch
        import torch.nn.functional as F

        size = int(self.video.config.image_size)
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        return (x - mean) / std

    def propagate(self, frames: np.ndarray, boxes: Sequence[np.ndarray]) -> list[np.ndarray] | None:
        """frames (T, H, W, 3), per subject boxes (T, 4) with NaN rows -> per subject masks (T, H, W)
        bool from SAM 2: each subject prompted with its box on its first found frame and propagated
        forward; frames before that stay empty. None without a video model."""
        if self.video_model is None:
            return None
        return [logits > self.mask_threshold for logits in self.propagate_logits(frames, boxes)]

    def propagate_logits(self, frames: np.ndarray, boxes: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per subject SAM 2 mask logits (T, H, W) at frame size; -inf before the subject's first frame."""
        import torch
        import torch.nn.functional as F
        from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoInferenceSession

        self.load_video()
        steps, height, width = frames.shape[:3]
        out = [np.full((steps, height, width), -np.inf, dtype=np.float32) for _ in boxes]
        first = {k: int(np.flatnonzero(~np.isnan(b).any(1))[0]) for k, b in enumerate(boxes) if (~np.isnan(b).any(1)).any()}
        if not first:
            return out
        size = int(self.video.config.image_size)
        session = Sam2VideoInferenceSession(
            video=self.video_pixels(frames).to(self.video.dtype), video_height=height, video_width=width,
            inference_device=self.device, inference_state_device=self.device, video_storage_device=self.device,
            dtype=self.video.dtype)
        for k, t in first.items():
            # A box prompt is two corner points with labels 2 and 3, in the model's square input (SAM 2 Sec. 4).
            corners = torch.as_tensor(sam2_box(boxes[k][t], height, width, size), dtype=torch.float32).reshape(1, 1, 2, 2)
            session.add_point_inputs(session.obj_id_to_idx(k), t, {
                "point_coords": corners.to(self.device), "point_labels": torch.tensor([[[2, 3]]], dtype=torch.int32,
                                                                                      device=self.device)})
        session.obj_with_new_inputs = list(first)
        with torch.inference_mode():
            for result in self.video.propagate_in_video_iterator(session, start_frame_idx=min(first.values())):
                logits = F.interpolate(result.pred_masks.float(), (height, width), mode="bilinear", align_corners=False)
                for row, k in enumerate(result.object_ids):
                    if result.frame_idx >= first[k]:
                        out[k][result.frame_idx] = logits[row, 0].cpu().numpy()
        return out
