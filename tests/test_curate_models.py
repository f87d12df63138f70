"""Curation model backends on tiny random transformers models saved to disk and loaded by path:
Grounding-DINO boxes against transformers' own post-processing, tracking, SAM masks and the
largest-component rule, DINOv2 embeddings, Qwen2.5-VL captions with item descriptors, and batched
results equal to one-by-one results."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_data import build_tiny_grounding_dino, build_tiny_sam

from idcrafter.curate.captions import (
    CaptionStage,
    QwenCaptioner,
    TemplateCaptioner,
    clean_text,
    join_descriptors,
    mark_descriptors,
)
from idcrafter.curate.core import Candidate, Detection, Dropped, Funnel, SubjectTrack, make_backend
from idcrafter.curate.detect import (
    DetectStage,
    GroundingDinoDetector,
    KeypointStage,
    box_iou,
    cxcywh_to_pixels,
    face_visible,
    grounding_prompt,
    link_tracks,
    nms,
)
from idcrafter.curate.dino import DinoVerifier
from idcrafter.curate.segment import SamSegmenter, SegmentStage, fill_gaps, largest_component, sam2_box


# ---------------------------------------------------------------------------- tiny models
@pytest.fixture(scope="module")
def gd_folder(tmp_path_factory):
    return build_tiny_grounding_dino(tmp_path_factory.mktemp("gd") / "grounding-dino")


def noise_frames(n: int, height: int = 48, width: int = 80, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------- boxes
def test_cxcywh_to_pixels_and_iou_on_known_boxes():
    # A box centred in a 100 x 200 (H x W) frame, 20% of the width and 40% of the height.
    assert np.allclose(cxcywh_to_pixels(np.array([0.5, 0.5, 0.2, 0.4]), 100, 200), [80, 30, 120, 70])
    iou = box_iou(np.array([[0, 0, 10, 10]]), np.array([[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]]))
    assert np.allclose(iou, [[50 / 150, 0.0, 1.0]])
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [30, 30, 40, 40]], dtype=float)
    assert nms(boxes, np.array([0.5, 0.9, 0.7]), 0.5).tolist() == [1, 2]


def test_grounding_prompt_spans_name_the_category_words():
    text, spans = grounding_prompt(["person", "dog", "upper"], {"upper": "upper garment"})
    assert text == "a person. a dog. a upper garment."
    assert [text[a:b] for a, b in spans] == ["person", "dog", "upper garment"]
    with pytest.raises(ValueError, match="without '.'"):
        grounding_prompt(["a.b"])


def test_grounding_dino_boxes_match_transformers_post_process(gd_folder):
    frames = noise_frames(3)
    detector = GroundingDinoDetector(str(gd_folder), box_threshold=0.0, nms_iou=1.0)
    outputs, inputs, tokens = detector.raw(frames, ["person", "dog"])
    assert tokens == [[2], [5]]  # [CLS] a person . a dog . [SEP]
    reference = detector.processor.post_process_grounded_object_detection(
        outputs, inputs["input_ids"], threshold=-1.0, text_threshold=0.0, target_sizes=[(48, 80)] * 3)
    ours = cxcywh_to_pixels(outputs.pred_boxes.numpy(), 48, 80)
    for mine, theirs in zip(ours, reference):
        assert len(theirs["boxes"]) == 20
        np.testing.assert_allclose(mine, theirs["boxes"].numpy(), atol=1e-4)
    # Every detection is one of the model's query boxes (clipped to the frame), scored by its category's token.
    probs = outputs.logits.sigmoid().numpy()
    detections = detector.detect(frames, ["person", "dog"])
    assert sum(len(d) for d in detections) == 3 * 20
    for t, frame in enumerate(detections):
        clipped = np.clip(ours[t], 0, [80, 48, 80, 48])
        for det in frame:
            q = int(np.abs(clipped - det.box).sum(-1).argmin())
            np.testing.assert_allclose(det.box, clipped[q], atol=1e-4)
            token = {"person": 2, "dog": 5}[det.category]
            assert det.score == pytest.approx(float(probs[t, q, token]), abs=1e-6)
            assert det.score >= float(probs[t, q, 7 - token])  # the other category's token scores lower


def test_grounding_dino_batches_equal_one_by_one(gd_folder):
    frames = noise_frames(4, seed=1)
    detector = GroundingDinoDetector(str(gd_folder), box_threshold=0.3)
    together = detector.detect(frames, ["person", "dog"])
    alone = [detector.detect(frames[i:i + 1], ["person", "dog"])[0] for i in range(4)]
    assert sum(len(d) for d in together) > 0
    for a, b in zip(together, alone):
        assert [d.category for d in a] == [d.category for d in b]
        np.testing.assert_allclose(np.array([d.box for d in a]), np.array([d.box for d in b]), atol=1e-4)
        np.testing.assert_allclose([d.score for d in a], [d.score for d in b], atol=1e-5)


def test_missing_model_folder_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        GroundingDinoDetector(str(tmp_path / "nowhere")).detect(noise_frames(1), ["person"])


# ---------------------------------------------------------------------------- tracking
def crossing_detections(shuffle_seed: int = 0) -> list[list[Detection]]:
    """Two people walking past each other (A right, B left, 2 px vertical offset: their boxes overlap
    almost fully where they cross), a dog standing still, and A missing in frame 9; detections are
    shuffled within each frame."""
    rng = np.random.default_rng(shuffle_seed)
    frames = []
    for t in range(16):
        dets = [Detection(np.array([10 + 6 * t, 20, 30 + 6 * t, 60], float), 0.9, "person"),
                Detection(np.array([100 - 6 * t, 22, 120 - 6 * t, 62], float), 0.8, "person"),
                Detection(np.array([50, 70, 70, 90], float), 0.7, "dog")]
        if t == 9:
            dets = dets[1:]
        frames.append([dets[i] for i in rng.permutation(len(dets))])
    return frames


def test_tracking_keeps_ids_through_crossing_paths():
    tracks = link_tracks(crossing_detections(), iou_min=0.3, max_gap=2)
    assert len(tracks) == 3
    by_start = {(tr.category, float(tr.boxes[0, 0])): tr for tr in tracks}
    a, b, dog = by_start[("person", 10.0)], by_start[("person", 100.0)], by_start[("dog", 50.0)]
    t = np.arange(16)
    np.testing.assert_array_equal(a.boxes[a.present(), 0], (10 + 6 * t)[t != 9])  # A stays A past the crossing
    np.testing.assert_array_equal(b.boxes[:, 0], 100 - 6 * t)
    assert a.present().sum() == 15 and b.present().all() and dog.present().all()
    assert np.isnan(a.boxes[9]).all() and a.scores[9] == 0 and a.scores[10] == pytest.approx(0.9)
    # The trap: after the crossing, A's last box overlaps B's new box more than A's own new box.
    assert box_iou(a.boxes[7], b.boxes[8])[0, 0] > 0.8 > 0.6 > box_iou(a.boxes[7], a.boxes[8])[0, 0]


def test_tracking_on_the_last_box_alone_swaps_crossing_ids():
    tracks = link_tracks(crossing_detections(), iou_min=0.3, max_gap=2, velocity=False)
    a = next(tr for tr in tracks if tr.category == "person" and tr.boxes[0, 0] == 10)
    assert a.boxes[8, 0] == 100 - 6 * 8  # A's track took B's box where their paths crossed


class SquareDetector:
    """A real, deterministic detector for synthetic frames: each pure red / green square is a subject."""

    colours = {"person": (255, 0, 0), "dog": (0, 255, 0)}

    def detect(self, frames, categories):
        from scipy import ndimage

        out = []
        for frame in frames:
            dets = []
            for category in categories:
                labels, n = ndimage.label((frame == self.colours[category]).all(-1))
                for sl in ndimage.find_objects(labels):
                    dets.append(Detection(np.array([sl[1].start, sl[0].start, sl[1].stop, sl[0].stop], float),
                                          1.0, category))
            out.append(dets)
        return out


def square_clip(people: int, frames: int = 6, present: int | None = None) -> np.ndarray:
    clip = np.full((frames, 64, 96, 3), 90, np.uint8)
    for t in range(frames):
        for k in range(people):
            if k == people - 1 and present is not None and t >= present:
                continue
            x = 4 + 30 * k + t
            clip[t, 10:30, x:x + 16] = (255, 0, 0)
    return clip


def test_detect_stage_keeps_tracked_subjects_and_drops_with_reasons():
    stage = DetectStage(categories=["person"], detector=SquareDetector(), min_subjects=2, max_subjects=2,
                        min_presence=0.5, frame_batch=4)
    cands = [Candidate("a.mp4", "two", 25.0, frames=square_clip(2)),
             Candidate("b.mp4", "one", 25.0, frames=square_clip(1)),
             Candidate("c.mp4", "three", 25.0, frames=square_clip(3)),
             Candidate("d.mp4", "brief", 25.0, frames=square_clip(3, present=2)),  # third seen in 2 / 6 frames
             Candidate("e.mp4", "empty", 25.0, frames=square_clip(0))]
    funnel = Funnel()
    kept = stage.run(cands, funnel)
    assert [c.key for c in kept] == ["two", "brief"]
    assert [len(c.subjects) for c in kept] == [2, 2]
    np.testing.assert_array_equal(kept[0].subjects[1].boxes[:, 0], 34 + np.arange(6))
    assert funnel.as_dict()["detect"]["dropped"] == {"no subject": 1, "too few subjects": 1, "too many subjects": 1}
    assert isinstance(funnel.drops[0], Dropped) and funnel.drops[0].stage == "detect"


def test_detect_stage_builds_its_backend_from_the_registry(gd_folder):
    stage = DetectStage(categories=["person", "dog"], detector="grounding-dino",
                        detector_options={"model": str(gd_folder), "box_threshold": 0.3}, frame_batch=2,
                        min_presence=0.0)
    kept = stage.run([Candidate("a.mp4", "a", 25.0, frames=noise_frames(3, seed=2))])
    assert isinstance(stage.detector, GroundingDinoDetector)
    direct = GroundingDinoDetector(str(gd_folder), box_threshold=0.3).detect(noise_frames(3, seed=2), ["person", "dog"])
    expected = link_tracks(direct)
    assert len(kept) == 1 and len(kept[0].subjects) == len(expected) > 0
    for got, want in zip(kept[0].subjects, expected):
        assert got.category == want.category
        np.testing.assert_allclose(got.boxes, want.boxes, atol=1e-4)




# ---------------------------------------------------------------------------- segmentation
@pytest.fixture(scope="module")
def sam_folder(tmp_path_factory):
    return build_tiny_sam(tmp_path_factory.mktemp("sam") / "sam")


def test_largest_component_keeps_the_biggest_8_connected_blob():
    mask = np.zeros((12, 16), bool)
    mask[1:6, 1:7] = True  # 30 pixels
    mask[6, 7] = mask[7, 8] = True  # joined diagonally: part of the big blob (32)
    mask[8:11, 10:15] = True  # 15 pixels, separate
    mask[0, 15] = True  # a speck
    kept = largest_component(mask)
    assert kept.sum() == 32 and kept[7, 8] and not kept[9, 12] and not kept[0, 15]
    assert largest_component(np.zeros((4, 4), bool)).sum() == 0
    tie = np.zeros((3, 7), bool)
    tie[:, 0] = tie[:, 6] = True
    assert largest_component(tie)[:, 0].all() and not largest_component(tie)[:, 6].any()


def test_fill_gaps_interpolates_short_gaps_only():
    boxes = np.full((8, 4), np.nan)
    boxes[0], boxes[3], boxes[7] = [0, 0, 10, 10], [3, 0, 13, 10], [30, 0, 40, 10]
    filled = fill_gaps(boxes, max_gap=2)
    np.testing.assert_allclose(filled[1:3, 0], [1, 2])
    assert np.isnan(filled[4:7]).all()  # a 3-frame gap stays a gap


def test_sam_segmenter_matches_the_stock_sam_path(sam_folder):
    from transformers import SamModel, SamProcessor

    frames = noise_frames(3, seed=3)
    boxes = [np.array([[8, 6, 40, 40], [44, 10, 76, 44]], float), np.array([[4, 4, 30, 30]], float),
             np.array([[20, 8, 60, 46], [0, 0, 80, 48]], float)]
    segmenter = SamSegmenter(str(sam_folder))
    together = segmenter.logits(frames, boxes)
    model, processor = SamModel.from_pretrained(sam_folder).eval(), SamProcessor.from_pretrained(sam_folder)
    for frame, frame_boxes, mine in zip(frames, boxes, together):
        inputs = processor(images=[frame], input_boxes=[frame_boxes.tolist()], return_tensors="pt")
        with torch.no_grad():
            out = model(**inputs, multimask_output=False)
        stock = processor.post_process_masks(out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"],
                                             binarize=False)[0][:, 0].numpy()
        assert mine.shape == (len(frame_boxes), 48, 80)
        np.testing.assert_allclose(mine, stock, atol=1e-5)
        masks = segmenter.segment(frame[None], [frame_boxes])[0]
        assert 0.02 < masks.mean() < 0.98  # a random SAM still gives non-trivial masks
        sure = np.abs(stock) > 1e-4  # away from the threshold, where float noise cannot flip a pixel
        np.testing.assert_array_equal(masks[sure], stock[sure] > 0)
    alone = [segmenter.logits(frames[i:i + 1], boxes[i:i + 1])[0] for i in range(3)]
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a, b, atol=1e-5)


class ColourSegmenter:
    """A real, deterministic segmenter for synthetic frames: the red pixels inside each box."""

    def segment(self, frames, boxes):
        out = []
        for frame, frame_boxes in zip(frames, boxes):
            red = (frame == (255, 0, 0)).all(-1)
            masks = np.zeros((len(frame_boxes), *red.shape), bool)
            for k, (x0, y0, x1, y1) in enumerate(np.round(frame_boxes).astype(int)):
                masks[k, y0:y1, x0:x1] = red[y0:y1, x0:x1]
            out.append(masks)
        return out


def test_segment_stage_masks_tracks_bridges_gaps_and_drops_empty_masks():
    frames = square_clip(2, frames=6)
    frames[:, 40, 5] = (255, 0, 0)  # a stray red pixel inside person 0's box below: not its largest component
    cand = Candidate("a.mp4", "a", 25.0, frames=frames)
    tracks = DetectStage(categories=["person"], detector=SquareDetector(), min_presence=0.0).run([cand])[0].subjects
    assert len(tracks) == 3  # the two squares, then the stray pixel (found last in raster order)
    cand.subjects = tracks[:2]
    a = cand.subjects[0]
    a.boxes[:, 3] = 42  # the box reaches the stray pixel
    a.boxes[2] = np.nan  # a missed detection, bridged
    ghost = Candidate("b.mp4", "b", 25.0, frames=np.full((6, 64, 96, 3), 90, np.uint8),
                      subjects=[SubjectTrack("person", np.tile([[4.0, 10, 20, 30]], (6, 1)), np.ones(6))])
    funnel = Funnel()
    kept = SegmentStage(segmenter=ColourSegmenter(), frame_batch=4).run([cand, ghost], funnel)
    assert [c.key for c in kept] == ["a"]
    for k, track in enumerate(kept[0].subjects):
        assert track.masks.shape == (6, 64, 96)
        np.testing.assert_array_equal(track.masks.sum((1, 2)), [20 * 16] * 6)  # the square only, every frame
        assert track.masks[3, 10:30, 4 + 30 * k + 3:20 + 30 * k + 3].all()
    assert not kept[0].subjects[0].masks[:, 40, 5].any()
    assert funnel.as_dict()["segment"]["dropped"] == {"empty mask": 1}


def test_segment_stage_builds_sam_from_the_registry(sam_folder):
    frames = noise_frames(2, seed=4)
    track = SubjectTrack("person", np.array([[8, 6, 40, 40], [10, 6, 42, 40]], float), np.ones(2))
    stage = SegmentStage(segmenter="sam", segmenter_options={"model": str(sam_folder)}, max_empty=1.0)
    kept = stage.run([Candidate("a.mp4", "a", 25.0, frames=frames, subjects=[track])])
    direct = SamSegmenter(str(sam_folder)).segment(frames, [track.boxes[:1], track.boxes[1:]])
    assert isinstance(stage.segmenter, SamSegmenter)
    for t in range(2):
        np.testing.assert_array_equal(kept[0].subjects[0].masks[t], largest_component(direct[t][0]))


# ---------------------------------------------------------------------------- DINOv2
def build_tiny_dinov2(folder, seed: int = 0):
    """A ~5k-parameter DINOv2 (one 16-wide layer, 14-pixel patches on 28 x 28 crops) with its processor."""
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=28,
                          patch_size=14)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2Model(config).eval()
    processor = BitImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                     image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory):
    return build_tiny_dinov2(tmp_path_factory.mktemp("dino") / "dinov2")


def test_dino_verifier_embeds_unit_cls_rows_in_batches(dino_folder):
    from transformers import AutoImageProcessor, Dinov2Model

    rng = np.random.default_rng(5)
    crops = [rng.integers(0, 256, (30 + 7 * i, 20 + 5 * i, 3), dtype=np.uint8) for i in range(4)]
    crops.insert(2, np.zeros((0, 5, 3), np.uint8))  # an empty crop: nothing to embed
    crops.append(None)
    verifier = DinoVerifier(str(dino_folder), batch_size=2)
    emb = verifier.embed(crops)
    assert emb.shape == (6, 16) and np.isnan(emb[[2, 5]]).all()
    np.testing.assert_allclose(np.linalg.norm(emb[[0, 1, 3, 4]], axis=1), 1.0, atol=1e-6)
    model, processor = Dinov2Model.from_pretrained(dino_folder).eval(), AutoImageProcessor.from_pretrained(dino_folder)
    for row, crop in zip(emb[[0, 1, 3, 4]], [crops[i] for i in (0, 1, 3, 4)]):
        with torch.no_grad():
            cls = model(**processor(images=[crop], return_tensors="pt")).last_hidden_state[0, 0]
        np.testing.assert_allclose(row, (cls / cls.norm()).numpy(), atol=1e-5)
    alone = np.concatenate([DinoVerifier(str(dino_folder)).embed([c]) for c in crops])
    np.testing.assert_allclose(emb, alone, atol=1e-5)
    same = verifier.embed([crops[0], crops[0].copy()])
    assert float(same[0] @ same[1]) == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------------------- captions
def moving_track(category: str, x0: float, dx: float, frames: int = 6, size: float = 20.0) -> SubjectTrack:
    boxes = np.array([[x0 + dx * t, 20, x0 + dx * t + size, 20 + size] for t in range(frames)], float)
    return SubjectTrack(category, boxes, np.ones(frames))


def test_template_captioner_names_layout_and_motion():
    cand = Candidate("a.mp4", "a", 25.0, frames=np.zeros((6, 64, 120, 3), np.uint8),
                     subjects=[moving_track("person", 4, 4), moving_track("dog", 50, 0), moving_track("person", 95, 0)])
    prompt, descriptors = TemplateCaptioner().caption(cand)
    assert prompt == ("a video of a person on the left, moving right, a dog in the center, staying still, "
                      "and a person on the right, staying still")
    assert descriptors == ["a person on the left", "a dog in the center", "a person on the right"]
    twins = Candidate("b.mp4", "b", 25.0, frames=np.zeros((6, 64, 120, 3), np.uint8),
                      subjects=[moving_track("upper", 4, 0), moving_track("upper", 10, 0, size=8)])
    prompt, descriptors = TemplateCaptioner().caption(twins)
    assert descriptors == ["an upper garment on the left", "another upper garment on the left"]
    assert all(d in prompt for d in descriptors)
    photo = Candidate("c.mp4", "c", 25.0, frames=np.zeros((1, 64, 120, 3), np.uint8),
                      subjects=[moving_track("person", 90, 0, frames=1), moving_track("bag", 4, 0, frames=1)])
    assert TemplateCaptioner().caption(photo) == ("a photo of a person on the right and a bag on the left",
                                                  ["a person on the right", "a bag on the left"])


def test_descriptor_markup_round_trips_through_the_ccpa_parser():
    from idcrafter.core.positions import parse_descriptor_markup

    prompt = join_descriptors("a woman walks in a park.", ["a red knit sweater", None, "blue jeans"])
    assert prompt == "a woman walks in a park, with a red knit sweater, blue jeans"
    assert join_descriptors(prompt, ["blue jeans"]) == prompt
    marked = mark_descriptors(prompt, ["upper", "face", "lower"], ["a red knit sweater", None, "blue jeans"])
    assert marked == "a woman walks in a park, with <upper>a red knit sweater</upper>, <lower>blue jeans</lower>"
    clean, spans = parse_descriptor_markup(marked)
    assert clean == prompt
    assert [(s.category, prompt[s.char_start:s.char_end]) for s in spans] == [("upper", "a red knit sweater"),
                                                                     ("lower", "blue jeans")]
    with pytest.raises(ValueError, match="does not occur"):
        mark_descriptors(prompt, ["bag"], ["a leather bag"])
    assert clean_text('  \n "A <face>tall</face> man." \nmore', max_words=2) == "A tall"
    assert clean_text("a\x0fred\ufffd\ufffd bike\x03.") == "a red bike"


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    from idcrafter.video.vlm import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen") / "tiny-qwen2.5-vl", seed=0)


def one_for_all_candidates() -> list[Candidate]:
    """Two single-person clips with face / upper-garment subjects and their references (on white)."""
    rng = np.random.default_rng(7)
    out = []
    for k in range(2):
        frames = rng.integers(0, 256, (4, 56, 56, 3), dtype=np.uint8)
        face, upper = moving_track("face", 10 + k, 1, frames=4, size=16), moving_track("upper", 8, 0, frames=4, size=28)
        for track in (face, upper):
            track.reference = np.full((56, 56, 3), 255, np.uint8)
            track.reference[8:48, 8:48] = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        out.append(Candidate(f"v{k}.mp4", f"v{k}", 25.0, frames=frames, subjects=[face, upper]))
    return out


def test_qwen_captions_carry_descriptors_valid_for_the_manifest_and_ccpa(qwen_folder, tmp_path):
    import json

    from PIL import Image

    from idcrafter.core.positions import parse_descriptor_markup
    from idcrafter.data.manifest import load_manifest

    stage = CaptionStage(captioner="qwen2.5-vl", captioner_options={"model": str(qwen_folder), "max_image_side": 56,
                                                                    "prompt_tokens": 24}, descriptors=True,
                         batch_size=2)
    kept = stage.run(one_for_all_candidates())
    assert isinstance(stage.captioner, QwenCaptioner) and len(kept) == 2
    lines = []
    for cand in kept:
        descriptors = [t.descriptor for t in cand.subjects]
        assert all(descriptors) and all(d in cand.prompt for d in descriptors)
        clean, spans = parse_descriptor_markup(cand.info["marked_prompt"])
        assert clean == cand.prompt and [s.text for s in spans] == [d for d in descriptors]
        Image.fromarray(cand.frames[0]).save(tmp_path / f"{cand.key}.png")
        subjects = []
        for track in cand.subjects:
            Image.fromarray(track.reference).save(tmp_path / f"{cand.key}_{track.category}.png")
            subjects.append({"image": f"{cand.key}_{track.category}.png", "category": track.category,
                             "descriptor": track.descriptor})
        lines.append(json.dumps({"id": cand.key, "image": f"{cand.key}.png", "prompt": cand.prompt,
                                 "subjects": subjects}))
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    samples, errors = load_manifest(tmp_path / "manifest.jsonl")
    assert errors == [] and len(samples) == 2


def test_qwen_batch_equals_one_by_one(qwen_folder):
    captioner = QwenCaptioner(str(qwen_folder), max_image_side=56, prompt_tokens=24)
    together = captioner.caption_batch(one_for_all_candidates())
    alone = [captioner.caption(c) for c in one_for_all_candidates()]
    assert together == alone
    assert together[0] != together[1]  # the captions follow the pixels


def test_caption_stage_without_descriptors_asks_for_none(qwen_folder):
    stage = CaptionStage(captioner="qwen2.5-vl", captioner_options={"model": str(qwen_folder), "max_image_side": 56,
                                                                    "prompt_tokens": 24})
    kept = stage.run(one_for_all_candidates()[:1])
    assert stage.captioner.descriptors is False
    assert kept[0].prompt and [t.descriptor for t in kept[0].subjects] == [None, None]
    assert "marked_prompt" not in kept[0].info


def test_model_backends_name_their_missing_folder_setting():
    for cls, setting in [(GroundingDinoDetector, "backends.detector.model"), (SamSegmenter, "backends.segmenter.model"),
                         (DinoVerifier, "backends.verifier.model"), (QwenCaptioner, "backends.captioner.model")]:
        with pytest.raises(ValueError, match=setting.replace(".", r"\.")):
            cls()
    with pytest.raises(ValueError, match=r"backends\.detector\.model"):
        make_backend("detector", "grounding-dino")


def test_single_subject_mode_splits_one_candidate_per_category():
    frames = square_clip(1, frames=4)
    frames[:, 40:52, 60:72] = (0, 255, 0)  # one dog
    stage = DetectStage(categories={"person": "a person", "dog": "a dog"}, detector=SquareDetector(),
                        single_subject=True)
    kept = stage.run([Candidate("a.mp4", "a", 25.0, frames=frames)])
    # Tracks come in order of first appearance, categories of one frame alphabetically.
    assert [(c.key, [t.category for t in c.subjects]) for c in kept] == [("a-dog", ["dog"]), ("a-person", ["person"])]
    assert all(c.frames is frames for c in kept)
    crowd = square_clip(2, frames=4)  # two people: whose face / garment is ambiguous
    funnel = Funnel()
    assert stage.run([Candidate("b.mp4", "b", 25.0, frames=crowd)], funnel) == []
    assert funnel.as_dict()["detect"]["dropped"] == {"several subjects per category": 1}


def test_detect_stage_hands_category_words_to_grounding_dino(gd_folder):
    stage = DetectStage(categories={"person": "a person", "upper": "an upper garment"},
                        detector=GroundingDinoDetector(str(gd_folder), phrases={"person": "a dog"}), min_presence=0.0)
    stage.run([Candidate("a.mp4", "a", 25.0, frames=noise_frames(1))])
    assert stage.detector.phrases == {"person": "a dog", "upper": "an upper garment"}  # the backend's own wins
    assert grounding_prompt(stage.categories, stage.detector.phrases)[0] == "a dog. an upper garment."


# ---------------------------------------------------------------------------- keypoints
def build_tiny_vitpose(folder, seed: int = 0):
    """A ~17k-parameter ViTPose (64 x 48 crops, 16-pixel patches, 17 COCO keypoints) with its processor."""
    from transformers import (
        VitPoseBackboneConfig,
        VitPoseConfig,
        VitPoseForPoseEstimation,
        VitPoseImageProcessorPil,
    )

    config = VitPoseConfig(backbone_config=VitPoseBackboneConfig(
        image_size=[64, 48], patch_size=[16, 16], hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        mlp_ratio=2, out_indices=[1]), num_labels=17)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VitPoseForPoseEstimation(config).eval()
    model.save_pretrained(folder)
    VitPoseImageProcessorPil(size={"height": 64, "width": 48}).save_pretrained(folder)
    return folder


def test_keypoint_stage_matches_stock_vitpose_and_requires_faces(tmp_path):
    from transformers import VitPoseForPoseEstimation, VitPoseImageProcessorPil

    folder = build_tiny_vitpose(tmp_path / "vitpose")
    frames = noise_frames(3, seed=8)
    a = SubjectTrack("person", np.array([[5, 5, 30, 40], [6, 5, 31, 40], [np.nan] * 4]), np.array([1, 1, 0.0]))
    b = SubjectTrack("person", np.array([[40, 5, 70, 40]] * 3, float), np.ones(3))
    dog = SubjectTrack("dog", np.array([[10, 30, 30, 46]] * 3, float), np.ones(3))
    kept = KeypointStage(model=str(folder), frame_batch=2).run([Candidate("a.mp4", "a", 25.0, frames=frames,
                                                                          subjects=[a, b, dog])])
    assert len(kept) == 1 and a.keypoints.shape == (3, 17, 3) and dog.keypoints is None
    assert np.isnan(a.keypoints[2]).all() and not np.isnan(b.keypoints).any()
    model, processor = VitPoseForPoseEstimation.from_pretrained(folder).eval(), VitPoseImageProcessorPil.from_pretrained(folder)
    for t, track in [(0, a), (1, a), (2, b)]:
        x0, y0, x1, y1 = track.boxes[t]
        coco = [[[x0, y0, x1 - x0, y1 - y0]]]
        with torch.no_grad():
            out = model(**processor(images=[frames[t]], boxes=coco, return_tensors="pt"))
        pose = processor.post_process_pose_estimation(out, boxes=coco)[0][0]
        np.testing.assert_allclose(track.keypoints[t, :, :2], pose["keypoints"].numpy(), atol=1e-3)  # pixels
        np.testing.assert_allclose(track.keypoints[t, :, 2], pose["scores"].numpy(), atol=1e-5)
    funnel = Funnel()
    strict = KeypointStage(model=str(folder), require_face=True, min_score=1.01)  # heatmap scores never reach it
    assert strict.run([Candidate("a.mp4", "a", 25.0, frames=frames, subjects=[a, b])], funnel) == []
    assert funnel.as_dict()["keypoints"]["dropped"] == {"face not visible": 1}
    passthrough = Candidate("b.mp4", "b", 25.0, frames=frames, subjects=[dog])
    assert KeypointStage().run([passthrough]) == [passthrough]  # no ViTPose folder: the stage is skipped


def test_face_visible_needs_nose_and_both_eyes_in_one_frame():
    kp = np.zeros((2, 17, 3))
    kp[0, [0, 1], 2] = 0.9  # nose and left eye, frame 0
    kp[1, [1, 2], 2] = 0.9  # both eyes, frame 1
    assert not face_visible(kp, 0.5)
    kp[1, 0, 2] = 0.6
    assert face_visible(kp, 0.5) and not face_visible(kp, 0.7)


# ---------------------------------------------------------------------------- SAM 2 video
def build_tiny_sam2_video(folder, seed: int = 0, size: int = 128):
    """A ~1.3M-parameter SAM 2 video model on 128-pixel inputs (Hiera 16 wide, 5 blocks). The widths
    SAM 2 ties together are kept: memory features 64 channels (its image cross-attention reads 64),
    the model 128 wide so object pointers split into memory-sized tokens as in the full model."""
    from transformers import Sam2VideoConfig, Sam2VideoModel

    config = Sam2VideoConfig(
        image_size=size,
        vision_config=dict(
            model_type="sam2_vision_model",
            backbone_config=dict(model_type="sam2_hiera_det_model", image_size=[size, size], hidden_size=16,
                                 embed_dim_per_stage=[16, 32, 64, 128], num_attention_heads_per_stage=[1, 1, 1, 1],
                                 blocks_per_stage=[1, 2, 1, 1], global_attention_blocks=[2],
                                 window_size_per_stage=[4, 4, 4, 4], window_positional_embedding_background_size=[2, 2]),
            backbone_channel_list=[128, 64, 32, 16],
            backbone_feature_sizes=[[size // 4] * 2, [size // 8] * 2, [size // 16] * 2], fpn_hidden_size=128),
        prompt_encoder_config=dict(hidden_size=128, image_size=size, patch_size=16),
        mask_decoder_config=dict(hidden_size=128, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32),
        memory_attention_hidden_size=128, memory_attention_num_layers=1, memory_attention_feed_forward_hidden_size=64,
        memory_attention_rope_feat_sizes=[size // 16, size // 16], memory_encoder_hidden_size=128,
        memory_encoder_output_channels=64, mask_downsampler_embed_dim=128, memory_fuser_embed_dim=128,
        memory_fuser_intermediate_dim=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Sam2VideoModel(config).eval()
        # A random object-score head says "no object" about half the time, and SAM 2 then blanks the
        # mask (score -1024); bias it to "present" so the masks come from the mask decoder.
        model.mask_decoder.pred_obj_score_head.proj_out.bias.data.fill_(5.0)
    model.save_pretrained(folder)
    return folder


def test_sam2_propagation_masks_each_subject_from_its_first_frame(tmp_path, sam_folder):
    from transformers.models.sam2_video.processing_sam2_video import Sam2VideoProcessor

    folder = build_tiny_sam2_video(tmp_path / "sam2")
    frames = noise_frames(5, seed=9)
    a = np.array([[10, 10, 40, 40]] * 5, float)
    b = np.array([[np.nan] * 4] * 2 + [[45, 5, 75, 40]] * 3)
    segmenter = SamSegmenter(str(sam_folder), video_model=str(folder))
    both = segmenter.propagate(frames, [a, b])
    assert [m.shape for m in both] == [(5, 48, 80)] * 2
    assert not both[1][:2].any() and both[1][2:].any() and both[0].any()  # b starts where it is first found
    assert 0.0 < both[0].mean() < 1.0
    # Objects carry their own memories: propagating one subject alone gives its masks unchanged (SAM 2
    # keeps memories in bfloat16, hence the tolerance; masks agree wherever the logit is clear of 0).
    together = segmenter.propagate_logits(frames, [a, b])
    for k, box in enumerate((a, b)):
        alone = segmenter.propagate_logits(frames, [box])[0]
        seen = np.isfinite(together[k])
        np.testing.assert_array_equal(np.isfinite(alone), seen)
        np.testing.assert_allclose(alone[seen], together[k][seen], atol=0.05)
        sure = np.abs(together[k]) > 0.05
        np.testing.assert_array_equal(alone[sure] > 0, both[k][sure])
    # The box prompt is scaled to the model's square input as transformers' SAM 2 processor scales boxes.
    stock = Sam2VideoProcessor._normalize_coordinates(None, 128, torch.tensor([[45.0, 5, 75, 40]]), (48, 80),
                                                      is_bounding_box=True)
    np.testing.assert_allclose(sam2_box([45, 5, 75, 40], 48, 80, 128), stock.numpy().ravel(), atol=1e-5)
    np.testing.assert_allclose(sam2_box([40, 24, 80, 48], 48, 80, 128), [64, 64, 128, 128])
    # The stage uses propagation when the segmenter has a video model.
    tracks = [SubjectTrack("person", a, np.ones(5)), SubjectTrack("person", b, np.r_[0, 0, 1, 1, 1.0])]
    kept = SegmentStage(segmenter=segmenter, max_empty=1.0).run([Candidate("v.mp4", "v", 25.0, frames=frames,
                                                                           subjects=tracks)])
    for track, masks in zip(kept[0].subjects, both):
        np.testing.assert_array_equal(track.masks, np.stack([largest_component(m) for m in masks]))


# ---------------------------------------------------------------------------- the model stages together
def test_model_stages_run_in_sequence_on_tiny_models(gd_folder, sam_folder, qwen_folder):
    from idcrafter.curate.core import run_stages

    stages = [DetectStage(categories={"person": "a person", "dog": "a dog"}, detector="grounding-dino",
                          detector_options={"model": str(gd_folder), "box_threshold": 0.8}, min_presence=1.0),
              SegmentStage(segmenter="sam", segmenter_options={"model": str(sam_folder)}, max_empty=1.0),
              CaptionStage(captioner="qwen2.5-vl", captioner_options={"model": str(qwen_folder), "max_image_side": 56,
                                                                      "prompt_tokens": 16}, descriptors=True)]
    # Two still scenes (one frame repeated: every detection is found in every frame) and a clip that
    # lost its frames upstream.
    cands = [Candidate(f"still{k}.mp4", f"still{k}", 25.0, frames=np.repeat(noise_frames(1, seed=20 + k), 3, 0))
             for k in range(2)]
    cands.append(Candidate("empty.mp4", "empty", 25.0, frames=np.zeros((0, 48, 80, 3), np.uint8)))
    funnel = Funnel()
    kept = run_stages(stages, cands, funnel)
    rows = funnel.as_dict()
    assert [c.key for c in kept] == ["still0", "still1"]
    assert rows["detect"] | {"seconds": 0} == {"in": 3, "kept": 2, "dropped": {"no frames": 1}, "seconds": 0}
    assert rows["segment"]["in"] == rows["caption"]["in"] == rows["caption"]["kept"] == 2
    for cand in kept:
        assert len(cand.subjects) > 1 and cand.prompt
        for track in cand.subjects:
            assert track.present().all() and np.allclose(track.boxes, track.boxes[0], atol=1e-3)
            assert track.masks.shape == (3, 48, 80) and (track.masks == track.masks[0]).mean() > 0.999
            assert track.descriptor and track.descriptor in cand.prompt
