"""GME-Qwen2-VL embeddings, GmeScore, NexusScore (both variants) and One-for-All's GME-I / GME-T, on tiny
random transformers models saved to disk and loaded by path, against independent computations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_data import build_tiny_grounding_dino, save_tiny_clip

QUERY = "Find an image that matches the given text."


# ------------------------------------------------------------------------------------ tiny models
def build_tiny_gme(folder: Path, seed: int = 0) -> Path:
    """A tiny random Qwen2-VL (text: hidden 32, 2 layers; vision: width 16, depth 1, patch 14, merge 2) with a
    byte-level BPE tokenizer holding Qwen's special tokens and the stock image processor, as a GME folder."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from idcrafter.eval.gme import _processor_class
    from idcrafter.video.vlm import QWEN_SPECIAL_TOKENS, _tiny_tokenizer

    tokenizer = _tiny_tokenizer()
    ids = dict(zip(QWEN_SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS))))
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    _processor_class()(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tokenizer).save_pretrained(folder)
    # Name the stock classes, as the published GME folder does (our loader reads them either way).
    for name in ("processor_config.json", "tokenizer_config.json"):
        data = json.loads((folder / name).read_text())
        if "processor_class" in data:
            data["processor_class"] = "Qwen2VLProcessor"
        data.get("image_processor", {})["image_processor_type"] = "Qwen2VLImageProcessor"
        (folder / name).write_text(json.dumps(data, indent=2) + "\n")
    return folder


def build_tiny_owlv2(folder: Path, seed: int = 0, shift: float = 0.6) -> Path:
    """A tiny random OWLv2 (32-pixel input, 8-pixel patches: 16 boxes) and its image processor. The class
    head's logit shift is set to `shift` so that image-guided scores spread around sigmoid(shift) ~ 0.65,
    across the benchmark's 0.5 and 0.6 thresholds."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessorPil

    config = Owlv2Config(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Owlv2ForObjectDetection(config).eval()
        with torch.no_grad():
            model.class_head.logit_shift.weight.zero_()
            model.class_head.logit_shift.bias.fill_(shift)
    model.save_pretrained(folder)
    Owlv2ImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder




@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gme_models")
    return {"gme": build_tiny_gme(root / "gme"), "owl": build_tiny_owlv2(root / "owlv2"),
            "gd": build_tiny_grounding_dino(root / "grounding-dino"), "clip": save_tiny_clip(root / "clip")}


@pytest.fixture(scope="module")
def embedder(models):
    from idcrafter.eval.gme import GmeEmbedder

    return GmeEmbedder(models["gme"])


@pytest.fixture(scope="module")
def small(models):
    """The same model with 4..16 image tiles instead of 256..1280: fast enough for hundreds of crops."""
    from idcrafter.eval.gme import GmeEmbedder

    return GmeEmbedder(models["gme"], min_image_tokens=4, max_image_tokens=16)


def noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------ GME embeddings
def test_smart_resize_on_hand_computed_sizes():
    from idcrafter.eval.gme import smart_resize

    assert smart_resize(60, 90) == (56, 84)  # rounded to multiples of 28, 4704 px within [3136, 12845056]
    assert smart_resize(10, 10) == (56, 56)  # 28 x 28 < 3136 px: scaled by sqrt(3136 / 100) = 5.6, ceil
    # 18e6 px > 16384 * 784: scaled by sqrt(18e6 / 12845056) = 1.1838, floor: 90 * 28 and 181 * 28
    assert smart_resize(3000, 6000) == (2520, 5068)
    assert smart_resize(28, 8400) == (28, 5600)  # aspect ratio 300 cut to 200
    # the processor's own pass (GME's 256..1280 image tokens): 56 x 84 scaled by sqrt(200704 / 4704), ceil
    assert smart_resize(56, 84, min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28) == (392, 560)


def reference_embedding(folder: Path, text: str | None, image: np.ndarray | None, instruction: str | None,
                        positions: str = "sequential") -> torch.Tensor:
    """One GME embedding computed independently of idcrafter.eval.gme: the prompt written out, the image
    resized by hand, image tokens expanded by hand, the stock Qwen2VLModel forward (no padding), last token."""
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    model = Qwen2VLForConditionalGeneration.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    system = instruction or "You are a helpful assistant."
    content = text or ""
    kwargs = {}
    if image is not None:
        processor = Qwen2VLImageProcessorPil.from_pretrained(folder)
        h, w = image.shape[:2]
        fh, fw = max(28, round(h / 28) * 28), max(28, round(w / 28) * 28)  # no image here needs the min / max rule
        resized = Image.fromarray(image).resize((fw, fh), Image.BICUBIC)
        pixels = processor(images=[resized], size={"shortest_edge": 200704, "longest_edge": 1003520},
                           return_tensors="pt")
        grid = pixels["image_grid_thw"]
        content = "<|vision_start|>" + "<|image_pad|>" * int(grid.prod() // 4) + "<|vision_end|>" + content
        kwargs = {"pixel_values": pixels["pixel_values"], "image_grid_thw": grid}
    prompt = (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{content}<|im_end|>\n"
              "<|im_start|>assistant\n<|endoftext|>")
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if positions == "sequential":
        kwargs["position_ids"] = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)
    else:  # Qwen2-VL's M-RoPE: image tokens at their (t, h, w) grid positions
        kwargs["mm_token_type_ids"] = (ids == model.config.image_token_id).long()
    with torch.no_grad():
        hidden = model.model(input_ids=ids, **kwargs).last_hidden_state[0, -1].double()
    return hidden / hidden.norm()


def test_gme_embeddings_match_an_independent_forward(models, embedder):
    images = [noise(60, 90, 0), noise(100, 50, 1)]  # different token counts: the batch is padded
    texts = ["a red cat", "a person with a hat rides a bike past a tall tree"]
    got_images = embedder.image_embeddings(images)
    got_texts = embedder.text_embeddings(texts, instruction=QUERY)
    got_plain = embedder.text_embeddings(texts[:1])
    assert got_images.shape == (2, 32) and got_texts.shape == (2, 32)
    for got, img in zip(got_images, images):
        assert (got.double() - reference_embedding(models["gme"], None, img, None)).abs().max() < 1e-5
    for got, text in zip(got_texts, texts):
        assert (got.double() - reference_embedding(models["gme"], text, None, QUERY)).abs().max() < 1e-5
    plain = reference_embedding(models["gme"], texts[0], None, None)
    assert (got_plain[0].double() - plain).abs().max() < 1e-5
    assert (got_texts[0].double() - plain).abs().max() > 1e-3  # the instruction is part of the input
    # Qwen2-VL's own 3-D image positions give another vector: GME's sequential positions are what is reproduced.
    mrope = reference_embedding(models["gme"], None, images[0], None, positions="qwen2-vl")
    assert (got_images[0].double() - mrope).abs().max() > 1e-3
    # the processor ran at GME's 256..1280 image tokens: 60 x 90 -> 56 x 84 -> 392 x 560 -> 28 x 40 patches
    inputs = embedder.processor.image_processor(images=[Image.new("RGB", (84, 56))], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 28, 40]]


def test_gme_folder_without_config_is_a_one_line_error(tmp_path):
    from idcrafter.eval.gme import GmeEmbedder

    with pytest.raises(FileNotFoundError, match="has no config.json"):
        GmeEmbedder(tmp_path)


# ------------------------------------------------------------------------------------ GmeScore
def test_gmescore_is_the_mean_frame_text_product_over_32_sampled_frames(models, embedder):
    from idcrafter.eval.gme import gmescore

    frames = np.stack([noise(24, 32, s) for s in range(5)])
    got = gmescore(embedder, "a red cat", frames)
    text = embedder.text_embeddings(["a red cat"], instruction=QUERY)[0].double()
    per_frame = embedder.image_embeddings(list(frames)).double() @ text  # 5 distinct frames
    # np.linspace(0, 4, 32, dtype=int): frame i appears 8, 8, 8, 7, 1 times
    counts = np.bincount(np.linspace(0, 4, 32, dtype=int), minlength=5)
    assert counts.tolist() == [8, 8, 8, 7, 1]
    assert got == pytest.approx(float((per_frame.numpy() * counts).sum() / 32), abs=1e-6)
    assert np.ptp(per_frame.numpy()) > 1e-4  # the weighting is visible in the value


# ------------------------------------------------------------------------------------ NexusScore rules
def test_nexus_subjects_skip_and_rename_people_by_case_id():
    from idcrafter.eval.nexusscore import nexus_subjects

    labels = ["Woman", "dog", "Man"]
    assert nexus_subjects("singleface_3", labels) == [(1, "dog")]
    assert nexus_subjects("faceobj_14", labels) == [(1, "dog")]
    assert nexus_subjects("humanobj_2", labels) == [(0, "human"), (1, "dog"), (2, "human")]
    assert nexus_subjects("singlehuman_1", ["Man"]) == [(0, "human")]
    assert nexus_subjects("multiobj_5", labels) == [(0, "Woman"), (1, "dog"), (2, "Man")]


def test_select_boxes_nms_then_threshold_then_top_k():
    from idcrafter.eval.nexusscore import select_boxes

    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 9], [0, 0, 10, 5], [20, 20, 30, 30], [40, 40, 50, 50]], float)
    scores = np.array([0.55, 0.9, 0.8, 0.45, 0.7])
    # box 0 overlaps box 1 (IoU 0.9 > 0.7): suppressed; box 2 (IoU 50/90 = 0.56) stays; box 3 is under 0.5.
    assert select_boxes(boxes, scores).tolist() == [1, 2, 4]
    assert select_boxes(boxes, scores, max_boxes=2).tolist() == [1, 2]
    # NMS comes first: a suppressing box under the threshold still removes its neighbour
    assert select_boxes(boxes[:2], np.array([0.4, 0.3])).tolist() == []
    assert select_boxes(np.zeros((0, 4)), np.zeros(0)).tolist() == []


def test_nexus_retrieval_score_on_hand_cases():
    from idcrafter.eval.nexusscore import nexus_retrieval_score

    conf = [0.9, 0.65, 0.59, 0.95, 0.7]
    text = [0.5, 0.31, 0.9, 0.30, 0.8]
    image = [0.4, 0.2, 0.9, 0.9, 0.0]
    # kept: crop 0 (0.4) and crop 1 (0.2); crop 2 conf <= 0.6, crop 3 text not > 0.30, crop 4 retrieval 0
    assert nexus_retrieval_score(conf, text, image, frame_obj=4) == pytest.approx(0.3 / 4)
    assert nexus_retrieval_score(conf[2:], text[2:], image[2:], frame_obj=3) == 0.0
    assert nexus_retrieval_score([], [], [], frame_obj=0) == 0.0


def test_pil_crop_rounds_like_pil():
    from idcrafter.eval.nexusscore import pil_crop

    frame = noise(20, 30, 3)
    box = (2.4, 3.6, 17.5, 12.49)
    expected = np.asarray(Image.fromarray(frame).crop(box))
    np.testing.assert_array_equal(pil_crop(frame, box), expected)
    np.testing.assert_array_equal(pil_crop(frame, (5.2, 6.2, 5.3, 6.3)), frame[6:7, 5:6])  # never empty
    np.testing.assert_array_equal(pil_crop(frame, (30, 10, 30, 12)), frame[10:12, 29:30])  # a sliver on the edge


# ------------------------------------------------------------------------------------ OWLv2 detector
def test_image_guided_detector_matches_the_stock_owlv2_outputs(models):
    from transformers import Owlv2ForObjectDetection, Owlv2ImageProcessorPil

    from idcrafter.eval.nexusscore import ImageGuidedDetector, select_boxes

    frames = [noise(24, 40, 10), noise(24, 40, 11)]
    query = noise(16, 16, 12)
    detector = ImageGuidedDetector(models["owl"])
    boxes, scores = detector.raw(frames, query)
    model = Owlv2ForObjectDetection.from_pretrained(models["owl"]).eval()
    processor = Owlv2ImageProcessorPil.from_pretrained(models["owl"])
    with torch.no_grad():
        out = model.image_guided_detection(
            pixel_values=processor(images=frames, return_tensors="pt")["pixel_values"],
            query_pixel_values=processor(images=[query, query], return_tensors="pt")["pixel_values"])
    np.testing.assert_allclose(scores, torch.sigmoid(out.logits[..., 0]).numpy(), atol=1e-6)
    # OWLv2 pads to a square: boxes are fractions of the 40-pixel side, clipped to the 40 x 24 frame
    cx, cy, w, h = out.target_pred_boxes.double().numpy().transpose(2, 0, 1)
    expected = np.clip(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * 40, 0, [40, 24, 40, 24])
    np.testing.assert_allclose(boxes, expected, atol=1e-4)
    assert scores.shape == (2, 16) and scores.min() < 0.6 < scores.max()  # the thresholds do select
    kept = detector.detect(frames, query)
    for (b, s), all_b, all_s in zip(kept, boxes, scores):
        k = select_boxes(all_b, all_s)
        np.testing.assert_array_equal(b, all_b[k])
        np.testing.assert_array_equal(s, all_s[k])


def test_owl_folder_of_another_model_is_rejected(models):
    from idcrafter.eval.nexusscore import ImageGuidedDetector

    with pytest.raises(ValueError, match="image-guided detection needs OWLv2"):
        ImageGuidedDetector(models["clip"])


# ------------------------------------------------------------------------------------ NexusScore end to end
def nexus_item(sample_id: str, labels: list[str], frames: np.ndarray):
    from idcrafter.eval.metrics import EvalItem

    refs = [noise(20, 20, 30 + k) for k in range(len(labels))]
    return EvalItem(id=sample_id, prompt="a dog and a cat", refs=refs, categories=labels, frames=frames)


def test_nexusscore_matches_a_hand_computation(models, small):
    from idcrafter.eval.nexusscore import ImageGuidedDetector, NexusScorer, pil_crop, select_boxes

    frames = np.stack([noise(24, 40, 40 + s) for s in range(3)])
    item = nexus_item("humanobj_7", ["Man", "dog"], frames)
    detector = ImageGuidedDetector(models["owl"])
    got = NexusScorer(small, detector)(item, frames)["nexusscore"]
    # By hand: 32 sampled frames of 3 (indices 0 x 16, 1 x 15, 2 x 1); subjects ("human", ref 0), ("dog", ref 1).
    picked = frames[np.linspace(0, 2, 32, dtype=int)]
    kept, frame_obj, n_boxes = [], 0, 0
    for k, label in [(0, "human"), (1, "dog")]:
        boxes, scores = detector.raw(list(picked), item.refs[k])
        ref = small.image_embeddings([item.refs[k]])[0].double()
        lab = small.text_embeddings([label], instruction=QUERY)[0].double()
        for f in range(32):
            idx = select_boxes(boxes[f], scores[f])
            frame_obj += len(idx) > 0
            n_boxes += len(idx)
            if not len(idx):
                continue
            crops = [pil_crop(picked[f], boxes[f][i]) for i in idx]
            emb = small.image_embeddings(crops).double()
            for i, e in zip(idx, emb):
                retrieval, text = float(e @ ref), float(e @ lab)
                if scores[f][i] > 0.6 and text > 0.30 and retrieval != 0:
                    kept.append(retrieval)
    assert n_boxes > len(kept) > 0 and frame_obj > 0  # some boxes kept, some dropped by the rules
    assert got == pytest.approx(np.mean(kept) / frame_obj, abs=1e-6)
    # a "face" case skips the Man reference: it scores as a case of the dog alone
    face = nexus_item("faceobj_7", ["Man", "dog"], frames)
    face.refs = item.refs
    dog = nexus_item("multiobj_7", ["dog"], frames)
    dog.refs = item.refs[1:]
    scorer = NexusScorer(small, detector)
    assert scorer(face, frames)["nexusscore"] == pytest.approx(scorer(dog, frames)["nexusscore"], abs=1e-7)
    assert scorer(face, frames)["nexusscore"] != pytest.approx(got, abs=1e-6)
    # a face case of one person has no subject for NexusScore: no value (the benchmark writes none for singleface_3)
    assert scorer(nexus_item("singleface_3", ["Man"], frames), frames) == {"nexusscore": None}


def test_build_nexusscore_needs_the_variant_models(models):
    from idcrafter.eval.nexusscore import build_nexusscore
    from idcrafter.utils.errors import ConfigError

    with pytest.raises(ConfigError, match="nexusscore.gme=DIR"):
        build_nexusscore({"detector": str(models["owl"])})
    with pytest.raises(ConfigError, match="nexusscore.clip=DIR"):
        build_nexusscore({"detector": str(models["gd"]), "variant": "idcrafter"})
    with pytest.raises(ConfigError, match="known variants are benchmark, idcrafter"):
        build_nexusscore({"detector": str(models["gd"]), "variant": "grounded"})


# ------------------------------------------------------------------------------------ ID-Crafter's NexusScore
def clip_image_embeddings(folder: Path, images) -> torch.Tensor:
    """Unit CLIP image embeddings float64 [N, D] from the stock CLIPModel and its processor."""
    from transformers import CLIPImageProcessorPil, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    pixels = CLIPImageProcessorPil.from_pretrained(folder)(images=list(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        emb = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output).double()
    return emb / emb.norm(dim=-1, keepdim=True)


def test_idcrafter_nexusscore_masks_the_best_box_and_averages_clip_cosines(models):
    from idcrafter.eval.nexusscore import IDCrafterNexusScorer, build_nexusscore
    from idcrafter.rewards.nexus import GroundingDINODetector

    frames = np.stack([noise(48, 64, 60 + s) for s in range(3)])
    item = nexus_item("multiobj_1", ["dog", "person", "dog"], frames)
    scorer = build_nexusscore({"variant": "idcrafter", "detector": str(models["gd"]), "clip": str(models["clip"]),
                               "box_threshold": 0.0})
    assert isinstance(scorer, IDCrafterNexusScorer) and scorer.segmenter is None and scorer.frames is None
    got = scorer(item, frames)["nexusscore_idcrafter"]
    # By hand: every frame; per category the two best boxes (Grounding-DINO's own ranking), the dogs taking
    # them in order; the box as the mask; CLIP cosine of the masked frame with the reference.
    found = GroundingDINODetector(models["gd"], box_threshold=0.0).detect(list(frames), {"dog": 2, "person": 1})
    ref_emb = clip_image_embeddings(models["clip"], item.refs)
    scores = np.zeros((3, 3))
    for f, per_frame in enumerate(found):
        for k, (cat, rank) in enumerate([("dog", 0), ("person", 0), ("dog", 1)]):
            x0, y0, x1, y1 = per_frame[cat][0][rank]
            masked = np.zeros_like(frames[f])
            masked[y0:y1, x0:x1] = frames[f][y0:y1, x0:x1]
            scores[f, k] = float(clip_image_embeddings(models["clip"], [masked])[0] @ ref_emb[k])
    assert got == pytest.approx(scores.mean(), abs=1e-6)
    assert np.ptp(scores) > 1e-3
    # with SAM, the masks are SAM's masks of the same boxes
    from tiny_data import build_tiny_sam

    from idcrafter.curate.segment import SamSegmenter

    sam = build_tiny_sam(models["gd"].parent / "sam")
    with_sam = build_nexusscore({"variant": "idcrafter", "detector": str(models["gd"]), "clip": str(models["clip"]),
                                 "box_threshold": 0.0, "sam": str(sam), "frames": 2})
    got_sam = with_sam(item, frames)["nexusscore_idcrafter"]
    picked = frames[[0, 2]]  # np.linspace(0, 2, 2, dtype=int)
    boxes = [np.stack([found[f]["dog"][0][0], found[f]["person"][0][0], found[f]["dog"][0][1]]) for f in (0, 2)]
    masks = SamSegmenter(str(sam)).segment(picked, boxes)
    sam_scores = [[float(clip_image_embeddings(models["clip"], [picked[i] * m[:, :, None]])[0] @ ref_emb[k])
                   for k, m in enumerate(masks[i])] for i in range(2)]
    assert got_sam == pytest.approx(np.mean(sam_scores), abs=1e-6)


# ------------------------------------------------------------------------------------ One-for-All GME-I / GME-T
def test_one_for_all_gme_i_and_t_match_a_hand_computation(models, small):
    from idcrafter.eval.gme import OneForAllGmeScorer, build_one_for_all
    from idcrafter.eval.metrics import EvalItem
    from idcrafter.rewards.nexus import GroundingDINODetector

    image = noise(48, 64, 70)
    refs = [noise(20, 20, 71), noise(24, 16, 72)]
    item = EvalItem(id="c1", prompt="a person with a bag", refs=refs, categories=["Person", "bag"], frames=image[None])
    scorer = build_one_for_all({"path": str(models["gme"]), "detector": str(models["gd"]), "box_threshold": 0.0,
                                "min_image_tokens": 4, "max_image_tokens": 16})
    assert isinstance(scorer, OneForAllGmeScorer)
    got = scorer(item, image[None])
    query = small.text_embeddings(["a person with a bag"], instruction=QUERY)[0]
    assert got["ofa_gme_t"] == pytest.approx(float(small.image_embeddings([image])[0] @ query), abs=1e-6)
    found = GroundingDINODetector(models["gd"], box_threshold=0.0).detect([image], {"person": 1, "bag": 1})[0]
    crops = [image[y0:y1, x0:x1] for x0, y0, x1, y1 in (found["person"][0][0], found["bag"][0][0])]
    emb = small.image_embeddings(refs + crops).double()
    expected = (float(emb[0] @ emb[2]) + float(emb[1] @ emb[3])) / 2
    assert got["ofa_gme_i"] == pytest.approx(expected, abs=1e-6)
    # a category Grounding-DINO finds no box for (threshold above every score) scores 0 for that reference
    strict = OneForAllGmeScorer(small, GroundingDINODetector(models["gd"], box_threshold=1.01))
    assert strict.gme_i(image, refs, ["person", "bag"]) == 0.0


# ------------------------------------------------------------------------------------ scripts/evaluate.py
def write_bench(folder: Path, still: bool = False) -> Path:
    """Two generated clips (or stills) with a prompt and one "dog" reference each, as a manifest."""
    from idcrafter.utils.media import write_video

    (folder / "gen").mkdir(parents=True)
    Image.fromarray(noise(20, 20, 80)).save(folder / "ref.png")
    lines = []
    for i in range(2):
        clip = np.stack([noise(24, 32, 90 + 10 * i + f) for f in range(4)])
        if still:
            Image.fromarray(clip[0]).save(folder / "gen" / f"s{i}.png")
        else:
            write_video(clip, folder / "gen" / f"s{i}.mp4", fps=8)
        lines.append({"id": f"s{i}", "video": "truth.mp4", "prompt": f"a dog number {i}",
                      "subjects": [{"image": "ref.png", "category": "dog"}]})
    (folder / "bench.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder / "bench.jsonl"


def items_of(folder: Path, still: bool = False):
    from idcrafter.eval.inputs import load_items

    items = load_items(folder / "bench.jsonl", [folder / "gen"])
    return [(item, item.load()) for item in items]


SMALL = ["min_image_tokens=4", "max_image_tokens=16"]


def test_evaluate_cli_gmescore_and_nexusscore_columns(models, small, tmp_path, capsys):
    from idcrafter.cli import evaluate as script
    from idcrafter.eval.gme import gmescore
    from idcrafter.eval.nexusscore import ImageGuidedDetector, NexusScorer

    manifest = write_bench(tmp_path)
    out = tmp_path / "out"
    options = [f"gmescore.path={models['gme']}", f"nexusscore.detector={models['owl']}",
               f"nexusscore.gme={models['gme']}", *(f"{m}.{o}" for m in ("gmescore", "nexusscore") for o in SMALL)]
    assert script.main(["--data", str(manifest), "--videos", str(tmp_path / "gen"), "--out", str(out), "--no-progress",
                        *(x for o in options for x in ("--model-option", o))]) == 0
    summary = json.loads((out / "summary.json").read_text())
    pairs = items_of(tmp_path)
    gme = [gmescore(small, item.prompt, frames) for item, frames in pairs]
    nexus = [NexusScorer(small, ImageGuidedDetector(models["owl"]))(item, frames)["nexusscore"] for item, frames in pairs]
    assert summary["columns"]["GmeScore"]["mean"] == pytest.approx(np.mean(gme), abs=1e-6)
    assert summary["columns"]["NexusScore"]["mean"] == pytest.approx(np.mean(nexus), abs=1e-6)
    assert max(nexus) > 0
    assert summary["opens2v"]["normalised"]["gmescore"] == pytest.approx(np.mean(np.minimum(gme, 1.0)), abs=1e-6)
    # --nexus idcrafter: Grounding-DINO + CLIP instead; without its CLIP folder the column is skipped with why
    capsys.readouterr()
    ida = tmp_path / "ida"
    assert script.main(["--data", str(manifest), "--videos", str(tmp_path / "gen"), "--out", str(ida), "--no-progress",
                        "--nexus", "idcrafter", "--model-option", f"nexusscore.detector={models['gd']}"]) == 0
    assert "nexusscore.clip=DIR" in json.loads((ida / "summary.json").read_text())["skipped"]["NexusScore"]
    assert script.main(["--data", str(manifest), "--videos", str(tmp_path / "gen"), "--out", str(ida), "--no-progress",
                        "--nexus", "idcrafter", "--model-option", f"nexusscore.detector={models['gd']}",
                        "--model-option", f"nexusscore.clip={models['clip']}"]) == 0
    from idcrafter.eval.nexusscore import build_nexusscore

    scorer = build_nexusscore({"variant": "idcrafter", "detector": str(models["gd"]), "clip": str(models["clip"])})
    expected = [scorer(item, frames)["nexusscore_idcrafter"] for item, frames in pairs]
    summary = json.loads((ida / "summary.json").read_text())
    assert summary["columns"]["NexusScore (ID-Crafter)"]["mean"] == pytest.approx(np.mean(expected), abs=1e-6)
    # a CLIP cosine is not on the leaderboard's [0, 0.05] NexusScore scale: reported beside, never normalised
    assert "nexusscore" not in summary["columns"] and "not on the leaderboard" in summary["skipped"]["NexusScore"]
    assert "nexusscore_idcrafter" not in summary["opens2v"]["normalised"]
    assert script.main(["--data", str(manifest), "--videos", str(tmp_path / "gen"), "--out", str(ida), "--no-progress",
                        "--nexus", "idcrafter", "--protocol", "legacy"]) == 2
    assert "error: --nexus idcrafter: the NexusScore variants are columns of --protocol opens2v" in capsys.readouterr().err


def test_evaluate_cli_one_for_all_gme_columns(models, small, tmp_path):
    from idcrafter.cli import evaluate as script
    from idcrafter.eval.gme import OneForAllGmeScorer
    from idcrafter.rewards.nexus import GroundingDINODetector

    manifest = write_bench(tmp_path, still=True)
    out = tmp_path / "out"
    assert script.main(["--data", str(manifest), "--videos", str(tmp_path / "gen"), "--out", str(out), "--no-progress",
                        "--protocol", "one-for-all", "--model-option", f"gme.path={models['gme']}",
                        "--model-option", f"gme.detector={models['gd']}", "--model-option", "gme.box_threshold=0",
                        *(x for o in SMALL for x in ("--model-option", f"gme.{o}"))]) == 0
    summary = json.loads((out / "summary.json").read_text())
    scorer = OneForAllGmeScorer(small, GroundingDINODetector(models["gd"], box_threshold=0.0))
    rows = [scorer(item, frames) for item, frames in items_of(tmp_path)]
    for key, title in (("ofa_gme_i", "GME-I"), ("ofa_gme_t", "GME-T")):
        assert summary["columns"][title]["mean"] == pytest.approx(np.mean([r[key] for r in rows]), abs=1e-6)
    # without the detector both columns are skipped with the options they need
    bare = tmp_path / "bare"
    assert script.main(["--data", str(manifest), "--videos", str(tmp_path / "gen"), "--out", str(bare), "--no-progress",
                        "--protocol", "one-for-all", "--model-option", f"gme.path={models['gme']}"]) == 0
    skipped = json.loads((bare / "summary.json").read_text())["skipped"]
    assert "--model-option gme.detector=" in skipped["GME-I"] and "--model-option gme.detector=" in skipped["GME-T"]
