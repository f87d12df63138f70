"""Rewards (docs/design.md 7): registry and weighted composite, and each scorer on tiny random models of the
real transformers classes, saved to disk and loaded through the reward by path. Each scorer is
checked against the same quantity computed here with the model called directly."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from idcrafter.rewards import (
    IMAGE_OBJECT_WEIGHTS,
    IMAGE_WEIGHTS,
    VIDEO_WEIGHTS,
    CompositeReward,
    RewardModel,
    build_reward,
    list_rewards,
)
from idcrafter.rewards.common import SubjectReward, load_image_processor, sample_frames
from idcrafter.rewards.identity import combine_identity_scores

NAMES = ["aesthetic", "clip_image", "clip_text", "dino_image", "face", "hps", "natural", "nexus", "object", "toyid"]
RNG = np.random.default_rng(0)


def video(frames: int, height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def features(out) -> torch.Tensor:
    """get_*_features returns a tensor in transformers 4 and an output with pooler_output in 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# ------------------------------------------------------------------------------------ registry
class Fixed(RewardModel):
    """Returns the given scores, a warning, and an extra component."""

    def __init__(self, name: str, values, warn: int = 0):
        super().__init__()
        self.name, self.values, self.warn = name, list(values), warn

    def score(self, samples, prompts, refs, meta, warnings):
        if self.warn:
            warnings["something missing"] += self.warn
        return self.values[: len(samples)]


def batch(n: int):
    return [video(1, 8, 8, i) for i in range(n)], ["p"] * n, [[] for _ in range(n)]


def test_registry_lists_every_reward_and_rejects_unknown_names():
    assert set(NAMES) <= set(list_rewards())
    with pytest.raises(ValueError, match="'sharpness'"):
        build_reward("sharpness")


def test_composite_is_the_weighted_sum_of_its_components():
    models = {"toyid": Fixed("toyid", [0.5, 0.25, 1.0], warn=2), "clip_text": Fixed("clip_text", [0.3, -0.1, 0.7])}
    out = CompositeReward("toyid=1,clip_text=0", models=models)(*batch(3))
    assert out.scores.tolist() == [0.5, 0.25, 1.0]
    assert out.components["toyid"].tolist() == [0.5, 0.25, 1.0]
    assert torch.allclose(out.components["clip_text"], torch.tensor([0.3, -0.1, 0.7]))
    assert out.warnings == Counter({"toyid: something missing": 2})
    out = CompositeReward({"toyid": 0.25, "clip_text": 2.0}, models=models)(*batch(3))
    expected = [0.25 * a + 2.0 * b for a, b in zip([0.5, 0.25, 1.0], [0.3, -0.1, 0.7])]
    assert out.scores.tolist() == pytest.approx(expected, abs=1e-6)


def test_paper_weights():
    # ID-Crafter: 0.6 (0.5 face + 0.5 nexus) + 0.4 (0.6 aesthetic + 0.4 natural).
    assert VIDEO_WEIGHTS == pytest.approx({"face": 0.3, "nexus": 0.3, "aesthetic": 0.24, "natural": 0.16})
    # MultiCrafter supp. Sec. B: w_id / w_text / w_aes = 0.5 / 1.4 / 0.7 (people), w_id = 1.0 (objects); R_aes = HPS v2.
    assert IMAGE_WEIGHTS == {"face": 0.5, "clip_text": 1.4, "hps": 0.7}
    assert IMAGE_OBJECT_WEIGHTS == {"object": 1.0, "clip_text": 1.4, "hps": 0.7}


class FrameTable(SubjectReward):
    """Per-frame, per-subject scores given by hand: the frame-level combination alone."""

    name = "table"

    def __init__(self, tables, alpha):
        super().__init__()
        self.tables, self.alpha = tables, alpha

    def frame_scores(self, samples, prompts, refs, meta, warnings):
        return [np.asarray(t, np.float64) for t in self.tables]


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
def test_subject_rewards_average_the_frame_level_reward(alpha):
    # ID-Crafter eq. 7 per frame, averaged over frames (App. A.2, eq. S.12): the min is each frame's worst subject.
    tables = [[[0.9, 0.1], [0.2, 0.8]], [[0.6, 0.4, 0.5]], np.zeros((2, 0))]
    out = FrameTable(tables, alpha)(*batch(3))
    frame = [(1 - alpha) * (0.9 + 0.1) / 2 + alpha * 0.1, (1 - alpha) * (0.2 + 0.8) / 2 + alpha * 0.2]
    expected = [(frame[0] + frame[1]) / 2, (1 - alpha) * 0.5 + alpha * 0.4, 0.0]
    assert out.scores.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.components["table_mean"].tolist() == pytest.approx([0.5, 0.5, 0.0], abs=1e-6)
    assert out.components["table_min"].tolist() == pytest.approx([0.15, 0.4, 0.0], abs=1e-6)
    # Not the clip-level form (min over subjects of the frame means, 0.45 here) unless alpha = 0.
    clip_level = (1 - alpha) * 0.5 + alpha * combine_identity_scores(np.mean(tables[0], 0), "min")
    assert (out.scores[0].item() == pytest.approx(clip_level, abs=1e-6)) == (alpha == 0.0)


@pytest.mark.parametrize("options, match", [
    ({"alpha": 1.5}, "alpha must be in"), ({"alpha": "x"}, "alpha must be a number"),
    ({"alpha": float("nan")}, "alpha must be in"), ({"mode": "max"}, "mode must be one of"),
    ({"mode": "mean", "alpha": 0.5}, "pass alpha only"),
])
def test_alpha_and_mode_options_are_checked(options, match):
    with pytest.raises(ValueError, match=match) as err:
        build_reward("face", **options)
    assert "'face'" in str(err.value) and "\n" not in str(err.value)


def test_mode_still_names_an_alpha():
    assert [build_reward("face", mode=m).alpha for m in ("mean", "mean_min", "min")] == [0.0, 0.5, 1.0]
    assert build_reward("face", mode="min", alpha=1).alpha == 1.0
    assert build_reward("face").alpha == 0.5 and build_reward("face", alpha="0.25").alpha == 0.25


@pytest.mark.parametrize("spec, match", [
    ("toyid=0,clip_text=0", "positive"),
    ("toyid=-1,clip_text=2", "toyid"),
    ("toyid=abc", "number"),
    ("toyid", "name=weight"),
    ("", "none given"),
])
def test_bad_weights_are_rejected(spec, match):
    with pytest.raises(ValueError, match=match):
        CompositeReward(spec, models={"toyid": Fixed("toyid", [1]), "clip_text": Fixed("clip_text", [1])})


def test_mismatched_counts_and_bad_samples_are_rejected():
    reward = Fixed("toyid", [1, 1])
    samples, prompts, refs = batch(2)
    with pytest.raises(ValueError, match="counts differ"):
        reward(samples, prompts[:1], refs)
    with pytest.raises(ValueError, match="counts differ"):
        reward(samples, prompts, refs, meta=[{}])
    with pytest.raises(ValueError, match="uint8"):
        reward([s.astype(np.float32) for s in samples], prompts, refs)


def test_missing_paths_are_one_line_errors_naming_reward_and_option(tmp_path):
    cases = [("clip_text", {}, "path"), ("clip_image", {}, "path"), ("dino_image", {}, "path"),
             ("aesthetic", {"clip_path": tmp_path}, "path"), ("aesthetic", {"path": tmp_path}, "clip_path"),
             ("nexus", {"embedder_path": tmp_path}, "path"), ("nexus", {"path": tmp_path}, "embedder_path"),
             ("natural", {}, "path"), ("toyid", {"path": tmp_path / "nothing"}, "path"),
             ("face", {"backend": "insightface"}, "root"), ("object", {"embedder_path": tmp_path}, "path"),
             ("object", {"path": tmp_path}, "embedder_path"), ("hps", {"tokenizer_path": tmp_path}, "path"),
             ("hps", {"path": tmp_path, "tokenizer_path": tmp_path / "nothing"}, "tokenizer_path")]
    for name, options, option in cases:
        with pytest.raises(ValueError) as err:
            build_reward(name, **options)
        message = str(err.value)
        assert f"'{name}'" in message and f"{option}=" in message and "\n" not in message, message


def test_sample_frames():
    v = np.arange(10)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    assert sample_frames(v)[:, 0, 0, 0].tolist() == list(range(10))
    assert sample_frames(v, stride=3)[:, 0, 0, 0].tolist() == [0, 3, 6, 9]
    assert sample_frames(v, max_frames=4)[:, 0, 0, 0].tolist() == [0, 3, 6, 9]
    assert sample_frames(v, stride=2, max_frames=3)[:, 0, 0, 0].tolist() == [0, 4, 8]
    assert sample_frames(v[:1], max_frames=4).shape[0] == 1


# ------------------------------------------------------------------------------------ toyid
def test_toyid_matches_the_toy_scorer(tmp_path):
    from idcrafter.rewards.toyid import DEFAULT_TOYID_PATH
    from idcrafter.toyworld.embedder import ToyIDEmbedder
    from idcrafter.toyworld.metrics import ToyIDScorer
    from idcrafter.toyworld.world import make_clip, make_reference, split_pools
    from idcrafter.video.defaults import TOYWORLD_MODEL

    assert DEFAULT_TOYID_PATH == TOYWORLD_MODEL.parent / "toyid"
    train, _ = split_pools(0)
    rng = np.random.default_rng(0)
    clip = make_clip([train[1], train[2]], 5, 64, rng)
    refs = [make_reference(train[1], 64, rng), make_reference(train[2], 64, rng)]
    torch.manual_seed(0)
    embedder = ToyIDEmbedder().eval()
    embedder.save(tmp_path / "toyid")
    expected = ToyIDScorer(embedder).subject_scores(clip.frames, refs)
    blank = np.full((3, 64, 64, 3), 230, np.uint8)
    out = build_reward("toyid", path=tmp_path / "toyid")([clip.frames, blank], ["", ""], [refs, refs])
    assert out.scores[0].item() == pytest.approx(expected.mean(), abs=1e-6)
    assert out.components["toyid_min"][0].item() == pytest.approx(expected.min(), abs=1e-6)
    assert out.scores[1].item() == 0.0 and out.warnings == Counter({"no sprite in a frame": 3})
    # alpha 0.5: the worst sprite of each frame, averaged over frames (ToyIDScorer keeps per-frame scores too).
    scorer = ToyIDScorer(embedder)
    per_frame = np.stack([scorer.subject_scores(f[None], refs) for f in clip.frames])
    out = build_reward("toyid", path=tmp_path / "toyid", alpha=0.5)([clip.frames], [""], [refs])
    expected_half = np.mean([0.5 * row.mean() + 0.5 * row.min() for row in per_frame])
    assert out.scores[0].item() == pytest.approx(expected_half, abs=1e-6)
    assert per_frame.mean(0) == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------------------------ CLIP / DINO
def tiny_clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz.,0123456789":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    tokenizer = tiny_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=40, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def clip_direct(folder):
    """The tiny CLIP called through its public feature API, not through the reward's embedder."""
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPImageProcessorPil.from_pretrained(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)

    @torch.no_grad()
    def images(xs):  # channels_last: a crop 3 pixels high would otherwise be read as [C, H, W]
        return unit(features(model.get_image_features(**processor(images=list(xs), return_tensors="pt", input_data_format="channels_last"))))

    @torch.no_grad()
    def texts(xs):
        return unit(features(model.get_text_features(**tokenizer(list(xs), padding=True, return_tensors="pt"))))

    return images, texts


def test_image_processors_load_without_torchvision(clip_folder):
    processor = load_image_processor(clip_folder)
    assert type(processor).__name__ == "CLIPImageProcessorPil"
    assert processor(images=[video(1)[0]], return_tensors="pt")["pixel_values"].shape == (1, 3, 32, 32)


def test_clip_text_and_clip_image_equal_the_direct_cosines(clip_folder):
    images, texts = clip_direct(clip_folder)
    clips = [video(5, seed=1), video(3, seed=2)]
    prompts = ["a red cat", "two dogs on a beach"]
    refs = [[video(1, 40, 40, seed=3)[0], video(1, 30, 50, seed=4)[0]], [video(1, seed=5)[0]]]
    out = build_reward("clip_text", path=clip_folder, max_frames=3)(clips, prompts, refs)
    expected = [(images(clips[0][[0, 2, 4]]) @ texts([prompts[0]]).T).mean(),
                (images(clips[1]) @ texts([prompts[1]]).T).mean()]
    assert out.scores.shape == (2,) and torch.isfinite(out.scores).all()
    assert out.scores.tolist() == pytest.approx([float(e) for e in expected], abs=1e-5)

    reward = build_reward("clip_image", path=clip_folder, stride=2)
    out = reward(clips, prompts, refs)
    expected = [(images(refs[0]) @ images(clips[0][::2]).T).mean(), (images(refs[1]) @ images(clips[1][::2]).T).mean()]
    assert out.scores.tolist() == pytest.approx([float(e) for e in expected], abs=1e-5)
    # A frame equal to its only reference: cosine 1.
    assert reward([refs[1][0][None]], [""], [refs[1]]).scores.item() == pytest.approx(1.0, abs=1e-5)
    out = reward([clips[1]], [""], [[]])
    assert out.scores.tolist() == [0.0] and out.warnings == Counter({"no reference images": 1})


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory):
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=32,
                          patch_size=8)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("dino")
    Dinov2Model(config).eval().save_pretrained(folder)
    BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def test_dino_image_equals_the_direct_cls_cosine(dino_folder):
    from transformers import BitImageProcessorPil, Dinov2Model

    model, processor = Dinov2Model.from_pretrained(dino_folder).eval(), BitImageProcessorPil.from_pretrained(dino_folder)

    @torch.no_grad()
    def cls(xs):
        hidden = model(**processor(images=list(xs), return_tensors="pt", input_data_format="channels_last")).last_hidden_state
        return unit(hidden[:, 0])  # Dinov2Model's last_hidden_state is already layer-normed

    clip, refs = video(4, seed=7), [video(1, seed=8)[0], video(1, 32, 32, seed=9)[0]]
    out = build_reward("dino_image", path=dino_folder, max_frames=2)([clip], [""], [refs])
    assert out.scores.shape == (1,) and torch.isfinite(out.scores).all()
    assert out.scores.item() == pytest.approx(float((cls(refs) @ cls(clip[[0, 3]]).T).mean()), abs=1e-5)


# ------------------------------------------------------------------------------------ aesthetic
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_aesthetic_is_the_mlp_on_unit_clip_embeddings_over_ten(clip_folder, tmp_path, suffix):
    from idcrafter.rewards.clip import AestheticMLP

    torch.manual_seed(1)
    mlp = AestheticMLP(16)
    state = {k: v.contiguous() for k, v in mlp.state_dict().items()}
    assert sorted(state) == [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("bias", "weight")]
    weights = tmp_path / f"aesthetic{suffix}"
    save_file(state, str(weights)) if suffix == ".safetensors" else torch.save(state, weights)
    images, _ = clip_direct(clip_folder)
    clip = video(3, seed=11)
    x = images(clip).double().numpy()
    for i in (0, 2, 4, 6, 7):  # dropout is the identity at inference
        x = x @ state[f"layers.{i}.weight"].double().numpy().T + state[f"layers.{i}.bias"].double().numpy()
    out = build_reward("aesthetic", path=weights, clip_path=clip_folder)([clip], [""], [[]])
    assert out.scores.item() == pytest.approx(x.mean() / 10, abs=1e-5)
    raw = build_reward("aesthetic", path=weights, clip_path=clip_folder, scale=None)([clip], [""], [[]])
    assert raw.scores.item() == pytest.approx(x.mean(), abs=1e-4)


def test_aesthetic_rejects_a_head_for_another_clip(clip_folder, tmp_path):
    from idcrafter.rewards.clip import AestheticMLP

    save_file(AestheticMLP(768).state_dict(), str(tmp_path / "head.safetensors"))
    reward = build_reward("aesthetic", path=tmp_path / "head.safetensors", clip_path=clip_folder)
    with pytest.raises(ValueError, match="768-d.*16-d"):
        reward([video(1)], [""], [[]])


# ------------------------------------------------------------------------------------ nexus
@pytest.fixture(scope="module")
def gdino_folder(tmp_path_factory):
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessorPil,
        GroundingDinoProcessor,
        SwinConfig,
    )

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "cat", "dog", "person", "object", "red"]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 1],
                                   window_size=2, out_features=["stage1", "stage2"]),
        text_config=BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=16, max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=12, num_feature_levels=2,
        encoder_n_points=1, decoder_n_points=1, max_text_len=32,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gdino")
    GroundingDinoForObjectDetection(config).eval().save_pretrained(folder)
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96}),
        tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def test_pixel_boxes_round_outwards_and_stay_inside():
    from idcrafter.rewards.nexus import grounding_text, pixel_boxes

    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.125, 0.875, 0.5, 0.5], [0.33, 0.5, 0.0, 0.0],
                          [1.0, 1.0, 0.25, 0.25], [1.0, 1.0, 0.0, 0.0]])
    assert pixel_boxes(boxes, 10, 20).tolist() == [[5, 2, 15, 8], [0, 6, 8, 10], [6, 5, 7, 6], [17, 8, 20, 10],
                                                   [19, 9, 20, 10]]
    assert grounding_text(["cat", "red dog"]) == ("cat. red dog.", [(0, 3), (5, 12)])


def test_nexus_equals_the_direct_crop_cosine(gdino_folder, clip_folder):
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    model = AutoModelForZeroShotObjectDetection.from_pretrained(gdino_folder).eval()
    processor = AutoProcessor.from_pretrained(gdino_folder)
    images, _ = clip_direct(clip_folder)
    clip, refs = video(2, seed=21), [video(1, 40, 40, seed=22)[0], video(1, seed=23)[0]]
    inputs = processor(images=list(clip), text=["cat. dog."] * 2, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == [2, 7, 5, 8, 5, 3]  # [CLS] cat . dog . [SEP]
    with torch.no_grad():
        out = model(**inputs)
    H, W = clip.shape[1:3]
    expected, direct_boxes = np.zeros((2, 2)), {}
    for k, token in enumerate([1, 3]):  # the positions of "cat" and "dog"
        for f in range(2):
            q = int(out.logits[f, :, token].argmax())
            cx, cy, w, h = out.pred_boxes[f, q].double().tolist()
            x0, y0 = int(np.floor(max(cx - w / 2, 0) * W)), int(np.floor(max(cy - h / 2, 0) * H))
            x1 = max(int(np.ceil(min(cx + w / 2, 1) * W)), x0 + 1)
            y1 = max(int(np.ceil(min(cy + h / 2, 1) * H)), y0 + 1)
            direct_boxes[k, f] = ([x0, y0, x1, y1], torch.sigmoid(out.logits[f, q, token]).item())
            expected[k, f] = max(float(images([refs[k]]) @ images([clip[f, y0:y1, x0:x1]]).T), 0.0)

    reward = build_reward("nexus", path=gdino_folder, embedder_path=clip_folder, box_threshold=0.0)
    found = reward.detector.detect(list(clip), {"cat": 1, "dog": 1})
    for (k, f), (box, score) in direct_boxes.items():
        boxes, scores = found[f]["cat" if k == 0 else "dog"]
        assert boxes.tolist() == [box] and scores[0] == pytest.approx(score, abs=1e-6)
    result = reward([clip], ["a cat and a dog"], [refs], meta=[{"categories": ["Cat", "dog"]}])
    assert result.scores.item() == pytest.approx(expected.mean(), abs=1e-5)
    assert result.components["nexus_min"].item() == pytest.approx(expected.min(0).mean(), abs=1e-5)  # per frame
    assert not result.warnings
    result = build_reward("nexus", path=gdino_folder, embedder_path=clip_folder, box_threshold=0.0, alpha=0.5)(
        [clip], [""], [refs], meta=[{"categories": ["cat", "dog"]}])
    assert result.scores.item() == pytest.approx(0.5 * expected.mean() + 0.5 * expected.min(0).mean(), abs=1e-5)


def test_nexus_no_detection_is_zero_with_a_warning(gdino_folder, clip_folder, dino_folder):
    reward = build_reward("nexus", path=gdino_folder, embedder="dino", embedder_path=dino_folder, box_threshold=1.01)
    clip, refs = video(3, seed=31), [video(1, seed=32)[0], video(1, seed=33)[0]]
    out = reward([clip, clip], ["", ""], [refs, refs], meta=[{"categories": ["cat", "dog"]}, {}])
    assert out.scores.tolist() == [0.0, 0.0]
    assert out.warnings == Counter({"no detection of a subject in a frame": 12})  # 2 samples x 2 subjects x 3 frames
    with pytest.raises(ValueError, match="one word per reference"):
        reward([clip], [""], [refs], meta=[{"categories": ["cat"]}])


def test_nexus_gives_subjects_of_one_category_distinct_boxes(gdino_folder, clip_folder):
    reward = build_reward("nexus", path=gdino_folder, embedder_path=clip_folder, box_threshold=0.0, nms_iou=1.0,
                          max_frames=2)
    clip, refs = video(4, seed=41), [video(1, seed=42)[0], video(1, seed=43)[0], video(1, seed=44)[0]]
    found = reward.detector.detect(list(clip[:1]), {"person": 2, "dog": 1})[0]
    assert found["person"][0].shape == (2, 4) and found["dog"][0].shape == (1, 4)
    assert found["person"][1][0] >= found["person"][1][1]
    out = reward([clip], [""], [refs], meta=[{"categories": ["person", "dog", "person"]}])
    assert torch.isfinite(out.scores).all() and 0.0 <= out.scores.item() <= 1.0 and not out.warnings
    assert out.components["nexus_min"].item() <= out.scores.item() <= out.components["nexus"].item() + 1e-7


# ------------------------------------------------------------------------------------ object
@pytest.fixture(scope="module")
def blind_gdino_folder(gdino_folder, tmp_path_factory):
    """The tiny Grounding-DINO with an image processor that rescales pixels by 0: it sees a constant
    image, so its boxes are the same for every image of a size and the pictures can be built around them."""
    import shutil

    from transformers import BertTokenizer, GroundingDinoImageProcessorPil, GroundingDinoProcessor

    folder = tmp_path_factory.mktemp("gdino_blind") / "gdino"
    shutil.copytree(gdino_folder, folder)
    GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96}, rescale_factor=0.0),
        tokenizer=BertTokenizer.from_pretrained(gdino_folder)).save_pretrained(folder)
    return folder


def dino_direct(folder):
    from transformers import BitImageProcessorPil, Dinov2Model

    model, processor = Dinov2Model.from_pretrained(folder).eval(), BitImageProcessorPil.from_pretrained(folder)

    @torch.no_grad()
    def cls(xs):
        return unit(model(**processor(images=list(xs), return_tensors="pt", input_data_format="channels_last")).last_hidden_state[:, 0])

    return cls


def crop(image, box):
    x0, y0, x1, y1 = (int(v) for v in box)
    return image[y0:y1, x0:x1].copy()


@pytest.fixture(scope="module")
def object_scene(blind_gdino_folder, dino_folder):
    reward = build_reward("object", path=blind_gdino_folder, embedder_path=dino_folder, box_threshold=0.0,
                          nms_iou=0.3, extra_boxes=2)
    image = video(1, seed=61)[0]
    # Candidates as the reward asks for them: one subject per category + 2 extra, best first.
    found = reward.detector.detect([image], {"cat": 3, "dog": 3})[0]
    blank = reward.detector.detect([np.zeros_like(image)], {"cat": 3, "dog": 3})[0]
    assert all(np.array_equal(found[c][0], blank[c][0]) for c in found)  # the detector cannot see the pixels
    cats, dogs = found["cat"][0], found["dog"][0]
    assert len(cats) == 3 and len(dogs) == 3
    return dict(reward=reward, image=image, cats=cats, dogs=dogs, cls=dino_direct(dino_folder))


def test_object_matches_each_reference_to_its_own_candidate_box(object_scene, blind_gdino_folder, dino_folder):
    reward, image, cats, dogs = (object_scene[k] for k in ("reward", "image", "cats", "dogs"))
    # The references are what the image holds in the cat's second-best and the dog's third-best boxes.
    refs = [crop(image, cats[1]), crop(image, dogs[2])]
    warnings = Counter()
    matched = reward.match(image[None], refs, {"categories": ["cat", "dog"]}, warnings)
    assert matched.boxes[0].tolist() == [cats[1].tolist(), dogs[2].tolist()] and not warnings
    assert matched.scores[0] == pytest.approx([1.0, 1.0], abs=1e-5)
    out = reward([image[None]], ["a cat and a dog"], [refs], meta=[{"categories": ["cat", "dog"]}])
    assert out.scores.item() == pytest.approx(1.0, abs=1e-5) and out.components["object_min"].item() > 1 - 1e-5
    # NexusScore takes the best-scoring box of each category, whatever it holds.
    cls = object_scene["cls"]
    direct = [max(float(cls([refs[0]]) @ cls([crop(image, cats[0])]).T), 0.0),
              max(float(cls([refs[1]]) @ cls([crop(image, dogs[0])]).T), 0.0)]
    nexus = build_reward("nexus", path=blind_gdino_folder, embedder="dino", embedder_path=dino_folder,
                         box_threshold=0.0)([image[None]], [""], [refs], meta=[{"categories": ["cat", "dog"]}])
    assert nexus.scores.item() == pytest.approx(np.mean(direct), abs=1e-5) and max(direct) < 0.999


def test_object_tells_two_subjects_of_one_category_apart(object_scene):
    reward, image = object_scene["reward"], object_scene["image"]
    # The prompt is now "dog." and two dogs ask for 2 + 2 candidates: other boxes than with "cat. dog.".
    dogs = reward.detector.detect([image], {"dog": 4})[0]["dog"][0]
    refs = [crop(image, dogs[2]), crop(image, dogs[0])]  # listed in the other order than the detector ranks them
    matched = reward.match(image[None], refs, {"categories": ["dog", "dog"]}, Counter())
    assert matched.boxes[0].tolist() == [dogs[2].tolist(), dogs[0].tolist()]
    assert matched.scores[0] == pytest.approx([1.0, 1.0], abs=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_object_score_is_the_best_candidate_cosine_combined_by_alpha(object_scene, alpha):
    reward, image, cats, dogs, cls = (object_scene[k] for k in ("reward", "image", "cats", "dogs", "cls"))
    stranger = video(1, 40, 40, seed=62)[0]  # a dog reference that is nowhere in the image
    refs = [crop(image, cats[0]), stranger]
    best_dog = max(max(float(cls([stranger]) @ cls([crop(image, b)]).T), 0.0) for b in dogs)
    reward.alpha = alpha
    try:
        out = reward([image[None]], [""], [refs], meta=[{"categories": ["cat", "dog"]}])
    finally:
        reward.alpha = 0.0
    assert out.components["object_mean"].item() == pytest.approx((1.0 + best_dog) / 2, abs=1e-5)
    assert out.components["object_min"].item() == pytest.approx(min(1.0, best_dog), abs=1e-5)
    assert out.scores.item() == pytest.approx((1 - alpha) * (1.0 + best_dog) / 2 + alpha * best_dog, abs=1e-5)


def test_object_frames_average_and_a_missing_subject_scores_zero(object_scene, blind_gdino_folder, dino_folder):
    reward, image, cls = object_scene["reward"], object_scene["image"], object_scene["cls"]
    other = video(1, seed=63)[0]  # a second frame where neither reference is
    # The candidates of this two-frame batch (near-tied detector scores may order differently in a batch of one).
    found = reward.detector.detect([image, other], {"cat": 3, "dog": 3})
    assert all(np.array_equal(found[0][c][0], found[1][c][0]) for c in ("cat", "dog"))
    cats, dogs = found[0]["cat"][0], found[0]["dog"][0]
    refs = [crop(image, cats[2]), crop(image, dogs[1])]
    second = [max(max(float(cls([r]) @ cls([crop(other, b)]).T), 0.0) for b in boxes)
              for r, boxes in zip(refs, (cats, dogs))]
    out = reward([np.stack([image, other])], [""], [refs], meta=[{"categories": ["cat", "dog"]}])
    assert out.scores.item() == pytest.approx((1.0 + np.mean(second)) / 2, abs=1e-5)
    assert out.components["object_min"].item() == pytest.approx((1.0 + min(second)) / 2, abs=1e-5)
    blind = build_reward("object", path=blind_gdino_folder, embedder_path=dino_folder, box_threshold=1.01)
    out = blind([image[None], image[None]], ["", ""], [refs, []], meta=[{"categories": []}, {}])  # [] = "object"
    assert out.scores.tolist() == [0.0, 0.0]
    assert out.warnings == Counter({"no detection of a subject in a frame": 2, "no reference images": 1})


def test_the_object_composite_builds_from_the_named_weights(blind_gdino_folder, dino_folder, clip_folder, tmp_path):
    from idcrafter.rewards.clip import CLIPTextReward
    from idcrafter.rewards.hps import HPSReward
    from idcrafter.rewards.objects import ObjectReward

    (tmp_path / "hps.pt").write_bytes(b"")
    options = {"object": {"path": blind_gdino_folder, "embedder_path": dino_folder},
               "clip_text": {"path": clip_folder}, "hps": {"path": tmp_path / "hps.pt", "tokenizer_path": clip_folder}}
    composite = CompositeReward(IMAGE_OBJECT_WEIGHTS, options=options)
    assert [type(m) for m in composite.models.values()] == [ObjectReward, CLIPTextReward, HPSReward]
    assert composite.weights == {"object": 1.0, "clip_text": 1.4, "hps": 0.7}
    assert CompositeReward("object=1.0,clip_text=1.4,hps=0.7", options=options).weights == composite.weights


# ------------------------------------------------------------------------------------ natural
@pytest.mark.parametrize("answer, rating", [
    ("4", 4), ("5", 5), ("1", 1), ("Rating: 3/5", 3), ("I would say 2.", 2), ("**4** - minor errors", 4),
    ("3.5", 3), ("10", None), ("0", None), ("6 out of 10", None), ("", None), ("plausible", None),
    ("score 12, no 4", 4),
])
def test_natural_parses_the_first_standalone_digit(answer, rating):
    from idcrafter.rewards.natural import NEUTRAL_SCORE, parse_rating, rating_to_score

    assert parse_rating(answer) == rating
    assert rating_to_score(rating) == (NEUTRAL_SCORE if rating is None else (rating - 1) / 4)


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    from idcrafter.video.vlm import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen") / "tiny", seed=0)


def force_answer(reward, token: str) -> None:
    """Make the tiny VLM always answer `token`: a head with zero weights and a one-hot bias."""
    reward.load()
    model = reward.model
    vocab = model.lm_head.out_features
    head = torch.nn.Linear(model.lm_head.in_features, vocab, bias=True)
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.zero_()
        head.bias[reward.processor.tokenizer.convert_tokens_to_ids(token)] = 10.0
    model.lm_head = head


def test_natural_scores_the_vlm_answer(qwen_folder):
    reward = build_reward("natural", path=qwen_folder, max_frames=2, max_side=56, max_new_tokens=1)
    clips = [video(5, 56, 84, seed=51), video(2, 40, 40, seed=52)]
    out = reward(clips, ["", ""], [[], []])  # the random model's answers, whatever they are
    assert out.scores.shape == (2,) and torch.isfinite(out.scores).all()
    from idcrafter.rewards.natural import parse_rating, rating_to_score

    assert out.scores.tolist() == [rating_to_score(parse_rating(a)) for a in reward.last_answers]
    force_answer(reward, "4")
    out = reward(clips, ["", ""], [[], []])
    assert reward.last_answers == ["4", "4"] and out.scores.tolist() == [0.75, 0.75] and not out.warnings
    force_answer(reward, "x")
    out = reward(clips, ["", ""], [[], []])
    assert out.scores.tolist() == [0.5, 0.5] and out.warnings == Counter({"no rating 1-5 in the VLM answer": 2})


# ------------------------------------------------------------------------------------ insightface
def test_insightface_backend_needs_its_model_folder_and_converts_faces(tmp_path):
    from idcrafter.rewards.faces import FaceReward, InsightFaceBackend

    with pytest.raises(ValueError, match="root="):
        build_reward("face", backend="insightface", root=tmp_path, model_name="antelopev2")
    pack = tmp_path / "models" / "antelopev2"
    pack.mkdir(parents=True)
    (pack / "glintr100.onnx").write_bytes(b"")
    backend = InsightFaceBackend(root=tmp_path, model_name="antelopev2")

    class Face:
        def __init__(self, box, emb):
            self.bbox, self.embedding, self.normed_embedding = np.array(box, np.float32), emb, emb / np.linalg.norm(emb)

    seen = []

    class App:  # stands in for FaceAnalysis: the .onnx models cannot be downloaded here
        def get(self, bgr):
            seen.append(bgr[0, 0].tolist())
            return [] if bgr.mean() > 200 else [Face([5, 5, 40, 40], np.array([3.0, 4.0])),
                                                Face([50, 5, 60, 20], np.array([0.0, 2.0]))]

    backend._app = App()
    image = np.zeros((64, 64, 3), np.uint8)
    image[..., 0] = 10  # red: BGR puts it last
    faces = backend.detect(image)
    assert seen == [[0, 0, 10]] and faces.largest() == 0
    assert np.allclose(faces.embeddings, [[0.6, 0.8], [0.0, 1.0]])
    white = np.full((64, 64, 3), 255, np.uint8)
    out = FaceReward(backend=backend)([image[None], white[None]], ["", ""], [[image], [image]])
    assert out.scores.tolist() == pytest.approx([1.0, 0.0]) and out.warnings == Counter({"no face in a frame": 1})
