"""Shared fixtures: tiny real diffusers models built from small configs, deterministic seeds."""

from __future__ import annotations

import pytest
import torch

TINY_FLUX = dict(
    patch_size=1,
    in_channels=4,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=[4, 6, 6],
)


@pytest.fixture(scope="session", autouse=True)
def _release_deepspeed_shm():
    """At the end of the session, unlink the DeepSpeed /dev/shm buffers its runs left (see ports.py)."""
    from ports import release_leftovers, shm_names

    before = shm_names()
    yield
    release_leftovers(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_flux(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**TINY_FLUX).eval()


def grid_ids(h: int, w: int, t: float = 0.0) -> torch.Tensor:
    """[h*w, 3] rows (t, i, j), row-major: FLUX image position ids."""
    i, j = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return torch.stack([torch.full_like(i, t), i, j], dim=-1).reshape(-1, 3)


def flux_inputs(img_len: int = 16, txt_len: int = 8, batch: int = 1, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, img_len, TINY_FLUX["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(batch, txt_len, TINY_FLUX["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(batch, TINY_FLUX["pooled_projection_dim"], generator=g),
        timestep=torch.full((batch,), 0.5),
        img_ids=grid_ids(4, img_len // 4),
        txt_ids=torch.zeros(txt_len, 3),
        return_dict=False,
    )
