"""Multi-ID matching core (docs/design.md 7): Hungarian scores against brute force, edge cases,
aggregation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from idcrafter.rewards.identity import (
    combine_identity_scores,
    cosine_similarity_matrix,
    frame_identity_scores,
    hungarian_assignment,
    hungarian_identity_reward,
    hungarian_identity_scores,
    video_identity_scores,
)

SIZES = range(1, 7)


def _injections(n_refs: int, n_dets: int, full: bool):
    """Every injective map refs -> dets or None; `full` keeps only those matching min(R, M) refs."""

    def rec(k: int, used: frozenset):
        if k == n_refs:
            yield ()
            return
        for d in [None, *range(n_dets)]:
            if d is None or d not in used:
                for rest in rec(k + 1, used if d is None else used | {d}):
                    yield (d, *rest)

    for a in rec(0, frozenset()):
        if not full or sum(d is not None for d in a) == min(n_refs, n_dets):
            yield a


def _brute_force_total(sim: np.ndarray, clip_min: float | None, full: bool) -> float:
    clipped = sim if clip_min is None else np.maximum(sim, clip_min)
    return max(
        sum(clipped[k, d] for k, d in enumerate(a) if d is not None)
        for a in _injections(*sim.shape, full=full)
    )


def _check_consistent(sim: np.ndarray, scores: np.ndarray, assignment: list, clip_min: float | None) -> None:
    n_refs, n_dets = sim.shape
    clipped = sim if clip_min is None else np.maximum(sim, clip_min)
    matched = [d for d in assignment if d is not None]
    assert len(assignment) == n_refs
    assert len(matched) == len(set(matched)) == min(n_refs, n_dets)
    assert all(0 <= d < n_dets for d in matched)
    for k, d in enumerate(assignment):
        expected = 0.0 if d is None else clipped[k, d]
        assert scores[k] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n_dets", SIZES)
@pytest.mark.parametrize("n_refs", SIZES)
def test_hungarian_matches_brute_force(n_refs, n_dets):
    for seed in range(3):
        rng = np.random.default_rng(1000 * n_refs + 10 * n_dets + seed)
        sim = rng.uniform(-1.0, 1.0, size=(n_refs, n_dets))
        # At least one negative entry in every matrix, so clipping is always exercised.
        sim[rng.integers(n_refs), rng.integers(n_dets)] = -rng.uniform(0.01, 1.0)
        scores = hungarian_identity_scores(sim)
        assignment = hungarian_assignment(sim)
        assert scores.shape == (n_refs,)
        assert (scores >= 0).all()
        assert abs(scores.sum() - _brute_force_total(sim, 0.0, full=False)) < 1e-9
        _check_consistent(sim, scores, assignment, 0.0)


@pytest.mark.parametrize("shape", [(1, 1), (2, 5), (4, 4), (5, 2), (6, 3), (3, 6)])
def test_hungarian_matches_brute_force_with_ties_and_other_clips(shape):
    rng = np.random.default_rng(7)
    # Coarse values make ties; a positive clip and no clip at all change the optimum.
    sim = np.round(rng.uniform(-1.0, 1.0, size=shape), 1)
    for clip_min in (0.0, 0.3):
        scores = hungarian_identity_scores(sim, clip_min=clip_min)
        assert abs(scores.sum() - _brute_force_total(sim, clip_min, full=False)) < 1e-9
        _check_consistent(sim, scores, hungarian_assignment(sim, clip_min=clip_min), clip_min)
    scores = hungarian_identity_scores(sim, clip_min=None)
    assert abs(scores.sum() - _brute_force_total(sim, None, full=True)) < 1e-9
    _check_consistent(sim, scores, hungarian_assignment(sim, clip_min=None), None)


def test_hungarian_beats_greedy_on_hand_example():
    sim = np.array([[0.9, 0.8], [0.85, 0.1]])
    assert hungarian_assignment(sim) == [1, 0]
    np.testing.assert_allclose(hungarian_identity_scores(sim), [0.8, 0.85])


def test_negative_similarities_clip_to_zero():
    sim = np.array([[-0.5, 0.2], [-0.1, -0.9], [0.4, -0.3]])
    np.testing.assert_allclose(hungarian_identity_scores(sim), [0.2, 0.0, 0.4])


def test_no_detections():
    for sim in (np.zeros((3, 0)), torch.zeros(3, 0)):
        scores = hungarian_identity_scores(sim)
        assert type(scores) is type(sim)
        assert tuple(scores.shape) == (3,)
        assert float(abs(scores).sum()) == 0.0
        assert hungarian_assignment(sim) == [None, None, None]


def test_no_references():
    for sim in (np.zeros((0, 4)), torch.zeros(0, 4), np.zeros((0, 0))):
        scores = hungarian_identity_scores(sim)
        assert type(scores) is type(sim)
        assert tuple(scores.shape) == (0,)
        assert hungarian_assignment(sim) == []
    assert combine_identity_scores(hungarian_identity_scores(np.zeros((0, 4)))) == 0.0


def test_torch_and_numpy_agree_and_keep_their_kind():
    rng = np.random.default_rng(3)
    sim_np = rng.uniform(-1.0, 1.0, size=(4, 6)).astype(np.float32)
    sim_t = torch.from_numpy(sim_np.copy()).requires_grad_(True)
    scores_np = hungarian_identity_scores(sim_np)
    scores_t = hungarian_identity_scores(sim_t)
    assert isinstance(scores_np, np.ndarray) and scores_np.dtype == np.float32
    assert isinstance(scores_t, torch.Tensor) and scores_t.dtype == torch.float32
    assert scores_t.device == sim_t.device
    np.testing.assert_allclose(scores_t.detach().numpy(), scores_np)
    assert hungarian_assignment(sim_t) == hungarian_assignment(sim_np)
    # Scores are gathered from the tensor: the gradient reaches exactly the matched, unclipped entries.
    scores_t.sum().backward()
    expected = np.zeros_like(sim_np)
    for k, d in enumerate(hungarian_assignment(sim_np)):
        if d is not None and sim_np[k, d] > 0:
            expected[k, d] = 1.0
    np.testing.assert_array_equal(sim_t.grad.numpy(), expected)
    assert hungarian_identity_scores(torch.ones(2, 2, dtype=torch.float64)).dtype == torch.float64


def test_non_finite_similarity_raises():
    with pytest.raises(ValueError, match="NaN"):
        hungarian_identity_scores(np.array([[0.1, np.nan]]))
    with pytest.raises(ValueError, match="2-D"):
        hungarian_identity_scores(np.zeros(3))


def test_combine_modes_on_hand_numbers():
    scores = [0.9, 0.5, 0.7]
    assert combine_identity_scores(scores, "mean") == pytest.approx(0.7)
    assert combine_identity_scores(scores, "min") == pytest.approx(0.5)
    assert combine_identity_scores(scores, "mean_min") == pytest.approx(0.6)
    assert combine_identity_scores(np.array(scores)) == pytest.approx(0.6)
    assert combine_identity_scores(torch.tensor(scores)) == pytest.approx(0.6)
    for mode in ("mean", "min", "mean_min"):
        assert combine_identity_scores([], mode) == 0.0
        assert combine_identity_scores(torch.zeros(0), mode) == 0.0
    with pytest.raises(ValueError, match="mode"):
        combine_identity_scores(scores, "max")


def test_cosine_similarity_matrix():
    refs = np.array([[1.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    dets = np.array([[2.0, 0.0], [0.0, 0.0], [0.0, -1.0]])
    expected = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.6, 0.0, -0.8]])
    sim = cosine_similarity_matrix(refs, dets)
    assert isinstance(sim, np.ndarray) and sim.shape == (3, 3)
    assert np.isfinite(sim).all()
    np.testing.assert_allclose(sim, expected, atol=1e-12)
    sim_t = cosine_similarity_matrix(
        torch.tensor(refs, dtype=torch.float32), torch.tensor(dets, dtype=torch.float32)
    )
    assert isinstance(sim_t, torch.Tensor) and sim_t.dtype == torch.float32
    assert torch.isfinite(sim_t).all()
    np.testing.assert_allclose(sim_t.numpy(), expected, atol=1e-6)
    assert cosine_similarity_matrix(np.zeros((2, 5)), np.zeros((0, 5))).shape == (2, 0)
    with pytest.raises(ValueError, match="embedding sizes"):
        cosine_similarity_matrix(np.zeros((2, 5)), np.zeros((3, 4)))


def _hand_video():
    refs = np.eye(3)[:2]  # two identities, D = 3
    frames = [
        np.eye(3)[[1, 0]],  # both present, detected in swapped order
        np.eye(3)[[0]],  # reference 1 missing
        np.zeros((0, 3)),  # nobody detected
        np.array([[0.6, 0.8, 0.0]]),  # one ambiguous detection: closer to reference 1
    ]
    per_frame = np.array([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.8]])
    return refs, frames, per_frame


def test_frame_and_video_aggregation_on_hand_example():
    refs, frames, per_frame = _hand_video()
    np.testing.assert_allclose(frame_identity_scores(refs, frames), per_frame, atol=1e-12)
    np.testing.assert_allclose(video_identity_scores(refs, frames), [0.5, 0.45], atol=1e-12)
    # Mean over frames first, then 0.5 mean_k + 0.5 min_k across references.
    assert hungarian_identity_reward(refs, frames) == pytest.approx(0.5 * 0.475 + 0.5 * 0.45)
    assert hungarian_identity_reward(refs, frames, mode="min") == pytest.approx(0.45)
    # A frame given as None counts as a frame with no detections.
    frames_none = [*frames[:2], None, frames[3]]
    np.testing.assert_allclose(frame_identity_scores(refs, frames_none), per_frame, atol=1e-12)


def test_frame_scores_follow_the_reference_kind():
    refs, frames, per_frame = _hand_video()
    refs_t = torch.tensor(refs, dtype=torch.float32)
    mixed = [torch.tensor(frames[0]), frames[1], torch.zeros(0, 3), frames[3]]
    out = frame_identity_scores(refs_t, mixed)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (4, 2)
    np.testing.assert_allclose(out.numpy(), per_frame, atol=1e-6)
    out_np = frame_identity_scores(refs, [torch.tensor(f) for f in frames])
    assert isinstance(out_np, np.ndarray)
    np.testing.assert_allclose(out_np, per_frame, atol=1e-12)


def test_no_frames():
    refs = np.eye(3)[:2]
    assert frame_identity_scores(refs, []).shape == (0, 2)
    np.testing.assert_array_equal(video_identity_scores(refs, []), [0.0, 0.0])
    video_t = video_identity_scores(torch.eye(3)[:2], [])
    assert isinstance(video_t, torch.Tensor) and video_t.tolist() == [0.0, 0.0]
    assert hungarian_identity_reward(refs, []) == 0.0
    assert not math.isnan(hungarian_identity_reward(np.zeros((0, 3)), [np.eye(3)]))
