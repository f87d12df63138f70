"""HPS v2 / v2.1 (Human Preference Score v2): MultiCrafter's aesthetic reward R_aes (MultiCrafter supp. Sec. B).

HPS v2 is an OpenCLIP ViT-H-14 fine-tuned on human preference pairs (HPD v2). Its score, as the
HPSv2 package computes it (`hpsv2.score`), is the cosine of the prompt and the image:

    hps = unit(visual(preprocess(image))) . unit(text(tokenize(prompt)))      (about 0.2-0.3 on real images)

and for a video the mean over the sampled frames. ID-Crafter's R_aes is the LAION aesthetic MLP
(`aesthetic`); MultiCrafter's image composite uses this reward instead (`IMAGE_WEIGHTS`).

The checkpoint (`HPS_v2_compressed.pt`, `HPS_v2.1_compressed.pt`) is an open_clip state dict. open_clip
imports torchvision when the package is imported, so the model is rebuilt here without it, as a
transformers `CLIPModel` (`convert_open_clip_state_dict`):

    visual.conv1.weight                      -> vision_model.embeddings.patch_embedding.weight
    visual.class_embedding                   -> vision_model.embeddings.class_embedding
    visual.positional_embedding              -> vision_model.embeddings.position_embedding.weight
    visual.ln_pre / visual.ln_post           -> vision_model.pre_layrnorm / vision_model.post_layernorm
    visual.proj [width, D]                   -> visual_projection.weight [D, width] (transposed)
    token_embedding / positional_embedding   -> text_model.embeddings.token_embedding / position_embedding
    ln_final                                 -> text_model.final_layer_norm
    text_projection [width, D]               -> text_projection.weight [D, width] (transposed)
    logit_scale                              -> logit_scale
    every residual block (visual.transformer.resblocks.i / transformer.resblocks.i -> .encoder.layers.i):
    ln_1, ln_2 -> layer_norm1, layer_norm2;   mlp.c_fc, mlp.c_proj -> mlp.fc1, mlp.fc2;
    attn.out_proj -> self_attn.out_proj;      attn.in_proj_weight / _bias [3w, ...] -> q_proj, k_proj, v_proj (in that order)

Text is pooled at the argmax of the token ids (open_clip's end-of-text token has the largest id),
after the final layer norm, as open_clip does. Preprocessing is HPSv2's evaluation transform
(`light_augmentation=True` there, i.e. open_clip's `ResizeMaxSize`): the image as a float tensor in
[0, 1], the longer side resized to the model's input size with torchvision's antialiased bicubic
tensor resize (torch `interpolate(bicubic, antialias=True)`), centred zero padding to a square, then
OpenAI CLIP's mean / std. An image whose longer side already equals the input size is only padded.
Tokens are open_clip's: ftfy + HTML unescape, whitespace collapsed, lower case, byte-level BPE with
the OpenAI CLIP vocabulary, `[sot] + tokens + [eot]` cut to the context (77, the last kept token
becomes eot) and padded with 0.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
import os
import pickle
import re
import zipfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from idcrafter.rewards.base import register_reward
from idcrafter.rewards.clip import _FrameReward
from idcrafter.rewards.common import model_dtype, require_path, unit_rows
from idcrafter.utils.deps import require
from idcrafter.utils.errors import ConfigError, FileFormatError

__all__ = [
    "HPSReward",
    "HPSScorer",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "OPEN_CLIP_ARCHS",
    "OpenCLIPTokenizer",
    "build_clip_model",
    "clip_config_from_open_clip",
    "convert_open_clip_state_dict",
    "hps_preprocess",
    "load_open_clip_arch",
    "load_open_clip_state_dict",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# open_clip's model configs for the HPS checkpoints (HPS v2 and v2.1 are both ViT-H-14). Other names
# are read from an installed open_clip's model_configs/ folder, or give a JSON file of that format.
OPEN_CLIP_ARCHS: dict[str, dict] = {
    "ViT-H-14": {
        "embed_dim": 1024,
        "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
    },
}

# open_clip options this conversion reproduces only at these values (anything else is refused).
_VISION_FIXED = {"ls_init_value": (None,), "attentional_pool": (False,), "no_ln_pre": (False,),
                 "pos_embed_type": ("learnable",), "pool_type": ("tok",), "act_kwargs": (None, {}),
                 "norm_kwargs": (None, {}), "block_type": (None, "default"), "qk_norm": (False,),
                 "scaled_cosine_attn": (False,), "scale_heads": (False,), "scale_attn_inner": (False,),
                 "scale_attn": (False,), "scale_fc": (False,), "timm_model_name": (None,),
                 "input_patchnorm": (False,), "global_average_pool": (False,)}
_TEXT_FIXED = {"ls_init_value": (None,), "embed_cls": (False,), "no_causal_mask": (False,),
               "pool_type": ("argmax",), "proj_bias": (False,), "proj_type": ("linear",),
               "hf_model_name": (None,), "hf_tokenizer_name": (None,), "act_kwargs": (None, {}),
               "norm_kwargs": (None, {}), "block_type": (None, "default"), "qk_norm": (False,),
               "scaled_cosine_attn": (False,), "scale_heads": (False,), "scale_attn_inner": (False,),
               "scale_attn": (False,), "scale_fc": (False,)}
_TOP_FIXED = {"init_logit_bias": (None,), "multimodal_cfg": (None,)}


# ------------------------------------------------------------------------------------ checkpoint
def load_open_clip_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The open_clip state dict of an HPS checkpoint: `torch.load(weights_only=True)` of a plain
    {"state_dict": {...}} (HPSv2's release format) or of a bare state dict; a "module." prefix (DDP)
    is dropped. Anything else is refused with a one-line FileFormatError."""
    path = Path(path)
    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise FileFormatError(f"reward 'hps': {path} is not a plain tensor checkpoint that torch.load(weights_only=True) "
                              f"accepts ({first[:160]})") from None
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FileFormatError(f"reward 'hps': {path} holds no open_clip state dict (expected a dict of tensors, "
                              "or {'state_dict': dict of tensors})")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def _open_clip_configs_dir() -> Path | None:
    """An installed open_clip's model_configs folder, found without importing open_clip (it imports torchvision)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model_configs"
    return folder if folder.is_dir() else None


def load_open_clip_arch(arch: str | os.PathLike | Mapping) -> dict:
    """An open_clip model config: a name (built in: ViT-H-14; others from an installed open_clip's
    model_configs/), a .json file of that format, or the dict itself."""
    if isinstance(arch, Mapping):
        return json.loads(json.dumps(dict(arch)))
    name = str(arch)
    if name in OPEN_CLIP_ARCHS:
        return json.loads(json.dumps(OPEN_CLIP_ARCHS[name]))
    path = Path(name).expanduser()
    if not path.is_file():
        folder = _open_clip_configs_dir()
        path = folder / f"{name}.json" if folder is not None else path
    if not path.is_file():
        raise ConfigError(f"reward 'hps': arch={name!r} is neither a known open_clip architecture "
                          f"({', '.join(OPEN_CLIP_ARCHS)}, or one of an installed open_clip) nor a model-config .json file")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FileFormatError(f"reward 'hps': arch file {path} is not readable JSON ({err})") from None
    if not isinstance(config, dict) or not isinstance(config.get("vision_cfg"), dict) or not isinstance(
            config.get("text_cfg"), dict) or "embed_dim" not in config:
        raise FileFormatError(f"reward 'hps': arch file {path} is not an open_clip model config "
                              "(needs embed_dim, vision_cfg, text_cfg)")
    return config


def _check_fixed(where: str, cfg: Mapping, fixed: Mapping[str, tuple]) -> None:
    for key, allowed in fixed.items():
        if key in cfg and cfg[key] not in allowed:
            raise ConfigError(f"reward 'hps': open_clip option {where}.{key}={cfg[key]!r} is not supported "
                              f"(only {' or '.join(repr(a) for a in allowed)}); HPS checkpoints are plain ViT CLIPs")


def clip_config_from_open_clip(arch: Mapping):
    """open_clip model config (embed_dim, quick_gelu, vision_cfg, text_cfg) -> transformers `CLIPConfig`."""
    from transformers import CLIPConfig

    vision, text = dict(arch["vision_cfg"]), dict(arch["text_cfg"])
    _check_fixed("config", arch, _TOP_FIXED)
    _check_fixed("vision_cfg", vision, _VISION_FIXED)
    _check_fixed("text_cfg", text, _TEXT_FIXED)
    layers, image_size = vision.get("layers", 12), vision.get("image_size", 224)
    if not isinstance(layers, int):
        raise ConfigError(f"reward 'hps': vision_cfg.layers={layers!r} is a ResNet tower; only ViT towers are supported")
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            raise ConfigError(f"reward 'hps': non-square image_size {image_size} is not supported")
        image_size = image_size[0]
    width, head_width = int(vision.get("width", 768)), int(vision.get("head_width", 64))
    if width % head_width:
        raise ConfigError(f"reward 'hps': vision width {width} is not a multiple of head_width {head_width}")
    act = "quick_gelu" if arch.get("quick_gelu", False) else "gelu"
    text_width = int(text.get("width", 512))
    return CLIPConfig(
        text_config=dict(vocab_size=int(text.get("vocab_size", 49408)), hidden_size=text_width,
                         intermediate_size=int(text_width * float(text.get("mlp_ratio", 4.0))),
                         num_hidden_layers=int(text.get("layers", 12)), num_attention_heads=int(text.get("heads", 8)),
                         max_position_embeddings=int(text.get("context_length", 77)), hidden_act=act,
                         layer_norm_eps=1e-5),
        vision_config=dict(hidden_size=width, intermediate_size=int(width * float(vision.get("mlp_ratio", 4.0))),
                           num_hidden_layers=int(layers), num_attention_heads=width // head_width,
                           image_size=int(image_size), patch_size=int(vision.get("patch_size", 16)), hidden_act=act,
                           layer_norm_eps=1e-5),
        projection_dim=int(arch["embed_dim"]),
    )


def convert_open_clip_state_dict(state: Mapping[str, torch.Tensor], vision_layers: int,
                                 text_layers: int) -> dict[str, torch.Tensor]:
    """open_clip `CLIP` state dict -> transformers `CLIPModel` state dict (mapping in the module doc).

    A `CustomTextCLIP` layout (text tower under "text.") is accepted too. Every key must be used:
    a missing or an unknown one is a one-line FileFormatError."""
    src = {(k[len("text."):] if k.startswith("text.") else k): v for k, v in state.items()}
    src.pop("attn_mask", None)  # the causal mask buffer, present in some older saves
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in src:
            raise FileFormatError(f"reward 'hps': the checkpoint has no {key!r} (not an open_clip ViT CLIP of this arch)")
        used.add(key)
        return src[key]

    out: dict[str, torch.Tensor] = {"logit_scale": take("logit_scale")}

    def blocks(prefix: str, dst: str, count: int) -> None:
        for i in range(count):
            s, d = f"{prefix}.{i}.", f"{dst}.{i}."
            for part in ("weight", "bias"):
                q, k, v = take(f"{s}attn.in_proj_{part}").chunk(3, dim=0)
                out[f"{d}self_attn.q_proj.{part}"], out[f"{d}self_attn.k_proj.{part}"] = q, k
                out[f"{d}self_attn.v_proj.{part}"] = v
                out[f"{d}self_attn.out_proj.{part}"] = take(f"{s}attn.out_proj.{part}")
                out[f"{d}layer_norm1.{part}"] = take(f"{s}ln_1.{part}")
                out[f"{d}layer_norm2.{part}"] = take(f"{s}ln_2.{part}")
                out[f"{d}mlp.fc1.{part}"] = take(f"{s}mlp.c_fc.{part}")
                out[f"{d}mlp.fc2.{part}"] = take(f"{s}mlp.c_proj.{part}")

    out["vision_model.embeddings.class_embedding"] = take("visual.class_embedding")
    out["vision_model.embeddings.patch_embedding.weight"] = take("visual.conv1.weight")
    out["vision_model.embeddings.position_embedding.weight"] = take("visual.positional_embedding")
    for part in ("weight", "bias"):
        out[f"vision_model.pre_layrnorm.{part}"] = take(f"visual.ln_pre.{part}")
        out[f"vision_model.post_layernorm.{part}"] = take(f"visual.ln_post.{part}")
        out[f"text_model.final_layer_norm.{part}"] = take(f"ln_final.{part}")
    blocks("visual.transformer.resblocks", "vision_model.encoder.layers", vision_layers)
    out["visual_projection.weight"] = take("visual.proj").t()
    out["text_model.embeddings.token_embedding.weight"] = take("token_embedding.weight")
    out["text_model.embeddings.position_embedding.weight"] = take("positional_embedding")
    blocks("transformer.resblocks", "text_model.encoder.layers", text_layers)
    out["text_projection.weight"] = take("text_projection").t()
    unknown = sorted(set(src) - used)
    if unknown:
        raise FileFormatError(f"reward 'hps': the checkpoint has {len(unknown)} keys this arch does not use "
                              f"({', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}); check arch=")
    return {k: v.contiguous() for k, v in out.items()}


def build_clip_model(state: Mapping[str, torch.Tensor], arch: str | os.PathLike | Mapping = "ViT-H-14",
                     dtype: torch.dtype = torch.float32):
    """A transformers `CLIPModel` holding an open_clip checkpoint, in eval mode, without gradients.
    Built on the meta device and filled from the state dict, so no random initialisation runs."""
    from transformers import CLIPModel

    config = clip_config_from_open_clip(load_open_clip_arch(arch))
    converted = convert_open_clip_state_dict(state, config.vision_config.num_hidden_layers,
                                             config.text_config.num_hidden_layers)
    with torch.device("meta"):
        model = CLIPModel(config)
    expected = model.state_dict()
    for key, value in converted.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise FileFormatError(f"reward 'hps': the checkpoint does not fit the arch: {key} is {tuple(value.shape)}, "
                                  f"the arch expects {tuple(expected[key].shape)}")
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise FileFormatError(f"reward 'hps': conversion left {missing[:3]} unset")
    model.load_state_dict({k: v.to(dtype) for k, v in converted.items()}, strict=True, assign=True)
    # The position ids are non-persistent buffers: rebuild them off the meta device.
    for embeddings in (model.text_model.embeddings, model.vision_model.embeddings):
        count = embeddings.position_embedding.num_embeddings
        embeddings.register_buffer("position_ids", torch.arange(count).expand((1, -1)), persistent=False)
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------ inputs
def hps_preprocess(images: list[np.ndarray], size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    """RGB uint8 [H, W, 3] images -> float32 [N, 3, size, size], HPSv2's evaluation transform (module doc)."""
    out = []
    for image in images:
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
        height, width = x.shape[1:]
        scale = size / float(max(height, width))
        if scale != 1.0:
            new = (round(height * scale), round(width * scale))
            x = F.interpolate(x[None], size=new, mode="bicubic", align_corners=False, antialias=True)[0]
        pad_h, pad_w = size - x.shape[1], size - x.shape[2]
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
        out.append(x)
    if not out:
        return torch.zeros(0, 3, size, size)
    pixels = torch.stack(out)
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level BPE alphabet: printable bytes map to themselves, the others to 256 + n.
    The order (printable bytes first, then the others) is the order of the first 256 vocabulary ids."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in keep}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + n)
    return chars


def clip_tokenizer_from_bpe(path: str | os.PathLike, vocab_size: int = 49408):
    """transformers `CLIPTokenizer` from open_clip's / OpenAI's `bpe_simple_vocab_16e6.txt.gz`: the
    vocabulary is the 256 byte symbols, the same with "</w>", the first `vocab_size - 514` merges and
    the two special tokens, in that order (the ids open_clip and OpenAI CLIP use)."""
    from transformers import CLIPTokenizer

    lines = gzip.open(str(path)).read().decode("utf-8").split("\n")
    count = vocab_size - 2 * 256 - 2
    merges = [tuple(line.split()) for line in lines[1:1 + count]]
    if count <= 0 or len(merges) != count or any(len(m) != 2 for m in merges):
        raise FileFormatError(f"reward 'hps': {path} does not hold {count} BPE merges for a {vocab_size}-token vocabulary")
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={s: i for i, s in enumerate(vocab_list)}, merges=merges)


def _default_bpe_file() -> Path | None:
    """open_clip's bundled BPE vocabulary, found without importing open_clip."""
    folder = _open_clip_configs_dir()
    bpe = folder.parent / "bpe_simple_vocab_16e6.txt.gz" if folder is not None else None
    return bpe if bpe is not None and bpe.is_file() else None


class OpenCLIPTokenizer:
    """open_clip's `tokenize` on top of a transformers CLIP tokenizer: texts -> int64 [N, context_length].

    Args:
        source: a CLIP tokenizer folder (vocab.json + merges.txt or tokenizer.json, e.g. the one of any
            OpenAI / LAION CLIP on the hub, saved locally) or a `bpe_simple_vocab_16e6.txt.gz` file.
        context_length: open_clip's text context (77).
        vocab_size: the text tower's vocabulary (49408), used to read a .txt.gz vocabulary.
    """

    def __init__(self, source: str | os.PathLike, context_length: int = 77, vocab_size: int = 49408):
        source = Path(source)
        if source.is_dir():
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
        else:
            self.tokenizer = clip_tokenizer_from_bpe(source, vocab_size)
        vocab = self.tokenizer.get_vocab()
        if "<|startoftext|>" not in vocab or "<|endoftext|>" not in vocab:
            raise FileFormatError(f"reward 'hps': the tokenizer in {source} is not a CLIP tokenizer "
                                  "(no <|startoftext|> / <|endoftext|>)")
        self.sot, self.eot = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
        self.context_length = int(context_length)
        self.ftfy = require("ftfy", extra="hps")

    def clean(self, text: str) -> str:
        """open_clip's cleaning: ftfy, HTML entities unescaped (twice), whitespace collapsed, lower case."""
        text = html.unescape(html.unescape(self.ftfy.fix_text(text))).strip()
        return re.sub(r"\s+", " ", text).strip().lower()

    def __call__(self, texts: list[str]) -> torch.Tensor:
        result = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = self.tokenizer(self.clean(str(text)), add_special_tokens=False)["input_ids"]
            tokens = [self.sot, *ids, self.eot]
            if len(tokens) > self.context_length:
                tokens = tokens[: self.context_length]
                tokens[-1] = self.eot
            result[i, : len(tokens)] = torch.tensor(tokens)
        return result


# ------------------------------------------------------------------------------------ scorer
class HPSScorer:
    """An HPS checkpoint as a transformers CLIPModel: `images` / `texts` -> unit float32 [N, D] on the CPU.

    Args:
        path: the checkpoint (`HPS_v2_compressed.pt`, `HPS_v2.1_compressed.pt`).
        arch: open_clip architecture name or model-config .json (default ViT-H-14, HPS v2 and v2.1).
        tokenizer_path: CLIP tokenizer folder or `bpe_simple_vocab_16e6.txt.gz`; default: the BPE file
            of an installed open_clip (the `hps` extra installs it).
    """

    def __init__(self, path: str | os.PathLike | None, arch: str | os.PathLike | Mapping = "ViT-H-14",
                 tokenizer_path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype | None = None, batch_size: int = 16, reward: str = "hps"):
        self.path = require_path(reward, path, "HPS_v2_compressed.pt or HPS_v2.1_compressed.pt, an open_clip checkpoint")
        if tokenizer_path is None:
            tokenizer_path = _default_bpe_file()
            if tokenizer_path is None:
                raise ConfigError(f"reward {reward!r}: no tokenizer_path given and open_clip is not installed; pass "
                                  "tokenizer_path=... (a CLIP tokenizer folder or bpe_simple_vocab_16e6.txt.gz)")
        self.tokenizer_path = require_path(reward, tokenizer_path, "a CLIP tokenizer folder or bpe_simple_vocab_16e6.txt.gz",
                                           "tokenizer_path")
        self.arch = load_open_clip_arch(arch)  # checked now: a bad name fails before anything loads
        self.device, self.dtype = torch.device(device), model_dtype(dtype)
        if int(batch_size) < 1:
            raise ConfigError(f"reward {reward!r}: batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.model = self.tokenizer = None

    def load(self) -> HPSScorer:
        if self.model is None:
            model = build_clip_model(load_open_clip_state_dict(self.path), self.arch, self.dtype)
            text = model.config.text_config
            self.tokenizer = OpenCLIPTokenizer(self.tokenizer_path, text.max_position_embeddings, text.vocab_size)
            if max(self.tokenizer.sot, self.tokenizer.eot) >= text.vocab_size:
                raise FileFormatError(f"reward 'hps': the tokenizer's special tokens ({self.tokenizer.sot}, "
                                      f"{self.tokenizer.eot}) lie outside the {text.vocab_size}-token text tower")
            self.model = model.to(self.device)
        return self

    @property
    def image_size(self) -> int:
        return int(self.load().model.config.vision_config.image_size)

    @torch.no_grad()
    def images(self, images: list[np.ndarray]) -> torch.Tensor:
        """RGB uint8 [H, W, 3] images -> unit image embeddings [N, D]."""
        self.load()
        out = [torch.zeros(0, self.model.config.projection_dim)]
        for i in range(0, len(images), self.batch_size):
            pixels = hps_preprocess(list(images[i:i + self.batch_size]), self.image_size)
            pooled = self.model.vision_model(pixel_values=pixels.to(self.device, self.dtype)).pooler_output
            out.append(unit_rows(self.model.visual_projection(pooled)).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        """Strings -> unit text embeddings [N, D], pooled at the end-of-text token (the argmax id)."""
        self.load()
        ids = self.tokenizer(list(texts)).to(self.device)
        hidden = self.model.text_model(input_ids=ids).last_hidden_state  # after the final layer norm
        pooled = hidden[torch.arange(len(ids), device=ids.device), ids.argmax(-1)]
        return unit_rows(self.model.text_projection(pooled)).cpu()


@register_reward("hps")
class HPSReward(_FrameReward):
    """HPS v2 / v2.1: cosine of the prompt and each sampled frame (HPSv2's score), averaged over frames.

    MultiCrafter's R_aes (supp. Sec. B, weight 0.7 in `IMAGE_WEIGHTS`); ID-Crafter's R_aes is `aesthetic`.
    Options: path (the .pt checkpoint), arch (open_clip name or config .json, ViT-H-14), tokenizer_path
    (CLIP tokenizer folder or bpe_simple_vocab_16e6.txt.gz; default: an installed open_clip's), device,
    dtype (HPSv2 scores under fp16 autocast; float32 by default here), batch_size, stride, max_frames.
    """

    name = "hps"

    def __init__(self, path=None, arch: str = "ViT-H-14", tokenizer_path=None, device="cpu", dtype=None,
                 batch_size: int = 16, stride: int = 1, max_frames: int | None = 8):
        super().__init__(device, stride, max_frames)
        self.scorer = HPSScorer(path, arch, tokenizer_path, device, dtype, batch_size, reward=self.name)

    def score(self, samples, prompts, refs, meta, warnings: Counter):
        text = self.scorer.texts(prompts)
        return [float((self.scorer.images(self.frames(v)) @ t).mean()) for v, t in zip(samples, text)]
