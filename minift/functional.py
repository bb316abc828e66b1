r"""Hand-derived forward and backward passes for every op of BERT and its losses.

Each op comes as a pair, ``<op>_forward(...)`` and ``<op>_backward(d<out>, ...)``, the backward
right under the forward and naming its results ``d<input>``; then a ``torch.autograd.Function``
that wires the pair into autograd, and a lower-case function the model calls. The docstring of each
pair derives the gradient; the line that computes a term carries its formula.

What is saved for backward is the op's *inputs* (and outputs where the formula is in terms of
them); intermediates such as a layer norm's mean or attention's probabilities are recomputed. This
costs a little arithmetic and keeps the backward itself differentiable, so ``gradgradcheck`` (the
gradient of the gradient) checks these too.

``minift.backends`` puts these functions behind ``impl="reference"``; ``tests/test_functional.py``
checks each against PyTorch's autograd with ``torch.autograd.gradcheck`` in float64.

Shape legend: N rows (any leading dims flattened), B batch, nh heads, T tokens, D head dim,
C classes, I input features, O output features.
"""
from __future__ import annotations

import math

import torch
from torch.autograd import Function

from .config import IGNORE_INDEX

# ------------------------------------------------------------------------------------------
# linear: y = x W^T + b
# ------------------------------------------------------------------------------------------


def linear_forward(x, weight, bias):
    """y = x W^T + b, with x (..., I), W (O, I), b (O,)."""
    y = x @ weight.t()                                              # (..., O)
    return y + bias if bias is not None else y


def linear_backward(dy, x, weight, has_bias: bool):
    r"""Linear backward. From :math:`y_{no} = \sum_i x_{ni} W_{oi} + b_o`:

    .. math::

        \frac{\partial L}{\partial x_{ni}} = \sum_o dy_{no} W_{oi} &\quad\Rightarrow\quad dx = dy\, W \\
        \frac{\partial L}{\partial W_{oi}} = \sum_n dy_{no} x_{ni} &\quad\Rightarrow\quad dW = dy^\top x \\
        \frac{\partial L}{\partial b_o} = \sum_n dy_{no} &

    where n runs over all leading dimensions.
    """
    dx = dy @ weight                                                # (..., I)
    dy2 = dy.reshape(-1, dy.shape[-1])                              # (N, O)
    dweight = dy2.t() @ x.reshape(-1, x.shape[-1])                  # (O, I)  dW = dy^T x
    dbias = dy2.sum(0) if has_bias else None                        # (O,)
    return dx, dweight, dbias


class Linear(Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return linear_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        return linear_backward(dy, x, weight, ctx.has_bias)


def linear(x, weight, bias=None):
    return Linear.apply(x, weight, bias)


# ------------------------------------------------------------------------------------------
# embedding lookup: y_t = W[id_t]
# ------------------------------------------------------------------------------------------


def embedding_forward(ids, weight):
    return weight[ids]                                              # (..., H)


def embedding_backward(dy, ids, num_embeddings: int):
    r"""Embedding backward. From :math:`y_t = W_{id_t}`, row r of W receives the sum of
    :math:`dy_t` over every t with :math:`id_t = r`:

    .. math::

        \frac{\partial L}{\partial W_r} = \sum_{t:\, id_t = r} dy_t

    (a scatter-add; repeated ids accumulate).
    """
    H = dy.shape[-1]
    dweight = torch.zeros(num_embeddings, H, dtype=dy.dtype, device=dy.device)
    return dweight.index_add(0, ids.reshape(-1), dy.reshape(-1, H))  # (V, H)


class Embedding(Function):
    @staticmethod
    def forward(ctx, ids, weight):
        ctx.save_for_backward(ids)
        ctx.num_embeddings = weight.shape[0]
        return embedding_forward(ids, weight)

    @staticmethod
    def backward(ctx, dy):
        (ids,) = ctx.saved_tensors
        return None, embedding_backward(dy, ids, ctx.num_embeddings)


def embedding(ids, weight):
    return Embedding.apply(ids, weight)


# ------------------------------------------------------------------------------------------
# layer norm over the last dimension
# ------------------------------------------------------------------------------------------


def layer_norm_forward(x, weight, bias, eps):
    r"""Layer norm over the last dimension:
    :math:`y = \hat x \odot w + b`, :math:`\hat x = (x - \mu)\, r`, :math:`\mu = \operatorname{mean}(x)`,
    :math:`r = 1/\sqrt{\operatorname{var}(x) + \epsilon}`."""
    mu = x.mean(-1, keepdim=True)                                   # (N, 1)
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)  # (N, 1)
    xhat = (x - mu) * rstd                                          # (N, H)
    return xhat * weight + bias


def layer_norm_backward(dy, x, weight, eps):
    r"""Layer norm backward. With :math:`g = dy \odot w` (the gradient reaching
    :math:`\hat x`) and H features,

    .. math::

        \frac{\partial L}{\partial x} = r \left( g - \operatorname{mean}(g)
            - \hat x \odot \operatorname{mean}(g \odot \hat x) \right)

    because

    .. math::

        \frac{\partial \hat x_j}{\partial x_i} = r \left(\delta_{ij} - \frac{1}{H}
            - \frac{\hat x_i \hat x_j}{H}\right),
        \qquad
        \frac{\partial L}{\partial w} = \sum_n dy \odot \hat x, \qquad
        \frac{\partial L}{\partial b} = \sum_n dy.
    """
    mu = x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    xhat = (x - mu) * rstd                                          # recomputed, not saved
    g = dy * weight                                                 # dL/dxhat
    dx = rstd * (g - g.mean(-1, keepdim=True)
                 - xhat * (g * xhat).mean(-1, keepdim=True))        # r (g - mean g - xhat mean(g xhat))
    lead = tuple(range(dy.dim() - 1))
    dweight = (dy * xhat).sum(lead)                                 # (H,)
    dbias = dy.sum(lead)                                            # (H,)
    return dx, dweight, dbias


class LayerNorm(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return layer_norm_forward(x, weight, bias, eps)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        return *layer_norm_backward(dy, x, weight, ctx.eps), None


def layer_norm(x, weight, bias, eps=1e-12):
    return LayerNorm.apply(x, weight, bias, eps)


# ------------------------------------------------------------------------------------------
# residual add + dropout + layer norm: the post-LN residual of BertSelfOutput and BertOutput
# ------------------------------------------------------------------------------------------


def add_layer_norm_forward(y, x, keep, p, weight, bias, eps):
    r"""The post-LN residual :math:`\mathrm{out} = \mathrm{LayerNorm}(z)`, with
    :math:`z = y \odot m + x` and the dropout multipliers :math:`m = \mathrm{keep} / (1 - p)`
    (:math:`m = 1` without dropout, ``keep=None``). Returns out and z, which the backward needs."""
    z = (y if keep is None else dropout_forward(y, keep, p)) + x    # (N, H)  z = y m + x
    return layer_norm_forward(z, weight, bias, eps), z


def add_layer_norm_backward(dout, z, keep, p, weight, eps):
    r"""Backward of the post-LN residual. The layer norm's part is :func:`layer_norm_backward`'s:
    with :math:`g = dout \odot w`, :math:`\hat z = (z - \mu)\, r`,

    .. math::

        dz = r \left( g - \operatorname{mean}(g) - \hat z \odot \operatorname{mean}(g \odot \hat z) \right),
        \qquad dw = \sum_n dout \odot \hat z, \qquad db = \sum_n dout.

    Then z is a sum, :math:`z_j = y_j m_j + x_j`, so :math:`\partial z_j / \partial x_j = 1` and
    :math:`\partial z_j / \partial y_j = m_j`:

    .. math::

        dx = dz, \qquad dy = dz \odot m .

    Without dropout (:math:`m = 1`) dy and dx are the same tensor, and the kernel writes it once.
    Returns dy, dx, dweight, dbias.
    """
    dz, dweight, dbias = layer_norm_backward(dout, z, weight, eps)   # (N, H), (H,), (H,)
    dy = dz if keep is None else dropout_backward(dz, keep, p)      # dy = dz m
    return dy, dz, dweight, dbias                                    # dx = dz


class AddLayerNorm(Function):
    @staticmethod
    def forward(ctx, y, x, weight, bias, keep, p, eps):
        out, _ = add_layer_norm_forward(y, x, keep, p, weight, bias, eps)
        ctx.save_for_backward(y, x, weight, keep)       # the inputs; z is recomputed (the kernel saves it)
        ctx.p, ctx.eps = p, eps
        return out

    @staticmethod
    def backward(ctx, dout):
        y, x, weight, keep = ctx.saved_tensors
        z = (y if keep is None else dropout_forward(y, keep, ctx.p)) + x
        return *add_layer_norm_backward(dout, z, keep, ctx.p, weight, ctx.eps), None, None, None


def add_layer_norm(y, x, weight, bias, eps=1e-12, p=0.0, training=True, generator=None):
    """LayerNorm(dropout(y) + x) over the last dimension."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"add_layer_norm: expected 0 <= p < 1, got {p}")
    keep = dropout_mask(y.shape, p, y.device, generator) if training and p > 0.0 else None
    return AddLayerNorm.apply(y, x, weight, bias, keep, p, eps)


# ------------------------------------------------------------------------------------------
# GELU (exact, with erf) and tanh
# ------------------------------------------------------------------------------------------

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gelu_forward(x):
    r"""GELU: :math:`\mathrm{GELU}(x) = x\, \Phi(x)`, with :math:`\Phi` the standard normal CDF,
    :math:`\Phi(x) = \left(1 + \operatorname{erf}(x/\sqrt 2)\right) / 2`."""
    return x * 0.5 * (1.0 + torch.erf(x * _INV_SQRT2))


def gelu_backward(dy, x):
    r"""GELU backward:
    :math:`\frac{d}{dx}\left[x \Phi(x)\right] = \Phi(x) + x\, \phi(x)`, with
    :math:`\phi(x) = e^{-x^2/2} / \sqrt{2\pi}`."""
    cdf = 0.5 * (1.0 + torch.erf(x * _INV_SQRT2))                   # Phi(x)
    pdf = torch.exp(-0.5 * x * x) * _INV_SQRT_2PI                   # phi(x)
    return dy * (cdf + x * pdf)


class GELU(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return gelu_forward(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return gelu_backward(dy, x)


def gelu(x):
    return GELU.apply(x)


def bias_gelu_forward(h, bias):
    r"""GELU after a bias: :math:`\mathrm{out} = \mathrm{GELU}(h + b)`, with h the matmul's output
    without its bias (BertIntermediate). Returns out and the pre-activation :math:`h + b`, saved
    for the backward."""
    pre = h + bias                                                  # (N, I)
    return gelu_forward(pre), pre


def bias_gelu_backward(dout, pre):
    r"""Bias + GELU backward. With :math:`a = h + b` (b broadcast over the rows n),
    :math:`\partial a_{ni} / \partial h_{ni} = 1` and :math:`\partial a_{ni} / \partial b_i = 1`, so

    .. math::

        da = dout \odot \left(\Phi(a) + a\, \phi(a)\right), \qquad
        dh = da, \qquad db_i = \sum_n da_{ni}:

    the bias gradient is the column sum of the same da, which the kernel takes in the same pass.
    Returns dh, dbias.
    """
    da = gelu_backward(dout, pre)                                   # (N, I)  dout (Phi + a phi)
    return da, da.reshape(-1, da.shape[-1]).sum(0)                  # dh = da, db = sum_n da


class BiasGELU(Function):
    @staticmethod
    def forward(ctx, h, bias):
        out, _ = bias_gelu_forward(h, bias)
        ctx.save_for_backward(h, bias)                  # the inputs; pre is recomputed (the kernel saves it)
        return out

    @staticmethod
    def backward(ctx, dout):
        h, bias = ctx.saved_tensors
        return bias_gelu_backward(dout, h + bias)


def bias_gelu(h, bias):
    return BiasGELU.apply(h, bias)


def tanh_forward(x):
    return torch.tanh(x)


def tanh_backward(dy, y):
    r"""Tanh backward: :math:`\frac{d \tanh x}{dx} = 1 - \tanh^2 x = 1 - y^2`: the output
    is all the backward needs."""
    return dy * (1.0 - y * y)


class Tanh(Function):
    @staticmethod
    def forward(ctx, x):
        y = tanh_forward(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return tanh_backward(dy, y)


def tanh(x):
    return Tanh.apply(x)


# ------------------------------------------------------------------------------------------
# softmax over the last dimension
# ------------------------------------------------------------------------------------------


def softmax_forward(x):
    r"""Softmax: :math:`y_j = e^{x_j - m} / \sum_k e^{x_k - m}` with :math:`m = \max_k x_k`
    (subtracting m changes nothing but overflow)."""
    e = torch.exp(x - x.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def softmax_backward(dy, y):
    r"""Softmax backward: :math:`\partial y_j / \partial x_i = y_j (\delta_{ij} - y_i)`, so

    .. math::

        dx_i = y_i \Big(dy_i - \sum_j dy_j\, y_j\Big).
    """
    return y * (dy - (dy * y).sum(-1, keepdim=True))


class Softmax(Function):
    @staticmethod
    def forward(ctx, x):
        y = softmax_forward(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return softmax_backward(dy, y)


def softmax(x):
    return Softmax.apply(x)


# ------------------------------------------------------------------------------------------
# dropout (inverted: scale the kept units by 1/(1-p) at training time, nothing at test time)
# ------------------------------------------------------------------------------------------


def dropout_mask(shape, p, device, generator=None):
    """keep_i ~ Bernoulli(1 - p), drawn from ``generator`` (torch's default one when None)."""
    return torch.rand(shape, device=device, generator=generator) >= p


def dropout_forward(x, keep, p):
    return x * keep / (1.0 - p)                                     # E[y] = x


def dropout_backward(dy, keep, p):
    return dy * keep / (1.0 - p)                                    # the same mask, saved


class Dropout(Function):
    @staticmethod
    def forward(ctx, x, keep, p):
        ctx.save_for_backward(keep)
        ctx.p = p
        return dropout_forward(x, keep, p)

    @staticmethod
    def backward(ctx, dy):
        (keep,) = ctx.saved_tensors
        return dropout_backward(dy, keep, ctx.p), None, None


def dropout(x, p, training=True, generator=None):
    if not training or p == 0.0:
        return x
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: expected 0 <= p < 1, got {p}")
    return Dropout.apply(x, dropout_mask(x.shape, p, x.device, generator), p)


# ------------------------------------------------------------------------------------------
# scaled dot-product attention with a key-padding mask and attention dropout
# ------------------------------------------------------------------------------------------


def key_padding_keep(mask, name: str = "key padding mask"):
    """A key-padding mask as bool, True = keep: the one convention of every attention in minift.

    Accepted: bool, or numbers that are all 0 or 1 (any dtype), 1 = a real token to attend to,
    0 = padding, as Hugging Face's ``attention_mask``. Refused: anything else, in particular an
    *additive* mask (0 = attend, -1e4 or -inf = padding, as ``F.scaled_dot_product_attention`` reads
    a float mask): read as keep = nonzero it would silently attend to the padding only.
    """
    if mask is None or mask.dtype == torch.bool:
        return mask
    if mask.numel() and bool(((mask != 0) & (mask != 1)).any()):
        lo, hi = mask.min().item(), mask.max().item()
        hint = (" It looks like an additive mask (0 = attend, large negative = padding): pass "
                "(mask == 0) instead." if hi <= 0 and lo < 0 else "")
        raise ValueError(f"{name}: expected bool or 0/1 values (1 = attend, 0 = padding), "
                         f"got {mask.dtype} values in [{lo:g}, {hi:g}].{hint}")
    return mask != 0


def naive_attention(q, k, v, key_padding_mask=None, dropout_p=0.0, scale=None, training=True):
    """softmax(q k^T * scale + mask) v in plain PyTorch ops (PyTorch's autograd, the oracle);
    rows whose keys are all masked give 0. Also the fallback of minift.ops.fused_attention."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    key_padding_mask = key_padding_keep(key_padding_mask)
    s = (q @ k.transpose(-2, -1)) * scale                                           # (B, nh, T, T)
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, :]                                   # (B, 1, 1, T)
        s = s.masked_fill(~keep, float("-inf"))
        p = torch.softmax(s, dim=-1).masked_fill(~keep.any(-1, keepdim=True), 0.0)  # empty rows -> 0
    else:
        p = torch.softmax(s, dim=-1)                                                # (B, nh, T, T)
    if dropout_p > 0.0:
        p = torch.nn.functional.dropout(p, dropout_p, training=training)
    return p @ v                                                                    # (B, nh, T, D)


def attention_probs(q, k, key_padding_mask, scale):
    """P = softmax(q k^T * scale) over the kept keys; a row with no kept key is all zeros."""
    s = (q @ k.transpose(-2, -1)) * scale                           # (B, nh, Tq, Tk)
    if key_padding_mask is None:
        return softmax_forward(s)
    keep = key_padding_mask[:, None, None, :]                       # (B, 1, 1, Tk)
    s = s.masked_fill(~keep, float("-inf"))
    any_kept = keep.any(-1, keepdim=True)                           # (B, 1, 1, 1)
    s = s.masked_fill(~any_kept, 0.0)                               # avoid -inf - -inf = NaN
    return softmax_forward(s) * any_kept                            # empty rows -> 0


def attention_forward(q, k, v, key_padding_mask, scale, keep, p):
    r"""Attention: :math:`O = \tilde P V` with :math:`\tilde P = P \odot \mathrm{keep} / (1-p)`
    (attention dropout), :math:`P = \operatorname{softmax}(S)`,
    :math:`S = Q K^\top \cdot \mathrm{scale} + \mathrm{mask}` (:math:`-\infty` at padded keys)."""
    P = attention_probs(q, k, key_padding_mask, scale)              # (B, nh, Tq, Tk)
    if keep is not None:
        P = P * keep / (1.0 - p)
    return P @ v                                                    # (B, nh, Tq, D)


def attention_backward(dO, q, k, v, key_padding_mask, scale, keep, p):
    r"""Attention backward, through :math:`O = \tilde P V`, :math:`\tilde P = P \odot M`,
    :math:`P = \operatorname{softmax}(S)`, :math:`S = \mathrm{scale}\; Q K^\top`:

    .. math::

        dV &= \tilde P^\top dO \\
        d\tilde P &= dO\, V^\top, \qquad dP = d\tilde P \odot M
            \qquad (M = \mathrm{keep} / (1-p), \text{ or } 1) \\
        dS_{ij} &= P_{ij} (dP_{ij} - D_i), \qquad D_i = \sum_j P_{ij}\, dP_{ij}
            \qquad \text{(softmax backward, row by row)} \\
        dQ &= \mathrm{scale} \cdot dS\, K, \qquad dK = \mathrm{scale} \cdot dS^\top Q

    P is recomputed from Q and K rather than saved: the fused kernel does the same, so that no
    T x T matrix outlives the forward pass. Masked keys have :math:`P_{ij} = 0`, hence
    :math:`dS_{ij} = 0`.
    """
    P = attention_probs(q, k, key_padding_mask, scale)              # (B, nh, Tq, Tk), recomputed
    Pt = P if keep is None else P * keep / (1.0 - p)                # dropped-out probabilities
    dv = Pt.transpose(-2, -1) @ dO                                  # (B, nh, Tk, D)  dV = P~^T dO
    dP = dO @ v.transpose(-2, -1)                                   # (B, nh, Tq, Tk)  dP~ = dO V^T
    if keep is not None:
        dP = dP * keep / (1.0 - p)
    Di = (P * dP).sum(-1, keepdim=True)                             # (B, nh, Tq, 1)  D_i = sum_j P_ij dP_ij
    dS = P * (dP - Di)                                              # dS_ij = P_ij (dP_ij - D_i)
    dq = (dS @ k) * scale                                           # (B, nh, Tq, D)
    dk = (dS.transpose(-2, -1) @ q) * scale                         # (B, nh, Tk, D)
    return dq, dk, dv


class Attention(Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, scale, keep, p):
        ctx.save_for_backward(q, k, v, key_padding_mask, keep)
        ctx.scale, ctx.p = scale, p
        return attention_forward(q, k, v, key_padding_mask, scale, keep, p)

    @staticmethod
    def backward(ctx, dO):
        q, k, v, key_padding_mask, keep = ctx.saved_tensors
        dq, dk, dv = attention_backward(dO, q, k, v, key_padding_mask, ctx.scale, keep, ctx.p)
        return dq, dk, dv, None, None, None, None


def attention(q, k, v, key_padding_mask=None, dropout_p=0.0, scale=None, generator=None):
    """softmax(q k^T * scale + mask) v for q (B, nh, Tq, D), k and v (B, nh, Tk, D); mask (B, Tk)
    bool, True = keep. Tq = Tk in self-attention; Tq = 1 when only the [CLS] row is asked for."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"attention: expected q of shape (B, nh, Tq, D) and k, v of shape (B, nh, Tk, D), "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    key_padding_mask = key_padding_keep(key_padding_mask)
    keep = None
    if dropout_p > 0.0:
        B, nh, Tq, _ = q.shape
        keep = dropout_mask((B, nh, Tq, k.shape[2]), dropout_p, q.device, generator)
    return Attention.apply(q, k, v, key_padding_mask, scale, keep, dropout_p)


# ------------------------------------------------------------------------------------------
# softmax cross-entropy with ignore_index, label smoothing and class weights
# ------------------------------------------------------------------------------------------


def check_class_weight(weight, logits, name="cross_entropy", values=True):
    """Per-class weights as F.cross_entropy(weight=...) takes them: (C,), the logits' dtype and
    device, no gradient asked of them, and (``values``) every entry finite and >= 0. The error says
    what was expected and what came. (F.cross_entropy itself accepts negative weights, and NaN.)
    The value check reads the weights (a few tensor ops, and on a GPU a wait for it), so the fused
    op leaves it to its CPU kernel, which raises the same ValueError."""
    if weight is None:
        return
    C = logits.shape[-1]
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name}: expected weight to be a tensor of shape (C,) = ({C},), got {type(weight).__name__}")
    if weight.dim() != 1 or weight.shape[0] != C:
        raise ValueError(f"{name}: expected weight of shape (C,) = ({C},), one per class, got {tuple(weight.shape)}")
    if weight.dtype != logits.dtype:
        raise TypeError(f"{name}: expected weight of dtype {logits.dtype} like the logits, got {weight.dtype}")
    if weight.device != logits.device:
        raise ValueError(f"{name}: expected weight on {logits.device} like the logits, got {weight.device}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name}: the class weights get no gradient; pass weight.detach() "
                         "(got a weight that requires grad)")
    if not values:
        return
    bad = ~(torch.isfinite(weight) & (weight >= 0))                 # (C,)
    if bad.any():
        c = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}: expected finite class weights >= 0, got weight[{c}] = {weight[c].item():g}")


def _ce_targets(logits, target, ignore_index, label_smoothing, reduction, weight):
    r"""The smoothed, weighted target distribution :math:`q` (N, C) and each row's scale
    :math:`r_n` (N,).

    .. math::

        q_{nc} = (1-\epsilon)\, w_{y_n} [c = y_n] + \frac{\epsilon}{C} w_c
            \qquad (w_c = 1 \text{ without class weights}),

    0 for an ignored row. :math:`r_n = 1` for "none" and "sum"; for "mean" :math:`r_n = 1/W` with
    :math:`W = \sum_n w_{y_n}` over the rows not ignored (their number without class weights), and
    0 when :math:`W = 0` (every row ignored: loss 0, where torch's own gives NaN).
    """
    N, C = logits.shape
    valid = target != ignore_index                                  # (N,)
    safe_t = target.masked_fill(~valid, 0)
    w = torch.ones(C, dtype=logits.dtype, device=logits.device) if weight is None else weight.to(logits.dtype)
    wy = w[safe_t] * valid                                          # (N,)  w_{y_n}, 0 when ignored
    q = (label_smoothing / C) * w.expand(N, C) * valid[:, None]     # (N, C)  (eps/C) w_c
    q = q.scatter_add(1, safe_t[:, None], ((1.0 - label_smoothing) * wy)[:, None])  # + (1-eps) w_y at y
    r = torch.ones(N, dtype=logits.dtype, device=logits.device)    # (N,)
    if reduction == "mean":
        W = wy.sum()                                                # W = sum_n w_{y_n}
        r = r / W if W != 0 else r * 0
    return q, r


def _log_softmax(z):
    r""":math:`\log p_c = (z_c - m) - \log\sum_k e^{z_k - m}`, :math:`m = \max_k z_k`: the max and
    the log of the sum subtracted one after the other (:math:`m + \log\sum` would round the second
    away at :math:`|z| = 10^8` in float32)."""
    d = z - z.amax(-1, keepdim=True)                                # (N, C)  z_c - m <= 0
    return d - torch.log(torch.exp(d).sum(-1, keepdim=True))       # (N, C)  log p


def cross_entropy_forward(logits, target, ignore_index=IGNORE_INDEX, label_smoothing=0.0, reduction="mean",
                          weight=None):
    r"""Softmax cross-entropy of logits (N, C) against class indices (N,), with optional class
    weights :math:`w` (C,).

    .. math::

        \log p_c &= (z_c - m) - \log \sum_k e^{z_k - m}
            \qquad (m = \max_k z_k \text{: stable at any } |z|) \\
        l_n &= -\sum_c q_{nc} \log p_{nc}, \qquad
            q_{nc} = (1-\epsilon)\, w_{y_n} [c = y_n] + \frac{\epsilon}{C} w_c

    with label smoothing :math:`\epsilon` and :math:`w_c = 1` without class weights. This is
    F.cross_entropy's meaning of ``weight=`` together with ``label_smoothing=``: the hit term
    weighted by the target's :math:`w_{y_n}`, the smoothing term by each class's :math:`w_c`,

    .. math::

        l_n = (1-\epsilon)\, w_{y_n} (-\log p_{y_n}) + \frac{\epsilon}{C} \sum_c w_c (-\log p_c).

    Rows with :math:`y_n` = ``ignore_index`` contribute 0; "mean" divides the sum by
    :math:`W = \sum_n w_{y_n}` over the other rows (their number without class weights).
    """
    q, r = _ce_targets(logits, target, ignore_index, label_smoothing, reduction, weight)
    per_row = -(q * _log_softmax(logits)).sum(-1)                   # (N,)  l_n = -sum_c q_nc log p_nc
    if reduction == "none":
        return per_row
    return (per_row * r).sum()                                      # sum_n r_n l_n


def cross_entropy_backward(dloss, logits, target, ignore_index=IGNORE_INDEX, label_smoothing=0.0, reduction="mean",
                           weight=None):
    r"""Softmax cross-entropy backward. From :math:`l_n = -\sum_k q_{nk} \log p_k` and
    :math:`\partial \log p_k / \partial z_c = [k = c] - p_c`:

    .. math::

        \frac{\partial l_n}{\partial z_c} = -\sum_k q_{nk} \big([k = c] - p_c\big)
            = a_n p_c - q_{nc}, \qquad
        a_n = \sum_k q_{nk} = (1-\epsilon)\, w_{y_n} + \frac{\epsilon}{C} \sum_k w_k,

    times the row's scale :math:`r_n` (1, or :math:`1/W` for "mean") and ``dloss``. Without class
    weights :math:`a_n = 1` and this is softmax minus the smoothed one-hot, :math:`p - q`. Ignored
    rows have :math:`q_n = 0`, hence :math:`a_n = 0` and a zero gradient.
    """
    q, r = _ce_targets(logits, target, ignore_index, label_smoothing, reduction, weight)
    p = torch.softmax(logits, -1)                                   # (N, C)
    a = q.sum(-1, keepdim=True)                                     # (N, 1)  a_n = sum_k q_nk
    scale = dloss * r                                               # (N,)  dloss_n (none), or dloss r_n
    dlogits = (a * p - q) * scale[:, None]                          # (N, C)  (a_n p_c - q_nc) r_n dloss
    return dlogits


class CrossEntropy(Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index, label_smoothing, reduction, weight):
        ctx.save_for_backward(logits, target, weight)
        ctx.args = (ignore_index, label_smoothing, reduction)
        return cross_entropy_forward(logits, target, *ctx.args, weight=weight)

    @staticmethod
    def backward(ctx, dloss):
        logits, target, weight = ctx.saved_tensors
        dlogits = cross_entropy_backward(dloss, logits, target, *ctx.args, weight=weight)
        return dlogits, None, None, None, None, None


def check_cross_entropy_args(logits, target, label_smoothing, reduction, weight=None):
    if logits.dim() != 2:
        raise ValueError(f"cross_entropy: expected logits of shape (N, C), got {tuple(logits.shape)}")
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"cross_entropy: expected target of shape ({logits.shape[0]},), got {tuple(target.shape)}")
    if target.dtype.is_floating_point:
        raise TypeError(f"cross_entropy: expected integer class indices, got {target.dtype}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must lie in [0, 1], got {label_smoothing}")
    check_class_weight(weight, logits)


def cross_entropy(logits, target, ignore_index=IGNORE_INDEX, label_smoothing=0.0, reduction="mean", weight=None):
    check_cross_entropy_args(logits, target, label_smoothing, reduction, weight)
    return CrossEntropy.apply(logits, target, ignore_index, label_smoothing, reduction, weight)


# ------------------------------------------------------------------------------------------
# binary cross-entropy with logits, and mean squared error
# ------------------------------------------------------------------------------------------


def bce_with_logits_forward(z, y):
    r"""Binary cross-entropy on logits,
    :math:`l = -\left[y \log \sigma(z) + (1-y) \log(1-\sigma(z))\right]`, written stably as

    .. math::

        l = \max(z, 0) - z y + \log\left(1 + e^{-|z|}\right)

    (finite for :math:`|z| = 10^4`). Mean over all elements."""
    return (z.clamp(min=0) - z * y + torch.log1p(torch.exp(-z.abs()))).mean()


def bce_with_logits_backward(dloss, z, y):
    r"""Binary cross-entropy backward: :math:`\partial l / \partial z = \sigma(z) - y`.
    The :math:`\sigma'(z) = \sigma(1-\sigma)` of the chain rule cancels the denominators of
    :math:`-\left(y/\sigma - (1-y)/(1-\sigma)\right)`. Divided by the element count for the mean."""
    return dloss * (torch.sigmoid(z) - y) / z.numel()


class BCEWithLogits(Function):
    @staticmethod
    def forward(ctx, z, y):
        ctx.save_for_backward(z, y)
        return bce_with_logits_forward(z, y)

    @staticmethod
    def backward(ctx, dloss):
        z, y = ctx.saved_tensors
        dz = bce_with_logits_backward(dloss, z, y)
        dy = -dloss * z / z.numel() if ctx.needs_input_grad[1] else None  # dl/dy = -z
        return dz, dy


def bce_with_logits(z, y):
    if z.shape != y.shape:
        raise ValueError(f"bce_with_logits: expected target of shape {tuple(z.shape)}, got {tuple(y.shape)}")
    return BCEWithLogits.apply(z, y)


def mse_loss_forward(pred, y):
    return ((pred - y) ** 2).mean()                                 # (1/N) sum (p - y)^2


def mse_loss_backward(dloss, pred, y):
    return dloss * 2.0 * (pred - y) / pred.numel()                  # dl/dp = 2 (p - y) / N


class MSELoss(Function):
    @staticmethod
    def forward(ctx, pred, y):
        ctx.save_for_backward(pred, y)
        return mse_loss_forward(pred, y)

    @staticmethod
    def backward(ctx, dloss):
        pred, y = ctx.saved_tensors
        dpred = mse_loss_backward(dloss, pred, y)
        return dpred, (-dpred if ctx.needs_input_grad[1] else None)


def mse_loss(pred, y):
    if pred.shape != y.shape:
        raise ValueError(f"mse_loss: expected target of shape {tuple(pred.shape)}, got {tuple(y.shape)}")
    return MSELoss.apply(pred, y)


# ------------------------------------------------------------------------------------------
# AdamW's update (minift.optim.AdamW's loop; the compiled minift::adamw_step_ does the same)
# ------------------------------------------------------------------------------------------


@torch.no_grad()
def adamw_update_(p, g, m, v, lr, b1, b2, eps, wd, t) -> None:
    """One AdamW step of parameter p in place, at step number t >= 1 (the formulas in minift.optim.AdamW's docstring)."""
    m.lerp_(g, 1.0 - b1)                                        # m = b1 m + (1-b1) g
    v.mul_(b2).addcmul_(g, g, value=1.0 - b2)                   # v = b2 v + (1-b2) g^2
    m_hat_scale = 1.0 / (1.0 - b1 ** t)                         # mhat = m / (1 - b1^t)
    v_hat_sqrt = (v / (1.0 - b2 ** t)).sqrt_()                  # sqrt(vhat)
    if wd != 0.0:
        p.mul_(1.0 - lr * wd)                                   # - eta lambda theta
    p.addcdiv_(m, v_hat_sqrt.add_(eps), value=-lr * m_hat_scale)  # - eta mhat/(sqrt(vhat)+eps)
