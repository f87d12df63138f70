"""--protocol multicrafter (idcrafter.eval.multicrafter): CLIP-T, Face-Sim, DINO-I, CLIP-I and AES (HPS v2).

Tiny random CLIP, DINO ViT, DINOv2 and open_clip (HPS layout) models are saved to disk and loaded by path
through the column models; each value is compared with the same cosine computed here through the
models' own feature APIs. Face-Sim runs the real dlib backend on insightface's sample group photo.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_data import save_tiny_clip

from idcrafter.eval.metrics import EvalItem


def video(frames: int, height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def unit(x: torch.Tensor) -> torch.Tensor:
    x = x if isinstance(x, torch.Tensor) else x.pooler_output  # transformers 5: an output with pooler_output
    return x / x.norm(dim=-1, keepdim=True)


def item(prompt: str = "a red cat", refs=(), sample_id: str = "s0") -> EvalItem:
    return EvalItem(id=sample_id, prompt=prompt, refs=list(refs))


# ------------------------------------------------------------------------------------ models on disk
@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory):
    """A tiny DINO v1 ViT (facebook/dino-vits16's classes: ViTModel + ViTImageProcessor)."""
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("dino")
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=32,
                       patch_size=8)).eval().save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406],
                         image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------ CLIP-T, CLIP-I
def test_clip_t_and_clip_i_equal_the_cosines_of_clip_features(clip_folder):
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    from idcrafter.eval.multicrafter import build_clip

    score = build_clip({"path": str(clip_folder), "frames": 3}, "cpu")
    model = CLIPModel.from_pretrained(clip_folder).eval()
    processor, tokenizer = CLIPImageProcessorPil.from_pretrained(clip_folder), CLIPTokenizer.from_pretrained(clip_folder)

    @torch.no_grad()
    def images(xs):
        return unit(model.get_image_features(**processor(images=list(xs), return_tensors="pt"))).double()

    @torch.no_grad()
    def text(prompt):
        return unit(model.get_text_features(**tokenizer([prompt], return_tensors="pt"))).double()

    clip = video(9, seed=1)
    refs = [video(1, 40, 40, seed=2)[0], video(1, 30, 50, seed=3)[0]]
    out = score(item("a red cat", refs), clip)
    frames = clip[[0, 4, 8]]  # frames=3: first, middle, last
    assert out["mc_clip_t"] == pytest.approx(float((images(frames) @ text("a red cat").T).mean()), abs=1e-6)
    assert out["mc_clip_i"] == pytest.approx(float((images(refs) @ images(frames).T).mean()), abs=1e-6)
    # A still image is one frame; an output equal to its only reference has CLIP-I 1; no reference, no CLIP-I.
    still = score(item("two dogs", [refs[0]]), refs[0][None])
    assert still["mc_clip_i"] == pytest.approx(1.0, abs=1e-6)
    assert still["mc_clip_t"] == pytest.approx(float(images([refs[0]]) @ text("two dogs").T), abs=1e-6)
    assert score(item("two dogs"), clip)["mc_clip_i"] is None
    # The values differ between prompts and images: the check is not on a constant.
    assert abs(out["mc_clip_t"] - still["mc_clip_t"]) > 1e-3


# ------------------------------------------------------------------------------------ DINO-I
def test_dino_i_is_the_cosine_of_the_layer_normed_cls_token(dino_folder):
    from transformers import ViTImageProcessorPil, ViTModel

    from idcrafter.eval.multicrafter import build_dino

    model, processor = ViTModel.from_pretrained(dino_folder).eval(), ViTImageProcessorPil.from_pretrained(dino_folder)

    @torch.no_grad()
    def cls(xs):  # the last block's CLS token through the final layer norm, as DreamBench's DINO score takes it
        hidden = model(**processor(images=list(xs), return_tensors="pt"), output_hidden_states=True).hidden_states[-1]
        return unit(model.layernorm(hidden[:, 0])).double()

    clip, refs = video(5, seed=4), [video(1, seed=5)[0], video(1, 32, 32, seed=6)[0]]
    out = build_dino({"path": str(dino_folder), "frames": 2}, "cpu")(item(refs=refs), clip)
    expected = float((cls(refs) @ cls(clip[[0, 4]]).T).mean())
    assert out["mc_dino_i"] == pytest.approx(expected, abs=1e-6) and abs(expected) < 0.999
    assert build_dino({"path": str(dino_folder)}, "cpu")(item(), clip) == {"mc_dino_i": None}


def test_dino_i_with_dinov2_equals_the_dino_image_reward(tmp_path):
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    from idcrafter.eval.multicrafter import build_dino
    from idcrafter.rewards import build_reward

    torch.manual_seed(2)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=32,
                             patch_size=8)).eval().save_pretrained(tmp_path)
    BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    clip, refs = video(7, seed=7), [video(1, seed=8)[0]]
    out = build_dino({"path": str(tmp_path), "frames": 4}, "cpu")(item(refs=refs), clip)
    reward = build_reward("dino_image", path=tmp_path, max_frames=4)([clip], [""], [refs])  # pooler_output = CLS
    assert out["mc_dino_i"] == pytest.approx(reward.scores.item(), abs=1e-6)


def test_column_models_refuse_what_does_not_load(clip_folder, tmp_path):
    from idcrafter.eval.protocols import build_scorers

    scorers, skipped = build_scorers("multicrafter", {"clip": {"path": str(clip_folder), "size": 3},
                                                      "dino": {"path": str(clip_folder)},
                                                      "hps": {"path": str(tmp_path / "none.pt")},
                                                      "face": {"backend": "insightface", "root": str(tmp_path)}})
    assert scorers == {}
    assert skipped["mc_clip_t"] == skipped["mc_clip_i"] == (
        "cannot load clip (ValueError: clip: unknown option(s) size; known: dtype, frames, path)")
    assert skipped["mc_dino_i"] == (f"cannot load dino (ValueError: dino.path {clip_folder}: model_type 'clip' is "
                                    "not a DINO ViT (vit, dinov2, dinov2_with_registers, dinov3_vit))")
    assert skipped["mc_aes"].startswith("cannot load hps (ValueError: reward 'hps': path=") and "does not exist" in skipped["mc_aes"]
    assert skipped["mc_face_sim"].startswith("cannot load face (ValueError: reward 'face': root=")
    _, skipped = build_scorers("multicrafter", {})
    assert skipped["mc_face_sim"].endswith("pass --model-option face.backend=...")


# ------------------------------------------------------------------------------------ Face-Sim (dlib, real photo)
_insightface = importlib.util.find_spec("insightface")
PHOTO = Path(_insightface.submodule_search_locations[0]) / "data" / "images" / "t1.jpg" if _insightface else None


@pytest.fixture(scope="module")
def group():
    pytest.importorskip("dlib", reason="dlib is not installed (pip install dlib-bin)")
    if importlib.util.find_spec("face_recognition_models") is None or PHOTO is None or not PHOTO.is_file():
        pytest.skip("needs face-recognition-models and insightface's sample photo data/images/t1.jpg")
    from PIL import Image

    from idcrafter.rewards.faces import DlibFaceBackend

    photo = np.asarray(Image.open(PHOTO).convert("RGB"))
    backend = DlibFaceBackend(upsample=0)
    boxes = backend.detect(photo).boxes
    assert len(boxes) == 6, f"expected the six people of t1.jpg, found {len(boxes)}"
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    a, b = int(np.argmax(areas)), int(np.argmin(areas))

    def box(k, margin):
        x0, y0, x1, y1 = boxes[k]
        w, h = x1 - x0, y1 - y0
        return (int(max(0, x0 - margin * w)), int(max(0, y0 - margin * h)), int(min(photo.shape[1], x1 + margin * w)),
                int(min(photo.shape[0], y1 + margin * h)))

    def crop(k, margin=0.5):
        x0, y0, x1, y1 = box(k, margin)
        return photo[y0:y1, x0:x1].copy()

    def paste(image, src, dst):
        s, d = box(src, 0.15), box(dst, 0.15)
        patch = Image.fromarray(photo[s[1]:s[3], s[0]:s[2]]).resize((d[2] - d[0], d[3] - d[1]), Image.Resampling.BICUBIC)
        image[d[1]:d[3], d[0]:d[2]] = np.asarray(patch)

    swapped = photo.copy()  # persons A and B trade places
    paste(swapped, a, b)
    paste(swapped, b, a)
    duplicated = photo.copy()  # A is gone, B appears twice
    paste(duplicated, b, a)
    return dict(photo=photo, backend=backend, boxes=boxes, a=a, b=b, refs=[crop(a), crop(b)], swapped=swapped,
                duplicated=duplicated)


def centre_inside(det_box, box) -> bool:
    cx, cy = (det_box[0] + det_box[2]) / 2, (det_box[1] + det_box[3]) / 2
    return box[0] <= cx <= box[2] and box[1] <= cy <= box[3]


def brute_force_face_sim(refs: np.ndarray, dets: np.ndarray) -> float:
    """max over injective reference -> detection maps of the mean clipped cosine (plain enumeration)."""
    refs, dets = np.asarray(refs, np.float64), np.asarray(dets, np.float64)
    r = refs / np.linalg.norm(refs, axis=1, keepdims=True)
    d = dets / np.linalg.norm(dets, axis=1, keepdims=True)
    cos = np.maximum(r @ d.T, 0.0)
    return max(np.mean([cos[k, j] for k, j in enumerate(p)]) for p in itertools.permutations(range(len(d)), len(r)))


def test_face_sim_matches_faces_by_identity_with_the_dlib_backend(group):
    from idcrafter.eval.multicrafter import build_face, face_sim

    backend, refs, boxes, a, b = group["backend"], group["refs"], group["boxes"], group["a"], group["b"]
    score = build_face({"backend": "dlib", "upsample": 0}, "cpu")
    ref_emb = np.stack([backend.detect(r).embeddings[backend.detect(r).largest()] for r in refs])
    values = {}
    for name in ("photo", "swapped", "duplicated"):
        faces = backend.detect(group[name])
        got = score(item("two people", refs), group[name][None])["mc_face_sim"]
        assert got == pytest.approx(brute_force_face_sim(ref_emb, faces.embeddings), abs=1e-9)
        values[name] = got
        _, assignment = face_sim(ref_emb, faces.embeddings)
        _, reversed_refs = face_sim(ref_emb[::-1], faces.embeddings)
        assert reversed_refs == assignment[::-1]  # listing the references the other way round swaps the matches
        # Each reference takes the face that is its person's: where A / B stand in this image.
        where_a, where_b = (boxes[b], boxes[a]) if name == "swapped" else (boxes[a], boxes[b])
        assert centre_inside(faces.boxes[assignment[1]], where_b)
        if name != "duplicated":
            assert centre_inside(faces.boxes[assignment[0]], where_a)
        else:  # A is gone: it takes another face, away from where it stood
            assert not centre_inside(faces.boxes[assignment[0]], where_a)
    assert values["photo"] > 0.99 and values["photo"] - values["swapped"] < 0.02
    assert values["duplicated"] < values["swapped"] - 0.02
    # No face in the output: every reference is unmatched, 0; no face in any reference: no Face-Sim.
    grey = np.full((1, 200, 200, 3), 128, np.uint8)
    assert score(item(refs=refs), grey) == {"mc_face_sim": 0.0}
    assert score(item(refs=[grey[0]]), group["photo"][None]) == {"mc_face_sim": None}
    # A reference without a face (an object) is left out; the face references are scored as before.
    assert score(item(refs=[*refs, grey[0]]), group["photo"][None])["mc_face_sim"] == pytest.approx(values["photo"])


# ------------------------------------------------------------------------------------ AES (HPS v2)
@pytest.fixture(scope="module")
def hps_checkpoint(tmp_path_factory):
    """A tiny open_clip CLIP saved as HPSv2 releases its checkpoint ({"state_dict": ...}), and the
    open_clip model itself as the reference (imported as tests/test_rewards_hps.py does it)."""
    from test_rewards_hps import TEXT, VISION, import_open_clip  # skips when open_clip is not installed

    model_module, tokenizer_module = import_open_clip()
    torch.manual_seed(3)
    model = model_module.CLIP(embed_dim=12, vision_cfg=VISION, text_cfg=TEXT, quick_gelu=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("hps")
    torch.save({"state_dict": {k: v.clone() for k, v in model.state_dict().items()}}, folder / "HPS_v2_compressed.pt")
    (folder / "tiny.json").write_text(json.dumps({"embed_dim": 12, "vision_cfg": VISION, "text_cfg": TEXT}))
    bpe = Path(tokenizer_module.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    options = {"path": str(folder / "HPS_v2_compressed.pt"), "arch": str(folder / "tiny.json"), "tokenizer_path": str(bpe)}
    return dict(model=model, tokenize=tokenizer_module.tokenize, options=options)


def test_aes_is_the_hps_v2_cosine_of_open_clip(hps_checkpoint):
    from idcrafter.eval.multicrafter import build_hps
    from idcrafter.rewards.hps import hps_preprocess

    score = build_hps({**hps_checkpoint["options"], "frames": 2}, "cpu")
    model, tokenize = hps_checkpoint["model"], hps_checkpoint["tokenize"]
    values = []
    for frames, shown, prompt in ((video(5, seed=9), [0, 4], "a cat on a red sofa"),
                                  (video(1, 40, 30, seed=10), [0], "Two people hiking, golden hour")):
        with torch.no_grad():  # HPSv2's score: diag(image_features @ text_features.T), both unit
            image_features, text_features, _ = model(hps_preprocess(list(frames[shown]), 32),
                                                     tokenize([prompt] * len(shown)))
        expected = float((image_features * text_features).sum(-1).mean())
        values.append(score(item(prompt), frames)["mc_aes"])
        assert values[-1] == pytest.approx(expected, abs=1e-5)
    assert abs(values[0] - values[1]) > 1e-3


# ------------------------------------------------------------------------------------ the CLI
def test_evaluate_cli_multicrafter_protocol(clip_folder, dino_folder, hps_checkpoint, group, tmp_path):
    from PIL import Image

    from idcrafter.cli import evaluate as script
    from idcrafter.eval.multicrafter import build_clip, build_dino, build_face, build_hps

    (tmp_path / "gen").mkdir()
    lines = []
    for i, (image, refs) in enumerate(((group["photo"], group["refs"]), (video(1, 64, 64, seed=11)[0], [video(1, seed=12)[0]]))):
        Image.fromarray(image).save(tmp_path / "gen" / f"s{i}.png")
        names = []
        for k, ref in enumerate(refs):
            Image.fromarray(ref).save(tmp_path / f"ref{i}_{k}.png")
            names.append({"image": f"ref{i}_{k}.png", "category": "person" if i == 0 else "object"})
        lines.append({"id": f"s{i}", "video": "truth.mp4", "prompt": f"prompt number {i}", "subjects": names})
    (tmp_path / "bench.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    hps = hps_checkpoint["options"]
    out = tmp_path / "out"
    assert script.main(["--data", str(tmp_path / "bench.jsonl"), "--videos", str(tmp_path / "gen"), "--out", str(out),
                        "--no-progress", "--protocol", "multicrafter",
                        "--model-option", f"clip.path={clip_folder}", "--model-option", f"dino.path={dino_folder}",
                        "--model-option", "face.backend=dlib", "--model-option", "face.upsample=0",
                        *(x for k, v in hps.items() for x in ("--model-option", f"hps.{k}={v}"))]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"] == "multicrafter"
    columns = {v["key"]: v for v in summary["columns"].values()}
    assert set(columns) == {"mc_clip_t", "mc_face_sim", "mc_dino_i", "mc_clip_i", "mc_aes"}
    # Each column's mean is the column model's value of each file, averaged over the samples it applies to.
    scorers = [build_clip({"path": str(clip_folder)}), build_dino({"path": str(dino_folder)}),
               build_face({"backend": "dlib", "upsample": 0}), build_hps(hps)]
    rows = []
    for i, line in enumerate(lines):
        refs = [np.asarray(Image.open(tmp_path / s["image"]).convert("RGB")) for s in line["subjects"]]
        frames = np.asarray(Image.open(tmp_path / "gen" / f"s{i}.png").convert("RGB"))[None]
        rows.append({k: v for s in scorers for k, v in s(item(line["prompt"], refs), frames).items()})
    for key, column in columns.items():
        kept = [r[key] for r in rows if r[key] is not None]
        assert column["mean"] == pytest.approx(np.mean(kept), abs=1e-9) and column["count"] == len(kept)
    assert columns["mc_face_sim"]["count"] == 1  # the object sample has no face reference
    assert summary["skipped"] == {"Total": "--protocol multicrafter has no total: the paper reports its columns side by side"}


def test_face_options_belong_to_multicrafter_when_it_is_asked_for():
    from idcrafter.eval.run import EvalRequest, resolve_protocol, validate

    asked = EvalRequest(out="o", data="d", videos=["v"], protocol="multicrafter", model_options=["face.backend=dlib"])
    assert resolve_protocol(asked) == "multicrafter"
    assert validate(asked).options == {"face": {"backend": "dlib"}}
    # Without --protocol, face.* is the legacy face reward's option, as before.
    assert resolve_protocol(EvalRequest(out="o", data="d", videos=["v"], model_options=["face.backend=dlib"])) == "legacy"
