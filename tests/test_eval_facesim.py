"""OpenS2V-Eval's FaceSim-Cur / FaceSim-Arc (idcrafter/eval/facesim.py) against get_facesim.py's recipe.

The models are tiny random ones saved to disk and loaded by path through the real code path: an
insightface pack of real ONNX graphs (tests/tiny_insightface.py: insightface routes them to its own
SCRFD and ArcFace classes) and a CurricularFace IR backbone state dict. Each number is checked against
an independent computation written here: the detector decoded by hand from onnxruntime outputs, the
alignment by insightface's `face_align.norm_crop`, the recognition model run by onnxruntime, the IR
backbone as functional torch calls on its state dict, numpy cosines and means.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("insightface")
pytest.importorskip("onnxruntime")

import cv2  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tiny_insightface import decode_tiny_scrfd, tiny_pack  # noqa: E402

from idcrafter.eval.facesim import (  # noqa: E402
    ARCHS,
    FaceSimScorer,
    build_facesim,
    curricular_backbone,
    load_curricular,
    parse_arch,
)
from idcrafter.eval.metrics import EvalItem  # noqa: E402
from idcrafter.utils.errors import ConfigError, FileFormatError  # noqa: E402

TINY_ARCH = "IR_SE:1,1,1,1:16,16,16,32,32"  # SE blocks, an identity shortcut (16 -> 16) and 1x1 ones
FACES = Path(__import__("insightface").__file__).parent / "data" / "images"


def _random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Every parameter and BN statistic random (BN variances positive), so no layer is an identity."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = value
        elif key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=gen) + 0.5
        elif value.ndim == 1 and not key.endswith("running_mean"):  # BN affine and PReLU slopes
            state[key] = 1.0 + 0.2 * torch.randn(value.shape, generator=gen)
        else:
            fan_in = max(value[0].numel(), 1) if value.ndim > 1 else 1
            state[key] = torch.randn(value.shape, generator=gen) / fan_in**0.5
    return state


def _bn(x, sd, prefix):
    return F.batch_norm(x, sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"], sd.get(f"{prefix}.weight"),
                        sd.get(f"{prefix}.bias"), False, 0.0, 1e-5)


def ir_forward(sd: dict, spec: str, x: torch.Tensor) -> torch.Tensor:
    """TFace's IR network written as functional calls on its state dict (an independent forward)."""
    arch = parse_arch(spec)
    x = F.prelu(_bn(F.conv2d(x, sd["input_layer.0.weight"], padding=1), sd, "input_layer.1"), sd["input_layer.2.weight"])
    blocks = []
    for units, cin, depth in zip(arch.units, arch.widths[:-1], arch.widths[1:]):
        blocks += [(cin, depth, 2)] + [(depth, depth, 1)] * (units - 1)
    for i, (cin, depth, stride) in enumerate(blocks):
        p = f"body.{i}.res_layer"
        if arch.bottleneck:
            r = F.prelu(_bn(F.conv2d(_bn(x, sd, f"{p}.0"), sd[f"{p}.1.weight"]), sd, f"{p}.2"), sd[f"{p}.3.weight"])
            r = F.prelu(_bn(F.conv2d(r, sd[f"{p}.4.weight"], padding=1), sd, f"{p}.5"), sd[f"{p}.6.weight"])
            r = _bn(F.conv2d(r, sd[f"{p}.7.weight"], stride=stride), sd, f"{p}.8")
        else:
            r = F.prelu(_bn(F.conv2d(_bn(x, sd, f"{p}.0"), sd[f"{p}.1.weight"], padding=1), sd, f"{p}.2"),
                        sd[f"{p}.3.weight"])
            r = _bn(F.conv2d(r, sd[f"{p}.4.weight"], stride=stride, padding=1), sd, f"{p}.5")
        if arch.se:
            s = torch.sigmoid(F.conv2d(F.relu(F.conv2d(r.mean((2, 3), keepdim=True), sd[f"{p}.se_block.fc1.weight"])),
                                       sd[f"{p}.se_block.fc2.weight"]))
            r = r * s
        if cin == depth:
            shortcut = x[:, :, ::stride, ::stride]
        else:
            shortcut = _bn(F.conv2d(x, sd[f"body.{i}.shortcut_layer.0.weight"], stride=stride), sd,
                           f"body.{i}.shortcut_layer.1")
        x = r + shortcut
    x = _bn(x, sd, "output_layer.0").flatten(1)
    x = F.linear(x, sd["output_layer.3.weight"], sd["output_layer.3.bias"])
    return F.batch_norm(x, sd["output_layer.4.running_mean"], sd["output_layer.4.running_var"], None, None, False,
                        0.0, 1e-5)


# ------------------------------------------------------------------------------------------ backbone
def test_ir101_has_the_published_checkpoints_keys_and_shapes():
    """glint360k_curricular_face_r101_backbone.bin is a state dict of TFace's IR_101 (get_model("IR_101")):
    49 basic units (3, 13, 30, 3), MaxPool shortcuts where the width stays, a 512 x 25088 embedding."""
    with torch.device("meta"):
        state = curricular_backbone("IR_101").state_dict()
    assert sum(1 for k in state if k.endswith(".res_layer.0.weight")) == 49
    assert tuple(state["input_layer.0.weight"].shape) == (64, 3, 3, 3) and "input_layer.2.weight" in state
    assert "body.0.shortcut_layer.0.weight" not in state  # 64 -> 64, stride 2: MaxPool2d(1, 2), no weights
    assert tuple(state["body.3.shortcut_layer.0.weight"].shape) == (128, 64, 1, 1)
    assert tuple(state["body.16.shortcut_layer.0.weight"].shape) == (256, 128, 1, 1)
    assert tuple(state["body.46.shortcut_layer.1.running_var"].shape) == (512,)
    assert tuple(state["body.48.res_layer.4.weight"].shape) == (512, 512, 3, 3)
    assert tuple(state["body.48.res_layer.3.weight"].shape) == (512,)  # PReLU
    assert tuple(state["output_layer.3.weight"].shape) == (512, 512 * 7 * 7)
    assert "output_layer.4.running_mean" in state and "output_layer.4.weight" not in state  # BN1d without affine
    # stem 7 (conv, BN's 5 entries, PReLU), 18 per unit, 6 per 1x1 shortcut (3), output 10 (BN, linear, BN1d's 3)
    assert len(state) == 7 + 49 * 18 + 3 * 6 + 10
    with torch.device("meta"):
        se = curricular_backbone("IR_SE_50").state_dict()
        wide = curricular_backbone("IR_152").state_dict()
    assert tuple(se["body.0.res_layer.se_block.fc1.weight"].shape) == (4, 64, 1, 1)
    assert tuple(wide["body.0.res_layer.1.weight"].shape) == (64, 64, 1, 1)  # bottleneck 64 -> 256, a quarter
    assert tuple(wide["body.0.res_layer.7.weight"].shape) == (256, 64, 1, 1)
    assert tuple(wide["output_layer.3.weight"].shape) == (512, 2048 * 7 * 7)
    assert set(ARCHS) == {"IR_18", "IR_34", "IR_50", "IR_101", "IR_152", "IR_200", "IR_SE_50", "IR_SE_101",
                          "IR_SE_152", "IR_SE_200"}


@pytest.mark.parametrize("spec", ["IR:1,2,1,1:8,8,16,16,32", TINY_ARCH, "IR:1,1,1,1:8,16,16,32,32:bottleneck"])
def test_ir_backbone_matches_the_functional_forward(spec):
    model = curricular_backbone(spec)
    state = _random_state(model, 3)
    model.load_state_dict(state)
    x = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        got, expected = model(x), ir_forward(state, spec, x)
    assert got.shape == (2, 512)
    assert float((got - expected).abs().max()) < 1e-5 * float(expected.abs().max())


def test_curricular_checkpoint_loading_errors(tmp_path):
    good = tmp_path / "tiny.bin"
    torch.save(_random_state(curricular_backbone(TINY_ARCH), 0), good)
    assert isinstance(load_curricular(good, TINY_ARCH), torch.nn.Module)
    # 89 of IR_101's 917 keys are in the tiny network; 71 of those with other shapes; its SE blocks and
    # the 1x1 shortcut of its third unit are not in IR_101
    with pytest.raises(FileFormatError, match=r"not an IR_101 CurricularFace backbone: missing 828 \(e\.g\. "
                                              r"body\.3\.shortcut_layer\.0\.weight\); unexpected 14 \(e\.g\. "
                                              r"body\.0\.res_layer\.se_block\.fc1\.weight\); shape differs for 71"):
        load_curricular(good, "IR_101")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(FileFormatError, match="not a torch state dict"):
        load_curricular(tmp_path / "junk.bin", TINY_ARCH)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_curricular(tmp_path / "absent.bin")
    with pytest.raises(ConfigError, match="facesim.arch='IR_99': expected one of IR_18"):
        parse_arch("IR_99")
    with pytest.raises(ConfigError, match="2 stages need 3 widths"):
        parse_arch("IR:1,1:8,8")


# ------------------------------------------------------------------------------------------ the scorer
@pytest.fixture(scope="module")
def tiny_facesim(tmp_path_factory):
    """root/models/buffalo_l (tiny SCRFD + ArcFace ONNX) and a tiny random CurricularFace state dict."""
    root = tmp_path_factory.mktemp("facesim")
    pack = tiny_pack(root / "insightface", "buffalo_l")
    state = _random_state(curricular_backbone(TINY_ARCH), 7)
    torch.save(state, root / "curricular.bin")
    return {"root": root / "insightface", "pack": pack, "curricular": root / "curricular.bin", "state": state}


def _photo(name: str, size: int = 160) -> np.ndarray:
    from PIL import Image

    return cv2.resize(np.asarray(Image.open(FACES / name).convert("RGB")), (size, size), interpolation=cv2.INTER_AREA)


def _strip_frame(size: int = 160) -> np.ndarray:
    """Black with a bright band along the top edge: no face as is, one after the grey padding (the band's
    detector cell is then half grey instead of half black)."""
    frame = np.zeros((size, size, 3), np.uint8)
    frame[: size // 20] = 255
    return frame


def _expected_face(fixture, image_rgb):
    """get_facesim.py's process_image computed by hand -> (aligned RGB 224, ArcFace embedding) or None."""
    import onnxruntime
    from insightface.utils import face_align

    bgr = np.ascontiguousarray(image_rgb[..., ::-1])
    dets, kps = decode_tiny_scrfd(fixture["pack"] / "det_tiny.onnx", bgr)
    source, offset = bgr, np.zeros(2, np.float32)
    if len(dets) == 0:
        top, left = int(bgr.shape[0] * 0.25), int(bgr.shape[1] * 0.25)
        source = np.pad(bgr, ((top, top), (left, left), (0, 0)), constant_values=128)
        dets, kps = decode_tiny_scrfd(fixture["pack"] / "det_tiny.onnx", source)
        offset = np.array([left, top], np.float32)
        if len(dets) == 0:
            return None
    areas = (dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1])
    best = np.flatnonzero(areas == areas.max())[-1]  # of equal areas, the later detection
    crop = face_align.norm_crop(source, landmark=kps[best], image_size=112)  # ArcFace sees the image it detected in
    blob = ((crop[..., ::-1].astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
    session = onnxruntime.InferenceSession(str(fixture["pack"] / "w_tiny.onnx"), providers=["CPUExecutionProvider"])
    arc = session.run(None, {"input.1": np.ascontiguousarray(blob)})[0][0]
    aligned = face_align.norm_crop(bgr, landmark=kps[best] - offset, image_size=224)[..., ::-1]
    return np.ascontiguousarray(aligned), arc


def _expected_cur(fixture, aligned_rgb):
    small = cv2.resize(aligned_rgb, (112, 112))
    x = torch.from_numpy(small.transpose(2, 0, 1).astype(np.float32))[None] / 127.5 - 1.0
    with torch.no_grad():
        e = ir_forward(fixture["state"], TINY_ARCH, x)[0].double().numpy()
    return e / np.linalg.norm(e)


def _cos(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_facesim_matches_an_independent_computation(tiny_facesim):
    scorer = FaceSimScorer(tiny_facesim["root"], tiny_facesim["curricular"], arch=TINY_ARCH)
    reference = _photo("t1.jpg", 200)
    # 40 frames, 32 sampled: faces in the two photos, faces found only after padding, and frames without any
    photos = [_photo("Tom_Hanks_54745.png"), _photo("t1.jpg"), np.ascontiguousarray(_photo("t1.jpg")[:, ::-1])]
    frames = np.stack([photos[i % 3] if i % 4 else (_strip_frame() if i % 8 else np.zeros((160, 160, 3), np.uint8))
                       for i in range(40)])
    item = EvalItem(id="faceobj_3", prompt="p", refs=[np.zeros((64, 64, 3), np.uint8), reference],
                    ref_paths=["Images/faceobj/object/cup.jpg", "Images/faceobj/crop_woman/3.jpg"])
    got = scorer(item, frames)

    ref_face, ref_arc = _expected_face(tiny_facesim, reference)
    ref_cur = _expected_cur(tiny_facesim, ref_face)
    cur, arc, kinds = [], [], {"face": 0, "padded": 0, "none": 0}
    for index in np.linspace(0, 39, 32).astype(int):
        found = _expected_face(tiny_facesim, frames[index])
        kind = "none" if found is None else "face" if index % 4 else "padded"
        kinds[kind] += 1
        if found is None:
            continue
        cur.append(max(0.0, _cos(ref_cur, _expected_cur(tiny_facesim, found[0]))))
        arc.append(max(0.0, _cos(ref_arc, found[1])))
    assert kinds["face"] > 10 and kinds["padded"] >= 2 and kinds["none"] >= 2, kinds  # every path taken
    expected_cur = float(np.mean([c for c in cur if c != 0.0]))
    assert got["facesim_cur"] == pytest.approx(expected_cur, abs=1e-5)
    assert got["facesim_arc"] == pytest.approx(float(np.mean(arc)), abs=1e-5)
    assert 0.0 < got["facesim_cur"] < 1.0 and 0.0 < got["facesim_arc"] < 1.0


def test_facesim_same_photo_scores_one_and_skipped_cases_score_none(tiny_facesim):
    scorer = build_facesim({"root": str(tiny_facesim["root"]), "curricular": str(tiny_facesim["curricular"]),
                            "arch": TINY_ARCH})
    photo = _photo("Tom_Hanks_54745.png", 112)
    item = EvalItem(id="singleface_1", prompt="p", refs=[photo], ref_paths=["Images/singleface/crop_man/1.png"])
    got = scorer(item, np.stack([photo] * 3))
    assert got["facesim_cur"] == pytest.approx(1.0, abs=1e-6) and got["facesim_arc"] == pytest.approx(1.0, abs=1e-6)
    black = np.zeros((3, 112, 112, 3), np.uint8)
    assert scorer(item, black) == {"facesim_cur": 0.0, "facesim_arc": 0.0}  # no face in any frame
    none = {"facesim_cur": None, "facesim_arc": None}
    assert scorer(EvalItem(id="singleobj_1", prompt="p", refs=[photo], ref_paths=["Images/man/1.png"]),
                  black) == none  # not a face case
    assert scorer(EvalItem(id="humanobj_1", prompt="p", refs=[photo], ref_paths=["Images/human/x.png"]),
                  black) == none  # no reference in a face folder
    assert scorer(EvalItem(id="humanobj_1", prompt="p", refs=[black[0]], ref_paths=["Images/man/x.png"]),
                  black) == none  # the reference has no face
    with pytest.raises(ConfigError, match="facesim: unknown option detsize"):
        build_facesim({"root": "r", "curricular": "c", "detsize": 1})


def test_facesim_pack_errors(tmp_path, tiny_facesim):
    with pytest.raises(FileNotFoundError, match="no insightface pack at .*models/antelopev2"):
        FaceSimScorer(tiny_facesim["root"], tiny_facesim["curricular"], pack="antelopev2", arch=TINY_ARCH)
    broken = tmp_path / "models" / "buffalo_l"
    broken.mkdir(parents=True)
    (broken / "det.onnx").write_bytes(b"junk")
    with pytest.raises(FileFormatError, match="does not load"):
        FaceSimScorer(tmp_path, tiny_facesim["curricular"], arch=TINY_ARCH)


def test_evaluate_cli_reports_facesim_columns(tiny_facesim, tmp_path):
    from idcrafter.cli import evaluate as script
    from idcrafter.eval.inputs import load_benchmark_items
    from idcrafter.utils.media import read_video, write_video

    cases = {
        "singleface_1": {"img_paths": ["Images/singleface/crop_man/1.png"], "prompt": "a man", "class_label": ["Man"]},
        "humanobj_2": {"img_paths": ["Images/humanobj/thing/cup/1.png", "Images/humanobj/human/woman/2.png"],
                       "prompt": "a woman and a cup", "class_label": ["Cup", "Woman"]},
        "singlehuman_3": {"img_paths": ["Images/singlehuman/human/3.png"], "prompt": "someone",
                          "class_label": ["Man"]},  # no face folder: not scored
    }
    bench = tmp_path / "Human-Domain_Eval.json"
    bench.write_text(json.dumps(cases))
    images = tmp_path / "images"
    from PIL import Image

    for rel, name in [(cases["singleface_1"]["img_paths"][0], "Tom_Hanks_54745.png"),
                      (cases["humanobj_2"]["img_paths"][0], "t1.jpg"), (cases["humanobj_2"]["img_paths"][1], "t1.jpg"),
                      (cases["singlehuman_3"]["img_paths"][0], "Tom_Hanks_54745.png")]:
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_photo(name, 128)).save(images / rel)
    videos = tmp_path / "videos"
    videos.mkdir()
    clip = np.stack([_photo("Tom_Hanks_54745.png", 128), _photo("t1.jpg", 128)] * 3)
    for case in cases:
        write_video(clip, videos / f"{case}.mp4")
    out = tmp_path / "eval"
    assert script.main(["--opens2v", str(bench), "--images-root", str(images), "--videos", str(videos),
                        "--out", str(out), "--no-progress",
                        "--model-option", f"facesim.root={tiny_facesim['root']}",
                        "--model-option", f"facesim.curricular={tiny_facesim['curricular']}",
                        "--model-option", f"facesim.arch={TINY_ARCH}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    scorer = FaceSimScorer(tiny_facesim["root"], tiny_facesim["curricular"], arch=TINY_ARCH)
    items = load_benchmark_items(bench, images, videos)
    per_case = {item.id: scorer(item, read_video(item.path)) for item in items}
    assert per_case["singlehuman_3"]["facesim_cur"] is None
    for key, header in (("facesim_cur", "FaceSim-Cur"), ("facesim_arc", "FaceSim-Arc")):
        values = [v[key] for v in per_case.values() if v[key] is not None]
        assert len(values) == 2 and all(0.0 < v <= 1.0 for v in values)
        assert summary["columns"][header]["key"] == key
        assert summary["columns"][header]["mean"] == pytest.approx(np.mean(values), abs=1e-6)
    assert summary["opens2v"]["normalised"]["facesim_cur"] is not None

    missing = tmp_path / "eval_missing"
    assert script.main(["--opens2v", str(bench), "--images-root", str(images), "--videos", str(videos),
                        "--out", str(missing), "--no-progress",
                        "--model-option", f"facesim.root={tiny_facesim['root']}"]) == 0
    skipped = json.loads((missing / "summary.json").read_text())["skipped"]
    assert skipped["FaceSim-Cur"] == skipped["FaceSim-Arc"]
    assert "get_facesim.py" in skipped["FaceSim-Cur"] and "facesim.curricular=..." in skipped["FaceSim-Cur"]
