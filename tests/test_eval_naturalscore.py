"""OpenS2V NaturalScore with a local VLM (idcrafter.eval.naturalscore): a tiny random Qwen2.5-VL saved to
disk and loaded by path. The inputs the VLM receives are checked against the benchmark's recipe computed
here; a second tiny VLM, whose weights make it answer "4" whatever it sees, checks the score end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

cv2 = pytest.importorskip("cv2")

from idcrafter.eval.opens2v import NATURAL_PROMPT  # noqa: E402


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from idcrafter.video.vlm import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen") / "tiny", seed=0)


@pytest.fixture(scope="module")
def qwen_says_4(qwen, tmp_path_factory):
    """The tiny VLM rewritten so that it always answers "4": the last layer's value bias adds a huge
    constant c to the residual stream (attention averages equal values to c), so the final hidden
    state is c's direction whatever the input; the head's row of "4" is that direction, every other
    row zero. Saved with its processor files, as any local folder."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from idcrafter.rewards.natural import load_image_text_processor

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen).eval()
    processor = load_image_text_processor(qwen)
    four = processor.tokenizer.convert_tokens_to_ids("4")
    layer = model.model.language_model.layers[-1].self_attn
    with torch.no_grad():
        layer.v_proj.weight.zero_()
        layer.v_proj.bias.copy_(torch.linspace(-1.0, 1.0, layer.v_proj.bias.numel()))
        layer.o_proj.weight.mul_(1e4)
        # Each key-value head serves num_heads / num_kv_heads consecutive query heads (grouped-query attention).
        heads = layer.v_proj.bias.view(model.config.text_config.num_key_value_heads, -1)
        group = model.config.text_config.num_attention_heads // heads.shape[0]
        direction = layer.o_proj(heads.repeat_interleave(group, dim=0).flatten()) * model.model.language_model.norm.weight
        head = torch.zeros_like(model.lm_head.weight)
        head[four] = 50.0 * direction / direction.norm()
        model.lm_head.weight.copy_(head)
    folder = tmp_path_factory.mktemp("qwen4") / "says4"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def frames_of(count: int, h: int = 48, w: int = 80, seed: int = 0) -> np.ndarray:
    """A smooth moving pattern (JPEG changes it, but not beyond a few grey levels)."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = [np.stack([128 + 100 * np.sin((xx + 3 * t + seed) / 7), 128 + 100 * np.cos((yy - 2 * t) / 5),
                     np.full((h, w), 40 + 5 * t)], -1) for t in range(count)]
    return np.clip(out, 0, 255).astype(np.uint8)


def test_the_vlm_sees_16_jpeg_frames_long_side_512_then_the_prompt(qwen, tmp_path):
    from transformers import Qwen2VLImageProcessorPil

    from idcrafter.eval.naturalscore import NaturalScorer

    scorer = NaturalScorer(qwen)
    video = frames_of(40)
    messages, images, inputs = scorer.model_inputs(video)
    # One user turn: the 16 images first, then the benchmark's prompt, verbatim (its content order).
    assert len(messages) == 1 and messages[0]["role"] == "user"
    content = messages[0]["content"]
    assert [c["type"] for c in content] == ["image"] * 16 + ["text"] and content[-1]["text"] == NATURAL_PROMPT
    # Frames 0, 2, ..., 30 (40 // 16 = 2), each 80x48 -> 512 x int(48 * 512 / 80) = 307, INTER_AREA, then a
    # JPEG written and read back by OpenCV (the benchmark sends cv2.imencode's JPEG bytes).
    assert len(images) == 16
    for k, image in enumerate(images):
        resized = cv2.resize(video[2 * k], (512, 307), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(tmp_path / "f.jpg"), resized[..., ::-1])
        assert np.array_equal(image, cv2.imread(str(tmp_path / "f.jpg"))[..., ::-1])
        lossy = np.abs(image.astype(int) - resized).mean()
        assert 0 < lossy < 3  # the JPEG step is there, and small
    # The processor's tensors are the folder's image processor on those images, and the text holds
    # 16 vision blocks with one image token per merged 2x2 patch, then the prompt.
    pixels = Qwen2VLImageProcessorPil.from_pretrained(qwen)(images=list(images), return_tensors="pt")
    assert torch.equal(inputs["pixel_values"], pixels["pixel_values"])
    assert torch.equal(inputs["image_grid_thw"], pixels["image_grid_thw"])
    tok = scorer.processor.tokenizer
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(tok.convert_tokens_to_ids("<|vision_start|>")) == 16
    assert ids.count(tok.convert_tokens_to_ids("<|image_pad|>")) == int(pixels["image_grid_thw"].prod(-1).sum()) // 4
    last_image = len(ids) - 1 - ids[::-1].index(tok.convert_tokens_to_ids("<|vision_end|>"))
    assert tok.decode(ids[last_image + 1:]).startswith(NATURAL_PROMPT)
    # A 10-frame clip shows all of its frames (the benchmark drops reads past the end).
    assert len(scorer.model_inputs(frames_of(10))[1]) == 10


def test_sampling_is_the_api_default_seeded_per_repeat_and_greedy_at_zero(qwen):
    from idcrafter.eval.naturalscore import NaturalScorer

    scorer = NaturalScorer(qwen, max_new_tokens=6, seed=3)
    config = scorer.generation_config()
    assert (config.do_sample, config.temperature, config.top_p, config.top_k, config.repetition_penalty,
            config.max_new_tokens) == (True, 1.0, 1.0, 0, 1.0, 6)
    video = frames_of(16)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    sampled = scorer.replies(video)
    assert torch.equal(torch.rand(3), before)  # the global RNG is left as it was
    assert len(sampled) == 3 and len(set(sampled)) == 3  # the repeats are different samples
    assert scorer.replies(video) == sampled  # ... and reproducible (seed + repeat)
    assert NaturalScorer(qwen, max_new_tokens=6, seed=4).replies(video) != sampled
    greedy = NaturalScorer(qwen, max_new_tokens=6, temperature=0)
    assert not greedy.generation_config().do_sample
    replies = greedy.replies(video)
    assert len(replies) == 3 and len(set(replies)) == 1


def test_a_vlm_that_answers_4_scores_exactly_4(qwen_says_4):
    from idcrafter.eval.naturalscore import NaturalScorer, build_naturalscore

    scorer = NaturalScorer(qwen_says_4, max_new_tokens=1)
    assert scorer(frames_of(20)) == 4.0 and scorer.last_replies == ["4", "4", "4"]
    column = build_naturalscore({"path": str(qwen_says_4), "max_new_tokens": 1, "repeats": 2}, "cpu")
    assert column(None, frames_of(5)) == {"naturalscore": 4.0}
    # Without the cap the reply is "44...", a bare number the benchmark's float() reads as such.
    assert NaturalScorer(qwen_says_4, max_new_tokens=3, repeats=1)(frames_of(5)) == 444.0


def test_bad_options_and_folders_are_refused_in_one_line(qwen, tmp_path):
    from idcrafter.eval.naturalscore import build_naturalscore
    from idcrafter.eval.protocols import build_scorers

    with pytest.raises(ValueError, match="unknown option.*top_k"):
        build_naturalscore({"path": str(qwen), "top_k": 3})
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        build_naturalscore({"path": str(qwen), "temperature": -1})
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ValueError, match="model_type 'clip' is not a supported VLM"):
        build_naturalscore({"path": str(tmp_path / "clip")})
    scorers, skipped = build_scorers("opens2v", {"naturalscore": {"path": str(tmp_path / "none")}})
    assert "naturalscore" not in scorers
    assert skipped["naturalscore"].startswith("cannot load naturalscore (FileNotFoundError: ")
    assert "\n" not in skipped["naturalscore"]
    _, skipped = build_scorers("opens2v", {})
    assert skipped["naturalscore"] == ("needs a local Qwen2.5-VL / Qwen2-VL folder in place of GPT-4o "
                                       "(get_naturalscore.py): pass --model-option naturalscore.path=...")


def test_evaluate_cli_opens2v_naturalscore_column(qwen_says_4, tmp_path):
    from idcrafter.cli import evaluate as script
    from idcrafter.utils.media import write_video

    (tmp_path / "gen").mkdir()
    from PIL import Image

    Image.fromarray(frames_of(1)[0]).save(tmp_path / "ref.png")
    lines = []
    for i in range(2):
        write_video(frames_of(12, seed=i), tmp_path / "gen" / f"s{i}.mp4", fps=8)
        lines.append({"id": f"s{i}", "video": "truth.mp4", "prompt": "a thing",
                      "subjects": [{"image": "ref.png", "category": "object"}]})
    (tmp_path / "bench.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    assert script.main(["--data", str(tmp_path / "bench.jsonl"), "--videos", str(tmp_path / "gen"), "--out", str(out),
                        "--no-progress", "--model-option", f"naturalscore.path={qwen_says_4}",
                        "--model-option", "naturalscore.max_new_tokens=1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["columns"]["NaturalScore"]["mean"] == 4.0 and summary["columns"]["NaturalScore"]["count"] == 2
    assert summary["opens2v"]["normalised"]["naturalscore"] == pytest.approx(0.75)  # (4 - 1) / (5 - 1)
    assert "naturalscore" not in summary["skipped"]
