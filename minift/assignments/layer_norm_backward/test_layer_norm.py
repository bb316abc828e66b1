import torch

from layer_norm import layer_norm_backward, layer_norm_forward


def _case(seed, N=6, H=11):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g, dtype=torch.float64) * 3 + 1
    w, b = torch.randn(H, generator=g, dtype=torch.float64), torch.randn(H, generator=g, dtype=torch.float64)
    dy = torch.randn(N, H, generator=g, dtype=torch.float64)
    return x, w, b, dy


def _autograd(x, w, b, dy):
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    return torch.autograd.grad(layer_norm_forward(x, w, b), (x, w, b), dy)


def test_dx():
    x, w, b, dy = _case(0)
    assert torch.allclose(layer_norm_backward(dy, x, w)[0], _autograd(x, w, b, dy)[0], atol=1e-10)


def test_dweight_and_dbias():
    x, w, b, dy = _case(1)
    ours, ref = layer_norm_backward(dy, x, w), _autograd(x, w, b, dy)
    assert torch.allclose(ours[1], ref[1], atol=1e-10) and torch.allclose(ours[2], ref[2], atol=1e-10)


def test_other_shapes():
    x, w, b, dy = _case(2, N=1, H=64)
    assert torch.allclose(layer_norm_backward(dy, x, w)[0], _autograd(x, w, b, dy)[0], atol=1e-10)
