"""--protocol one-for-all (idcrafter.eval.one_for_all): FashionCLIP-I/T and DINO with tiny random CLIP,
DINOv2 and Grounding-DINO saved and loaded by path, each against the models called directly in the
test; FaceSim with the real dlib backend on real photos against dlib called directly; the CLI on a
manifest of generated PNGs."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.optimize import linear_sum_assignment
from tiny_data import build_tiny_grounding_dino, save_tiny_clip, save_tiny_dinov2

from idcrafter.eval.metrics import EvalItem
from idcrafter.eval.one_for_all import (
    build_dino,
    build_face,
    build_fashionclip,
    clothing_texts,
    detection_text,
    face_references,
    grounded_scores,
    is_face_category,
    scored_frames,
    subject_references,
)


def noise(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth random colour image uint8 [H, W, 3] (blocks of 8 pixels: crops of it differ)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.repeat(np.repeat(small, 8, 0), 8, 1)[:height, :width])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ofa")
    return {"clip": save_tiny_clip(root / "fashionclip"), "dino": save_tiny_dinov2(root / "dinov2"),
            "gd": build_tiny_grounding_dino(root / "grounding-dino")}


# ------------------------------------------------------------------------------------ pure rules


def test_categories_references_texts_and_frames():
    assert [is_face_category(c) for c in ("face", "Woman", "person.", "upper", "bag")] == [True, True, True, False, False]
    assert [detection_text(c) for c in ("upper", "Lower Garment", "bag", "dress.")] == \
        ["upper garment", "lower garment", "bag", "dress"]
    cats = ["face", "upper", "bag", "man"]
    assert face_references(cats) == [0, 3]
    assert subject_references(cats) == [1, 2] and subject_references(cats, faces=True) == [0, 1, 2, 3]
    # FashionCLIP-T reads the descriptors of the non-face references, else the prompt without markup.
    assert clothing_texts("p", cats, ["short hair", "a red hoodie", None, "x"]) == (["a red hoodie"], True)
    assert clothing_texts("a man <face>with short hair</face> in <upper>a red hoodie</upper>", cats, []) == \
        (["a man with short hair in a red hoodie"], False)
    assert clothing_texts("a < b", cats, [None] * 4) == (["a < b"], False)
    frames = np.arange(20).reshape(20, 1, 1, 1).astype(np.uint8) * np.ones((1, 2, 2, 3), np.uint8)
    assert scored_frames(frames)[:, 0, 0, 0].tolist() == [0, 2, 5, 8, 10, 13, 16, 19]  # linspace(0, 19, 8) truncated
    assert len(scored_frames(frames[:5])) == 5


def test_grounded_scores_match_one_to_one_without_clipping():
    # Hungarian maximum total: 0.5 + 0.8 = 1.3 beats 0.9 + 0.1.
    assert grounded_scores(np.array([[0.9, 0.5], [0.8, 0.1]])).tolist() == pytest.approx([0.5, 0.8])
    assert grounded_scores(np.array([[0.3], [0.7]])).tolist() == [0.0, 0.7]   # one box: the other reference scores 0
    assert grounded_scores(np.array([[-0.2]])).tolist() == [-0.2]             # cosines are not clipped


# ------------------------------------------------------------------------------------ FashionCLIP, DINO


class Direct:
    """The tiny models called through transformers' own APIs, independently of the scorers."""

    def __init__(self, models):
        from transformers import (
            AutoModelForZeroShotObjectDetection,
            AutoProcessor,
            BitImageProcessorPil,
            CLIPImageProcessorPil,
            CLIPModel,
            CLIPTokenizer,
            Dinov2Model,
        )

        self.gd = AutoModelForZeroShotObjectDetection.from_pretrained(models["gd"]).eval()
        self.gd_processor = AutoProcessor.from_pretrained(models["gd"])
        self.clip = CLIPModel.from_pretrained(models["clip"]).eval()
        self.clip_processor = CLIPImageProcessorPil.from_pretrained(models["clip"])
        self.tokenizer = CLIPTokenizer.from_pretrained(models["clip"])
        self.dino = Dinov2Model.from_pretrained(models["dino"]).eval()
        self.dino_processor = BitImageProcessorPil.from_pretrained(models["dino"])

    @torch.no_grad()
    def best_crop(self, image: np.ndarray, text: str) -> np.ndarray:
        """The crop of the query with the highest phrase probability (max over the phrase's word tokens)."""
        inputs = self.gd_processor(images=[image], text=[text + "."], return_tensors="pt")
        words = len(text.split())
        assert inputs["input_ids"][0, 1 + words].item() == 5  # [CLS] w1 .. wn "." [SEP]: one token per word
        out = self.gd(**inputs)
        p = out.logits[0, :, 1:1 + words].sigmoid().amax(-1)
        cx, cy, w, h = out.pred_boxes[0, int(p.argmax())].double().tolist()
        H, W = image.shape[:2]
        x0, y0 = int(np.floor(max(cx - w / 2, 0) * W)), int(np.floor(max(cy - h / 2, 0) * H))
        x1 = max(int(np.ceil(min(cx + w / 2, 1) * W)), x0 + 1)
        y1 = max(int(np.ceil(min(cy + h / 2, 1) * H)), y0 + 1)
        return image[y0:y1, x0:x1]

    @torch.no_grad()
    def clip_images(self, images) -> torch.Tensor:
        # PIL images: their layout is not guessed (a crop 3 pixels high would pass for [C, H, W] as an array)
        pil = [Image.fromarray(np.ascontiguousarray(x)) for x in images]
        out = self.clip.get_image_features(**self.clip_processor(images=pil, return_tensors="pt"))
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return (out / out.norm(dim=-1, keepdim=True)).double()

    @torch.no_grad()
    def clip_texts(self, texts) -> torch.Tensor:
        out = self.clip.get_text_features(**self.tokenizer(list(texts), padding=True, return_tensors="pt"))
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return (out / out.norm(dim=-1, keepdim=True)).double()

    @torch.no_grad()
    def dino_images(self, images) -> torch.Tensor:
        pil = [Image.fromarray(np.ascontiguousarray(x)) for x in images]
        cls = self.dino(**self.dino_processor(images=pil, return_tensors="pt")).last_hidden_state[:, 0]
        return (cls / cls.norm(dim=-1, keepdim=True)).double()


@pytest.fixture(scope="module")
def direct(models):
    return Direct(models)


def fashion_item(descriptors=None) -> EvalItem:
    refs = [noise(40, 32, 1), noise(48, 40, 2), noise(32, 32, 3)]
    return EvalItem(id="s0", prompt="a woman in a studio", refs=refs, categories=["face", "upper", "bag"],
                    descriptors=descriptors or [])


@pytest.mark.parametrize("faces", [False, True])
def test_dino_is_the_mean_crop_cosine_over_subject_references(models, direct, faces):
    item, image = fashion_item(), noise(48, 64, 10)
    scorer = build_dino({"path": str(models["dino"]), "detector": str(models["gd"]), "box_threshold": 0.0,
                         "faces": faces}, "cpu")
    chosen = [0, 1, 2] if faces else [1, 2]
    texts = {0: "face", 1: "upper garment", 2: "bag"}
    expected = [float(direct.dino_images([item.refs[k]]) @ direct.dino_images([direct.best_crop(image, texts[k])]).T)
                for k in chosen]
    assert np.ptp(expected) > 1e-3  # the references score differently: the mean is not of a constant
    assert scorer(item, image[None])["ofa_dino"] == pytest.approx(np.mean(expected), abs=1e-5)
    assert not scorer.warnings


def test_fashionclip_image_and_text_scores(models, direct):
    item, image = fashion_item(["long dark hair", "a red hoodie", "a small black bag"]), noise(48, 64, 11)
    scorer = build_fashionclip({"path": str(models["clip"]), "detector": str(models["gd"]), "box_threshold": 0.0},
                               "cpu")
    got = scorer(item, image[None])
    crops = [direct.best_crop(image, "upper garment"), direct.best_crop(image, "bag")]
    expected_i = np.mean([float(direct.clip_images([item.refs[k]]) @ direct.clip_images([c]).T)
                          for k, c in zip((1, 2), crops)])
    assert got["ofa_fashionclip_i"] == pytest.approx(expected_i, abs=1e-5)
    # T: the whole image against the two clothing descriptions (the face's descriptor is not one).
    expected_t = (direct.clip_images([image]) @ direct.clip_texts(["a red hoodie", "a small black bag"]).T).mean()
    assert got["ofa_fashionclip_t"] == pytest.approx(float(expected_t), abs=1e-5)
    assert not scorer.warnings
    # Without descriptions the full prompt is read, and counted.
    got = scorer(fashion_item(), image[None])
    expected_prompt = float(direct.clip_images([image]) @ direct.clip_texts(["a woman in a studio"]).T)
    assert got["ofa_fashionclip_t"] == pytest.approx(expected_prompt, abs=1e-5)
    assert abs(expected_prompt - float(expected_t)) > 1e-4
    assert dict(scorer.warnings) == {"no clothing descriptions: FashionCLIP-T used the full prompt": 1}
    # A video: the mean over its frames (here 3, all scored).
    frames = np.stack([image, noise(48, 64, 12), noise(48, 64, 13)])
    per_frame = [scorer(item, f[None])["ofa_fashionclip_i"] for f in frames]
    assert scorer(item, frames)["ofa_fashionclip_i"] == pytest.approx(np.mean(per_frame), abs=1e-6)


def test_thin_crops_are_embedded_as_height_width_channels(models, direct):
    from idcrafter.rewards.clip import CLIPEmbedder, DINOEmbedder

    # A crop 3 pixels high: the image processors alone would read [3, 4, 3] as channels first.
    crops = [noise(3, 4, 7), noise(1, 5, 8), noise(9, 3, 9)]
    clip, dino = CLIPEmbedder(models["clip"]), DINOEmbedder(models["dino"])
    assert torch.allclose(clip.images(crops).double(), direct.clip_images(crops), atol=1e-6)
    assert torch.allclose(dino.images(crops).double(), direct.dino_images(crops), atol=1e-6)


def test_subject_not_found_scores_zero_and_no_subject_gives_no_value(models):
    scorer = build_dino({"path": str(models["dino"]), "detector": str(models["gd"]), "box_threshold": 1.01}, "cpu")
    assert scorer(fashion_item(), noise(48, 64, 10)[None]) == {"ofa_dino": 0.0}
    assert dict(scorer.warnings) == {"subject not found in the output (scores 0)": 2}
    faces_only = EvalItem(id="f", prompt="p", refs=[noise(32, 32, 1)], categories=["face"])
    assert scorer(faces_only, noise(48, 64, 10)[None]) == {"ofa_dino": None}


def test_builders_refuse_files_that_do_not_load(models, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        build_dino({"path": str(tmp_path / "none"), "detector": str(models["gd"])}, "cpu")
    # transformers would load another architecture's folder with random weights: refused by its config
    with pytest.raises(ValueError, match="fashionclip.path=.*: a dinov2 model folder, expected clip"):
        build_fashionclip({"path": str(models["dino"]), "detector": str(models["gd"])}, "cpu")
    with pytest.raises(ValueError, match="dino.detector=.*: a clip model folder, expected grounding-dino"):
        build_dino({"path": str(models["dino"]), "detector": str(models["clip"])}, "cpu")
    with pytest.raises(OSError, match="dino.path=.*: no config.json"):
        build_dino({"path": str(tmp_path), "detector": str(models["gd"])}, "cpu")
    good = {"path": str(models["dino"]), "detector": str(models["gd"])}
    with pytest.raises(ValueError, match="dino.faces='yes': expected true or false"):
        build_dino({**good, "faces": "yes"}, "cpu")
    with pytest.raises(ValueError, match="dino.box_threshold='high': expected a number"):
        build_dino({**good, "box_threshold": "high"}, "cpu")
    with pytest.raises(ValueError, match="unknown option dino.treshold; known: path, detector"):
        build_dino({**good, "treshold": 0.3}, "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        build_face({"backend": "arcface"}, "cpu")
    # insightface looks for the paper's AuraFace pack unless another is named
    with pytest.raises(ValueError, match="no insightface model pack at .*models/auraface"):
        build_face({"backend": "insightface", "root": str(tmp_path)}, "cpu")
    with pytest.raises(ValueError, match="models/antelopev2"):
        build_face({"backend": "insightface", "root": str(tmp_path), "model_name": "antelopev2"}, "cpu")


# ------------------------------------------------------------------------------------ FaceSim (real dlib)

_insightface = importlib.util.find_spec("insightface")
PHOTOS = Path(_insightface.submodule_search_locations[0]) / "data" / "images" if _insightface else Path("/nonexistent")
needs_dlib = pytest.mark.skipif(
    importlib.util.find_spec("dlib") is None or importlib.util.find_spec("face_recognition_models") is None
    or not (PHOTOS / "t1.jpg").is_file(),
    reason="needs dlib, face-recognition-models and insightface's sample photos")


def photo(name: str) -> np.ndarray:
    return np.asarray(Image.open(PHOTOS / name).convert("RGB"))


@functools.lru_cache(maxsize=1)
def dlib_models():
    import dlib

    from idcrafter.rewards.faces import face_recognition_models_dir

    folder = face_recognition_models_dir()
    return (dlib.get_frontal_face_detector(),
            dlib.shape_predictor(str(folder / "shape_predictor_68_face_landmarks.dat")),
            dlib.face_recognition_model_v1(str(folder / "dlib_face_recognition_resnet_model_v1.dat")))


def dlib_faces(image: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(box area, unit descriptor) of every face, with dlib's own API (upsample 0, no jitter)."""
    detector, predictor, encoder = dlib_models()
    out = []
    for rect in detector(image, 0):
        d = np.array(encoder.compute_face_descriptor(image, predictor(image, rect)), np.float64)
        r = [max(rect.left(), 0), max(rect.top(), 0), min(rect.right(), image.shape[1]), min(rect.bottom(), image.shape[0])]
        out.append(((r[2] - r[0]) * (r[3] - r[1]), d / np.linalg.norm(d)))
    return out


@pytest.fixture(scope="module")
def dlib_facesim():
    return build_face({"backend": "dlib", "upsample": 0}, "cpu")  # faces here are ~100 px: no upsampling


@needs_dlib
def test_facesim_with_dlib_on_real_photos(dlib_facesim):
    scorer = dlib_facesim
    scorer.warnings.clear()
    tom, group = photo("Tom_Hanks_54745.png"), photo("t1.jpg")
    shirt = noise(32, 32, 5)
    item = EvalItem(id="tom", prompt="p", refs=[shirt, tom], categories=["upper", "face"])
    ref = dlib_faces(tom)[0][1]
    # The same person, mirrored: the largest (only) face of the output against the reference's.
    mirrored = np.ascontiguousarray(tom[:, ::-1])
    same = float(ref @ dlib_faces(mirrored)[0][1])
    assert scorer(item, mirrored[None])["ofa_facesim"] == pytest.approx(same, abs=1e-5)
    # Six other people: the largest face of the group photo is the one compared.
    largest = max(dlib_faces(group), key=lambda f: f[0])[1]
    other = float(ref @ largest)
    assert scorer(item, group[None])["ofa_facesim"] == pytest.approx(other, abs=1e-5)
    assert same > 0.95 and other < same - 0.03  # dlib's compressed cosines: same person ~0.97, others ~0.9
    assert not scorer.warnings
    # No face in the output: 0, counted; no face reference, or one without a face: no value.
    assert scorer(item, np.full((1, 64, 64, 3), 128, np.uint8)) == {"ofa_facesim": 0.0}
    assert dict(scorer.warnings) == {"no face in the output (scores 0)": 1}
    assert scorer(EvalItem(id="x", prompt="p", refs=[shirt], categories=["upper"]), group[None]) == {"ofa_facesim": None}
    grey_face = EvalItem(id="g", prompt="p", refs=[np.full((80, 80, 3), 128, np.uint8)], categories=["face"])
    assert scorer(grey_face, group[None]) == {"ofa_facesim": None}
    assert scorer.warnings["no face in a face reference (left out)"] == 1


@needs_dlib
def test_facesim_matches_several_face_references_one_to_one(dlib_facesim):
    scorer = dlib_facesim
    tom, group = photo("Tom_Hanks_54745.png"), photo("t1.jpg")
    faces = dlib_faces(group)
    item = EvalItem(id="two", prompt="p", refs=[tom, group[:, :400].copy()], categories=["man", "woman"])
    refs = np.stack([dlib_faces(tom)[0][1], max(dlib_faces(item.refs[1]), key=lambda f: f[0])[1]])
    sim = refs @ np.stack([d for _, d in faces]).T
    rows, cols = linear_sum_assignment(sim, maximize=True)
    assert scorer(item, group[None])["ofa_facesim"] == pytest.approx(sim[rows, cols].mean(), abs=1e-5)
    assert sim[rows, cols].mean() > sim.mean()


# ------------------------------------------------------------------------------------ CLI


def write_png_manifest(folder: Path) -> Path:
    """Two samples (face + upper + bag references with descriptors; one without) and their generated PNGs."""
    (folder / "gen").mkdir(parents=True)
    lines = []
    for i in range(2):
        subjects = []
        for k, (cat, desc) in enumerate((("face", "short hair"), ("upper", "a red hoodie"), ("bag", "a black bag"))):
            Image.fromarray(noise(40, 32, 10 * i + k)).save(folder / f"ref{i}{k}.png")
            subjects.append({"image": f"ref{i}{k}.png", "category": cat, **({"descriptor": desc} if i == 0 else {})})
        prompt = "a man with short hair in a red hoodie with a black bag" if i == 0 else "a man in a park"
        lines.append({"id": f"s{i}", "image": "target.png", "prompt": prompt, "subjects": subjects})
        Image.fromarray(noise(48, 64, 100 + i)).save(folder / "gen" / f"s{i}.png")
    (folder / "bench.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder / "bench.jsonl"


def test_evaluate_cli_one_for_all_on_generated_pngs(models, tmp_path, capsys):
    from idcrafter.cli import evaluate as script
    from idcrafter.eval.inputs import load_items

    manifest = write_png_manifest(tmp_path)
    out = tmp_path / "out"
    options = ["--model-option", f"fashionclip.path={models['clip']}", "--model-option", f"fashionclip.detector={models['gd']}",
               "--model-option", "fashionclip.box_threshold=0", "--model-option", f"dino.path={models['dino']}",
               "--model-option", f"dino.detector={models['gd']}", "--model-option", "dino.box_threshold=0",
               "--model-option", "facesim.backend=insightface"]  # no root: FaceSim is skipped with the reason
    assert script.main(["--data", str(manifest), "--videos", str(tmp_path / "gen"), "--out", str(out), "--no-progress",
                        "--protocol", "one-for-all", *options]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"] == "one-for-all" and summary["images"] == 2
    items = load_items(manifest, [tmp_path / "gen"])
    assert items[0].descriptors == ["short hair", "a red hoodie", "a black bag"] and items[1].descriptors == [None] * 3
    fashion = build_fashionclip({"path": str(models["clip"]), "detector": str(models["gd"]), "box_threshold": 0}, "cpu")
    dino = build_dino({"path": str(models["dino"]), "detector": str(models["gd"]), "box_threshold": 0}, "cpu")
    rows = [{**fashion(it, it.load()), **dino(it, it.load())} for it in items]
    for key, title in (("ofa_fashionclip_i", "FashionCLIP-I"), ("ofa_fashionclip_t", "FashionCLIP-T"), ("ofa_dino", "DINO")):
        assert summary["columns"][title]["count"] == 2
        assert summary["columns"][title]["mean"] == pytest.approx(np.mean([r[key] for r in rows]), abs=1e-6)
    assert summary["skipped"]["FaceSim"].startswith("cannot load facesim (ValueError: reward 'face': no root given")
    assert "GME-I" in summary["skipped"] and "no total" in summary["skipped"]["Total"]
    assert summary["warnings"] == {"fashionclip": {"no clothing descriptions: FashionCLIP-T used the full prompt": 1}}
    assert "Protocol: one-for-all" in capsys.readouterr().out
    # --protocol multicrafter reads the same PNG manifest (its columns are skipped without models).
    mc = tmp_path / "mc"
    assert script.main(["--data", str(manifest), "--videos", str(tmp_path / "gen"), "--out", str(mc), "--no-progress",
                        "--protocol", "multicrafter"]) == 0
    mc_summary = json.loads((mc / "summary.json").read_text())
    assert mc_summary["protocol"] == "multicrafter" and mc_summary["images"] == 2
    # an option of another protocol's model is refused before anything loads
    assert script.main(["--data", str(manifest), "--videos", str(tmp_path / "gen"), "--out", str(mc), "--no-progress",
                        "--protocol", "one-for-all", "--model-option", "aesthetics.clip=x"]) == 2
    assert "unknown reward 'aesthetics'" in capsys.readouterr().err
