"""Tiny real training data written to disk: mp4 clips of coloured shapes, reference PNGs, masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from idcrafter.utils.media import write_video

COLOURS = [(230, 40, 40), (40, 90, 230), (40, 200, 80), (240, 200, 30)]


def write_manifest(folder: Path, n: int = 4, frames: int = 9, size: int = 64, masks: bool = True,
                   extra_lines: list[str] | None = None, seed: int = 0) -> Path:
    """n samples, each two squares of fixed colours moving right over grey; masks as PNGs."""
    folder = Path(folder)
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        colours = [COLOURS[(i + k) % len(COLOURS)] for k in range(2)]
        boxes = [(4 + 28 * k, 8 + int(rng.integers(0, 20)), 26 + 28 * k, 30 + int(rng.integers(0, 20))) for k in range(2)]
        clip = []
        for f in range(frames):
            img = Image.new("RGB", (size, size), (128, 128, 128))
            d = ImageDraw.Draw(img)
            for c, (x0, y0, x1, y1) in zip(colours, boxes):
                d.rectangle((x0 + f // 3, y0, x1 + f // 3, y1), fill=c)
            clip.append(np.asarray(img))
        write_video(np.stack(clip), folder / "videos" / f"{i}.mp4", fps=16)
        subjects = []
        for k, (c, (x0, y0, x1, y1)) in enumerate(zip(colours, boxes)):
            ref = Image.new("RGB", (32, 32), "white")
            ImageDraw.Draw(ref).rectangle((4, 4, 28, 28), fill=c)
            ref.save(folder / "refs" / f"{i}_{k}.png")
            subject = {"image": f"refs/{i}_{k}.png", "category": "object"}
            if masks:
                m = Image.new("L", (size, size), 0)
                ImageDraw.Draw(m).rectangle((x0 + 1, y0, x1 + 2, y1), fill=255)
                m.save(folder / "masks" / f"{i}_{k}.png")
                subject["mask"] = f"masks/{i}_{k}.png"
            subjects.append(subject)
        lines.append(json.dumps({"id": f"s{i}", "video": f"videos/{i}.mp4", "prompt": "two squares move right",
                                 "subjects": subjects, "fps": 16}))
    lines += extra_lines or []
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def save_older_layout(pipe, folder: Path) -> Path:
    """An MCImagePipeline written in the older layout: a stock FLUX diffusers folder (what diffusers'
    FluxPipeline reads, transformer/ without our weights) plus mcimage_adapter/ from `save_adapter`,
    as the built-in toy model and a base model with a trained adapter are."""
    import shutil

    from mcimage.config import ADAPTER_SUBFOLDER
    from mcimage.pipeline import PIPELINE_MODULE

    folder = pipe.save_pretrained(folder)
    shutil.rmtree(folder / "transformer")
    pipe.transformer.to_flux().save_pretrained(folder / "transformer")
    pipe.transformer.save_adapter(folder / ADAPTER_SUBFOLDER)
    (folder / f"{PIPELINE_MODULE}.py").unlink()
    index = json.loads((folder / "model_index.json").read_text())
    index.update(_class_name="FluxPipeline", transformer=["diffusers", "FluxTransformer2DModel"])
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder


def video_refs():
    """Two references of the video pipeline tests: a red disc on white (RGB), a blue square on
    transparency (RGBA, composited on white by the pipeline)."""
    a = Image.new("RGB", (48, 64), "white")
    ImageDraw.Draw(a).ellipse((4, 8, 44, 56), fill=(230, 30, 30))
    b = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    ImageDraw.Draw(b).rectangle((5, 5, 35, 35), fill=(20, 60, 240, 255))
    return [a, b]


# ---------------------------------------------------------------------------- tiny detection models
GD_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "person", "dog", "face", "bag", "upper",
            "lower", "garment", "cat", "object", "dress"]


def build_tiny_grounding_dino(folder, seed: int = 0):
    """A ~170k-parameter Grounding-DINO (Swin 8-wide, BERT 32-wide, 20 queries) with its processor."""
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessorPil,
        GroundingDinoProcessor,
        SwinConfig,
    )

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(GD_WORDS) + "\n")
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(window_size=7, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                                   image_size=64, out_features=["stage2", "stage3", "stage4"], out_indices=[2, 3, 4]),
        text_config=BertConfig(vocab_size=len(GD_WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=20, max_text_len=32,
        encoder_n_points=2, decoder_n_points=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GroundingDinoForObjectDetection(config).eval()
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96}),
        tokenizer=BertTokenizer(str(folder / "vocab.txt")))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_sam(folder, seed: int = 0):
    """A ~17k-parameter SAM (64-pixel encoder, 8-pixel patches) with its processor."""
    from transformers import (
        SamConfig,
        SamImageProcessorPil,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    config = SamConfig(
        vision_config=SamVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32,
                                      output_channels=16, image_size=64, patch_size=8, global_attn_indexes=[0],
                                      window_size=0, num_pos_feats=8),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                 mlp_dim=32, iou_head_hidden_dim=16))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SamModel(config).eval()
    processor = SamProcessor(image_processor=SamImageProcessorPil(size={"longest_edge": 64},
                                                                  pad_size={"height": 64, "width": 64}))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------- tiny embedders
def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A CLIPModel (32-wide towers, 16-d projection) with a character-level tokenizer (any lower-case
    text, digits and ., are in its vocabulary) and a PIL image processor (32 x 32 centre crop)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz.,0123456789":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return Path(folder)


def save_tiny_dinov2(folder: Path, seed: int = 0) -> Path:
    """A Dinov2Model (32-wide, 2 layers, 8-pixel patches) with DINOv2's PIL image processor settings."""
    import torch
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=32,
                          patch_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2Model(config).eval()
    model.save_pretrained(folder)
    BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return Path(folder)
