"""A lossless latent codec for toy frames behind the Wan VAE's encode/decode interface.

Pixel-unshuffle by a factor f: frames [B, 3, F, H, W] in [-1, 1] -> latents [B, 3 f^2, F, H/f, W/f],
one latent frame per frame (no temporal compression). Decoding is the exact inverse, so the toy
world measures the transformer's mechanisms, not a VAE's reconstruction error (a Wan-architecture
VAE trained on a CPU stays far from lossless in the time a toy build allows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin


class _Deterministic:
    """Stands in for a diagonal Gaussian with zero variance: mode() == sample() == the latents."""

    def __init__(self, latents: torch.Tensor):
        self.latents = latents

    def mode(self) -> torch.Tensor:
        return self.latents

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.latents


class PixelUnshuffleCodec(ModelMixin, ConfigMixin):
    """encode(x).latent_dist.mode() and decode(z).sample, like `AutoencoderKLWan`; exact inverse pair."""

    @register_to_config
    def __init__(
        self,
        factor: int = 8,
        in_channels: int = 3,
        z_dim: int | None = None,
        latents_mean: list[float] | None = None,
        latents_std: list[float] | None = None,
        scale_factor_spatial: int | None = None,
        scale_factor_temporal: int = 1,
        temperal_downsample: list[bool] | None = None,
    ):
        super().__init__()
        expected = in_channels * factor * factor
        if z_dim not in (None, expected) or scale_factor_spatial not in (None, factor) or scale_factor_temporal != 1:
            raise ValueError(f"PixelUnshuffleCodec: inconsistent config for factor {factor} and {in_channels} channels")
        # The pipeline reads these as it does the Wan VAE's and normalises latents as (z - mean) / std;
        # 0.5 brings pixels in [-1, 1] to about unit variance.
        self.register_to_config(
            z_dim=expected, latents_mean=latents_mean or [0.0] * expected, latents_std=latents_std or [0.5] * expected,
            scale_factor_spatial=factor, temperal_downsample=temperal_downsample or [False, False, False],
        )
        # A parameter-free model still needs one tensor for dtype/device bookkeeping and saving.
        self.register_buffer("anchor", torch.zeros(1))

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """x: [B, C, F, H, W] -> latents [B, C f^2, F, H/f, W/f]."""
        f = self.config.factor
        b, c, frames, h, w = x.shape
        if h % f or w % f:
            raise ValueError(f"PixelUnshuffleCodec: frame size {h}x{w} is not a multiple of {f}")
        z = F.pixel_unshuffle(x.transpose(1, 2).flatten(0, 1), f)  # [B*F, C f^2, H/f, W/f]
        z = z.unflatten(0, (b, frames)).transpose(1, 2)
        dist = _Deterministic(z)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        """latents [B, C f^2, F, h, w] -> frames [B, C, F, h f, w f]."""
        f = self.config.factor
        b, _, frames = z.shape[:3]
        x = F.pixel_shuffle(z.transpose(1, 2).flatten(0, 1), f).unflatten(0, (b, frames)).transpose(1, 2)
        return DecoderOutput(sample=x) if return_dict else (x,)


class PixelUnshuffleImageCodec(ModelMixin, ConfigMixin):
    """The same lossless pixel-unshuffle behind the `AutoencoderKL` interface FLUX pipelines read.

    encode(x [B, 3, H, W]).latent_dist.mode() -> [B, 3 f^2, H/f, W/f]; decode(z).sample is the exact
    inverse. `block_out_channels` has log2(f) + 1 entries so `2 ** (len - 1)` (the pipelines'
    vae_scale_factor) is f; scaling_factor 2 brings pixels in [-1, 1] to about unit variance.
    """

    @register_to_config
    def __init__(
        self,
        factor: int = 4,
        in_channels: int = 3,
        latent_channels: int | None = None,
        block_out_channels: list[int] | None = None,
        scaling_factor: float = 2.0,
        shift_factor: float = 0.0,
    ):
        super().__init__()
        if factor < 1 or factor & (factor - 1):
            raise ValueError(f"PixelUnshuffleImageCodec: factor must be a power of two, got {factor}")
        expected = in_channels * factor * factor
        if latent_channels not in (None, expected):
            raise ValueError(f"PixelUnshuffleImageCodec: latent_channels must be {expected} for factor {factor}")
        levels = factor.bit_length()  # log2(f) + 1
        self.register_to_config(latent_channels=expected, block_out_channels=block_out_channels or [expected] * levels)
        if 2 ** (len(self.config.block_out_channels) - 1) != factor:
            raise ValueError(f"PixelUnshuffleImageCodec: block_out_channels must have {levels} entries for factor {factor}")
        self.register_buffer("anchor", torch.zeros(1))

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """x: [B, C, H, W] -> latents [B, C f^2, H/f, W/f]."""
        f = self.config.factor
        if x.ndim != 4 or x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"PixelUnshuffleImageCodec: expected [B, C, H, W] with H, W multiples of {f}, got {tuple(x.shape)}")
        dist = _Deterministic(F.pixel_unshuffle(x, f))
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        """latents [B, C f^2, h, w] -> images [B, C, h f, w f]."""
        x = F.pixel_shuffle(z, self.config.factor)
        return DecoderOutput(sample=x) if return_dict else (x,)
