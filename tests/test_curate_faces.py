"""Face verification in curation with real dlib models on videos made from real photos shipped in
packages: pans and zooms over insightface's sample group photo and scikit-image's astronaut
(docs/design.md 8.1; MultiCrafter App. C: references from the initial frame, face embeddings,
a cosine threshold between the reference and target frames)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idcrafter.curate.core import Candidate, Dropped, SubjectTrack
from idcrafter.curate.identity import FaceVerifier, VerifyStage
from idcrafter.curate.references import ReferenceStage

pytest.importorskip("dlib")
insightface = pytest.importorskip("insightface")
skimage_data = pytest.importorskip("skimage.data")

GROUP = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
# Two people of the group photo (face boxes in photo pixels, found by dlib's HOG detector).
FACES = {"left": (65, 284, 169, 388), "middle": (275, 179, 362, 266)}
ASTRONAUT_FACE = (179, 83, 266, 170)
SIZE = (440, 360)  # output frame (width, height)


def person_box(face) -> np.ndarray:
    """Head and shoulders around a face box."""
    x0, y0, x1, y1 = face
    w, h = x1 - x0, y1 - y0
    return np.array([x0 - 0.4 * w, y0 - 0.3 * h, x1 + 0.4 * w, y1 + 1.0 * h])


def pan(photo: np.ndarray, start, end, n: int, boxes) -> tuple[np.ndarray, list[np.ndarray]]:
    """n frames of a camera moving (and zooming) from crop window `start` to `end` over a photo
    -> (frames (n, H, W, 3), per person its box in every frame (n, 4))."""
    frames, tracks = [], [[] for _ in boxes]
    for t in range(n):
        a = t / max(n - 1, 1)
        x0, y0, x1, y1 = (1 - a) * np.asarray(start, float) + a * np.asarray(end, float)
        crop = Image.fromarray(photo).crop((int(x0), int(y0), int(x1), int(y1))).resize(SIZE, Image.BICUBIC)
        frames.append(np.asarray(crop))
        sx, sy = SIZE[0] / (int(x1) - int(x0)), SIZE[1] / (int(y1) - int(y0))
        for k, b in enumerate(boxes):
            tracks[k].append(np.clip((b - [int(x0), int(y0)] * 2) * [sx, sy, sx, sy], 0, [SIZE[0], SIZE[1]] * 2))
    return np.stack(frames), [np.stack(t) for t in tracks]


def candidate(frames: np.ndarray, tracks: list[np.ndarray], key: str) -> Candidate:
    subjects = [SubjectTrack("person", b, np.ones(len(b))) for b in tracks]
    return Candidate(key, key, 8.0, 0, len(frames), frames=frames, frame_indices=np.arange(len(frames)),
                     subjects=subjects)


@pytest.fixture(scope="module")
def group_clip():
    photo = np.asarray(Image.open(GROUP).convert("RGB"))
    boxes = [person_box(FACES["left"]), person_box(FACES["middle"])]
    return pan(photo, (0, 140, 440, 500), (30, 160, 410, 470), 9, boxes)


@pytest.fixture(scope="module")
def spliced_clip():
    """One person's track that turns into another person half-way: 4 frames of the group photo's
    left person, then 5 of the astronaut framed alike (a cut the shot detector missed)."""
    photo = np.asarray(Image.open(GROUP).convert("RGB"))
    astronaut = skimage_data.astronaut()
    first, (box_a,) = pan(photo, (0, 140, 440, 500), (10, 145, 440, 500), 4, [person_box(FACES["left"])])
    ax0, ay0 = ASTRONAUT_FACE[0] - 65, ASTRONAUT_FACE[1] - 144  # the astronaut's face where the left face was
    second, (box_b,) = pan(astronaut, (ax0, ay0, ax0 + 440, ay0 + 360), (ax0 + 10, ay0 + 5, ax0 + 440, ay0 + 360), 5,
                           [person_box(ASTRONAUT_FACE)])
    return np.concatenate([first, second]), [np.concatenate([box_a, box_b])]


@pytest.fixture(scope="module")
def faces():
    return FaceVerifier("dlib", upsample=0)


def test_references_match_each_persons_face_in_the_target_frames(group_clip, faces):
    frames, tracks = group_clip
    [out] = ReferenceStage(rule="first-frame", face_options={"upsample": 0}, require_face=True).run(
        [candidate(frames, tracks, "group")])
    assert out.frame_indices.tolist() == [4] and [s.reference_frame for s in out.subjects] == [0, 0]
    refs = faces.embed([s.face for s in out.subjects])
    assert not np.isnan(refs).any()
    # every later frame: each person's face against both references
    for t in range(1, 9):
        crops = [frames[t, int(b[t, 1]):int(b[t, 3]), int(b[t, 0]):int(b[t, 2])] for b in tracks]
        sims = refs @ faces.embed(crops).T  # (reference, person)
        assert sims[0, 0] > faces.threshold > sims[0, 1] and sims[1, 1] > faces.threshold > sims[1, 0]
    stage = VerifyStage(verifiers={"person": "face"}, options={"face": {"upsample": 0}})
    assert stage.run([out]) == [out]
    assert all(s.identity > 0.93 for s in out.subjects)


def test_a_clip_spliced_from_two_peoples_photos_is_dropped(spliced_clip):
    frames, tracks = spliced_clip
    stage = VerifyStage(verifiers={"person": "face"}, options={"face": {"upsample": 0}}, frames=4)
    # without references: views across the splice disagree
    [dropped] = stage.process([candidate(frames, tracks, "spliced")])
    assert dropped.reason == "identity below threshold" and dropped.item.subjects[0].info["identity_min"] < 0.9
    # MultiCrafter's order: reference from the first frame, the middle frame (the astronaut) as target
    [with_ref] = ReferenceStage(rule="first-frame", face_options={"upsample": 0}).run(
        [candidate(frames, tracks, "spliced")])
    [dropped] = stage.process([with_ref])
    assert dropped.reason == "identity below threshold" and with_ref.subjects[0].identity < 0.9
    # a person box with no face in the reference frame (the shirt below the left face)
    shirt = candidate(frames, [np.tile([[20.0, 300, 200, 360]], (9, 1))], "shirt")
    [no_face] = ReferenceStage(rule="first-frame", face_options={"upsample": 0}, require_face=True).process([shirt])
    assert isinstance(no_face, Dropped) and no_face.reason == "no face in the reference frame"
    assert np.isnan(stage.backends["person"].embed([frames[0, 300:360, 20:200]])).all()
    # the unspliced halves pass
    kept = stage.run([candidate(frames[:4], [tracks[0][:4]], "a"), candidate(frames[4:], [tracks[0][4:]], "b")])
    assert [c.key for c in kept] == ["a", "b"]
