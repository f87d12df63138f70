"""Curation presets and the settings a run resolves from them (docs/design.md 8.1).

A preset is a plain dict: the sample `kind` ("video" or "image"), the `categories` to find
({manifest category: the words the detector is prompted with}), the model `backends`
({kind: {"name": registered name, **options such as model: a local folder}}), the ordered
`stages` ([{"name", "options"}]) and the `write` options. A settings file (YAML or JSON) is merged
over it:

    stages:                    # a mapping edits the preset's stages by name ...
      blur: {min_variance: 50}  #   options merged into that stage's
      aesthetic: {model: /models/clip-aesthetic}   # a stage the preset lacks is added before `detect`
      motion: null             #   null removes the stage
    # stages: [probe, shots, {name: blur, min_variance: 50}]   # ... a list sets which run, in order
    #                                                          (each keeps its preset options)
    backends: {detector: {model: /models/grounding-dino-base}}
    categories: {person: a person, dog: a dog}

Anything else (a key the preset does not have, a stage name not registered) is a ValueError
naming it. The resolved settings are saved as `settings.json` in the output folder.

Each number below names its paper passage; where the papers give none, the comment says it is
this project's choice. At run time the runner passes `categories` and the built backends to
every stage whose constructor takes them (`categories`, `detector`, `segmenter`, `verifier`,
`captioner`, `kind`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from idcrafter.curate.core import BACKENDS, STAGES

__all__ = ["BACKEND_SETTINGS", "PRESETS", "load_settings_file", "merge_settings", "resolve_settings", "save_settings"]

_MODELS = {  # the model backends and the local folders a GPU run names (README "Curating data")
    "detector": {"name": "grounding-dino", "model": None},  # IDEA-Research/grounding-dino-base
    "segmenter": {"name": "sam", "model": None, "video_model": None},  # facebook/sam-vit-huge; SAM 2: facebook/sam2.1-hiera-large
    # MultiCrafter App. C: face detection + recognition; dlib's weights ship with its pip package (insightface
    # needs a model pack folder: {backend: insightface, root: DIR, model_name: antelopev2})
    "verifier": {"name": "face", "backend": "dlib"},
    "captioner": {"name": "qwen2.5-vl", "model": None},  # Qwen/Qwen2.5-VL-7B-Instruct (ID-Crafter Sec. 4.1)
}


def _stage(name: str, **options) -> dict[str, Any]:
    return {"name": name, "options": options}


PRESETS: dict[str, dict[str, Any]] = {
    # ID-Crafter (Sec. 3.4, App. B.1): multi-subject video clips cut at shot boundaries, per-subject
    # masks over the clip, references from frames outside the sampled clip, a VLM caption.
    "idcrafter-video": {
        "kind": "video",
        "categories": {"person": "a person", "dog": "a dog", "cat": "a cat"},
        "backends": copy.deepcopy(_MODELS) | {"verifier": {"name": "dinov2", "model": None}},
        "stages": [
            # 480p: ID-Crafter Sec. 4.1 generates at 480p; 300 s: project choice (frames are held in memory)
            _stage("probe", min_frames=81, min_side=256, max_seconds=300.0, short_side=480),
            # 81 frames at 16 fps: Wan 2.1's clip (docs/design.md 4); shot detection: ID-Crafter App. B.1;
            # threshold 27 / 15 frames: PySceneDetect's content-detector defaults
            _stage("shots", mode="video", threshold=27.0, min_shot_frames=15, num_frames=81, target_fps=16.0,
                   max_clips=2, context_frames=4),
            _stage("blur", min_variance=100.0),  # project choice (the usual sharp-photo rule of thumb)
            _stage("motion", min_motion=0.002, max_motion=0.08),  # project choice: ~1 and ~40 px/frame at 480p
            # at most 3 subjects: the model's subject embeddings (docs/design.md 4, max_subjects = 3)
            _stage("detect", min_subjects=1, max_subjects=3),
            _stage("segment"),  # SAM, largest connected component (MultiCrafter App. C)
            # ID-Crafter: a frame outside the sampled clip; references run before verify, which then
            # checks each reference against the subject in the clip
            _stage("references", rule="outside-clip", face_backend="dlib"),
            # people by their faces, every other subject by DINOv2 (the verifier backend); thresholds:
            # each verifier's own (dlib 0.93, DINOv2 0.5: project choices)
            _stage("verify", verifiers={"person": "face"}, options={"face": {"backend": "dlib"}}),
            _stage("caption"),  # Qwen2.5-VL (ID-Crafter Sec. 3.4 / 4.1)
        ],
        "write": {"masks": "mp4"},
    },
    # MultiCrafter App. C: clips with two people; references (segmented portraits and face crops)
    # from the initial frame, the target from the middle frame, body and face masks, face
    # verification with a stringent cosine threshold, a Qwen2.5-VL prompt.
    "multicrafter-image": {
        "kind": "image",
        "categories": {"person": "a person"},
        "backends": copy.deepcopy(_MODELS),
        "stages": [
            _stage("probe", min_frames=2, min_side=512, max_seconds=300.0, short_side=1024),  # project choice
            _stage("shots", mode="image", threshold=27.0, min_shot_frames=15, min_shot_seconds=1.0),
            _stage("blur", min_variance=100.0),  # App. D: open-source video frames "with motion blur"
            # "two or more people" (MultiCrafter Sec. 1 / App. C: samples featuring two individuals; App. I: three)
            _stage("detect", min_subjects=2, max_subjects=3),
            _stage("keypoints"),  # App. C: YOLO-Pose boxes and keypoints; here ViTPose
            _stage("segment"),  # App. C: SAM, "only the largest connected component of the mask is retained"
            # App. C: initial frame -> references (segmented portraits and cropped faces), middle -> target
            _stage("references", rule="first-frame", face_backend="dlib", require_face=True),
            # App. C: face embeddings of the reference and target frames, "a stringent threshold" on
            # their cosine: the face verifier's own (dlib 0.93, insightface 0.4)
            _stage("verify"),
            _stage("caption"),  # App. C: Qwen2.5-VL prompted with the references and the target
        ],
        "write": {"masks": "png", "face_masks": True},  # App. C: "body and face masks preserved"
    },
    # One-for-All App. H: single-subject pairs of four categories (face, upper garment, lower
    # garment, bag), the pair verified to show the same subject, cropped and segmented; "item
    # prompt" (descriptor) and "full prompt" captions.
    "one-for-all": {
        "kind": "image",
        "categories": {"face": "a face", "upper": "an upper garment", "lower": "a lower garment", "bag": "a bag"},
        "backends": copy.deepcopy(_MODELS) | {"verifier": {"name": "dinov2", "model": None}},
        "stages": [
            _stage("probe", min_frames=2, min_side=512, max_seconds=300.0, short_side=768),  # Sec. 4.1: refs 768x576
            _stage("shots", mode="image", threshold=27.0, min_shot_frames=15, min_shot_seconds=1.0),
            _stage("blur", min_variance=100.0),  # project choice
            # App. H: single-subject pairs: each category found once in a frame becomes its own candidate
            _stage("detect", min_subjects=1, single_subject=True),
            _stage("segment"),  # App. H: "cropping and segmentation"
            _stage("references", rule="first-frame", face_backend="dlib"),  # another frame than the target
            # App. H: a VLM verifies the pair shows the same subject; here faces by face embeddings,
            # garments and bags by DINOv2 (the verifier backend)
            _stage("verify", verifiers={"face": "face"}, options={"face": {"backend": "dlib"}}),
            _stage("caption", descriptors=True),  # App. H: "item prompt" per subject + "full prompt"
        ],
        "write": {"masks": "png"},
    },
}

# `--backend toyworld`: the toy world's sprite detector, segmenter, ToyID verifier and prompt
# language, and the numbers of its clips (docs/design.md 9: 64 px, 9 frames at 8 fps). Its clips
# pass the preset's blur threshold (Laplacian variance 300-1700 after H.264, 20 clips); its motions
# are 0.02-0.05 of the frame a frame and "still", which is exactly 0 and is dropped as static.
BACKEND_SETTINGS: dict[str, dict[str, Any]] = {
    "toyworld": {
        "categories": {"toy": "toy"},
        "backends": {kind: {"name": "toyworld"} for kind in BACKENDS},
        "stages": {
            "probe": {"min_frames": 9, "min_side": 32, "short_side": None},
            "shots": {"num_frames": 9, "target_fps": 8.0, "min_shot_frames": 4},
            "motion": {"min_motion": 0.0005, "max_motion": 0.25},
            "keypoints": None,
            "verify": {"verifiers": None, "options": None},  # ToyID for every subject
        },
    },
}


def _stage_entry(item: Any) -> dict[str, Any]:
    """A stage as a settings list gives it ("name", {"name", **options} or {"name", "options"})."""
    if isinstance(item, str):
        return {"name": item, "options": {}}
    if isinstance(item, dict) and isinstance(item.get("name"), str):
        options = item.get("options", {k: v for k, v in item.items() if k != "name"})
        if not isinstance(options, dict):
            raise ValueError(f"stage {item['name']}: options must be a mapping")
        return {"name": item["name"], "options": dict(options)}
    raise ValueError(f"a stage must be a name or a mapping with a 'name', got {item!r}")


def _merge_stages(stages: list[dict[str, Any]], edits: Any, add: bool = True) -> list[dict[str, Any]]:
    if isinstance(edits, list):  # these stages in this order, each keeping the options it had
        had = {s["name"]: s["options"] for s in stages}
        entries = [_stage_entry(item) for item in edits]
        return [{"name": e["name"], "options": {**copy.deepcopy(had.get(e["name"], {})), **e["options"]}} for e in entries]
    if not isinstance(edits, dict):
        raise ValueError(f"stages must be a list or a mapping of stage names, got {type(edits).__name__}")
    stages = copy.deepcopy(stages)
    for name, options in edits.items():
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r} in stages; known: {', '.join(STAGES)}")
        at = next((i for i, s in enumerate(stages) if s["name"] == name), None)
        if options is None or options is False:
            if at is not None:
                stages.pop(at)
            continue
        if not isinstance(options, dict):
            raise ValueError(f"stages.{name} must be a mapping of options or null, got {options!r}")
        if at is None and not add:  # an overlay (the backend's settings) only edits the stages there are
            continue
        if at is None:  # a stage the preset lacks goes in its registry position
            order = list(STAGES)
            at = next((i for i, s in enumerate(stages) if order.index(s["name"]) > order.index(name)), len(stages))
            stages.insert(at, {"name": name, "options": {}})
        stages[at]["options"].update(options)
    return stages


def merge_settings(base: dict[str, Any], over: dict[str, Any], where: str = "settings", add_stages: bool = True) -> dict[str, Any]:
    """`over` (a settings file's mapping) merged over `base` (a preset); see the module docstring.
    `add_stages` False: a stage mapping only edits the stages `base` has (a backend's settings)."""
    merged = copy.deepcopy(base)
    for key, value in over.items():
        if key not in base:
            raise ValueError(f"{where}: unknown key {key!r} (known: {', '.join(base)})")
        if key == "stages":
            merged["stages"] = _merge_stages(merged["stages"], value, add_stages)
        elif key == "backends":
            if not isinstance(value, dict):
                raise ValueError(f"{where}: backends must be a mapping of backend kinds")
            for kind, spec in value.items():
                if kind not in BACKENDS:
                    raise ValueError(f"{where}: unknown backend kind {kind!r} (known: {', '.join(BACKENDS)})")
                if not isinstance(spec, dict):
                    raise ValueError(f"{where}: backends.{kind} must be a mapping")
                if spec.get("name", merged["backends"].get(kind, {}).get("name")) != merged["backends"].get(kind, {}).get("name"):
                    merged["backends"][kind] = dict(spec)  # another backend: the old one's options do not apply
                else:
                    merged["backends"].setdefault(kind, {}).update(spec)
        elif key == "categories":
            if isinstance(value, list):
                value = {str(v): str(v) for v in value}
            if not isinstance(value, dict) or not value:
                raise ValueError(f"{where}: categories must be a non-empty list or mapping of category to words")
            merged["categories"] = {str(k): str(v) for k, v in value.items()}
        elif isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"{where}: {key} must be a mapping")
            merged[key].update(value)
        else:
            merged[key] = value
    return merged


def resolve_settings(preset: str, backend: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings of a run: the preset, then the backend's settings (`--backend toyworld`), then
    the settings file's `overrides`; ValueError for an unknown preset or backend, or a bad key."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    settings = copy.deepcopy(PRESETS[preset])
    if backend is not None:
        if backend not in BACKEND_SETTINGS:
            raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKEND_SETTINGS)}")
        settings = merge_settings(settings, BACKEND_SETTINGS[backend], f"backend {backend}", add_stages=False)
    if overrides:
        settings = merge_settings(settings, overrides)
    settings["preset"], settings["backend"] = preset, backend
    return settings


def load_settings_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON file's mapping; ValueError naming the file when it is not one."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))  # JSON is YAML too
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"settings file {path}: not readable YAML or JSON ({reason})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"settings file {path}: must hold a mapping, not {type(data).__name__}")
    return data


def save_settings(settings: dict[str, Any], folder: str | Path) -> Path:
    """Write the resolved settings as `folder/settings.json` (atomically), for the record and for
    rerunning with `--settings folder/settings.json`."""
    from idcrafter.utils.io import atomic_write

    path = Path(folder) / "settings.json"
    keep = {k: v for k, v in settings.items() if k not in ("preset", "backend")}
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(keep, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path
