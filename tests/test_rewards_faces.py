"""The multi-ID face reward on a real group photo with real dlib weights (docs/design.md 7).

The photo is insightface's sample `t1.jpg` (six people); the references are crops of each detected
face. Then: (i) the photo itself, (ii) the largest and the smallest face swapped, (iii) one face
blanked, (iv) one face replaced by a copy of another person's. The Hungarian reward is
position-free by design, so a swap costs only the resampling of the moved faces; a lost or a
replaced identity costs far more.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

dlib = pytest.importorskip("dlib", reason="dlib is not installed (pip install dlib-bin)")
# Found by spec, not imported: face_recognition_models' __init__ needs pkg_resources, gone from new setuptools.
if importlib.util.find_spec("face_recognition_models") is None:
    pytest.skip("face-recognition-models is not installed (pip install face-recognition-models)", allow_module_level=True)
_insightface = importlib.util.find_spec("insightface")
PHOTO = Path(_insightface.submodule_search_locations[0]) / "data" / "images" / "t1.jpg" if _insightface else None
if PHOTO is None or not PHOTO.is_file():
    pytest.skip("insightface's sample photo data/images/t1.jpg is not installed (pip install insightface)",
                allow_module_level=True)

from PIL import Image  # noqa: E402

from idcrafter.rewards import build_reward  # noqa: E402
from idcrafter.rewards.faces import DlibFaceBackend, FaceReward  # noqa: E402
from idcrafter.rewards.identity import (  # noqa: E402
    combine_identity_scores,
    cosine_similarity_matrix,
    hungarian_assignment,
)


def grow(box, margin: float, shape) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    return (int(max(0, x0 - margin * w)), int(max(0, y0 - margin * h)),
            int(min(shape[1], x1 + margin * w)), int(min(shape[0], y1 + margin * h)))


def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda x: (x[2] - x[0]) * (x[3] - x[1])
    return w * h / (area(a) + area(b) - w * h)


@pytest.fixture(scope="module")
def scene():
    photo = np.asarray(Image.open(PHOTO).convert("RGB"))
    backend = DlibFaceBackend(upsample=0)  # faces here are ~100 px: no upsampling needed, 4x faster
    boxes = backend.detect(photo).boxes
    assert len(boxes) == 6, f"expected the six people of t1.jpg, found {len(boxes)}"
    refs = [photo[y0:y1, x0:x1].copy() for x0, y0, x1, y1 in (grow(b, 0.5, photo.shape) for b in boxes)]

    def paste(image, src, dst):
        s, d = grow(boxes[src], 0.15, photo.shape), grow(boxes[dst], 0.15, photo.shape)
        patch = Image.fromarray(photo[s[1]:s[3], s[0]:s[2]]).resize((d[2] - d[0], d[3] - d[1]), Image.Resampling.BICUBIC)
        image[d[1]:d[3], d[0]:d[2]] = np.asarray(patch)

    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    big, small = int(np.argmax(areas)), int(np.argmin(areas))
    swapped = photo.copy()
    paste(swapped, big, small)
    paste(swapped, small, big)
    blanked = photo.copy()
    x0, y0, x1, y1 = grow(boxes[0], 0.3, photo.shape)
    blanked[y0:y1, x0:x1] = (128, 128, 128)
    duplicated = photo.copy()
    paste(duplicated, small, big)  # the big face's person is gone, the small face's appears twice
    reward = FaceReward(backend=backend, max_frames=None)
    images = {"original": photo, "swapped": swapped, "blanked": blanked, "duplicated": duplicated}
    return dict(photo=photo, boxes=boxes, refs=refs, big=big, small=small, backend=backend, reward=reward,
                images=images)


@pytest.fixture(scope="module")
def scored(scene):
    """name -> (per-reference scores [6], the reward R_face, warnings)."""
    out = {}
    for name, image in scene["images"].items():
        warnings = Counter()
        per_ref = scene["reward"].sample_scores(image[None], scene["refs"], warnings)
        out[name] = (per_ref, combine_identity_scores(per_ref, "mean_min"), warnings)
    print({k: round(v[1], 5) for k, v in out.items()})
    return out


def test_every_reference_is_matched_to_its_own_face(scene, scored):
    backend, boxes = scene["backend"], scene["boxes"]
    refs = np.stack([scene["reward"].reference_embedding(r) for r in scene["refs"]])
    faces = backend.detect(scene["photo"])
    assignment = hungarian_assignment(cosine_similarity_matrix(refs, faces.embeddings))
    assert None not in assignment
    assert all(iou(faces.boxes[j], boxes[k]) > 0.7 for k, j in enumerate(assignment))
    per_ref, _, warnings = scored["original"]
    assert per_ref.min() > 0.99 and not warnings  # same pixels, re-detected in a crop
    result = scene["reward"]([scene["photo"][None]], ["a group photo"], [scene["refs"]])
    assert result.scores[0] == pytest.approx(0.5 * per_ref.mean() + 0.5 * per_ref.min(), abs=1e-6)
    assert result.components["face_mean"][0] == pytest.approx(per_ref.mean(), abs=1e-6)
    assert result.components["face_min"][0] == pytest.approx(per_ref.min(), abs=1e-6)


def test_the_original_photo_scores_highest(scored):
    score = {name: v[1] for name, v in scored.items()}
    assert score["original"] > score["swapped"] > score["duplicated"] > score["blanked"]
    assert score["original"] - score["swapped"] < 0.01  # matching follows faces, not positions
    assert score["blanked"] < 0.5  # one of six identities lost: the min term is 0


def test_swapped_faces_are_followed_to_their_new_places(scene):
    backend, boxes, big, small = scene["backend"], scene["boxes"], scene["big"], scene["small"]
    refs = np.stack([scene["reward"].reference_embedding(r) for r in scene["refs"]])
    faces = backend.detect(scene["images"]["swapped"])
    assignment = hungarian_assignment(cosine_similarity_matrix(refs, faces.embeddings))
    moved = {big: small, small: big}
    for k, j in enumerate(assignment):
        assert iou(faces.boxes[j], grow(boxes[moved.get(k, k)], 0.0, scene["photo"].shape)) > 0.4, k


def test_a_blanked_face_scores_zero_and_a_replaced_one_drops(scene, scored):
    per_ref, score, warnings = scored["blanked"]
    assert per_ref[0] == 0.0 and per_ref[1:].min() > 0.99
    assert score == pytest.approx(0.5 * per_ref[1:].sum() / 6, abs=1e-9)  # 0.5 mean + 0.5 * min (= 0)
    assert not warnings  # the frame still has faces; the reference does too
    original, duplicated = scored["original"][0], scored["duplicated"][0]
    big = scene["big"]
    assert duplicated[big] < original[big] - 0.05  # dlib cosines of different people are ~0.8-0.9
    assert np.allclose(np.delete(duplicated, big), np.delete(original, big), atol=1e-3)


def test_no_face_is_zero_with_warnings_never_nan(scene):
    reward = scene["reward"]
    face_ref = scene["refs"][0]
    flat = np.full((3, 96, 128, 3), 90, np.uint8)
    out = reward([flat, face_ref[None]], ["", ""], [[face_ref, flat[0]], [flat[0]]])
    assert out.scores.tolist() == [0.0, 0.0]
    assert out.warnings == Counter({"no face in a reference": 2, "no face in a frame": 3})
    # The reference without a face scores 0; the other one is still matched.
    warnings = Counter()
    per_ref = reward.sample_scores(face_ref[None], [face_ref, flat[0]], warnings)
    assert per_ref[0] > 0.99 and per_ref[1] == 0.0
    assert warnings == Counter({"no face in a reference": 1})


def test_face_reward_averages_the_frame_level_reward(scene, scored):
    # A clip of the photo with face 0 blanked, then with the big face replaced by another person's: per
    # frame (1 - alpha) mean_k + alpha min_k, averaged over the frames (ID-Crafter eq. 7 and S.12).
    assert scene["big"] != 0  # so the two frames lose different people
    clip = np.stack([scene["images"]["blanked"], scene["images"]["duplicated"]])
    alpha = 0.25  # alpha weighs the worst subject
    out = FaceReward(backend=scene["backend"], alpha=alpha, max_frames=None)([clip], [""], [scene["refs"]])
    frames = [scored["blanked"][0], scored["duplicated"][0]]
    expected = np.mean([(1 - alpha) * f.mean() + alpha * f.min() for f in frames])
    assert out.scores.item() == pytest.approx(expected, abs=1e-6)
    assert out.components["face_mean"].item() == pytest.approx(np.mean([f.mean() for f in frames]), abs=1e-6)
    assert out.components["face_min"].item() == pytest.approx(frames[1].min() / 2, abs=1e-6)  # blanked frame: 0
    # Not the clip-level form, whose min is taken over the references' frame means.
    clip_level = (1 - alpha) * np.mean(frames) + alpha * np.min(np.mean(frames, 0))
    assert out.scores.item() < clip_level - 0.01


def test_build_reward_options():
    reward = build_reward("face", backend="dlib", upsample=0, stride=2, max_frames=3, alpha=0.25)
    assert isinstance(reward.backend, DlibFaceBackend) and reward.backend.upsample == 0
    assert (reward.stride, reward.max_frames, reward.alpha) == (2, 3, 0.25)
    assert build_reward("face").alpha == 0.5 and build_reward("face", mode="mean").alpha == 0.0
    with pytest.raises(ValueError, match="face.*upsampl|face.*bad option"):
        build_reward("face", upsampl=0)
    with pytest.raises(ValueError, match="mode"):
        build_reward("face", mode="max")
    with pytest.raises(ValueError, match="alpha"):
        build_reward("face", alpha=-0.1)
