"""Object identity reward: MultiCrafter's R_id for multi-object customisation (w_id = 1.0, supp. Sec. B).

Faces have ArcFace; objects (a dog, a backpack, a toy) are found by their category word and
compared by appearance, with the Hungarian multi-ID matching of the face reward:

    candidates_c,f = Grounding-DINO boxes of category c in frame f: up to n_c + extra_boxes,
                     p >= box_threshold, greedy IoU <= nms_iou    (n_c = the references of category c)
    s_fk           = hungarian(cosine(DINOv2(ref_k), DINOv2(crop)) clipped at 0)[k], over the references
                     and candidates of k's category; 0 when k is left without a box
    R_object       = mean_f [(1 - alpha) mean_k s_fk + alpha min_k s_fk]       (alpha 0: mean over subjects)

Unlike NexusScore (`nexus`: the n_c best-scoring boxes, one per subject), the detector here only
proposes candidates and appearance decides which box is which subject, so a second instance of a
category (another dog) or a confident false box does not take a subject's place. A still image is
one frame. Detector, crops, embedders and matching are `idcrafter.rewards.nexus.GroundedSubjectReward`.
"""

from __future__ import annotations

import torch

from idcrafter.rewards.base import register_reward
from idcrafter.rewards.nexus import GroundedSubjectReward

__all__ = ["ObjectReward"]


@register_reward("object")
class ObjectReward(GroundedSubjectReward):
    """Per-subject object identity under Hungarian matching of references to Grounding-DINO candidates.

    Subjects' category words come from meta["categories"] (one per reference; "object" when absent).
    Options: path (Grounding-DINO folder), embedder ("dino" | "clip"), embedder_path (its folder),
    extra_boxes (candidates per category beyond one per subject, 2), box_threshold (0.35), nms_iou
    (0.5), alpha (weight of the worst subject, 0: the mean over subjects; as `face`), mode (the older
    name), clip_min (0), stride, max_frames, device, dtype. Components: object, object_mean, object_min.
    `match` returns the scores and the box each reference took.
    """

    name = "object"

    def __init__(self, path=None, embedder: str = "dino", embedder_path=None, extra_boxes: int = 2,
                 box_threshold: float = 0.35, nms_iou: float = 0.5, alpha: float | None = None,
                 mode: str | None = None, clip_min: float = 0.0, stride: int = 1, max_frames: int | None = 8,
                 device: str | torch.device = "cpu", dtype=None):
        super().__init__(path, embedder, embedder_path, box_threshold, nms_iou, alpha, mode, default_alpha=0.0,
                         extra_boxes=extra_boxes, clip_min=clip_min, stride=stride, max_frames=max_frames,
                         device=device, dtype=dtype)
