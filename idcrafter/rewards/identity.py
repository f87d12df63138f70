"""Multi-identity matching: references x detections, Hungarian assignment, per-reference scores.

The matching core of the multi-ID face reward (docs/design.md 7) and of the toy world's ToyID metric. A
backend (insightface ArcFace, dlib, the toy identity embedder) only supplies embeddings of the
detected faces / identities; everything after that lives here and is shared:

    similarity = cosine(refs [R, D], dets [M, D])           -> [R, M]
    clipped    = max(similarity, clip_min)                   (docs/design.md 7: cosine clipped at 0)
    assignment = linear_sum_assignment(clipped, maximize)    (one detection per reference at most)
    score_k    = clipped[k, assignment(k)], or 0 when reference k is left unmatched (M < R)
    R_frame    = (1 - alpha) mean_k score_k + alpha min_k score_k      (ID-Crafter eq. 7, alpha = 0.5)
    R          = mean over the sampled frames of R_frame                 (ID-Crafter App. A.2, eq. S.12)

alpha weighs the worst-kept subject: ID-Crafter's Tab. S.7 ablates it from 0.0 ("average only") to
1.0 ("minimum only") and finds 0.5 best.

Arrays may be numpy arrays or torch tensors; each function returns the kind it was given. The
assignment is solved on the CPU in float64 (scipy); torch scores are gathered from the input
tensor, so they stay on its device and dtype (and carry autograd through the matched entries).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar, Union

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = [
    "COMBINE_MODES",
    "MODE_ALPHA",
    "combine_identity_scores",
    "cosine_similarity_matrix",
    "frame_identity_reward",
    "frame_identity_scores",
    "hungarian_assignment",
    "hungarian_identity_reward",
    "hungarian_identity_scores",
    "mean_min_score",
    "video_identity_scores",
]

Array = Union[np.ndarray, torch.Tensor]
ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

COMBINE_MODES = ("mean", "min", "mean_min")
# The named modes as the weight alpha of the min term: R = (1 - alpha) mean_k + alpha min_k.
MODE_ALPHA = {"mean": 0.0, "min": 1.0, "mean_min": 0.5}


def _to_numpy64(x: Array | Sequence[float]) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _float_dtype_np(*arrays: np.ndarray) -> np.dtype:
    dtype = np.result_type(*arrays)
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)


def _float_dtype_torch(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() else torch.get_default_dtype()


def _check_matrix(x: Array, name: str) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")


def cosine_similarity_matrix(refs: Array, dets: Array, eps: float = 1e-12) -> Array:
    """Cosine similarity of every reference embedding with every detection embedding.

    refs: [R, D], dets: [M, D] -> [R, M], values in [-1, 1]. Rows are L2-normalised with the norm
    floored at `eps`, so a zero vector has similarity 0 with everything (never NaN). Computed in
    float64 (float32 on MPS); returned as a torch tensor on the input's device and float dtype if
    either input is a tensor, else as a numpy array of the inputs' float dtype.
    """
    _check_matrix(refs, "refs")
    _check_matrix(dets, "dets")
    if refs.shape[1] != dets.shape[1]:
        raise ValueError(f"embedding sizes differ: refs {tuple(refs.shape)}, dets {tuple(dets.shape)}")
    if isinstance(refs, torch.Tensor) or isinstance(dets, torch.Tensor):
        like = refs if isinstance(refs, torch.Tensor) else dets
        work = torch.float32 if like.device.type == "mps" else torch.float64
        r = torch.as_tensor(refs, device=like.device).to(work)
        d = torch.as_tensor(dets, device=like.device).to(work)
        r = r / r.norm(dim=-1, keepdim=True).clamp_min(eps)
        d = d / d.norm(dim=-1, keepdim=True).clamp_min(eps)
        # Rounding can push a self-similarity a hair past 1.
        return (r @ d.T).clamp(-1.0, 1.0).to(_float_dtype_torch(like))
    refs_np, dets_np = np.asarray(refs), np.asarray(dets)
    r, d = refs_np.astype(np.float64), dets_np.astype(np.float64)
    r = r / np.maximum(np.linalg.norm(r, axis=-1, keepdims=True), eps)
    d = d / np.maximum(np.linalg.norm(d, axis=-1, keepdims=True), eps)
    return np.clip(r @ d.T, -1.0, 1.0).astype(_float_dtype_np(refs_np, dets_np))


def _solve_assignment(similarity: Array, clip_min: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(ref rows, det cols) of a maximum-similarity assignment with min(R, M) pairs."""
    _check_matrix(similarity, "similarity")
    sim = _to_numpy64(similarity)
    if not np.isfinite(sim).all():
        raise ValueError("similarity contains NaN or inf (check the embeddings)")
    if sim.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    if clip_min is not None:
        sim = np.maximum(sim, clip_min)
    rows, cols = linear_sum_assignment(sim, maximize=True)
    return rows.astype(np.int64), cols.astype(np.int64)


def hungarian_assignment(similarity: Array, clip_min: float | None = 0.0) -> list[int | None]:
    """Detection index assigned to each reference, None for a reference left unmatched.

    similarity: [R, M] -> list of length R. Maximises the total clipped similarity; exactly
    min(R, M) references are matched. With clip_min >= 0 a pair whose similarity was clipped may
    be matched at score 0, which scores the same as leaving the reference unmatched.
    """
    rows, cols = _solve_assignment(similarity, clip_min)
    assignment: list[int | None] = [None] * similarity.shape[0]
    for r, c in zip(rows.tolist(), cols.tolist()):
        assignment[r] = c
    return assignment


def hungarian_identity_scores(similarity: ArrayT, clip_min: float | None = 0.0) -> ArrayT:
    """Per-reference identity score under the best one-to-one matching (docs/design.md 7).

    similarity: [R, M] -> scores [R]. Similarities are clipped below at `clip_min` (None: no
    clipping), the assignment maximising their total is found with scipy's
    `linear_sum_assignment(maximize=True)`, each reference scores the clipped similarity of its
    detection, and a reference left unmatched (M < R) scores 0. M = 0 gives zeros, R = 0 an empty
    result. Torch in -> torch out on the same device and float dtype; numpy in -> numpy out.
    """
    rows, cols = _solve_assignment(similarity, clip_min)
    n_refs = similarity.shape[0]
    if isinstance(similarity, torch.Tensor):
        sim = similarity.to(_float_dtype_torch(similarity))
        clipped = sim if clip_min is None else sim.clamp_min(clip_min)
        rows_t = torch.as_tensor(rows, device=sim.device)
        cols_t = torch.as_tensor(cols, device=sim.device)
        # Out-of-place so the matched entries keep their autograd history.
        return sim.new_zeros(n_refs).index_put((rows_t,), clipped[rows_t, cols_t])
    sim_np = np.asarray(similarity)
    sim_np = sim_np.astype(_float_dtype_np(sim_np))
    clipped_np = sim_np if clip_min is None else np.maximum(sim_np, clip_min)
    scores = np.zeros(n_refs, dtype=sim_np.dtype)
    scores[rows] = clipped_np[rows, cols]
    return scores


def mean_min_score(scores: Array | Sequence[float], alpha: float = 0.5) -> float:
    """(1 - alpha) mean_k s_k + alpha min_k s_k of per-reference scores [R] (ID-Crafter eq. 7; alpha
    weighs the worst subject: 0 = mean only, 1 = min only, 0.5 the paper's choice). No references -> 0.0."""
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    s = _to_numpy64(scores)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D [R], got shape {s.shape}")
    if s.size == 0:
        return 0.0
    if alpha == 0.0:
        return float(s.mean())
    if alpha == 1.0:
        return float(s.min())
    return float((1.0 - alpha) * s.mean() + alpha * s.min())


def combine_identity_scores(scores: Array | Sequence[float], mode: str = "mean_min") -> float:
    """Collapse per-reference scores [R] into one reward.

    "mean": mean_k s_k; "min": min_k s_k (the worst-kept identity); "mean_min":
    0.5 mean_k s_k + 0.5 min_k s_k (docs/design.md 7, R_face). No references -> 0.0.
    `mean_min_score` takes the weight itself (alpha; these modes are alpha 0, 1 and 0.5).
    """
    if mode not in COMBINE_MODES:
        raise ValueError(f"mode must be one of {COMBINE_MODES}, got {mode!r}")
    return mean_min_score(scores, MODE_ALPHA[mode])


def frame_identity_reward(per_frame: Array, alpha: float = 0.5) -> tuple[float, float, float]:
    """The frame-level identity reward averaged over a video (ID-Crafter App. A.2, eq. S.12).

    per_frame: [F, R] per-frame, per-reference scores (`frame_identity_scores`) -> (reward, mean term,
    min term) with reward = mean_f [(1 - alpha) mean_k s_fk + alpha min_k s_fk]
                          = (1 - alpha) mean term + alpha min term,
    mean term = mean_f mean_k s_fk and min term = mean_f min_k s_fk (the worst subject of each frame,
    averaged). No frames or no references -> zeros. For a still image (F = 1) this is `mean_min_score`.
    """
    s = _to_numpy64(per_frame)
    if s.ndim != 2:
        raise ValueError(f"per_frame must be 2-D [F, R], got shape {s.shape}")
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if s.size == 0:
        return 0.0, 0.0, 0.0
    mean_term, min_term = float(s.mean(1).mean()), float(s.min(1).mean())
    if alpha == 0.0:
        return mean_term, mean_term, min_term
    if alpha == 1.0:
        return min_term, mean_term, min_term
    return (1.0 - alpha) * mean_term + alpha * min_term, mean_term, min_term


def _like_refs(dets: Array | None, refs: Array) -> Array | None:
    """Detections of one frame as the same kind as the references; None when there are none."""
    if dets is None:
        return None
    if isinstance(refs, torch.Tensor):
        dets = torch.as_tensor(dets, device=refs.device)
    elif isinstance(dets, torch.Tensor):
        dets = dets.detach().cpu().numpy()
    else:
        dets = np.asarray(dets)
    return None if dets.size == 0 else dets


def frame_identity_scores(
    ref_embeddings: ArrayT, frame_detections: Sequence[Array | None], clip_min: float | None = 0.0
) -> ArrayT:
    """Per-frame Hungarian identity scores.

    ref_embeddings: [R, D]; frame_detections: F entries, each [M_f, D] embeddings of the faces /
    identities detected in frame f (an empty array or None when nothing was detected)
    -> [F, R]: entry (f, k) is reference k's score in frame f, 0 where it went unmatched there.
    Returned as the kind of `ref_embeddings` (torch: its device and float dtype).
    """
    _check_matrix(ref_embeddings, "ref_embeddings")
    n_refs = ref_embeddings.shape[0]
    is_torch = isinstance(ref_embeddings, torch.Tensor)
    rows = []
    for dets in frame_detections:
        dets = _like_refs(dets, ref_embeddings)
        if dets is None:
            sim = (
                ref_embeddings.new_zeros((n_refs, 0), dtype=_float_dtype_torch(ref_embeddings))
                if is_torch
                else np.zeros((n_refs, 0), dtype=_float_dtype_np(np.asarray(ref_embeddings)))
            )
        else:
            sim = cosine_similarity_matrix(ref_embeddings, dets)
        rows.append(hungarian_identity_scores(sim, clip_min))
    if is_torch:
        if not rows:
            return ref_embeddings.new_zeros((0, n_refs), dtype=_float_dtype_torch(ref_embeddings))
        return torch.stack(rows)
    if not rows:
        return np.zeros((0, n_refs), dtype=_float_dtype_np(np.asarray(ref_embeddings)))
    return np.stack(rows)


def video_identity_scores(
    ref_embeddings: ArrayT, frame_detections: Sequence[Array | None], clip_min: float | None = 0.0
) -> ArrayT:
    """Per-reference identity scores averaged over the sampled frames.

    ref_embeddings: [R, D]; frame_detections: F entries of [M_f, D] -> [R], the frame mean of
    `frame_identity_scores` per reference. Each frame is matched on its own (a reference may take a
    different detection in each frame) and a frame where a reference goes unmatched contributes 0,
    so an identity that disappears is penalised in proportion to the frames it is missing from.
    No frames (F = 0) -> zeros.
    """
    per_frame = frame_identity_scores(ref_embeddings, frame_detections, clip_min)
    if per_frame.shape[0] == 0:
        return per_frame.sum(0)
    return per_frame.mean(0)


def hungarian_identity_reward(
    ref_embeddings: Array,
    frame_detections: Sequence[Array | None],
    mode: str = "mean_min",
    clip_min: float | None = 0.0,
) -> float:
    """A clip-level identity score: frame-averaged per-reference scores, then combined across references.

    ref_embeddings: [R, D]; frame_detections: F entries of [M_f, D] (a still image is F = 1).
    Averages over frames first and takes the min across references after, so "min" is the worst
    identity over the whole clip rather than the worst identity of each frame. The RL rewards
    (`face`, `nexus`, `object`, `toyid`) instead average the frame-level reward
    (`frame_identity_reward`, ID-Crafter eq. S.12); both agree on a still image.
    """
    return combine_identity_scores(video_identity_scores(ref_embeddings, frame_detections, clip_min), mode)
