"""Subject encoder: VAE latents of each reference -> 2x2 patch tokens + a subject-index embedding.

The frozen Wan VAE runs in the pipeline (or the data cache); this module holds only the trainable
part, so training never keeps the VAE in the optimizer and the adapter stays small.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sincos_2d(h: int, w: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """Fixed 2-d sine-cosine position embedding [h*w, dim] (row-major), no parameters.

    Gives the subject tower a sense of layout inside a reference at any resolution.
    """
    if dim % 4:
        raise ValueError(f"sincos_2d: dim must be a multiple of 4, got {dim}")
    quarter = dim // 4
    freqs = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32), torch.arange(w, device=device, dtype=torch.float32), indexing="ij"
    )
    ay, ax = ys.reshape(-1, 1) * freqs, xs.reshape(-1, 1) * freqs
    return torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1).to(dtype)


class SubjectEncoder(nn.Module):
    """Reference latents [B, N, C, h, w] (or [B, N, C, 1, h, w]) -> tokens [B, N, T, D].

    T = (h / p) * (w / p) with p the patch size; token t of subject k is
    patch_embed(latent_k)_t + pos_t + index_embedding[k].
    """

    def __init__(self, latent_channels: int, dim: int, max_subjects: int, patch: int = 2):
        super().__init__()
        self.patch = patch
        self.max_subjects = max_subjects
        self.patch_embedding = nn.Conv2d(latent_channels, dim, kernel_size=patch, stride=patch)
        self.index_embedding = nn.Embedding(max_subjects, dim)
        nn.init.normal_(self.index_embedding.weight, std=0.02)
        self.norm = nn.LayerNorm(dim)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.dim() == 6:  # [B, N, C, 1, h, w]: one latent frame per reference
            if latents.shape[3] != 1:
                raise ValueError(f"SubjectEncoder: references must be one latent frame, got {latents.shape[3]}")
            latents = latents[:, :, :, 0]
        if latents.dim() != 5:
            raise ValueError(f"SubjectEncoder: latents must be [B, N, C, h, w], got {tuple(latents.shape)}")
        b, n, c, h, w = latents.shape
        if n > self.max_subjects:
            raise ValueError(f"SubjectEncoder: {n} subjects, this model supports at most {self.max_subjects}")
        if h % self.patch or w % self.patch:
            raise ValueError(f"SubjectEncoder: latent size {h}x{w} is not a multiple of the patch {self.patch}")
        x = self.patch_embedding(latents.flatten(0, 1).to(self.patch_embedding.weight.dtype))  # [B*N, D, h/p, w/p]
        x = x.flatten(2).transpose(1, 2)  # [B*N, T, D]
        x = x + sincos_2d(h // self.patch, w // self.patch, x.shape[-1], x.device, x.dtype)
        x = x.unflatten(0, (b, n))
        index = self.index_embedding(torch.arange(n, device=x.device))  # [N, D]
        return self.norm(x + index[None, :, None, :])
