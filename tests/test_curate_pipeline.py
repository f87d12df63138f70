"""Curation stages, presets, writer, runner and command line (docs/design.md 8.1) on synthetic
videos: a textured square over flat backgrounds with hard cuts (tests/curate_data.py)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from curate_data import Annotate, shot_frames, write_raw

from idcrafter.curate import core
from idcrafter.curate.core import Candidate, Funnel, SubjectTrack, run_stages
from idcrafter.curate.filters import BlurFilter, MotionFilter, flow_magnitude, laplacian_variance
from idcrafter.curate.presets import PRESETS, merge_settings, resolve_settings, save_settings
from idcrafter.curate.probe import ProbeStage, input_key
from idcrafter.curate.runner import (
    Curator,
    build_stages,
    list_inputs,
    parse_shard,
    shard_from_env,
    shard_inputs,
)
from idcrafter.curate.shots import ShotStage, clip_windows, context_indices, detect_shots
from idcrafter.curate.write import SampleError, face_box, face_mask, write_sample, write_samples
from idcrafter.data.manifest import load_manifest

ANNOTATE = f"{Annotate.__module__}:Annotate"
TOY_STAGES = [
    {"name": "probe", "min_frames": 9, "min_side": 32},
    {"name": "shots", "num_frames": 9, "target_fps": 8.0, "min_shot_frames": 4, "max_clips": 1, "context_frames": 2},
    {"name": "blur", "min_variance": 100.0},
    {"name": "motion"},
    {"name": "annotate"},
]


@pytest.fixture
def annotate_registered(monkeypatch):
    monkeypatch.setitem(core.STAGES, "annotate", ANNOTATE)


def toy_settings(kind: str = "video") -> dict:
    preset = "idcrafter-video" if kind == "video" else "multicrafter-image"
    stages = [dict(s) for s in TOY_STAGES]
    if kind == "image":
        stages[1] = {"name": "shots", "mode": "image", "min_shot_frames": 4}
        stages[3] = {"name": "annotate"}
        stages.pop()
    return resolve_settings(preset, "toyworld", {"stages": stages})


# ------------------------------------------------------------------------------------------ stages


def test_shots_are_found_at_the_hard_cuts_and_clips_stay_inside_them():
    frames = shot_frames(num_frames=72, shot=24)
    assert detect_shots(frames, 8.0, min_shot_frames=4) == [(0, 24), (24, 48), (48, 72)]
    # 9 frames at 8 fps from an 8 fps shot of 24 frames: two clips back to back, a third does not fit
    assert clip_windows(0, 24, 8.0, 8.0, 9, max_clips=3) == [list(range(0, 9)), list(range(9, 18))]
    # 30 fps -> 16 fps (idcrafter.data.video.sample_frame_indices), offset to the shot's start
    assert clip_windows(100, 130, 30.0, 16.0, 9, 1) == [[100, 102, 104, 106, 108, 109, 111, 113, 115]]
    assert clip_windows(0, 8, 8.0, 8.0, 9, 1) == []
    # context: frames of the shot outside the clip's span, spread evenly
    assert context_indices(0, 24, list(range(9)), 3) == [9, 16, 23]
    assert context_indices(0, 9, list(range(9)), 3) == []


def test_shot_stage_video_and_image_candidates():
    frames = shot_frames(num_frames=48, shot=24)
    video = Candidate(source="v.mp4", key="v", fps=8.0, frames=frames, frame_indices=np.arange(48))
    clips = ShotStage(num_frames=9, target_fps=8.0, min_shot_frames=4, max_clips=2, context_frames=2).process([video])
    assert [c.key for c in clips] == ["v-s000-c00", "v-s000-c01", "v-s001-c00", "v-s001-c01"]
    assert list(clips[2].frame_indices) == list(range(24, 33)) and sorted(clips[2].context) == [33, 47]
    np.testing.assert_array_equal(clips[2].frames, frames[24:33])
    np.testing.assert_array_equal(clips[2].context[47], frames[47])
    assert video.frames is None  # the decoded video is released once split

    video = Candidate(source="v.mp4", key="v", fps=8.0, frames=frames, frame_indices=np.arange(48))
    images = ShotStage(mode="image", min_shot_frames=4).process([video])
    # MultiCrafter App. C: the middle frame is the target, the first frame the reference source
    assert [(list(c.frame_indices), sorted(c.context)) for c in images] == [([11], [0]), ([35], [24])]
    np.testing.assert_array_equal(images[1].frames[0], frames[35])

    short = Candidate(source="s.mp4", key="s", fps=8.0, frames=frames[:6], frame_indices=np.arange(6))
    (dropped,) = ShotStage(num_frames=9, target_fps=8.0, min_shot_frames=4).process([short])
    assert dropped.reason == "no shot long enough"


def test_blur_filter_drops_a_blurred_clip():
    sharp = shot_frames(num_frames=9, shot=24)
    blurred = np.stack([cv2.GaussianBlur(f, (0, 0), 2.0) for f in sharp])
    assert laplacian_variance(sharp[0]) > 5000 and laplacian_variance(blurred[0]) < 10
    out = BlurFilter(min_variance=100.0).process([Candidate("a", "a", 8.0, frames=sharp), Candidate("b", "b", 8.0, frames=blurred)])
    assert isinstance(out[0], Candidate) and out[0].info["sharpness"] > 5000
    assert out[1].reason == "blurry"


def test_motion_filter_measures_shifts_and_drops_static_and_chaotic_clips():
    rng = np.random.default_rng(0)
    texture = cv2.normalize(cv2.GaussianBlur((rng.random((96, 96, 3)) * 255).astype(np.uint8), (0, 0), 3), None, 0, 255,
                            cv2.NORM_MINMAX)
    window = lambda shift: texture[16:80, 16 - shift:80 - shift]  # noqa: E731
    # a whole-frame shift of s px is s / 64 of the short side
    assert flow_magnitude(window(0), window(2)) == pytest.approx(2 / 64, rel=0.05)
    assert flow_magnitude(window(0), window(4)) == pytest.approx(4 / 64, rel=0.05)
    static = np.stack([window(0)] * 9)
    calm = np.stack([window(i) for i in range(9)])
    wild = np.stack([window(12 * (i % 2)) for i in range(9)])
    out = MotionFilter(min_motion=0.002, max_motion=0.08).process(
        [Candidate(k, k, 8.0, frames=f) for k, f in (("static", static), ("calm", calm), ("wild", wild))])
    assert out[0].reason == "static" and out[2].reason == "chaotic motion"
    assert out[1].info["motion"] == pytest.approx(1 / 64, rel=0.1)
    # a one-frame (image) candidate has no motion to measure and passes
    assert isinstance(MotionFilter().process([Candidate("i", "i", 8.0, frames=static[:1])])[0], Candidate)


def test_probe_decodes_every_frame_with_an_even_size(tmp_path):
    frames = shot_frames(num_frames=20, size=64)
    path = write_raw(tmp_path / "a.mp4", frames)
    (c,) = ProbeStage(min_frames=9, short_side=32).process([Candidate(str(path), "a", 0.0)])
    assert c.frames.shape == (20, 32, 32, 3) and c.fps == pytest.approx(8.0)
    (c,) = ProbeStage(min_frames=9).process([Candidate(str(path), "a", 0.0)])
    assert np.abs(c.frames.astype(int) - frames).mean() < 4  # H.264 at crf 23
    assert ProbeStage(min_frames=21).process([Candidate(str(path), "a", 0.0)])[0].reason == "too short"
    assert ProbeStage(min_side=65).process([Candidate(str(path), "a", 0.0)])[0].reason == "too small"
    assert ProbeStage(max_seconds=2.0).process([Candidate(str(path), "a", 0.0)])[0].reason == "too long"


# ----------------------------------------------------------------------------------------- presets


def test_presets_merge_edit_add_remove_and_replace_stages():
    base = PRESETS["idcrafter-video"]
    names = [s["name"] for s in base["stages"]]
    assert names == ["probe", "shots", "blur", "motion", "detect", "segment", "references", "verify", "caption"]
    edited = merge_settings(base, {"stages": {"blur": {"min_variance": 50}, "motion": None, "aesthetic": {"model": "m"}}})
    assert [s["name"] for s in edited["stages"]] == ["probe", "shots", "blur", "aesthetic", "detect", "segment",
                                                     "references", "verify", "caption"]
    assert edited["stages"][2]["options"] == {"min_variance": 50}
    assert base["stages"][2]["options"] == {"min_variance": 100.0}  # the preset itself is untouched
    replaced = merge_settings(base, {"stages": ["probe", {"name": "shots", "num_frames": 17}]})
    # a list picks the stages and their order; each keeps the options it had, merged with the list's
    assert replaced["stages"] == [base["stages"][0], {"name": "shots", "options": {**base["stages"][1]["options"],
                                                                                  "num_frames": 17}}]
    switched = merge_settings(base, {"backends": {"detector": {"name": "toyworld"}}, "categories": ["dog"]})
    assert switched["backends"]["detector"] == {"name": "toyworld"} and switched["categories"] == {"dog": "dog"}
    with pytest.raises(ValueError, match="unknown key 'stagez'"):
        merge_settings(base, {"stagez": {}})
    with pytest.raises(ValueError, match="unknown stage 'blurr'"):
        merge_settings(base, {"stages": {"blurr": {}}})
    toy = resolve_settings("idcrafter-video", "toyworld")
    assert {spec["name"] for spec in toy["backends"].values()} == {"toyworld"}
    assert toy["stages"][1]["options"]["num_frames"] == 9 and toy["categories"] == {"toy": "toy"}
    assert "keypoints" not in [s["name"] for s in resolve_settings("multicrafter-image", "toyworld")["stages"]]
    # a backend's settings edit the preset's stages, never add one (One-for-All has no motion filter)
    assert "motion" not in [s["name"] for s in resolve_settings("one-for-all", "toyworld")["stages"]]
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_settings("idcrafter")


def test_build_stages_checks_options_and_injects_run_values(annotate_registered, monkeypatch):
    class Takes(core.Stage):
        name = "takes"

        def __init__(self, categories=None, kind=None):
            super().__init__()
            self.categories, self.kind = categories, kind

    monkeypatch.setattr(__import__(__name__), "Takes", Takes, raising=False)
    monkeypatch.setitem(core.STAGES, "takes", f"{__name__}:Takes")
    settings = resolve_settings("one-for-all", "toyworld", {"stages": ["probe", "takes"], "categories": {"bag": "a bag"}})
    probe, takes = build_stages(settings)
    assert isinstance(probe, ProbeStage) and takes.categories == {"bag": "a bag"} and takes.kind == "image"
    bad = resolve_settings("idcrafter-video", "toyworld", {"stages": [{"name": "blur", "min_varaince": 1}]})
    with pytest.raises(ValueError, match="stage blur has no option 'min_varaince'"):
        build_stages(bad)


# ------------------------------------------------------------------------------ inputs and shards


def test_inputs_from_folders_globs_and_list_files(tmp_path):
    for name in ("b.mp4", "a.mkv", "sub/c.mp4", "notes.txt"):
        (tmp_path / "raw" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "raw" / name).write_bytes(b"x")
    raw = tmp_path / "raw"
    assert list_inputs([raw]) == [str(raw / "a.mkv"), str(raw / "b.mp4"), str(raw / "sub/c.mp4")]
    assert list_inputs([str(raw / "*.mp4")]) == [str(raw / "b.mp4")]
    (tmp_path / "list.txt").write_text("# comment\nraw/b.mp4\n\nraw/sub/c.mp4\n")
    assert list_inputs([tmp_path / "list.txt", raw / "b.mp4"]) == [str(raw / "b.mp4"), str(raw / "sub/c.mp4")]
    with pytest.raises(ValueError, match="does not exist"):
        list_inputs([tmp_path / "nothing"])
    with pytest.raises(ValueError, match="matches no video"):
        list_inputs([str(raw / "*.avi")])


def test_shards_from_flag_launcher_and_slurm_partition_the_inputs():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "1", "a/b", "0/0"):
        with pytest.raises(ValueError):
            parse_shard(bad)
    assert shard_from_env({"RANK": "3", "WORLD_SIZE": "8"}) == (3, 8)
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "6"}) == (4, 6)
    assert shard_from_env({}) == (0, 1)
    inputs = [f"v{i}" for i in range(10)]
    shards = [shard_inputs(inputs, i, 3) for i in range(3)]
    assert sorted(sum(shards, [])) == sorted(inputs) and [len(s) for s in shards] == [4, 3, 3]


# ------------------------------------------------------------------------------------------ writer


def _annotated(kind: str) -> Candidate:
    frames = shot_frames(num_frames=24)
    c = Candidate("v.mp4", "v-s000-c00", 8.0, frames=frames[:9] if kind == "video" else frames[11:12],
                  context={20: frames[20]}, info={"target_fps": 8.0})
    (c,) = Annotate().process([c])
    return c


def test_write_sample_video_and_image_kinds_make_valid_manifest_lines(tmp_path):
    video = _annotated("video")
    line = write_sample(video, "video", tmp_path, masks="mp4")
    assert line["video"] == "videos/v-s000-c00.mp4" and line["fps"] == 8.0
    assert line["subjects"][0]["mask"] == "masks/v-s000-c00_0.mp4"
    assert line["subjects"][0]["bbox"] == [4.0, 12.0, 20.0, 28.0]  # the square in the clip's first frame
    from idcrafter.utils.media import read_video

    masks = read_video(tmp_path / line["subjects"][0]["mask"])[..., 0] > 127
    assert masks.shape == (9, 64, 64)
    assert (masks == video.subjects[0].masks).mean() > 0.99  # lossy H.264, thresholded back
    image = _annotated("image")
    iline = write_sample(image, "image", tmp_path / "img", masks="png")
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "img" / iline["subjects"][0]["mask"]))[..., 0] > 127,
                                  image.subjects[0].masks[0])  # PNG: exact
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "img" / iline["image"])), image.frames[0])
    for folder, rec in ((tmp_path, line), (tmp_path / "img", iline)):
        (folder / "m.jsonl").write_text(json.dumps(rec) + "\n")
        samples, errors = load_manifest(folder / "m.jsonl")
        assert len(samples) == 1 and errors == []
    # One-for-All: one line per subject, each a single-subject pair on the same target
    pair = _annotated("image")
    second = SubjectTrack("bag", pair.subjects[0].boxes.copy(), pair.subjects[0].scores, masks=~pair.subjects[0].masks,
                          reference=np.full((8, 8, 3), 255, np.uint8))
    pair.subjects.append(second)
    lines = write_samples(pair, "image", tmp_path / "ofa", masks="png", per_subject=True)
    assert [(r["id"], [s["category"] for s in r["subjects"]]) for r in lines] == [("v-s000-c00-0", ["toy"]),
                                                                               ("v-s000-c00-1", ["bag"])]
    assert lines[0]["image"] == lines[1]["image"] == "images/v-s000-c00.png"
    (tmp_path / "ofa" / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert [len(s.subjects) for s in load_manifest(tmp_path / "ofa" / "m.jsonl")[0]] == [1, 1]
    with pytest.raises(ValueError, match="write has no option 'mask'"):
        Curator(resolve_settings("one-for-all", "toyworld", {"stages": ["probe"], "write": {"mask": "png"}}))
    no_ref = _annotated("video")
    no_ref.subjects[0].reference = None
    with pytest.raises(SampleError, match="subject without reference"):
        write_sample(no_ref, "video", tmp_path)
    bad = _annotated("video")
    bad.subjects[0].descriptor = "a round thing"
    with pytest.raises(SampleError, match="descriptor not in prompt"):
        write_sample(bad, "video", tmp_path)
    empty = _annotated("video")
    empty.subjects = []
    with pytest.raises(SampleError, match="no subjects"):
        write_sample(empty, "video", tmp_path)


# ------------------------------------------------------------------------------------------ runner


def _raw_videos(folder: Path, count: int = 3) -> list[str]:
    return [str(write_raw(folder / f"clip{i}.mp4", shot_frames(num_frames=48, seed=i))) for i in range(count)]


def test_runner_writes_a_valid_manifest_and_report_and_resumes(tmp_path, annotate_registered):
    inputs = _raw_videos(tmp_path / "raw") + [str(tmp_path / "raw" / "empty.mp4")]
    Path(inputs[-1]).write_bytes(b"")
    curator = Curator(toy_settings("video"))
    summary = curator.run(inputs, tmp_path / "out", progress=False)
    # 3 videos x 2 shots x 1 clip; the empty file is dropped by the probe
    assert summary["samples"] == 6 and summary["finished"] == 4 and summary["manifest_errors"] == []
    funnel = summary["funnel"]
    assert funnel["probe"] == {**funnel["probe"], "in": 4, "kept": 3, "dropped": {"unreadable": 1}}
    assert (funnel["shots"]["in"], funnel["shots"]["kept"]) == (3, 6)
    assert (funnel["write"]["in"], funnel["write"]["kept"]) == (6, 6)
    samples, errors = load_manifest(tmp_path / "out" / "manifest.jsonl")
    assert len(samples) == 6 and errors == [] and all(s.video.is_file() for s in samples)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["drops"] == [{"source": inputs[-1], "key": input_key(inputs[-1]), "stage": "probe", "reason": "unreadable"}]
    assert report["funnel"]["probe"]["per_second"] > 0 and (tmp_path / "out" / "funnel.png").stat().st_size > 1000
    manifest = (tmp_path / "out" / "manifest.jsonl").read_text()

    # a rerun skips every finished input (no stage sees anything) and rebuilds the same manifest
    class Counting(core.Stage):
        name = "probe"
        seen = 0

        def process(self, batch):
            Counting.seen += len(batch)
            return batch

    again = Curator(toy_settings("video"), stages=[Counting()])
    again.hash = curator.hash
    again.run(inputs, tmp_path / "out", progress=False)
    assert Counting.seen == 0 and (tmp_path / "out" / "manifest.jsonl").read_text() == manifest

    # inputs in groups of 3 (model stages batch across videos): the same manifest and counts
    grouped = Curator(toy_settings("video"), group=3).run(inputs, tmp_path / "grouped", progress=False)
    assert (tmp_path / "grouped" / "manifest.jsonl").read_text() == manifest
    counts = lambda f: {k: (r["in"], r["kept"], r["dropped"]) for k, r in f.items()}  # noqa: E731
    assert counts(grouped["funnel"]) == counts(summary["funnel"])

    # two shards, then a last assembling run: the same manifest as one run
    for i in range(2):
        Curator(toy_settings("video")).run(inputs, tmp_path / "sharded", shard=(i, 2), progress=False)
    Curator(toy_settings("video")).run(inputs, tmp_path / "sharded", progress=False)
    assert (tmp_path / "sharded" / "manifest.jsonl").read_text() == manifest


def test_runner_image_kind_and_a_failing_stage_is_a_drop(tmp_path, annotate_registered, monkeypatch):
    inputs = _raw_videos(tmp_path / "raw", 2)
    settings = toy_settings("image")
    settings["stages"].append({"name": "annotate", "options": {}})
    summary = Curator(settings).run(inputs, tmp_path / "img", progress=False)
    assert summary["samples"] == 4 and summary["manifest_errors"] == []
    samples, _ = load_manifest(tmp_path / "img" / "manifest.jsonl")
    assert all(s.image.suffix == ".png" and s.subjects[0].mask.suffix == ".png" for s in samples)

    # a stage that raises on one input's candidates: in a group, that input alone loses them
    original = Annotate.process
    bad = inputs[1]

    def explode(self, batch):
        if any(c.source == bad for c in batch):
            raise RuntimeError("a stage bug")
        return original(self, batch)

    monkeypatch.setattr(Annotate, "process", explode)
    summary = Curator(toy_settings("video"), group=2).run(inputs, tmp_path / "boom", progress=False)
    assert summary["finished"] == 2 and summary["samples"] == 2
    assert summary["funnel"]["annotate"] == {**summary["funnel"]["annotate"], "in": 4, "kept": 2,
                                             "dropped": {"error (RuntimeError)": 2}}
    report = json.loads((tmp_path / "boom" / "report.json").read_text())
    assert {d["source"] for d in report["drops"]} == {bad}


# ----------------------------------------------------------------------------------- command line


def test_curate_command_line(tmp_path, annotate_registered, capsys):
    from idcrafter.cli.curate import main

    raw = tmp_path / "raw"
    _raw_videos(raw, 2)
    settings = tmp_path / "s.yaml"
    settings.write_text("stages:\n" + "".join(f"  - {json.dumps(s)}\n" for s in TOY_STAGES))
    out = tmp_path / "out"
    assert main([str(raw), "--out", str(out), "--backend", "toyworld", "--settings", str(settings), "--no-progress"]) == 0
    assert "4 samples" in capsys.readouterr().out
    saved = json.loads((out / "settings.json").read_text())
    assert [s["name"] for s in saved["stages"]] == ["probe", "shots", "blur", "motion", "annotate"]
    # the saved settings rerun the same curation (every input already finished)
    assert main([str(raw), "--out", str(out), "--settings", str(out / "settings.json"), "--no-progress"]) == 0
    assert "2 inputs, 2 already finished" in capsys.readouterr().err

    def error(argv) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0
        return err

    assert "needs a local model folder: --detector-model" in error([str(raw), "--out", str(tmp_path / "o2")])
    assert "does not exist" in error([str(tmp_path / "none"), "--out", str(tmp_path / "o3"), "--backend", "toyworld"])
    assert "--shard" in error([str(raw), "--out", str(tmp_path / "o4"), "--backend", "toyworld", "--shard", "2/2"])
    (tmp_path / "bad.yaml").write_text("stagez: {}\n")
    assert "unknown key 'stagez'" in error([str(raw), "--out", str(tmp_path / "o5"), "--settings", str(tmp_path / "bad.yaml")])
    (tmp_path / "opt.yaml").write_text("stages: {blur: {sharpness: 3}}\n")
    assert "stage blur has no option 'sharpness'" in error(
        [str(raw), "--out", str(tmp_path / "o6"), "--backend", "toyworld", "--settings", str(tmp_path / "opt.yaml")])
    assert "has no keypoints stage" in error([str(raw), "--out", str(tmp_path / "o7"), "--preset", "multicrafter-image",
                                              "--backend", "toyworld", "--keypoints-model", str(tmp_path)])
    assert "--keypoints-model" in error([str(raw), "--out", str(tmp_path / "o8"), "--keypoints-model", str(tmp_path / "x")])
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o6").exists()


def test_save_settings_round_trip(tmp_path):
    settings = resolve_settings("one-for-all")
    path = save_settings(settings, tmp_path)
    again = resolve_settings("one-for-all", None, json.loads(path.read_text()))
    assert again == settings


def test_run_stages_funnel_counts_with_toy_stages():
    frames = shot_frames(num_frames=48)
    video = Candidate("v.mp4", "v", 8.0, frames=frames, frame_indices=np.arange(48))
    funnel = Funnel()
    kept = run_stages([ShotStage(num_frames=9, target_fps=8.0, min_shot_frames=4, max_clips=3), BlurFilter(),
                       Annotate()], [video], funnel)
    assert len(kept) == 4 and all(isinstance(c.subjects[0], SubjectTrack) for c in kept)
    rows = funnel.as_dict()
    assert (rows["shots"]["in"], rows["shots"]["kept"]) == (1, 4)
    # max_clips 3 but a 24-frame shot holds two 9-frame clips: the context is the 6 frames after them
    assert rows["annotate"]["dropped"] == {}


def test_aesthetic_filter_scores_frames_with_a_linear_head_on_clip(tmp_path):
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from idcrafter.curate.filters import AestheticFilter

    config = CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                         max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(tmp_path)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path)
    weight, bias = torch.randn(1, 16), torch.tensor([5.0])
    save_file({"weight": weight, "bias": bias}, str(tmp_path / "aesthetic_head.safetensors"))

    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 256, (5, 40, 48, 3), dtype=np.uint8) for _ in range(3)]
    stage = AestheticFilter(model=str(tmp_path), num_frames=3)
    stage.setup()
    # the direct computation: unit CLIP image embedding . w + b, averaged over frames 0, 2, 4
    with torch.no_grad():
        direct = []
        for clip in clips:
            out = model.get_image_features(**processor(images=list(clip[[0, 2, 4]]), return_tensors="pt"))
            embeds = out if isinstance(out, torch.Tensor) else out.pooler_output
            direct.append(float(((embeds / embeds.norm(dim=-1, keepdim=True)) @ weight.T + bias).mean()))
    stage.min_score = float(np.median(direct))
    out = stage.process([Candidate(str(i), str(i), 8.0, frames=c) for i, c in enumerate(clips)])
    scores = [o.info["aesthetic"] if isinstance(o, Candidate) else o.item.info["aesthetic"] for o in out]
    np.testing.assert_allclose(scores, direct, atol=1e-5)
    assert [isinstance(o, Candidate) for o in out] == [d >= stage.min_score for d in direct]
    assert sum(not isinstance(o, Candidate) and o.reason == "low aesthetic score" for o in out) == 1
    with pytest.raises(ValueError, match="needs model"):
        AestheticFilter()


def test_flow_on_downscaled_frames_keeps_the_fraction_and_cuts_survive_downscaling():
    rng = np.random.default_rng(1)
    texture = cv2.normalize(cv2.GaussianBlur((rng.random((600, 900, 3)) * 255).astype(np.uint8), (0, 0), 12), None, 0, 255,
                            cv2.NORM_MINMAX)
    a, b = texture[50:530, 50:850], texture[50:530, 42:842]  # 8 px right at 480 px: 1/60 of the short side
    assert flow_magnitude(a, b, side=120) == pytest.approx(8 / 480, rel=0.1)
    # a 512 px wide video is analysed at 256 px (PySceneDetect's auto-downscale): the cuts stay put
    frames = np.stack([cv2.resize(f, (512, 512), interpolation=cv2.INTER_NEAREST) for f in shot_frames(num_frames=48)])
    assert detect_shots(frames, 8.0, min_shot_frames=4) == [(0, 24), (24, 48)]


def test_toy_world_clips_pass_the_toyworld_settings_and_their_cuts_are_found(tmp_path):
    from idcrafter.toyworld.world import identity_space, make_clip

    identities, rng = identity_space(), np.random.default_rng(3)
    shots = [make_clip([identities[i], identities[i + 40]], 25, 64, rng, motion_kind="left_to_right").frames
             for i in (0, 7, 11)]
    path = write_raw(tmp_path / "toy.mp4", np.concatenate(shots))
    settings = resolve_settings("idcrafter-video", "toyworld", {"stages": ["probe", "shots", "blur", "motion"]})
    funnel = Funnel()
    kept = run_stages(build_stages(settings), [Candidate(str(path), "toy", 0.0)], funnel)
    # a cut at every shot boundary; two 9-frame clips (the preset's max_clips) per 25-frame shot,
    # each with 4 context frames outside it
    assert [c.info["shot_range"] for c in kept] == [(0, 25)] * 2 + [(25, 50)] * 2 + [(50, 75)] * 2
    assert [int(c.frame_indices[0]) for c in kept] == [0, 9, 25, 34, 50, 59]
    assert all(len(c.frames) == 9 and len(c.context) == 4 for c in kept)
    assert {k: (r["in"], r["kept"]) for k, r in funnel.as_dict().items()} == {
        "probe": (1, 1), "shots": (1, 6), "blur": (6, 6), "motion": (6, 6)}


def test_face_mask_is_the_body_mask_inside_the_keypoints_face_box(tmp_path):
    keypoints = np.zeros((17, 3))
    keypoints[:5] = [[50, 40, 0.9], [45, 30, 0.9], [55, 30, 0.9], [38, 32, 0.8], [62, 32, 0.1]]  # right ear unsure
    # confident points span x 38..55 (17) and y 30..40 (10): a square of side 34 on their mean (47, 33)
    np.testing.assert_allclose(face_box(keypoints), [30, 16, 64, 50])
    body = np.zeros((80, 80), bool)
    body[20:80, 25:70] = True
    face = face_mask(body, keypoints)
    expected = np.zeros_like(body)
    expected[20:50, 30:64] = True
    np.testing.assert_array_equal(face, expected)
    keypoints[1:5, 2] = 0.0
    assert face_box(keypoints) is None and face_mask(body, keypoints) is None
    # written beside the body mask when the writer is asked for face masks
    c = _annotated("image")
    kp = np.zeros((1, 17, 3))
    kp[0, :3] = [[12, 20, 1.0], [8, 16, 1.0], [16, 16, 1.0]]
    c.subjects[0].keypoints = kp
    write_sample(c, "image", tmp_path, masks="png", face_masks=True)
    from PIL import Image

    written = np.asarray(Image.open(tmp_path / "masks" / "v-s000-c00_0_face.png"))[..., 0] > 127
    np.testing.assert_array_equal(written, face_mask(c.subjects[0].masks[0], kp[0]))
    assert 0 < written.sum() < c.subjects[0].masks[0].sum()


def test_readme_toy_command_curates_toy_raw_videos(tmp_path):
    """The toy-world command exactly as README.md writes it, end to end through every stage."""
    import shlex

    toyworld = pytest.importorskip("idcrafter.curate.toyworld")  # the toy backends
    from idcrafter.cli.curate import main

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    command = next(line.strip() for line in readme if line.strip().startswith("python scripts/curate.py toy_raw/"))
    args = shlex.split(command)[2:]
    raw, _ = toyworld.write_raw_videos(tmp_path, 2, seed=0)
    args[0], args[args.index("--out") + 1] = str(raw), str(tmp_path / "curated")
    assert main([*args, "--no-progress"]) == 0
    samples, errors = load_manifest(tmp_path / "curated" / "manifest.jsonl")
    assert errors == [] and len(samples) > 0
    assert all(s.is_video and s.subjects and all(x.mask is not None for x in s.subjects) for s in samples)
    report = json.loads((tmp_path / "curated" / "report.json").read_text())
    assert list(report["funnel"]) == ["probe", "shots", "blur", "motion", "detect", "segment", "references", "verify",
                                      "caption", "write"]
    assert report["funnel"]["probe"]["in"] == 2 and report["samples"] == len(samples)


def test_a_rerun_removes_the_temporary_files_a_killed_run_left_for_its_inputs(tmp_path, annotate_registered):
    inputs = _raw_videos(tmp_path / "raw", 1)
    key = input_key(inputs[0])
    stale = [tmp_path / "out" / "videos" / f".{key}-s000-c00.abc123.tmp.mp4", tmp_path / "out" / "records" / f".{key}.x.tmp.json"]
    other = tmp_path / "out" / "videos" / ".another-input-0123456789.abc.tmp.mp4"  # not this input's: kept
    for path in (*stale, other):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    Curator(toy_settings("video")).run(inputs, tmp_path / "out", progress=False)
    assert not any(p.exists() for p in stale) and other.exists()
