"""VLM semantic encoder on a tiny random Qwen2.5-VL written to disk and loaded back: shapes, masks,
batching, image handling, the trainable connector and the content-keyed disk cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from idcrafter.video.vlm import (
    INSTRUCTION,
    QWEN_SPECIAL_TOKENS,
    VISION_PATCH_MULTIPLE,
    Qwen2_5_VLImageTextProcessor,
    VLMConnector,
    VLMEmbeddingCache,
    VLMOutput,
    VLMSemanticEncoder,
    build_tiny_qwen2_5_vl,
    fit_to_patch_grid,
    pad_states,
    to_rgb,
)

MAX_SIDE = 112  # at most 4 x 4 = 16 vision tokens per reference keeps the test fast


def gradient(width: int, height: int, flip: bool = False) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, 255 - x] if not flip else [255 - y, x, y], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def shape_rgba(width: int, height: int, color=(220, 30, 30, 255)) -> Image.Image:
    image = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    ImageDraw.Draw(image).ellipse([width // 5, height // 5, 4 * width // 5, 4 * height // 5], fill=color)
    return image


PROMPTS = ["a red ball on a table", "a cat and a dog walk in the park"]


def refs():
    return [[shape_rgba(90, 70)], [gradient(120, 80), gradient(64, 100, flip=True).convert("L")]]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("vlm") / "tiny-qwen2.5-vl", seed=0)


@pytest.fixture(scope="module")
def encoder(tiny_folder):
    return VLMSemanticEncoder.from_pretrained(tiny_folder, max_image_side=MAX_SIDE)


class CallCounter:
    """Counts forward calls of the VLM (a forward hook on the whole model)."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ---------------------------------------------------------------------------- tiny model
def test_tiny_model_folder_matches_tokenizer(tiny_folder, encoder):
    config = json.loads((tiny_folder / "config.json").read_text())
    tok = encoder.processor.tokenizer
    assert config["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>")
    assert config["video_token_id"] == tok.convert_tokens_to_ids("<|video_pad|>")
    assert config["vision_start_token_id"] == tok.convert_tokens_to_ids("<|vision_start|>")
    assert config["vision_end_token_id"] == tok.convert_tokens_to_ids("<|vision_end|>")
    for token in QWEN_SPECIAL_TOKENS:  # each special token is one id, never split by the BPE
        assert tok.tokenize(token) == [token]
    assert encoder.model.config.text_config.vocab_size == len(tok)
    assert isinstance(encoder.processor, Qwen2_5_VLImageTextProcessor)
    assert (
        json.loads((tiny_folder / "processor_config.json").read_text())["processor_class"]
        == "Qwen2_5_VLProcessor"
    )
    assert encoder.hidden_size == 32
    text = encoder.processor.apply_chat_template(encoder.messages("a cat", 2), tokenize=False)
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert text.index("<|image_pad|>") < text.index(INSTRUCTION.format(prompt="a cat"))


def test_tiny_model_is_deterministic_per_seed(tmp_path, tiny_folder):
    from safetensors.torch import load_file

    again = build_tiny_qwen2_5_vl(tmp_path / "again", seed=0)
    other = build_tiny_qwen2_5_vl(tmp_path / "other", seed=1)
    base, same, diff = (load_file(f / "model.safetensors") for f in (tiny_folder, again, other))
    assert all(torch.equal(base[k], same[k]) for k in base)
    assert not all(torch.equal(base[k], diff[k]) for k in base)
    assert (tiny_folder / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()


# ---------------------------------------------------------------------------- encoding
def test_encode_shapes_mask_and_batching(encoder):
    out = encoder.encode(PROMPTS, refs())
    assert isinstance(out, VLMOutput)
    assert out.states.shape[0] == 2 and out.states.shape[2] == 32 and out.states.dtype == torch.float32
    assert out.mask.dtype == torch.bool and torch.isfinite(out.states).all()
    for i, (prompt, images) in enumerate(zip(PROMPTS, refs())):
        # The valid length is the sample's own token count: text plus its vision tokens.
        text = encoder.processor.apply_chat_template(encoder.messages(prompt, len(images)), tokenize=False)
        inputs = encoder.processor(
            text=[text], images=[encoder.prepare_image(im) for im in images], return_tensors="pt"
        )
        n = inputs["input_ids"].shape[1]
        assert out.mask[i].sum() == n and out.mask[i, :n].all()  # right-padded: a valid prefix
        assert (out.states[i, n:] == 0).all()
        alone = encoder.encode([prompt], [images])
        assert alone.states.shape[1] == n
        torch.testing.assert_close(out.states[i, :n], alone.states[0], rtol=1e-5, atol=1e-5)
    assert out.lengths()[1] > out.lengths()[0]  # two references give more vision tokens
    assert out.states.shape[1] == max(out.lengths())


def test_encode_is_deterministic_and_sees_the_images(encoder):
    first = encoder.encode(PROMPTS, refs())
    again = encoder.encode(PROMPTS, refs())
    assert torch.equal(first.states, again.states) and torch.equal(first.mask, again.mask)
    changed = refs()
    changed[0] = [shape_rgba(90, 70, color=(30, 30, 220, 255))]  # same size, blue instead of red
    moved = encoder.encode(PROMPTS, changed)
    assert torch.equal(moved.mask, first.mask)
    assert (moved.states[0] - first.states[0]).abs().max() > 1e-4
    torch.testing.assert_close(moved.states[1], first.states[1])  # the other sample is untouched
    reprompted = encoder.encode(["a blue ball on a table", PROMPTS[1]], refs())
    assert not torch.equal(reprompted.states[0], first.states[0])


def test_encoder_is_frozen_and_validates(encoder):
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())
    out = encoder.encode(PROMPTS[:1], [[gradient(40, 40)]])
    assert not out.states.requires_grad
    with pytest.raises(ValueError, match="2 prompts but 1"):
        encoder.encode(PROMPTS, [[gradient(40, 40)]])
    with pytest.raises(ValueError, match="max_image_side"):
        VLMSemanticEncoder(encoder.model, encoder.processor, max_image_side=20)


def test_missing_model_folder_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        VLMSemanticEncoder.from_pretrained(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*config.json"):
        VLMSemanticEncoder.from_pretrained(tmp_path / "empty")


# ---------------------------------------------------------------------------- images
def test_to_rgb_composites_transparency_on_white():
    clear = to_rgb(Image.new("RGBA", (8, 8), (255, 0, 0, 0)))
    assert clear.mode == "RGB" and np.all(np.asarray(clear) == 255)
    half = np.asarray(to_rgb(Image.new("RGBA", (4, 4), (0, 0, 0, 128))))
    assert np.all(np.abs(half.astype(int) - 127) <= 1)
    solid = np.asarray(to_rgb(shape_rgba(20, 20)))
    assert tuple(solid[10, 10]) == (220, 30, 30) and tuple(solid[0, 0]) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.info["transparency"] = 0
    assert np.all(np.asarray(to_rgb(palette)) == 255)
    assert tuple(np.asarray(to_rgb(Image.new("LA", (2, 2), (0, 0))))[0, 0]) == (255, 255, 255)
    deep = to_rgb(Image.fromarray(np.full((3, 3), 65535, dtype=np.uint16)))  # a 16-bit grey image
    assert deep.mode == "RGB" and np.all(np.asarray(deep) == 255)
    assert tuple(np.asarray(to_rgb(Image.new("L", (2, 2), 77)))[0, 0]) == (77, 77, 77)


@pytest.mark.parametrize(
    "size, max_side, expected",
    [
        ((1000, 500), 448, (448, 224)),
        ((30, 20), 448, (28, 28)),
        ((112, 56), 448, (112, 56)),
        ((449, 90), 112, (112, 28)),
    ],
)
def test_fit_to_patch_grid(size, max_side, expected):
    out = fit_to_patch_grid(Image.new("RGB", size), max_side)
    assert out.size == expected
    assert all(s % VISION_PATCH_MULTIPLE == 0 and s <= max_side for s in out.size)
    with pytest.raises(ValueError, match="max_side"):
        fit_to_patch_grid(Image.new("RGB", size), 20)


# ---------------------------------------------------------------------------- connector
def test_connector_maps_and_trains():
    torch.manual_seed(0)
    connector = VLMConnector(32, 48)
    states = pad_states([torch.randn(7, 32), torch.randn(4, 32)])
    out = connector(states.states, states.mask)
    assert out.shape == (2, 7, 48)
    assert (out[1, 4:] == 0).all() and (out[1, :4] != 0).any()
    assert connector(states.states.to(torch.bfloat16)).dtype == torch.float32

    target = torch.randn(2, 7, 48)
    optimizer = torch.optim.AdamW(connector.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(connector(states.states), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------------------- cache
def test_cache_hits_skip_the_model(encoder, tmp_path):
    cache = VLMEmbeddingCache(tmp_path / "cache")
    with CallCounter(encoder.model) as counter:
        first = encoder.encode(PROMPTS, refs(), cache=cache)
    assert counter.calls == 1
    files = sorted(cache.folder.rglob("*"))
    entries = [f for f in files if f.is_file()]
    assert len(entries) == 2 and all(f.suffix == ".safetensors" for f in entries)
    assert not [f for f in files if ".tmp" in f.name]  # atomic writes leave no temporary files

    with CallCounter(encoder.model) as counter:
        second = encoder.encode(PROMPTS, refs(), cache=cache)
    assert counter.calls == 0
    assert torch.equal(first.states, second.states) and torch.equal(first.mask, second.mask)

    with CallCounter(encoder.model) as counter:  # one changed prompt: one miss, one hit, one call
        mixed = encoder.encode([PROMPTS[0], "a dog alone"], refs(), cache=cache)
    assert counter.calls == 1
    n = first.lengths()[0]
    assert mixed.lengths()[0] == n
    torch.testing.assert_close(mixed.states[0, :n], first.states[0, :n])
    assert len([f for f in cache.folder.rglob("*.safetensors")]) == 3

    uncached = encoder.encode([PROMPTS[0], "a dog alone"], refs())
    torch.testing.assert_close(mixed.states, uncached.states)


def test_cache_key_follows_content(encoder, tmp_path):
    cache = VLMEmbeddingCache(tmp_path)
    images = refs()[1]
    key = cache.key_for("model-a", "a cat", images)
    assert key == cache.key_for("model-a", "a cat", refs()[1]) and len(key) == 64
    assert key != cache.key_for("model-b", "a cat", images)
    assert key != cache.key_for("model-a", "a cat.", images)
    assert key != cache.key_for("model-a", "a cat", images, instruction="Look: {prompt}")
    assert key != cache.key_for("model-a", "a cat", images[:1])
    assert key != cache.key_for("model-a", "a cat", images[::-1])
    edited = images[0].copy()
    edited.putpixel((0, 0), (0, 0, 0))
    assert key != cache.key_for("model-a", "a cat", [edited, images[1]])
    # Keyed on the RGB the model sees: an RGBA reference and its composite on white share a key.
    rgba = shape_rgba(30, 30)
    assert cache.key_for("m", "p", [rgba]) == cache.key_for("m", "p", [to_rgb(rgba)])
    # The encoder's identifier covers the resize setting, which changes the states.
    other = VLMSemanticEncoder(encoder.model, encoder.processor, model_id=encoder.model_id, max_image_side=56)
    assert other.cache_id != encoder.cache_id


def test_cache_put_get_roundtrip(tmp_path):
    cache = VLMEmbeddingCache(tmp_path / "c")
    assert cache.get("ab" * 32) is None and ("ab" * 32) not in cache
    out = pad_states([torch.randn(5, 8)])
    path = cache.put("ab" * 32, out)
    assert path.parent.name == "ab" and ("ab" * 32) in cache
    back = cache.get("ab" * 32)
    assert torch.equal(back.states, out.states) and torch.equal(back.mask, out.mask)
    with pytest.raises(ValueError, match="one sample per key"):
        cache.put("cd" * 32, pad_states([torch.randn(5, 8), torch.randn(3, 8)]))
    cache.path("ef" * 32).parent.mkdir(parents=True)
    cache.path("ef" * 32).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="unreadable entry"):
        cache.get("ef" * 32)
