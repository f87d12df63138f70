"""ref_attention_share and dispatch_attention() against independent naive computations."""

from __future__ import annotations

import math

import pytest
import torch

from idcrafter.core.attention import dispatch_attention, ref_attention_share


def naive_share(q, k, ranges, scale=None, tau=None):
    """Full softmax over every key, slice the reference columns, renormalise: float64."""
    q, k = q.double(), k.double()
    if tau is not None:
        q = q / tau.double()
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    probs = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)  # [B, H, Lq, Lk]
    mass = torch.stack([probs[..., s:e].sum(-1) for s, e in ranges], dim=-1)  # [B, H, Lq, N]
    share = mass / mass.sum(-1, keepdim=True)
    return share.mean(1).transpose(1, 2)  # [B, N, Lq]


def random_qk(b=2, h=3, lq=11, lk=20, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g, dtype=dtype) * 2
    k = torch.randn(b, h, lk, d, generator=g, dtype=dtype) * 2
    return q, k


RANGES = [(2, 6), (9, 10), (14, 20)]


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 11, 1024])
def test_share_matches_naive(chunk_size):
    q, k = random_qk()
    share = ref_attention_share(q, k, RANGES, chunk_size=chunk_size)
    assert share.shape == (2, 3, 11)
    torch.testing.assert_close(share.double(), naive_share(q, k, RANGES), atol=1e-5, rtol=0)
    torch.testing.assert_close(share.sum(1), torch.ones(2, 11), atol=1e-6, rtol=0)


@pytest.mark.parametrize("layout", ["token", "token_head", "head_first"])
def test_share_with_temperature_matches_naive(layout):
    q, k = random_qk()
    g = torch.Generator().manual_seed(5)
    tau_bhl = torch.rand(2, 3, 11, 1, generator=g) + 0.3  # per head and token
    if layout == "token":
        tau_bhl = tau_bhl[:, :1]
        tau = tau_bhl[:, 0, :, 0]  # [B, Lq]
    elif layout == "token_head":
        tau = tau_bhl[..., 0].permute(0, 2, 1)  # [B, Lq, H]
    else:
        tau = tau_bhl
    share = ref_attention_share(q, k, RANGES, temperature=tau, chunk_size=4)
    torch.testing.assert_close(share.double(), naive_share(q, k, RANGES, tau=tau_bhl), atol=1e-5, rtol=0)


def test_share_scale_argument():
    q, k = random_qk()
    share = ref_attention_share(q, k, RANGES, scale=0.05, chunk_size=5)
    torch.testing.assert_close(share.double(), naive_share(q, k, RANGES, scale=0.05), atol=1e-5, rtol=0)


def test_share_gradients_match_naive():
    q, k = random_qk()
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    q32, k32 = q.clone().requires_grad_(), k.clone().requires_grad_()
    weight = torch.randn(2, 3, 11, dtype=torch.float64)
    (naive_share(q64, k64, RANGES) * weight).sum().backward()
    (ref_attention_share(q32, k32, RANGES, chunk_size=3) * weight.float()).sum().backward()
    torch.testing.assert_close(q32.grad.double(), q64.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(k32.grad.double(), k64.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("with_tau", [False, True])
def test_share_gradcheck(with_tau):
    q, k = random_qk(b=1, h=2, lq=5, lk=9, d=4, dtype=torch.float64)
    q.requires_grad_()
    k.requires_grad_()
    inputs = [q, k]
    if with_tau:
        tau = (torch.rand(1, 5, 2, dtype=torch.float64) + 0.5).requires_grad_()
        inputs.append(tau)

    def fn(*xs):
        tau_ = xs[2] if with_tau else None
        return ref_attention_share(xs[0], xs[1], [(0, 3), (5, 9)], temperature=tau_, chunk_size=2)

    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-6)


def test_share_is_checkpointed_under_grad():
    """Activations kept for backward do not include per-chunk logits: saved tensors stay small."""
    q, k = random_qk(b=1, h=2, lq=256, lk=300, d=8)
    q.requires_grad_()

    def largest_saved(checkpointed):
        saved = []

        def pack(t):
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ref_attention_share(q, k, [(0, 150), (150, 300)], chunk_size=64, checkpointed=checkpointed)
        return max(saved)

    chunk_logits = 2 * 64 * 300  # H * chunk * R
    # Checkpointing keeps only inputs (q chunk, refs, membership), never a chunk's logits.
    assert largest_saved(None) < chunk_logits <= largest_saved(False)


def test_share_rejects_bad_ranges():
    q, k = random_qk()
    with pytest.raises(ValueError, match="outside"):
        ref_attention_share(q, k, [(0, 3), (18, 25)])
    with pytest.raises(ValueError, match="empty"):
        ref_attention_share(q, k, [])
    with pytest.raises(ValueError, match="outside"):
        ref_attention_share(q, k, [(4, 4)])
    with pytest.raises(ValueError, match="temperature"):
        ref_attention_share(q, k, RANGES, temperature=torch.ones(2, 7))


def test_dispatch_attention_matches_softmax():
    """diffusers' layout [B, L, H, D]; a boolean mask keeps keys; "native" and "_native_math" agree."""
    q, k = random_qk(lq=7, lk=9)
    v = torch.randn(2, 3, 9, 8)
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(8), -1) @ v.double()
    q_, k_, v_ = (x.transpose(1, 2) for x in (q, k, v))  # [B, L, H, D]
    for backend in (None, "native", "_native_math"):
        got = dispatch_attention(q_, k_, v_, backend=backend).transpose(1, 2)
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)
    mask = torch.rand(2, 1, 7, 9) > 0.3
    mask[..., 0] = True
    logits = (q.double() @ k.double().transpose(-1, -2) / math.sqrt(8)).masked_fill(~mask, -math.inf)
    masked = torch.softmax(logits, -1) @ v.double()
    for backend in (None, "native", "_native_math"):
        got = dispatch_attention(q_, k_, v_, attn_mask=mask, backend=backend).transpose(1, 2)
        torch.testing.assert_close(got.double(), masked, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="not a valid AttentionBackendName"):
        dispatch_attention(q_, k_, v_, backend="no-such-kernel")


@pytest.mark.parametrize("backend", ["flash", "xformers", "sage"])
def test_masked_call_on_a_maskless_backend_runs_on_sdpa(backend):
    """flash / sage refuse masks and xformers would add a boolean mask as 0 / 1: a masked call on
    them gives SDPA's masked result (on CPU the kernels themselves are not installed)."""
    q, k = random_qk(lq=5, lk=6)
    v = torch.randn(2, 3, 6, 8)
    mask = torch.rand(2, 1, 5, 6) > 0.4
    mask[..., 2] = True
    q_, k_, v_ = (x.transpose(1, 2) for x in (q, k, v))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    assert torch.equal(dispatch_attention(q_, k_, v_, attn_mask=mask, backend=backend), expected)


def test_share_with_key_mask_ignores_padded_subject():
    """Masked keys behave as if absent: a padded subject gets share 0, the others renormalise."""
    q, k = random_qk()
    key_mask = torch.ones(2, 20, dtype=torch.bool)
    key_mask[1, 14:20] = False  # sample 1 has no third subject
    share = ref_attention_share(q, k, RANGES, key_mask=key_mask, chunk_size=4)
    torch.testing.assert_close(share[0].double(), naive_share(q[:1], k[:1], RANGES)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(share[1, :2].double(), naive_share(q[1:], k[1:], RANGES[:2])[0], atol=1e-5, rtol=0)
    assert share[1, 2].abs().max() == 0
    with pytest.raises(ValueError, match="key_mask"):
        ref_attention_share(q, k, RANGES, key_mask=torch.ones(2, 7, dtype=torch.bool))
