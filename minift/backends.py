"""The three implementations of the ops the model is built from.

Each backend is a namespace with the same functions and signatures:

    embedding(ids, weight)                              (...) -> (..., H)
    linear(x, weight, bias)                             (..., in) -> (..., out)
    layer_norm(x, weight, bias, eps)                    over the last dim
    gelu(x), tanh(x)
    dropout(x, p, training)
    attention(q, k, v, key_padding_mask, dropout_p, scale)   (B, nh, T, D), mask (B, T) True = keep
    cross_entropy(logits, target, ignore_index=-100, label_smoothing=0.0, reduction="mean")
    bce_with_logits(logits, target), mse_loss(pred, target)

"torch" is PyTorch's own (the oracle); "reference" is minift.functional, every backward written by
hand; "fused" is "torch" with attention, dropout and the loss replaced by the compiled kernels of
minift.ops.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F


def naive_attention(q, k, v, key_padding_mask=None, dropout_p=0.0, scale=None, training=True):
    """softmax(q k^T * scale + mask) v in plain PyTorch ops; rows whose keys are all masked give 0."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale                                           # (B, nh, T, T)
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, :]                                   # (B, 1, 1, T)
        s = s.masked_fill(~keep, float("-inf"))
        p = torch.softmax(s, dim=-1).masked_fill(~keep.any(-1, keepdim=True), 0.0)  # empty rows -> 0
    else:
        p = torch.softmax(s, dim=-1)                                                # (B, nh, T, T)
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p, training=training)
    return p @ v                                                                    # (B, nh, T, D)


torch_ops = SimpleNamespace(
    name="torch",
    embedding=F.embedding,
    linear=F.linear,
    layer_norm=lambda x, w, b, eps: F.layer_norm(x, (x.shape[-1],), w, b, eps),
    gelu=F.gelu,
    tanh=torch.tanh,
    dropout=lambda x, p, training: F.dropout(x, p, training) if p > 0.0 and training else x,
    attention=naive_attention,
    cross_entropy=F.cross_entropy,
    bce_with_logits=F.binary_cross_entropy_with_logits,
    mse_loss=F.mse_loss,
)


def _reference_ops():
    from . import functional as RF
    return SimpleNamespace(
        name="reference",
        embedding=RF.embedding, linear=RF.linear, layer_norm=RF.layer_norm, gelu=RF.gelu,
        tanh=RF.tanh, dropout=RF.dropout, attention=RF.attention, cross_entropy=RF.cross_entropy,
        bce_with_logits=RF.bce_with_logits, mse_loss=RF.mse_loss)


def _fused_ops():
    from . import ops
    return SimpleNamespace(**{**vars(torch_ops), "name": "fused",
                              "attention": ops.fused_attention,
                              "dropout": ops.fused_dropout,
                              "cross_entropy": ops.softmax_cross_entropy})


_BUILDERS = {"torch": lambda: torch_ops, "reference": _reference_ops, "fused": _fused_ops}
_cache: dict[str, SimpleNamespace] = {}


def get_ops(impl: str) -> SimpleNamespace:
    if impl not in _cache:
        if impl not in _BUILDERS:
            raise ValueError(f"impl: expected one of {tuple(_BUILDERS)}, got {impl!r}")
        _cache[impl] = _BUILDERS[impl]()
    return _cache[impl]
