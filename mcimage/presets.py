"""Randomly initialised MCImagePipeline components for tests (no downloads).

Every component is the real class (CLIPTextModel, T5EncoderModel, AutoencoderKL,
MCImageTransformer, FlowMatchEulerDiscreteScheduler, fast tokenizers); only the sizes are small.
The VAE's latent channels are `config.flux["in_channels"] // 4` (FLUX packs 2x2 patches).
"""

from __future__ import annotations

import string

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from mcimage.config import MCImageConfig
from mcimage.transformer import MCImageTransformer

__all__ = ["TINY_T5_LENGTH", "TOY_FLOW_SHIFT", "build_tiny_components", "char_tokenizer", "is_toy_config"]

TINY_T5_LENGTH = 32  # pass as max_sequence_length to the pipeline with tiny components
TINY_CLIP_LENGTH = 16
TOY_FLOW_SHIFT = 3.0  # the toy world's static shift (the video toy world's finding: shift 1 ignores references)


def is_toy_config(config: MCImageConfig) -> bool:
    """The toy image world's configs run on the pixel-unshuffle codec instead of a VAE."""
    return config.preset.startswith("toyworld")


def char_tokenizer(specials: list[str], pad: str, eos: str, unk: str, bos: str | None, max_length: int):
    """A character-level fast tokenizer (printable ASCII); `specials` get the first ids."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    single = f"{bos} $A {eos}" if bos else f"$A {eos}"
    special = [(eos, vocab[eos])] + ([(bos, vocab[bos])] if bos else [])
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=special)
    kwargs = dict(pad_token=pad, eos_token=eos, unk_token=unk, model_max_length=max_length)
    if bos:
        kwargs["bos_token"] = bos
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def build_tiny_components(config: MCImageConfig, seed: int = 0) -> dict:
    """tokenizer, text_encoder, tokenizer_2, text_encoder_2, vae, transformer, scheduler.

    Toy-world configs (`is_toy_config`) get the lossless `PixelUnshuffleImageCodec` as VAE, a T5
    tokenizer of `config.text_length` characters and a static flow shift of 3.
    """
    toy = is_toy_config(config)
    t5_length = config.text_length if toy else TINY_T5_LENGTH
    flux = config.flux
    if flux["in_channels"] % 4:
        raise ValueError(f"build_tiny_components: flux in_channels {flux['in_channels']} is not 4 * latent channels")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = char_tokenizer(
            ["<|pad|>", "<|startoftext|>", "<|unk|>", "<|endoftext|>"], "<|pad|>", "<|endoftext|>", "<|unk|>",
            "<|startoftext|>", TINY_CLIP_LENGTH,
        )
        clip = CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=flux["pooled_projection_dim"],
            intermediate_size=2 * flux["pooled_projection_dim"], num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=TINY_CLIP_LENGTH, projection_dim=flux["pooled_projection_dim"],
            pad_token_id=0, bos_token_id=1, eos_token_id=3,  # not 2: CLIP's legacy argmax pooling
        )
        text_encoder = CLIPTextModel(clip).eval()
        tokenizer_2 = char_tokenizer(["<pad>", "</s>", "<unk>"], "<pad>", "</s>", "<unk>", None, t5_length)
        t5 = T5Config(
            vocab_size=len(tokenizer_2), d_model=flux["joint_attention_dim"], d_kv=8, d_ff=2 * flux["joint_attention_dim"],
            num_layers=1, num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=32,
        )
        text_encoder_2 = T5EncoderModel(t5).eval()
        if toy:
            from idcrafter.toyworld.codec import PixelUnshuffleImageCodec

            factor = int(round((flux["in_channels"] // 12) ** 0.5))  # 4 * 3 f^2 packed channels
            vae = PixelUnshuffleImageCodec(factor=factor).eval()
        else:
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                latent_channels=flux["in_channels"] // 4, norm_num_groups=8, sample_size=32,
                scaling_factor=1.0, shift_factor=0.0,
            ).eval()
        transformer = MCImageTransformer.from_mc_config(config, seed=seed).eval()
    if toy:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=TOY_FLOW_SHIFT, use_dynamic_shifting=False)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    return dict(
        tokenizer=tokenizer, text_encoder=text_encoder, tokenizer_2=tokenizer_2, text_encoder_2=text_encoder_2,
        vae=vae, transformer=transformer, scheduler=scheduler,
    )
