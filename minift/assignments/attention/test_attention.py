import torch
import torch.nn.functional as F

from attention import attention


def _qkv(B=2, H=3, T=7, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(3)]


def test_matches_sdpa_without_mask():
    q, k, v = _qkv()
    assert torch.allclose(attention(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=1e-10)


def test_matches_sdpa_with_mask():
    q, k, v = _qkv(seed=1)
    mask = torch.tensor([[True] * 5 + [False] * 2, [True] * 7])
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    assert torch.allclose(attention(q, k, v, mask), ref, atol=1e-10)


def test_fully_masked_row_is_zero_not_nan():
    q, k, v = _qkv(seed=2)
    mask = torch.tensor([[False] * 7, [True] * 3 + [False] * 4])
    out = attention(q, k, v, mask)
    assert torch.isfinite(out).all() and (out[0] == 0).all()


def test_gradients_flow():
    q, k, v = (t.requires_grad_() for t in _qkv(seed=3))
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v), (q, k, v), fast_mode=True)
