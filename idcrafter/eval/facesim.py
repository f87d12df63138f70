"""OpenS2V-Eval's FaceSim-Cur and FaceSim-Arc, as the benchmark's `eval/get_facesim.py` computes them.

Re-implemented from the benchmark's public code (OpenS2V-Nexus, Yuan et al. 2025, repository
PKU-YuanGroup/OpenS2V-Nexus, Apache-2.0); the CurricularFace backbone re-implements the IR / IR-SE
networks of TFace (Tencent, Apache-2.0) that the benchmark ships in `utils/curricularface`, with the
same module names, so the published checkpoint (`glint360k_curricular_face_r101_backbone.bin`, IR_101)
loads unchanged. The case selection, the face reference and the averaging are the pure helpers of
`idcrafter.eval.opens2v` (`facesim_applies`, `facesim_reference`, `largest_face`, `facesim_padding`,
`facesim_video_scores`, `curricular_input`).

Per case (`FaceSimScorer`):
  1. only ids containing singlehuman / singleface / faceobj / humanobj are scored; the face reference
     is the case's first image under a man / woman / crop_man / crop_woman folder;
  2. an image (the reference, or each of 32 evenly spaced frames) goes RGB -> BGR into insightface's
     `FaceAnalysis` (detector at det_size 320 x 320, threshold 0.5, then ArcFace); the face with the
     largest box is kept. Without a face the image is padded by 25 % of its height / width on each
     side with grey 128 and detected again; the keypoints are moved back by the padding, the ArcFace
     embedding stays the one of the padded copy;
  3. the face is aligned with `face_align.norm_crop(image_bgr, kps, 224)` on the unpadded image,
     turned to RGB, resized to 112, scaled to [-1, 1] and embedded by CurricularFace, L2-normalised;
  4. per frame, max(0, cosine) of the reference's and the frame's embeddings, for CurricularFace and
     for ArcFace (insightface's raw `embedding`: the cosine normalises it, so `normed_embedding`
     would give the same number);
  5. FaceSim-Cur: the mean over frames with a face whose score is not 0; FaceSim-Arc: the mean over
     every frame with a face (the benchmark's drop test for Arc compares the list, not the score, to
     0: kept as published). A video without a face in any frame scores 0.0.
A case whose reference has no face, or that has no face reference, gets no score (None here): the
benchmark skips it (no entry in its facesim.json), and the leaderboard averages what is there.

The model pack: the benchmark builds `FaceAnalysis(root=<OpenS2V-Weight>/face_extractor)` without a
pack name, so insightface's default pack, `buffalo_l` (its DEFAULT_MP_NAME), is what it loads from
`root/models/buffalo_l` (SCRFD-10G detector, ArcFace R50 trained on WebFace600K); `facesim.pack`
chooses another (e.g. antelopev2, the pack OpenS2V's data pipeline uses). Only the detection and
recognition models of the pack are loaded: the others (landmarks, gender / age) only add attributes
the score never reads. Nothing is downloaded: a missing pack folder is an error.

One difference from the benchmark's input: the references are the evaluator's decoded images
(`EvalItem.refs`: turned upright by their EXIF orientation, transparency composited on white), where
the benchmark reads `Image.open(path).convert("RGB")`; the two agree for the benchmark's RGB images.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from idcrafter.eval.opens2v import (
    FACESIM_FRAMES,
    FACESIM_PAD_GREY,
    curricular_input,
    facesim_applies,
    facesim_padding,
    facesim_reference,
    facesim_video_scores,
    largest_face,
    sample_indices,
)
from idcrafter.utils.errors import ConfigError, FileFormatError

__all__ = [
    "ARCHS",
    "DEFAULT_ARCH",
    "DEFAULT_PACK",
    "FaceSimScorer",
    "IRBackbone",
    "IRSpec",
    "build_facesim",
    "cosine",
    "curricular_backbone",
    "load_curricular",
    "load_face_analysis",
    "parse_arch",
]

DEFAULT_PACK = "buffalo_l"  # insightface's default pack: what get_facesim.py's FaceAnalysis(root=...) loads
DEFAULT_ARCH = "IR_101"  # get_facesim.py: get_model("IR_101")([112, 112])
DET_SIZE = 320  # get_facesim.py: face_arc_model.prepare(ctx_id=0, det_size=(320, 320))
DET_THRESH = 0.5  # insightface's default, which get_facesim.py keeps
ALIGN_SIZE = 224  # face_align.norm_crop(..., image_size=224) before CurricularFace's 112 resize
CURRICULAR_INPUT = 112
EMBEDDING = 512
OPTIONS = ("root", "curricular", "pack", "arch")


# ----------------------------------------------------------------------------------------------------
# The CurricularFace backbone (TFace's IR / IR-SE networks, module names as in its state dicts)
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class IRSpec:
    """An IR network: `units` blocks per stage (each stage's first block has stride 2), `widths` the stem's
    channels then each stage's, `bottleneck` blocks (1x1, 3x3, 1x1 at a quarter width) or basic ones
    (two 3x3), `se` a squeeze-excitation at the end of each block's residual branch."""

    units: tuple[int, ...]
    widths: tuple[int, ...]
    bottleneck: bool = False
    se: bool = False

    def __post_init__(self):
        if len(self.widths) != len(self.units) + 1 or not self.units or min(self.units) < 1 or min(self.widths) < 1:
            raise ConfigError(f"IR network: {len(self.units)} stages need {len(self.units) + 1} widths (stem first) "
                              f"and at least one unit each; got units {self.units}, widths {self.widths}")


_BASIC = (64, 64, 128, 256, 512)
_WIDE = (64, 256, 512, 1024, 2048)  # TFace's 152 and 200 layers: bottleneck blocks
_UNITS = {"18": (2, 2, 2, 2), "34": (3, 4, 6, 3), "50": (3, 4, 14, 3), "101": (3, 13, 30, 3),
          "152": (3, 8, 36, 3), "200": (3, 24, 36, 3)}
# TFace's names (the benchmark's utils/curricularface get_model keys); IR_101 is its 100-layer network.
ARCHS: dict[str, IRSpec] = {
    f"IR{'_SE' if se else ''}_{depth}": IRSpec(units, _WIDE if depth in ("152", "200") else _BASIC,
                                                bottleneck=depth in ("152", "200"), se=se)
    for depth, units in _UNITS.items() for se in (False, True) if not (se and depth in ("18", "34"))
}


def parse_arch(text: str) -> IRSpec:
    """An architecture name of `ARCHS` (IR_101, IR_SE_50, ...), or a custom network written
    "IR:<units>:<widths>" / "IR_SE:<units>:<widths>" with an optional ":bottleneck", e.g.
    "IR:1,1:16,16,32" (two stages of one basic block; stem 16 channels, stages 16 and 32)."""
    text = str(text).strip()
    if text in ARCHS:
        return ARCHS[text]
    parts = text.split(":")
    if len(parts) in (3, 4) and parts[0] in ("IR", "IR_SE") and parts[3:] in ([], ["bottleneck"]):
        try:
            units = tuple(int(u) for u in parts[1].split(","))
            widths = tuple(int(w) for w in parts[2].split(","))
        except ValueError:
            pass
        else:
            return IRSpec(units, widths, bottleneck=len(parts) == 4, se=parts[0] == "IR_SE")
    raise ConfigError(f"facesim.arch={text!r}: expected one of {', '.join(ARCHS)} or IR[_SE]:UNITS:WIDTHS[:bottleneck]")


class SEModule(nn.Module):
    """Squeeze-excitation: x * sigmoid(fc2(relu(fc1(mean over pixels of x)))), 1x1 convolutions without bias."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, max(channels // reduction, 1), kernel_size=1, padding=0, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(max(channels // reduction, 1), channels, kernel_size=1, padding=0, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


class IRBlock(nn.Module):
    """One IR unit: `res_layer(x) + shortcut_layer(x)`. The shortcut is a strided identity (MaxPool 1x1,
    no weights) when the width stays, else a strided 1x1 convolution + BN. The residual branch is
    BN, 3x3 conv, BN, PReLU, 3x3 conv (strided), BN for basic blocks; BN, 1x1 conv, BN, PReLU, 3x3
    conv, BN, PReLU, 1x1 conv (strided), BN for bottleneck ones; then the SE block if any."""

    def __init__(self, in_channel: int, depth: int, stride: int, bottleneck: bool = False, se: bool = False):
        super().__init__()
        if in_channel == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channel, depth, (1, 1), stride, bias=False),
                                                nn.BatchNorm2d(depth))
        if bottleneck:
            mid = depth // 4
            layers = [nn.BatchNorm2d(in_channel), nn.Conv2d(in_channel, mid, (1, 1), (1, 1), 0, bias=False),
                      nn.BatchNorm2d(mid), nn.PReLU(mid), nn.Conv2d(mid, mid, (3, 3), (1, 1), 1, bias=False),
                      nn.BatchNorm2d(mid), nn.PReLU(mid), nn.Conv2d(mid, depth, (1, 1), stride, 0, bias=False),
                      nn.BatchNorm2d(depth)]
        else:
            layers = [nn.BatchNorm2d(in_channel), nn.Conv2d(in_channel, depth, (3, 3), (1, 1), 1, bias=False),
                      nn.BatchNorm2d(depth), nn.PReLU(depth), nn.Conv2d(depth, depth, (3, 3), stride, 1, bias=False),
                      nn.BatchNorm2d(depth)]
        self.res_layer = nn.Sequential(*layers)
        if se:
            self.res_layer.add_module("se_block", SEModule(depth, 16))

    def forward(self, x):
        return self.res_layer(x) + self.shortcut_layer(x)


class IRBackbone(nn.Module):
    """TFace's IR backbone for 112 x 112 faces: `input_layer` (3x3 conv, BN, PReLU), `body` (the units,
    each stage halving the resolution: 112 -> 7 after four stages), `output_layer` (BN, dropout,
    flatten, linear to 512, BN without affine). float [N, 3, 112, 112] in [-1, 1] -> [N, 512]."""

    def __init__(self, spec: IRSpec, input_size: int = CURRICULAR_INPUT):
        super().__init__()
        self.spec = spec
        stem = spec.widths[0]
        self.input_layer = nn.Sequential(nn.Conv2d(3, stem, (3, 3), 1, 1, bias=False), nn.BatchNorm2d(stem),
                                         nn.PReLU(stem))
        blocks = []
        for units, in_channel, depth in zip(spec.units, spec.widths[:-1], spec.widths[1:]):
            blocks.append(IRBlock(in_channel, depth, 2, spec.bottleneck, spec.se))
            blocks += [IRBlock(depth, depth, 1, spec.bottleneck, spec.se) for _ in range(units - 1)]
        self.body = nn.Sequential(*blocks)
        side = input_size
        for _ in spec.units:
            side = (side - 1) // 2 + 1  # a 3x3 (or 1x1) convolution of stride 2, padded to keep "same"
        out = spec.widths[-1]
        self.output_layer = nn.Sequential(nn.BatchNorm2d(out), nn.Dropout(0.4), nn.Flatten(),
                                          nn.Linear(out * side * side, EMBEDDING), nn.BatchNorm1d(EMBEDDING, affine=False))

    def forward(self, x):
        return self.output_layer(self.body(self.input_layer(x)))


def curricular_backbone(arch: str | IRSpec = DEFAULT_ARCH) -> IRBackbone:
    """The CurricularFace backbone of an architecture (`parse_arch`), randomly initialised, in eval mode."""
    return IRBackbone(arch if isinstance(arch, IRSpec) else parse_arch(arch)).eval()


def load_curricular(path: str | Path, arch: str | IRSpec = DEFAULT_ARCH, device: str = "cpu") -> IRBackbone:
    """The backbone with the state dict saved at `path` (torch.save of `state_dict()`, as the benchmark's
    checkpoint is), every key and shape checked, on `device`, in eval mode.

    Raises FileNotFoundError (no file), FileFormatError (not a state dict of that architecture).
    """
    import pickle

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"facesim.curricular={str(path)!r}: no such file")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise FileFormatError(f"facesim.curricular={str(path)!r}: not a torch state dict ({str(err).splitlines()[0]})"
                              ) from None
    if not isinstance(state, Mapping):
        raise FileFormatError(f"facesim.curricular={str(path)!r}: holds a {type(state).__name__}, not a state dict")
    model = curricular_backbone(arch)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        name = arch if isinstance(arch, str) else "the given"
        detail = "; ".join(f"{what} {len(keys)} (e.g. {keys[0]})" for what, keys in
                           (("missing", missing), ("unexpected", unexpected), ("shape differs for", wrong)) if keys)
        raise FileFormatError(f"facesim.curricular={str(path)!r}: not an {name} CurricularFace backbone: {detail}")
    model.load_state_dict(state)
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------------
# insightface: detection, alignment and ArcFace
# ----------------------------------------------------------------------------------------------------

def _providers(device: str) -> tuple[list[str], int]:
    """onnxruntime providers and insightface's ctx_id for a torch device string."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], dev.index or 0
    return ["CPUExecutionProvider"], -1


def load_face_analysis(root: str | Path, pack: str = DEFAULT_PACK, device: str = "cpu"):
    """insightface's FaceAnalysis from `root`/models/`pack` (detection and recognition models), prepared
    as the benchmark prepares it (det_size 320 x 320, threshold 0.5). Never downloads.

    Raises FileNotFoundError (no pack folder or no .onnx in it), FileFormatError (the pack lacks a
    detector or a recognition model, or a model does not load).
    """
    from idcrafter.utils.deps import require

    folder = Path(root).expanduser() / "models" / pack
    if not folder.is_dir() or not any(folder.glob("*.onnx")):
        raise FileNotFoundError(f"facesim.root={str(root)!r}: no insightface pack at {folder} (a folder of .onnx "
                                "files; it is never downloaded here)")
    app_module = require("insightface.app", "face")
    providers, ctx_id = _providers(device)
    try:
        app = app_module.FaceAnalysis(name=pack, root=str(Path(root).expanduser()), providers=providers,
                                      allowed_modules=["detection", "recognition"])
    except Exception as err:  # onnxruntime raises its own classes for unreadable models; FaceAnalysis asserts
        text = str(err).strip().splitlines()
        raise FileFormatError(f"facesim.root={str(root)!r}: the pack {folder} does not load "
                              f"({err.__class__.__name__}{': ' + text[0] if text else ''})") from None
    if "recognition" not in app.models:
        raise FileFormatError(f"facesim.root={str(root)!r}: the pack {folder} has no recognition (ArcFace) model")
    app.prepare(ctx_id=ctx_id, det_thresh=DET_THRESH, det_size=(DET_SIZE, DET_SIZE))
    return app


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two embeddings [D] as the benchmark computes it (torch, float32)."""
    return float(torch.nn.functional.cosine_similarity(torch.tensor(a), torch.tensor(b), dim=-1).item())


class FaceSimScorer:
    """OpenS2V-Eval's FaceSim-Cur and FaceSim-Arc of a case (see the module doc).

    Args:
        root: the insightface root holding models/<pack> (the benchmark: OpenS2V-Weight/face_extractor).
        curricular: the CurricularFace backbone's state dict (glint360k_curricular_face_r101_backbone.bin).
        pack: the insightface model pack (default buffalo_l, the benchmark's).
        arch: the backbone's architecture (`parse_arch`; default IR_101, the benchmark's).
    """

    def __init__(self, root: str | Path, curricular: str | Path, pack: str = DEFAULT_PACK, arch: str = DEFAULT_ARCH,
                 device: str = "cpu", frames: int = FACESIM_FRAMES):
        self.backbone = load_curricular(curricular, arch, device)
        self.app = load_face_analysis(root, pack, device)
        self.device = device
        self.frames = frames

    def analyse(self, image_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The benchmark's `process_image`: uint8 RGB [H, W, 3] -> (the aligned face, uint8 RGB
        [224, 224, 3]; ArcFace's raw embedding [512]) of the largest face, or None without a face."""
        import cv2

        image_bgr = cv2.cvtColor(np.ascontiguousarray(image_rgb, dtype=np.uint8), cv2.COLOR_RGB2BGR)
        face = self._largest(image_bgr)
        if face is None:
            top, left = facesim_padding(*image_bgr.shape[:2])
            grey = (FACESIM_PAD_GREY,) * 3
            padded = cv2.copyMakeBorder(image_bgr, top, top, left, left, cv2.BORDER_CONSTANT, value=grey)
            face = self._largest(padded)
            if face is None:
                return None
            kps = np.array(face["kps"])
            kps -= np.array((left, top))  # in place, as the benchmark does: the keypoints stay float32
        else:
            kps = face["kps"]
        from insightface.utils import face_align

        aligned = face_align.norm_crop(image_bgr, landmark=kps, image_size=ALIGN_SIZE)
        return cv2.cvtColor(aligned, cv2.COLOR_BGR2RGB), face["embedding"]

    def _largest(self, image_bgr: np.ndarray):
        faces = self.app.get(image_bgr)
        index = largest_face([f["bbox"] for f in faces])
        return None if index is None else faces[index]

    def curricular_embedding(self, face_rgb: np.ndarray) -> np.ndarray:
        """An aligned face (uint8 RGB [224, 224, 3]) -> CurricularFace's L2-normalised embedding float32 [512]."""
        with torch.no_grad():
            embedding = self.backbone(curricular_input(face_rgb).to(self.device)).cpu().numpy()[0]
        return embedding / np.linalg.norm(embedding)

    def video_scores(self, frames: np.ndarray, reference: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
        """(FaceSim-Cur, FaceSim-Arc) of every decoded frame uint8 [F, H, W, 3] against the reference's
        (CurricularFace, ArcFace) embeddings, over the benchmark's 32 sampled frames."""
        frames = np.asarray(frames)
        cur, arc = [], []
        for frame in frames[sample_indices(len(frames), self.frames)]:
            found = self.analyse(frame)
            if found is None:
                continue  # a frame without a face counts in neither mean
            face, arc_embedding = found
            cur.append(max(0.0, cosine(reference[0], self.curricular_embedding(face))))
            arc.append(max(0.0, cosine(reference[1], arc_embedding)))
        # Cur drops zero scores, Arc keeps them (the benchmark's `arc_scores != 0.0` test is always true).
        return facesim_video_scores(cur, arc)

    def reference(self, item) -> tuple[np.ndarray, np.ndarray] | None:
        """The case's face reference embeddings (CurricularFace, ArcFace), or None when the case has no
        face reference or no face is found in it (the benchmark skips such a case)."""
        paths = list(getattr(item, "ref_paths", []) or [])
        chosen = facesim_reference(paths)
        if chosen is None:
            return None
        found = self.analyse(item.refs[paths.index(chosen)])
        if found is None:
            return None
        face, arc_embedding = found
        return self.curricular_embedding(face), arc_embedding

    def __call__(self, item, frames: np.ndarray) -> dict[str, float | None]:
        """The column model's scorer: {"facesim_cur", "facesim_arc"}, both None where FaceSim does not
        apply (the id, a missing face reference, no face in it)."""
        none = {"facesim_cur": None, "facesim_arc": None}
        if not facesim_applies(item.id):
            return none
        reference = self.reference(item)
        if reference is None:
            return none
        cur, arc = self.video_scores(frames, reference)
        return {"facesim_cur": cur, "facesim_arc": arc}


def build_facesim(options: Mapping[str, object], device: str = "cpu") -> FaceSimScorer:
    """The FaceSim column model (`idcrafter.eval.protocols`): options root=DIR, curricular=FILE,
    pack=NAME (default buffalo_l), arch=NAME (default IR_101)."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"facesim: unknown option {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
    return FaceSimScorer(options["root"], options["curricular"], pack=str(options.get("pack", DEFAULT_PACK)),
                         arch=str(options.get("arch", DEFAULT_ARCH)), device=device)

