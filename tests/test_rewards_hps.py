"""HPS v2 reward (MultiCrafter's R_aes): an open_clip checkpoint converted to a transformers CLIPModel.

The outside reference is open_clip itself. Its package imports torchvision at import time, which
cannot run beside this CPU torch, so while `open_clip` is imported a stub stands in for the
torchvision modules it names (nothing of them runs: open_clip's model and tokenizer never call
torchvision); the stub is removed right after. A tiny open_clip `CLIP` with random weights is saved
in HPSv2's checkpoint form ({"state_dict": ...}) and loaded through the reward by path; its
embeddings, tokens and scores must equal open_clip's own forward.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

if importlib.util.find_spec("open_clip") is None or importlib.util.find_spec("ftfy") is None:
    pytest.skip("open_clip is not installed (pip install --no-deps open_clip_torch ftfy regex)", allow_module_level=True)

from idcrafter.rewards import build_reward  # noqa: E402
from idcrafter.rewards.hps import (  # noqa: E402
    OPEN_CLIP_ARCHS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    OpenCLIPTokenizer,
    clip_config_from_open_clip,
    clip_tokenizer_from_bpe,
    hps_preprocess,
)
from idcrafter.utils.errors import ConfigError, FileFormatError  # noqa: E402

VISION = {"layers": 2, "width": 32, "head_width": 8, "patch_size": 8, "image_size": 32}
TEXT = {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2}
PROMPTS = ["A photo of a CAT &amp; a dog!", "", "Ünïcödé  café\tnaïve 123 it's", "a red-haired woman, 35mm, f/1.8",
           " ".join(["word"] * 100)]


class _StubMeta(type):
    def __getattr__(cls, name):
        return cls


class _Stub(metaclass=_StubMeta):
    """Any torchvision name open_clip touches at import (classes, enums, functions)."""

    def __init__(self, *args, **kwargs):
        pass


def import_open_clip():
    """open_clip's model and tokenizer modules, imported with torchvision stubbed, then unstubbed."""
    import transformers  # noqa: F401  (its torchvision check runs, and is cached, before the stub exists)
    from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig  # noqa: F401

    names = ["torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.ops",
             "torchvision.ops.misc"]
    saved = {n: sys.modules.get(n) for n in names}
    before = set(sys.modules)
    stubs = {n: types.ModuleType(n) for n in names}
    for name, module in stubs.items():
        module.__getattr__ = lambda attr: _Stub
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(stubs[parent], child, module)
    sys.modules.update(stubs)
    try:
        import open_clip.model as model
        import open_clip.tokenizer as tokenizer
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        # The imported open_clip holds the stub: keep it out of sys.modules for anything after this file.
        for name in set(sys.modules) - before:
            if name == "open_clip" or name.startswith("open_clip."):
                sys.modules.pop(name)
    assert all(sys.modules.get(name) is module for name, module in saved.items())
    return model, tokenizer


@pytest.fixture(scope="module")
def open_clip_ref(tmp_path_factory):
    model_module, tokenizer_module = import_open_clip()
    torch.manual_seed(0)
    model = model_module.CLIP(embed_dim=12, vision_cfg=VISION, text_cfg=TEXT, quick_gelu=False).eval()
    with torch.no_grad():  # every weight random, layer norms and biases included
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("hps")
    checkpoint = folder / "HPS_v2_compressed.pt"
    torch.save({"state_dict": {k: v.clone() for k, v in model.state_dict().items()}}, checkpoint)
    arch = folder / "tiny.json"
    arch.write_text(json.dumps({"embed_dim": 12, "vision_cfg": VISION, "text_cfg": TEXT}))
    bpe = Path(tokenizer_module.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    return dict(model=model, tokenize=tokenizer_module.tokenize, checkpoint=checkpoint, arch=arch, bpe=bpe,
                configs=Path(model_module.__file__).parent / "model_configs", folder=folder)


@pytest.fixture(scope="module")
def reward(open_clip_ref):
    return build_reward("hps", path=open_clip_ref["checkpoint"], arch=open_clip_ref["arch"],
                        tokenizer_path=open_clip_ref["bpe"], max_frames=2)


def images(count: int, height: int = 48, width: int = 64, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


def test_tokens_equal_open_clip_tokenize(open_clip_ref, reward, tmp_path):
    expected = open_clip_ref["tokenize"](PROMPTS)
    assert expected.shape == (5, 77) and expected[4, -1] == 49407  # the long prompt is cut, eot kept last
    reward.scorer.load()
    assert torch.equal(reward.scorer.tokenizer(PROMPTS), expected)
    # A CLIP tokenizer folder (as saved with any hub CLIP) gives the same ids.
    clip_tokenizer_from_bpe(open_clip_ref["bpe"]).save_pretrained(tmp_path / "tok")
    assert torch.equal(OpenCLIPTokenizer(tmp_path / "tok")(PROMPTS), expected)


def test_converted_embeddings_equal_open_clip(open_clip_ref, reward):
    model = open_clip_ref["model"]
    pictures = images(3) + images(1, 32, 32, seed=1)
    with torch.no_grad():
        image_ref = model.encode_image(hps_preprocess(pictures, 32), normalize=True)
        text_ref = model.encode_text(open_clip_ref["tokenize"](PROMPTS), normalize=True)
    assert torch.allclose(reward.scorer.images(pictures), image_ref, atol=1e-5, rtol=0)
    assert torch.allclose(reward.scorer.texts(PROMPTS), text_ref, atol=1e-5, rtol=0)
    converted = reward.scorer.model
    assert converted.logit_scale.item() == pytest.approx(model.logit_scale.item(), abs=0)
    assert converted.config.vision_config.num_attention_heads == 4 and converted.config.text_config.hidden_act == "gelu"


def test_score_is_the_hps_cosine_averaged_over_frames(open_clip_ref, reward):
    model = open_clip_ref["model"]
    clip = np.stack(images(5, seed=2))
    still = np.stack(images(1, 40, 30, seed=3))
    prompts = ["a cat sitting on a red sofa", "Two people hiking, golden hour"]
    out = reward([clip, still], prompts, [[], []])
    expected = []
    for frames, prompt in ((clip[[0, 4]], prompts[0]), (still, prompts[1])):  # max_frames=2: first and last
        with torch.no_grad():  # HPSv2's score: diag(image_features @ text_features.T), both unit
            image_features, text_features, _ = model(hps_preprocess(list(frames), 32),
                                                     open_clip_ref["tokenize"]([prompt] * len(frames)))
        expected.append(float((image_features * text_features).sum(-1).mean()))
    assert out.scores.tolist() == pytest.approx(expected, abs=1e-5)
    assert list(out.components) == ["hps"] and out.warnings == Counter()


def test_preprocessing_is_hpsv2s_resize_longest_and_pad():
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    mean, std = np.array(OPENAI_CLIP_MEAN), np.array(OPENAI_CLIP_STD)
    rng = np.random.default_rng(4)
    # Smooth, so that neither resize overshoots [0, 1] (PIL clips to uint8, a float tensor resize does not).
    smooth = gaussian_filter(rng.uniform(0, 255, (48, 64, 3)), (3, 3, 0)).round().astype(np.uint8)
    x = hps_preprocess([smooth], 32)[0].permute(1, 2, 0).numpy()
    # Longer side 64 -> 32, shorter 48 -> 24, 4 rows of zero padding (before normalising) above and below.
    assert np.allclose(x[:4], -mean / std, atol=1e-6) and np.allclose(x[28:], -mean / std, atol=1e-6)
    pil = np.asarray(Image.fromarray(smooth).resize((32, 24), Image.Resampling.BICUBIC)) / 255.0
    assert np.abs(x[4:28] - (pil - mean) / std).max() < 2 / 255 / std.min()  # antialiased bicubic, as PIL's
    # Longer side already the input size: padded only, the pixels untouched.
    tall = rng.integers(0, 256, (32, 20, 3), dtype=np.uint8)
    y = hps_preprocess([tall], 32)[0].permute(1, 2, 0).numpy()
    assert np.allclose(y[:, 6:26], (tall / 255.0 - mean) / std, atol=1e-6)
    assert np.allclose(y[:, :6], -mean / std, atol=1e-6) and np.allclose(y[:, 26:], -mean / std, atol=1e-6)


def test_the_built_in_arch_is_open_clips_vit_h_14(open_clip_ref):
    assert OPEN_CLIP_ARCHS["ViT-H-14"] == json.loads((open_clip_ref["configs"] / "ViT-H-14.json").read_text())
    config = clip_config_from_open_clip(OPEN_CLIP_ARCHS["ViT-H-14"])
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.num_attention_heads, vision.num_hidden_layers, vision.intermediate_size,
            vision.patch_size, vision.image_size) == (1280, 16, 32, 5120, 14, 224)
    assert (text.hidden_size, text.num_attention_heads, text.num_hidden_layers, text.vocab_size,
            text.max_position_embeddings, config.projection_dim, text.hidden_act) == (1024, 16, 24, 49408, 77, 1024, "gelu")


def test_bad_checkpoints_are_refused_in_one_line(open_clip_ref, tmp_path):
    import argparse

    def error(path, arch=None) -> str:
        reward = build_reward("hps", path=path, arch=arch or open_clip_ref["arch"], tokenizer_path=open_clip_ref["bpe"])
        with pytest.raises((FileFormatError, ConfigError)) as err:  # a damaged file, or an arch it cannot be
            reward([np.zeros((1, 32, 32, 3), np.uint8)], [""], [[]])
        assert "\n" not in str(err.value) and str(err.value).startswith("reward 'hps': "), str(err.value)
        return str(err.value)

    torch.save({"state_dict": {"x": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pt")
    assert "weights_only" in error(tmp_path / "pickled.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    assert "not a plain tensor checkpoint" in error(tmp_path / "text.pt")
    torch.save({"state_dict": {"visual.proj": "a string"}}, tmp_path / "strings.pt")
    assert "no open_clip state dict" in error(tmp_path / "strings.pt")
    state = torch.load(open_clip_ref["checkpoint"], weights_only=True)["state_dict"]
    torch.save({"state_dict": {**state, "visual.attn_pool.query": torch.zeros(2)}}, tmp_path / "extra.pt")
    assert "keys this arch does not use (visual.attn_pool.query)" in error(tmp_path / "extra.pt")
    assert "not an open_clip ViT CLIP of this arch" in error(open_clip_ref["checkpoint"], arch="ViT-H-14")
    wide = dict(json.loads(open_clip_ref["arch"].read_text()), embed_dim=16)
    (tmp_path / "wide.json").write_text(json.dumps(wide))
    assert "visual_projection.weight is (12, 32), the arch expects (16, 32)" in error(open_clip_ref["checkpoint"],
                                                                                       tmp_path / "wide.json")
    with pytest.raises(ConfigError, match="arch='ViT-Z-99'"):
        build_reward("hps", path=open_clip_ref["checkpoint"], arch="ViT-Z-99", tokenizer_path=open_clip_ref["bpe"])
    bad = dict(json.loads(open_clip_ref["arch"].read_text()), vision_cfg={**VISION, "ls_init_value": 0.1})
    (tmp_path / "ls.json").write_text(json.dumps(bad))
    assert "vision_cfg.ls_init_value=0.1 is not supported" in error(open_clip_ref["checkpoint"], tmp_path / "ls.json")


def test_the_tokenizer_defaults_to_an_installed_open_clips_vocabulary(open_clip_ref, monkeypatch):
    import idcrafter.rewards.hps as hps

    reward = build_reward("hps", path=open_clip_ref["checkpoint"], arch=open_clip_ref["arch"])
    assert reward.scorer.tokenizer_path == open_clip_ref["bpe"]  # found without importing open_clip
    monkeypatch.setattr(hps, "_default_bpe_file", lambda: None)
    with pytest.raises(ConfigError, match="no tokenizer_path given .* pass tokenizer_path=") as err:
        build_reward("hps", path=open_clip_ref["checkpoint"])
    assert "\n" not in str(err.value)
