"""Randomly initialised pipeline components built from a preset, for tests, benchmarks and the
built-in default model on machines without downloaded weights.

Every component is the real class (UMT5EncoderModel, AutoencoderKLWan, WanTransformer3DModel,
a fast tokenizer); only the sizes are small.
"""

from __future__ import annotations

import string

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from idcrafter.video.config import IDCrafterConfig
from idcrafter.video.transformer import IDCrafterTransformer

# A tiny Wan VAE with the real architecture: /8 in space, /4 in time (4n+1 frames -> n+1), 16 channels.
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])


def char_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer (printable ASCII) with T5's pad/eos/unk conventions."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=model_max_length
    )


def tiny_text_encoder(vocab_size: int, d_model: int) -> UMT5EncoderModel:
    config = UMT5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32,
    )
    return UMT5EncoderModel(config).eval()


def build_components(config: IDCrafterConfig, seed: int = 0) -> dict:
    """tokenizer, text_encoder, vae, transformer, scheduler for `config`, randomly initialised."""
    torch.manual_seed(seed)
    tokenizer = char_tokenizer(config.text_length)
    text_encoder = tiny_text_encoder(len(tokenizer), config.wan["text_dim"])
    if config.latent_channels == 16:
        vae = AutoencoderKLWan(**TINY_VAE).eval()
    else:  # the toy world's lossless codec: 3 * f^2 latent channels
        from idcrafter.toyworld.codec import PixelUnshuffleCodec

        factor = int(round((config.latent_channels / 3) ** 0.5))
        vae = PixelUnshuffleCodec(factor=factor).eval()
    transformer = IDCrafterTransformer.from_idcrafter_config(config).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=config.flow_shift)
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)
