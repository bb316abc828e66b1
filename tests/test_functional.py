"""Every hand-derived op against PyTorch: forward values, gradcheck and gradgradcheck in float64."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from minift import functional as RF
from minift.functional import naive_attention

f64 = dict(dtype=torch.float64)


def rnd(*shape, seed=0, scale=1.0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, **f64) * scale).requires_grad_(grad)


def padding_mask(B, T, seed=0, empty_row=True):
    """Irregular key-padding masks; batch row 0 is fully masked when empty_row."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    if empty_row:
        lengths[0] = 0
    return torch.arange(T)[None, :] < lengths[:, None]


def check(fn, inputs, gradgrad=True):
    # Large inputs use gradcheck's fast mode: it compares J^T u against random projections of the
    # numerical Jacobian instead of building every column, which is as strict for a wrong formula.
    fast = sum(t.numel() for t in inputs) > 1500
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast)
    if gradgrad:
        assert gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=fast)


def test_linear():
    x, w, b = rnd(2, 5, 7), rnd(3, 7, seed=1), rnd(3, seed=2)
    torch.testing.assert_close(RF.linear(x, w, b), F.linear(x, w, b), rtol=0, atol=1e-12)
    check(RF.linear, (x, w, b))
    check(lambda x, w: RF.linear(x, w, None), (x, w))


def test_embedding_with_repeated_ids():
    ids = torch.tensor([[1, 4, 4, 0], [4, 2, 1, 1]])
    w = rnd(6, 5)
    torch.testing.assert_close(RF.embedding(ids, w), F.embedding(ids, w), rtol=0, atol=0)
    check(lambda w: RF.embedding(ids, w), (w,))
    dy = rnd(2, 4, 5, seed=3, grad=False)
    (g_ref,) = torch.autograd.grad(F.embedding(ids, w), w, dy)
    (g_ours,) = torch.autograd.grad(RF.embedding(ids, w), w, dy)
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=1e-12)


def test_layer_norm():
    x, w, b = rnd(3, 4, 13, scale=3.0), rnd(13, seed=1), rnd(13, seed=2)
    torch.testing.assert_close(RF.layer_norm(x, w, b, 1e-5), F.layer_norm(x, (13,), w, b, 1e-5),
                               rtol=0, atol=1e-12)
    check(lambda x, w, b: RF.layer_norm(x, w, b, 1e-5), (x, w, b))


@pytest.mark.parametrize("name", ["gelu", "tanh", "softmax"])
def test_pointwise_and_softmax(name):
    x = rnd(4, 9, scale=2.5)
    ref = {"gelu": F.gelu, "tanh": torch.tanh, "softmax": lambda t: torch.softmax(t, -1)}[name]
    ours = getattr(RF, name)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-12)
    check(ours, (x,))


def test_dropout_uses_saved_mask():
    x = rnd(5, 8)
    gen = torch.Generator().manual_seed(11)
    y = RF.dropout(x, 0.3, True, generator=gen)
    keep = y != 0
    assert 0 < keep.sum() < keep.numel()
    torch.testing.assert_close(y[keep], x[keep] / 0.7)
    check(lambda x: RF.dropout(x, 0.3, True, generator=torch.Generator().manual_seed(11)), (x,))
    assert RF.dropout(x, 0.3, training=False) is x
    with pytest.raises(ValueError, match="0 <= p < 1"):
        RF.dropout(x, 1.0)


@pytest.mark.parametrize("T,D", [(7, 32), (13, 48), (5, 64)])
def test_attention_with_empty_rows(T, D):
    B, nh = 3, 2
    q, k, v = rnd(B, nh, T, D, seed=1), rnd(B, nh, T, D, seed=2), rnd(B, nh, T, D, seed=3)
    mask = padding_mask(B, T)
    out = RF.attention(q, k, v, mask)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all(), "a fully masked row gives 0"
    torch.testing.assert_close(out, naive_attention(q, k, v, mask), rtol=0, atol=1e-12)
    sdpa = F.scaled_dot_product_attention(q[1:], k[1:], v[1:], attn_mask=mask[1:, None, None, :])
    torch.testing.assert_close(out[1:], sdpa, rtol=0, atol=1e-12)
    check(lambda q, k, v: RF.attention(q, k, v, mask), (q, k, v), gradgrad=False)


def test_attention_gradgrad_small():
    q, k, v = rnd(2, 2, 5, 4, seed=1), rnd(2, 2, 5, 4, seed=2), rnd(2, 2, 5, 4, seed=3)
    mask = padding_mask(2, 5)
    check(lambda q, k, v: RF.attention(q, k, v, mask), (q, k, v))
    (dq,) = torch.autograd.grad(RF.attention(q, k, v, mask).sum(), q)
    assert torch.isfinite(dq).all() and (dq[0] == 0).all()


def test_attention_dropout_regenerates_same_mask():
    q, k, v = rnd(2, 2, 6, 8, seed=1), rnd(2, 2, 6, 8, seed=2), rnd(2, 2, 6, 8, seed=3)
    mask = padding_mask(2, 6, empty_row=False)
    fn = lambda q, k, v: RF.attention(q, k, v, mask, dropout_p=0.2, generator=torch.Generator().manual_seed(5))
    check(fn, (q, k, v), gradgrad=False)
    # Same bits as the oracle given the same keep mask.
    keep = RF.dropout_mask((2, 2, 6, 6), 0.2, q.device, torch.Generator().manual_seed(5))
    P = torch.softmax(((q @ k.transpose(-2, -1)) / 8 ** 0.5).masked_fill(~mask[:, None, None], float("-inf")), -1)
    torch.testing.assert_close(fn(q, k, v), (P * keep / 0.8) @ v, rtol=0, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy(reduction, smoothing):
    z = rnd(9, 5, scale=2.0)
    t = torch.tensor([0, 4, -100, 2, 2, 1, -100, 3, 4])
    ref = F.cross_entropy(z, t, ignore_index=-100, label_smoothing=smoothing, reduction=reduction)
    ours = RF.cross_entropy(z, t, label_smoothing=smoothing, reduction=reduction)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    check(lambda z: RF.cross_entropy(z, t, label_smoothing=smoothing, reduction=reduction), (z,))


def test_cross_entropy_all_ignored_is_zero_not_nan():
    z = rnd(4, 3)
    t = torch.full((4,), -100)
    loss = RF.cross_entropy(z, t)
    assert loss.item() == 0.0          # torch's own F.cross_entropy returns NaN here
    (dz,) = torch.autograd.grad(loss, z)
    assert (dz == 0).all()


def test_bce_and_mse():
    z, y = rnd(6, 4, scale=3.0), torch.randint(0, 2, (6, 4), generator=torch.Generator().manual_seed(0)).to(torch.float64)
    torch.testing.assert_close(RF.bce_with_logits(z, y), F.binary_cross_entropy_with_logits(z, y), rtol=0, atol=1e-12)
    check(lambda z: RF.bce_with_logits(z, y), (z,))
    soft = torch.rand(6, 4, generator=torch.Generator().manual_seed(1), **f64).requires_grad_()
    check(RF.bce_with_logits, (z, soft))
    p, t = rnd(7), rnd(7, seed=5)
    torch.testing.assert_close(RF.mse_loss(p, t), F.mse_loss(p, t), rtol=0, atol=1e-12)
    check(RF.mse_loss, (p, t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_losses_finite_at_logits_1e4(dtype):
    z = (torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4], [5e3, 1e4, -1e4]], dtype=dtype)).requires_grad_()
    t = torch.tensor([1, 2, 0])
    for smoothing in (0.0, 0.1):
        loss = RF.cross_entropy(z, t, label_smoothing=smoothing)
        ref = F.cross_entropy(z.double(), t, label_smoothing=smoothing)
        assert torch.isfinite(loss) and abs(loss.item() - ref.item()) <= 1e-3 * abs(ref.item())
        (dz,) = torch.autograd.grad(loss, z)
        assert torch.isfinite(dz).all()
    y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=dtype)
    loss = RF.bce_with_logits(z, y)
    ref = F.binary_cross_entropy_with_logits(z.double(), y.double())
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) <= 1e-3 * abs(ref.item())
    (dz,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(dz).all()


def test_bad_cross_entropy_arguments():
    with pytest.raises(ValueError, match="logits of shape \\(N, C\\)"):
        RF.cross_entropy(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer class indices"):
        RF.cross_entropy(torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="reduction"):
        RF.cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), reduction="avg")
