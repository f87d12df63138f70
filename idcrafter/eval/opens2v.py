"""OpenS2V-Eval's own computations: the Motion statistic and the leaderboard's normalisation and totals.

Everything here follows the benchmark's public evaluation code (OpenS2V-Nexus, Yuan et al. 2025,
repository PKU-YuanGroup/OpenS2V-Nexus, Apache-2.0), re-implemented: `eval/get_motionscore.py` for
Motion, `eval/v1.0_backup/merge_result.py` (v1.0, the leaderboard's first table) and
`eval/merge_result.py` (v1.1, Motion split into smoothness and amplitude) for the normalisation and
the weighted totals. The Motion statistic is not a flow magnitude (that is `idcrafter.eval.motion`,
the legacy protocol's column); on real videos the two differ by about 7x.

Motion (`farneback_motion`), as `get_motionscore.py` computes it:
  1. every frame of the video is decoded (decord there; `idcrafter.utils.media.read_video` uses
     decord when installed, else PyAV, which gives the same RGB frames for yuv420p H.264);
  2. each RGB frame goes through OpenCV's BGR->grey conversion: the benchmark hands RGB arrays to
     COLOR_BGR2GRAY, so red and blue weights are swapped. Kept, because the published numbers use it;
  3. Farneback flow between consecutive frames (pyr_scale 0.5, levels 3, winsize 15, iterations 3,
     poly_n 5, poly_sigma 1.2, flags 0);
  4. each [H, W, 2] flow map is resized with INTER_AREA to 16 x int(H * 16 / W) pixels;
  5. the maps are averaged over time, then over pixels AND over the two channels (dx and dy are
     signed: opposite motions cancel, and the score is the mean displacement along x + y over 2);
  6. the absolute value of that float32 mean is the score ("motion_fb").
The benchmark also reports "motion_lk" (Lucas-Kanade tracks drawn with random colours on a black
canvas, the canvas mean); the leaderboard does not use it, and its colours are unseeded, so it is
not reproducible. `lucas_kanade_motion` gives its expectation over the colours (or the exact value
for given colours).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "AES_FRAMES",
    "AestheticScorer",
    "DOMAINS",
    "LK_MAX_CORNERS",
    "NATURAL_PROMPT",
    "PROTOCOL_COLUMNS",
    "RANGES",
    "VERSIONS",
    "WEIGHTS",
    "benchmark_grey",
    "domain_totals",
    "domain_weights",
    "curricular_input",
    "facesim_applies",
    "facesim_padding",
    "facesim_reference",
    "facesim_video_scores",
    "largest_face",
    "evaluate_opens2v",
    "farneback_motion",
    "lucas_kanade_motion",
    "natural_frame_indices",
    "natural_frame_size",
    "natural_score",
    "normalised_columns",
    "parse_natural_score",
    "Range",
    "aesthetic_head",
    "build_aesthetics",
    "sample_indices",
]

# Farneback parameters of get_motionscore.py (positional order of cv2.calcOpticalFlowFarneback).
FARNEBACK = {"pyr_scale": 0.5, "levels": 3, "winsize": 15, "iterations": 3, "poly_n": 5, "poly_sigma": 1.2, "flags": 0}
DOWNSCALE_WIDTH = 16  # get_motionscore.py `_downscale_maps(downscale_size=16)`
# get_motionscore.py `compute_lk_optical_flow`: goodFeaturesToTrack and calcOpticalFlowPyrLK settings.
LK_MAX_CORNERS = 50
LK_FEATURES = {"maxCorners": LK_MAX_CORNERS, "qualityLevel": 0.3, "minDistance": 7, "blockSize": 7}
LK_WIN, LK_LEVELS, LK_CRITERIA_COUNT, LK_CRITERIA_EPS = (15, 15), 2, 10, 0.03
LK_LINE_THICKNESS = 2
# np.random.randint(0, 255) draws 0..254: mean 127 per channel.
LK_EXPECTED_COLOUR = 127.0


def _cv2():
    from idcrafter.utils.deps import require

    return require("cv2")


def benchmark_grey(frame: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> uint8 grey [H, W] exactly as the benchmark converts it (COLOR_BGR2GRAY on
    an RGB array: 0.114 R + 0.587 G + 0.299 B)."""
    return _cv2().cvtColor(np.ascontiguousarray(frame, dtype=np.uint8), _cv2().COLOR_BGR2GRAY)


def _check_frames(frames) -> list[np.ndarray]:
    frames = [np.asarray(f) for f in frames]
    for f in frames:
        if f.ndim != 3 or f.shape[-1] != 3 or f.dtype != np.uint8:
            raise ValueError(f"OpenS2V motion: frames must be uint8 [H, W, 3], got {f.dtype} {f.shape}")
    return frames


def farneback_motion(frames) -> float | None:
    """OpenS2V-Eval's Motion ("motion_fb") of a clip; see the module docstring for the steps.

    Args:
        frames: uint8 [F, H, W, 3] RGB (every frame of the video, as decoded).
    Returns:
        |mean over time, pixels and (dx, dy) of the 16-pixel-wide Farneback maps|; None for F < 2.
    """
    frames = _check_frames(frames)
    if len(frames) < 2:
        return None
    cv2 = _cv2()
    grey = [benchmark_grey(f) for f in frames]
    maps = []
    for prev, nxt in zip(grey[:-1], grey[1:]):
        flow = cv2.calcOpticalFlowFarneback(prev, nxt, None, **FARNEBACK)
        size = (DOWNSCALE_WIDTH, int(flow.shape[0] * (DOWNSCALE_WIDTH / flow.shape[1])))
        maps.append(cv2.resize(flow, size, interpolation=cv2.INTER_AREA))
    # float32 throughout, as numpy averages the benchmark's float32 maps: the published digits depend on it.
    return abs(float(np.mean(np.mean(np.array(maps), axis=0))))


def lucas_kanade_motion(frames, colours: np.ndarray | None = None) -> float | None:
    """The benchmark's "motion_lk": up to 50 corners of the first frame tracked frame to frame with
    pyramidal Lucas-Kanade; each step's track segments drawn as 2-pixel lines on a black RGB canvas in
    the corner's colour; the score is the canvas mean over pixels and channels.

    The benchmark draws the colours unseeded (uniform 0..254), so its number changes from run to run.
    With `colours` None this returns the expectation over those colours, 127 x the covered fraction of
    the canvas (every covered pixel ends with some corner's colour, each channel of mean 127);
    with `colours` [50, 3] it returns the value for that draw.

    Args:
        frames: uint8 [F, H, W, 3] RGB.
    Returns:
        the canvas mean; None for F < 2.
    """
    frames = _check_frames(frames)
    if len(frames) < 2:
        return None
    cv2 = _cv2()
    expected = colours is None
    if expected:
        colours = np.ones((LK_MAX_CORNERS, 3), np.int64)  # coverage mask: 1 where any track passed
    colours = np.asarray(colours)
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, LK_CRITERIA_COUNT, LK_CRITERIA_EPS)
    old = benchmark_grey(frames[0])
    points = cv2.goodFeaturesToTrack(old, mask=None, **LK_FEATURES)
    canvas = np.zeros_like(frames[0])
    if points is None:  # a flat first frame has no corners: nothing is drawn
        return 0.0
    for frame in frames[1:]:
        new_grey = benchmark_grey(frame)
        if len(points) == 0:
            break
        moved, status, _ = cv2.calcOpticalFlowPyrLK(old, new_grey, points, None, winSize=LK_WIN, maxLevel=LK_LEVELS,
                                                     criteria=criteria)
        good_new, good_old = moved[status == 1], points[status == 1]
        # Colours go by the index among this step's surviving tracks, as in the benchmark (not by corner).
        for i, (a, b) in enumerate(zip(good_new, good_old)):
            canvas = cv2.line(canvas, (int(a[0]), int(a[1])), (int(b[0]), int(b[1])), colours[i].tolist(),
                              LK_LINE_THICKNESS)
        old = new_grey
        points = good_new.reshape(-1, 1, 2)
    mean = float(np.mean(np.mean(canvas, axis=0)))
    return mean * LK_EXPECTED_COLOUR if expected else mean


# ----------------------------------------------------------------------------------------------------
# Leaderboard normalisation and totals
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """A column's fixed [low, high] and how per-video values are clipped before averaging: `clip_low`
    False means only the upper bound is applied (the benchmark clamps FaceSim, GmeScore, NexusScore
    and Motion from above only), `absolute` takes |x| first (Motion), `drop_zero` leaves zeros out of
    the mean (NexusScore: a video where no subject was found)."""

    low: float
    high: float
    clip_low: bool = False
    absolute: bool = False
    drop_zero: bool = False

    def clip(self, value: float) -> float:
        value = abs(value) if self.absolute else value
        value = min(value, self.high)
        return max(value, self.low) if self.clip_low else value

    def normalise(self, mean: float) -> float:
        return (mean - self.low) / (self.high - self.low)


# Column keys are our report's; the source names are merge_result.py's. Ranges are its min_/max_ constants:
# aes 4..7 (clamped both ways), motion 0..1 (abs, upper), facesim_cur 0..1 (upper), gme 0..1 (upper),
# nexus 0..0.05 (upper, zeros dropped), natural 1..5 (clamped both ways). v1.1 keeps them and adds
# motion_smoothness 0..1 (abs, upper); its motion_amplitude is v1.0's motion.
RANGES: dict[str, Range] = {
    "aesthetics": Range(4.0, 7.0, clip_low=True),
    "motion": Range(0.0, 1.0, absolute=True),
    "motion_smoothness": Range(0.0, 1.0, absolute=True),
    "facesim_cur": Range(0.0, 1.0),
    "gmescore": Range(0.0, 1.0),
    "nexusscore": Range(0.0, 0.05, drop_zero=True),
    "naturalscore": Range(1.0, 5.0, clip_low=True),
}

DOMAINS = ("Open-Domain", "Human-Domain", "Single-Domain")
VERSIONS = ("v1.0", "v1.1")

# merge_result.py's totals. Every domain but Human-Domain uses the first row (its test is
# `eval_type != "Human-Domain"`); Human-Domain has no NexusScore. The v1.0 rows reproduce the published
# leaderboard's TotalScore from its columns (tests/test_eval_opens2v.py checks rows of each table).
WEIGHTS: dict[str, dict[str, dict[str, float]]] = {
    "v1.0": {
        "default": {"aesthetics": 0.12, "motion": 0.12, "facesim_cur": 0.20, "gmescore": 0.12, "nexusscore": 0.20,
                    "naturalscore": 0.24},
        "Human-Domain": {"aesthetics": 0.15, "motion": 0.15, "facesim_cur": 0.25, "gmescore": 0.15,
                         "naturalscore": 0.30},
    },
    "v1.1": {
        "default": {"aesthetics": 0.16, "motion_smoothness": 0.06, "motion": 0.02, "facesim_cur": 0.20,
                    "gmescore": 0.12, "nexusscore": 0.20, "naturalscore": 0.24},
        "Human-Domain": {"aesthetics": 0.18, "motion_smoothness": 0.09, "motion": 0.03, "facesim_cur": 0.25,
                         "gmescore": 0.15, "naturalscore": 0.30},
    },
}


def domain_weights(domain: str, version: str = "v1.0") -> dict[str, float]:
    """The weights of `domain`'s total (ValueError for an unknown domain or version)."""
    if version not in WEIGHTS:
        raise ValueError(f"unknown OpenS2V-Eval version {version!r}; known: {', '.join(VERSIONS)}")
    if domain not in DOMAINS and domain != "Single-Object":
        raise ValueError(f"unknown OpenS2V-Eval domain {domain!r}; known: {', '.join(DOMAINS)}")
    table = WEIGHTS[version]
    return dict(table["Human-Domain"] if domain == "Human-Domain" else table["default"])


def normalised_columns(values: Mapping[str, Sequence[float | None]]) -> dict[str, float | None]:
    """Per-video raw scores -> the leaderboard's column values in [0, 1] (displayed x 100 as %).

    Per column: each video's value is clipped by `RANGES` (None, NaN and, for NexusScore, 0 are left
    out), the clipped values are averaged, and the mean is min-max normalised. A column with no
    value gives None (the benchmark would use 0 there and normalise that; we report it as missing).

    Args:
        values: column key -> one value (or None) per video.
    """
    out: dict[str, float | None] = {}
    for key, column in values.items():
        rng = RANGES.get(key)
        if rng is None:
            raise ValueError(f"no OpenS2V range for column {key!r}; known: {', '.join(RANGES)}")
        kept = [rng.clip(float(v)) for v in column
                if v is not None and not math.isnan(float(v)) and not (rng.drop_zero and float(v) == 0)]
        out[key] = rng.normalise(sum(kept) / len(kept)) if kept else None
    return out


def domain_totals(columns: Mapping[str, float | None], domain: str,
                  version: str = "v1.0") -> tuple[float | None, list[str]]:
    """The leaderboard's TotalScore of `domain` from normalised columns (`normalised_columns`).

    Returns (total, missing): total = sum_k w_k n_k over the domain's weights (they sum to 1); when a
    weighted column is missing the total is None and `missing` names those columns (a partial sum
    would not be comparable with the leaderboard).
    """
    weights = domain_weights(domain, version)
    missing = [k for k in weights if columns.get(k) is None]
    if missing:
        return None, missing
    return sum(w * float(columns[k]) for k, w in weights.items()), []


# ----------------------------------------------------------------------------------------------------
# The protocol's report
# ----------------------------------------------------------------------------------------------------

# Report column key -> the benchmark script (and model) that computes it. Columns whose model is not
# built are skipped with the reason `idcrafter.eval.protocols.build_scorers` gives.
COLUMN_SOURCES = {
    "aesthetics": "get_aesscore.py (CLIP ViT-L/14 + the LAION aesthetic MLP head)",
    "motion": "get_motionscore.py (OpenCV Farneback)",
    "motion_smoothness": "get_motion_smoothness.py (v1.1: Q-Align window scores; a local Qwen2.5-VL substitutes it)",
    "facesim_cur": "get_facesim.py (insightface detection and alignment + CurricularFace)",
    "gmescore": "get_gmescore.py (GME-Qwen2-VL)",
    "nexusscore": "get_nexusscore.py (YOLO-World detection + GME retrieval)",
    "naturalscore": "get_naturalscore.py (a VLM rating 1-5, three repeats)",
}
PROTOCOL_COLUMNS = tuple(COLUMN_SOURCES)
# Columns the benchmark reports beside the leaderboard's (no range, no weight): shown, not normalised.
# FaceSim-Arc: get_facesim.py's second score (the leaderboard's FaceSim is Cur).
# nexusscore_idcrafter: ID-Crafter's NexusScore (App. C, `--nexus idcrafter`), a mean CLIP cosine; the
# leaderboard's [0, 0.05] range belongs to the benchmark's recipe, so it is reported beside, never normalised.
REPORTED_COLUMNS: tuple[str, ...] = ("facesim_arc", "nexusscore_idcrafter")


def evaluate_opens2v(items, scorers=None, examples: int = 8, example_frames: int = 4, progress: bool = True,
                     version: str = "v1.0", skipped: Mapping[str, str] | None = None):
    """Score generated files with the OpenS2V-Eval protocol -> `idcrafter.eval.metrics.Report`.

    Per sample: Motion (`farneback_motion`, None for a still image) and the columns of every scorer
    given (`idcrafter.eval.protocols`: scorer(item, frames) -> {column: value}). Columns without a
    scorer are listed in `report.skipped` with the reason from `skipped` (else the benchmark script
    and model they need). `report.extra["opens2v"]` holds the leaderboard's normalised columns and,
    per domain, the TotalScore or the columns it lacks. The legacy weighted total is not computed
    (`report.weights` is empty): the leaderboard's total replaces it.

    Args:
        items: `idcrafter.eval.metrics.EvalItem`s (frames decoded from their files).
        scorers: option name -> scorer (`idcrafter.eval.protocols.build_scorers`).
        skipped: column key -> reason, for the model columns whose model could not be built.
    """
    from idcrafter.eval.metrics import TOTAL, Report
    from idcrafter.eval.protocols import score_items

    everything = (*PROTOCOL_COLUMNS, *REPORTED_COLUMNS)
    values, kinds, kept = score_items(items, scorers or {}, everything, per_frames={"motion": farneback_motion},
                                      examples=examples, example_frames=example_frames, progress=progress,
                                      desc="opens2v")
    given = dict(skipped or {})
    skipped = {}
    for key in everything:
        if all(v is None for v in values[key]):
            values.pop(key)
            if key == "motion":
                skipped[key] = "every sample is a still image (Motion needs 2 or more frames)"
            elif key == "nexusscore_idcrafter":
                continue  # only with --nexus idcrafter; NexusScore's own entry says why neither was computed
            else:
                skipped[key] = given.get(key, f"needs the benchmark's model: {COLUMN_SOURCES.get(key, key)}; "
                                              "no value for any sample")
    if "nexusscore_idcrafter" in values:
        skipped["nexusscore"] = ("--nexus idcrafter computes ID-Crafter's variant (column nexusscore_idcrafter, a CLIP "
                                 "cosine), which is not on the leaderboard's NexusScore scale")
    normalised = normalised_columns({k: values.get(k, []) for k in PROTOCOL_COLUMNS})
    totals = {}
    for domain in DOMAINS:
        total, missing = domain_totals(normalised, domain, version)
        totals[domain] = {"total": total, "missing": missing}
    open_missing = totals["Open-Domain"]["missing"]
    if open_missing:
        skipped[TOTAL] = f"the OpenS2V TotalScore needs every weighted column; missing: {', '.join(open_missing)}"
    columns = [k for k in everything if k in values]
    report = Report(ids=[item.id for item in items], columns=columns, values=values, weights={},
                    skipped=skipped, kinds=kinds, examples=kept)
    report.extra["opens2v"] = {
        "version": version,
        "normalised": normalised,
        "totals": totals,
        "ranges": {k: [r.low, r.high] for k, r in RANGES.items()},
        "weights": {d: domain_weights(d, version) for d in DOMAINS},
        "sources": COLUMN_SOURCES,
    }
    return report


# ----------------------------------------------------------------------------------------------------
# Aesthetics (get_aesscore.py)
# ----------------------------------------------------------------------------------------------------

AES_FRAMES = 32  # get_aesscore.py --num_frames default


def sample_indices(total: int, count: int | None) -> np.ndarray:
    """The benchmark's frame sampling: `count` indices evenly spaced over [0, total - 1], truncated to
    int (np.linspace(..., dtype=int)); repeats when count > total; every frame when count is None."""
    if count is None:
        return np.arange(total)
    return np.linspace(0, total - 1, count, dtype=int)


def aesthetic_head(in_features: int = 768):
    """The LAION aesthetic predictor's MLP as get_aesscore.py builds it (module names and order match
    its state dict: layers.0, .2, .4, .6, .7): in_features -> 1024 -> 128 -> 64 -> 16 -> 1, dropouts
    between (inactive in eval). `in_features` is the CLIP projection size (768 for ViT-L/14)."""
    from torch import nn

    return nn.Sequential(nn.Linear(in_features, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


class AestheticScorer:
    """OpenS2V-Eval's Aesthetics: for 32 evenly spaced frames, CLIP's projected image embedding
    (CLIPVisionModelWithProjection, its own image processor: resize shortest side, centre crop,
    normalise), L2-normalised, through the LAION aesthetic MLP; the video's score is the mean over the
    frames (about 1-10; the leaderboard maps [4, 7] to [0, 1]).

    Args:
        clip_path: a transformers CLIP folder (the benchmark: openai/clip-vit-large-patch14).
        head_path: the MLP's state dict saved with torch.save (the benchmark: aesthetic-model.pth), keys
            `layers.{0,2,4,6,7}.{weight,bias}` or the same prefixed by `layers.` as the benchmark saves it.
    """

    def __init__(self, clip_path, head_path, device: str = "cpu", frames: int = AES_FRAMES):
        import torch
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        self.clip = CLIPVisionModelWithProjection.from_pretrained(str(clip_path)).to(device).eval()
        self.processor = CLIPImageProcessor.from_pretrained(str(clip_path))
        state = torch.load(str(head_path), map_location="cpu", weights_only=True)
        # The benchmark's MLP holds the Sequential as `.layers`: its state dict keys start with "layers.".
        state = {k.removeprefix("layers."): v for k, v in state.items()}
        self.head = aesthetic_head(self.clip.config.projection_dim)
        self.head.load_state_dict(state)
        self.head.to(device).eval()
        self.device = device
        self.frames = frames

    def frame_scores(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [F, H, W, 3] -> float [F] scores of the frames as given."""
        import torch
        from PIL import Image

        images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
        with torch.no_grad():
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
            embed = self.clip(pixel_values=pixels).image_embeds
            embed = embed / torch.linalg.vector_norm(embed, dim=-1, keepdim=True)
            return self.head(embed).squeeze(1).float().cpu().numpy()

    def __call__(self, frames: np.ndarray) -> float:
        """uint8 [F, H, W, 3] (every decoded frame) -> the mean score of the benchmark's sampled frames."""
        frames = np.asarray(frames)
        return float(self.frame_scores(frames[sample_indices(len(frames), self.frames)]).mean())


def build_aesthetics(options: Mapping[str, object], device: str = "cpu"):
    """The Aesthetics column model (`idcrafter.eval.protocols`): options clip=DIR, head=FILE."""
    scorer = AestheticScorer(options["clip"], options["head"], device=device)
    return lambda item, frames: {"aesthetics": scorer(frames)}


# ----------------------------------------------------------------------------------------------------
# NaturalScore (get_naturalscore.py): the prompt, the frames shown, the reply's parsing, the averaging
# ----------------------------------------------------------------------------------------------------

NATURAL_FRAMES = 16
NATURAL_LONG_SIDE = 512
NATURAL_REPEATS = 3  # naturalscore_1..3.json, averaged by merge_result.py
# The benchmark's rating prompt, verbatim (get_naturalscore.py, Apache-2.0): the rating depends on its wording
# (\x20: the benchmark's trailing space, kept).
NATURAL_PROMPT = """
Your task is to determine how realistic the given video clip appears, based on 16 extracted frames. Consider the following aspects in your evaluation:

- **Common sense consistency**: Are the objects, people, and interactions logically coherent in the context of the video?
- **Physical plausibility**: Do lighting, shadows, motion, and reflections obey the laws of physics? Are the objects in motion consistent with real-world physics?
- **Naturalness**: Does the visual quality (textures, details, proportions, etc.) resemble what we would expect in real life? Is there any unnatural visual distortion?
- **AI generation artifacts**: Are there signs of unnatural blurring, morphing, glitches, distortions, or inconsistencies across frames?\x20

**If the video contains humans**, pay special attention to:
- Are the facial features realistic and anatomically correct (e.g., eyes, mouth, and nose proportions)?
- Do the body parts appear proportionate and natural in motion (e.g., arm and leg movements, hand gestures)?

If **no humans** are present in the video, you can focus on evaluating the realism of other visual aspects like object consistency, motion fluidity, and environmental plausibility without needing to specifically assess human-related elements.

Output a score from 1 to 5 based on the criteria below, followed by an explanation of the reasoning behind your score:

- **1 — Definitely AI-Generated**: Clear and frequent artifacts (e.g., blurry faces or objects, unnatural movements, inconsistent lighting), distorted shapes, implausible physics (e.g., impossible movements, lighting issues), and severe inconsistencies. Violates common sense or real-world logic. Faces and bodies may be unrealistic or distorted if humans are present.
- **2 — Likely AI-Generated**: Noticeable AI generation cues such as inconsistent anatomy, fluctuating object textures, or mild physical implausibility (e.g., unnatural hand positions or eye movements). Faces and bodies may appear unnatural or inconsistent if humans are present. Still clearly synthetic upon inspection.
- **3 — Uncertain / Borderline**: Mixed indicators — the video may appear mostly natural but contains subtle flaws or small anomalies that raise suspicion. Faces and bodies might show mild inconsistencies (e.g., slight distortion in facial features or body parts) if humans are present. Hard to determine definitively.
- **4 — Likely Real**: Mostly natural and physically plausible, with only minor and rare irregularities that might be explainable (e.g., slight compression, mild lighting inconsistencies). Faces and body parts are mostly natural, with only minor imperfections, if humans are present.
- **5 — Definitely Real**: Fully consistent with real-world physics, common sense, and appearance. No visible artifacts or signs of AI generation. Faces and body parts appear fully realistic, without any visible distortions or unnatural movements, if humans are present.

Please only return the score (1-5), no additional explanation.
"""  # noqa: E501


def natural_frame_indices(total: int, count: int = NATURAL_FRAMES) -> list[int]:
    """The frames the rater sees: i * max(total // count, 1) for i < count, keeping those inside the
    video (the benchmark seeks to each and drops failed reads), so a clip under 16 frames shows all."""
    step = max(total // count, 1)
    return [i * step for i in range(count) if i * step < total]


def natural_frame_size(height: int, width: int, long_side: int = NATURAL_LONG_SIDE) -> tuple[int, int]:
    """(height, width) of a frame resized so its long side is `long_side` (the other truncated to int,
    as the benchmark does before INTER_AREA resizing and JPEG encoding)."""
    if height >= width:
        return long_side, int(width * long_side / height)
    return int(height * long_side / width), long_side


def parse_natural_score(reply: str | float | int | None) -> float | None:
    """A rater's reply -> its 1-5 score, or None when it holds none.

    The benchmark stores the stripped reply and its merge takes float() of it (a reply that is not a
    bare number stops it). Here a bare number is read the same way; otherwise the first standalone
    digit 1-5 of the reply is taken (VLMs often add words despite the prompt); otherwise None.
    Values are not clipped here: `normalised_columns` clips to [1, 5] as the merge does.
    """
    import re

    if reply is None:
        return None
    if isinstance(reply, (int, float)):
        return float(reply)
    text = reply.strip()
    try:
        value = float(text)
    except ValueError:
        match = re.search(r"(?<![\d.])([1-5])(?!\d|\.\d)", text)
        return float(match.group(1)) if match else None
    return value if math.isfinite(value) else None


def natural_score(replies: Sequence[str | float | None]) -> float | None:
    """One video's NaturalScore: the mean of its parsed repeats (None ones left out; None if none)."""
    values = [v for v in (parse_natural_score(r) for r in replies) if v is not None]
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------------------------------
# FaceSim (get_facesim.py): which videos, which reference, which face, how frame scores are averaged
# ----------------------------------------------------------------------------------------------------

FACESIM_FRAMES = 32
FACESIM_ID_KEYS = ("singlehuman", "singleface", "faceobj", "humanobj")  # ids the benchmark scores
FACESIM_REFERENCE_DIRS = ("/man/", "/woman/", "/crop_woman/", "/crop_man/")
FACESIM_PAD_SCALE = 1.25  # a reference with no detected face is retried on a grey-padded copy
FACESIM_PAD_GREY = 128


def facesim_applies(sample_id: str) -> bool:
    """Whether the benchmark computes FaceSim for a sample id (a substring test on the file name)."""
    return any(key in sample_id for key in FACESIM_ID_KEYS)


def facesim_reference(img_paths: Sequence[str]) -> str | None:
    """The face reference of a case: the first of its `img_paths` under a man / woman / crop_man /
    crop_woman folder (the benchmark's choice); None when there is none (the case is not scored)."""
    for path in img_paths:
        if any(part in path for part in FACESIM_REFERENCE_DIRS):
            return path
    return None


def largest_face(boxes: Sequence[Sequence[float]]) -> int | None:
    """Index of the face the benchmark keeps among detections [x0, y0, x1, y1]: the largest box area
    (a stable sort's last: of equal areas, the later detection); None without detections."""
    if len(boxes) == 0:
        return None
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
    return sorted(range(len(boxes)), key=lambda i: areas[i])[-1]


def facesim_padding(height: int, width: int, scale: float = FACESIM_PAD_SCALE) -> tuple[int, int]:
    """(top/bottom, left/right) border of the retry copy: int(side * (scale - 1)) on each side."""
    return int(height * (scale - 1.0)), int(width * (scale - 1.0))


def facesim_video_scores(cur: Sequence[float], arc: Sequence[float]) -> tuple[float, float]:
    """A video's (FaceSim-Cur, FaceSim-Arc) from the cosine similarities of its frames with a detected
    face, each clipped at 0. Cur averages the frames with a positive score (zeros are dropped);
    Arc averages all of them: the benchmark's drop test for Arc compares the list, not the score, to 0,
    so it never drops. No frame: 0.0."""
    cur_kept = [max(0.0, float(c)) for c in cur if max(0.0, float(c)) != 0.0]
    arc_kept = [max(0.0, float(a)) for a in arc]
    return (float(np.mean(cur_kept)) if cur_kept else 0.0, float(np.mean(arc_kept)) if arc_kept else 0.0)


def curricular_input(face_rgb: np.ndarray):
    """An aligned 224 x 224 RGB face (uint8 [224, 224, 3]) -> CurricularFace's input float [1, 3, 112, 112]:
    cv2.resize to 112 (bilinear), scaled to [-1, 1] as the benchmark does."""
    import torch

    small = _cv2().resize(np.ascontiguousarray(face_rgb), (112, 112))
    x = torch.from_numpy(np.transpose(small, (2, 0, 1))).unsqueeze(0).float()
    return x.div(255).sub(0.5).div(0.5)
