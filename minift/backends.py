"""The three implementations of the ops the model is built from.

Each backend is a namespace with the same functions and signatures:

    embedding(ids, weight)                              (...) -> (..., H)
    linear(x, weight, bias)                             (..., in) -> (..., out)
    layer_norm(x, weight, bias, eps)                    over the last dim
    gelu(x), tanh(x)
    linear_gelu(x, weight, bias)                        GELU(x W^T + b), BertIntermediate
    add_layer_norm(y, x, weight, bias, eps, p, training)     LayerNorm(dropout(y) + x), the post-LN residual
    dropout(x, p, training)
    attention(q, k, v, key_padding_mask, dropout_p, scale)   (B, nh, T, D), mask (B, T) True = keep
    packed_attention(q, k, v, cu_q, cu_k, Tq, Tk, dropout_p, scale)   (N, nh, D), fused only (else None)
    cross_entropy(logits, target, ignore_index=-100, label_smoothing=0.0, reduction="mean", weight=None)
    bce_with_logits(logits, target), mse_loss(pred, target)

"torch" is PyTorch's own (the oracle); "reference" is minift.functional, every backward written by
hand; "fused" is "torch" with attention, dropout, the loss, bias + GELU, the residual add + dropout
+ layer norm and the linear layers' float32 CPU matrix multiplies (where minift.ops.gemm_backend
chose minift's) replaced by the compiled kernels of minift.ops.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .functional import naive_attention


torch_ops = SimpleNamespace(
    name="torch",
    embedding=F.embedding,
    linear=F.linear,
    layer_norm=lambda x, w, b, eps: F.layer_norm(x, (x.shape[-1],), w, b, eps),
    gelu=F.gelu,
    tanh=torch.tanh,
    linear_gelu=lambda x, w, b: F.gelu(F.linear(x, w, b)),
    add_layer_norm=lambda y, x, w, b, eps, p, training: F.layer_norm(
        (F.dropout(y, p, training) if p > 0.0 and training else y) + x, (y.shape[-1],), w, b, eps),
    dropout=lambda x, p, training: F.dropout(x, p, training) if p > 0.0 and training else x,
    attention=naive_attention,
    packed_attention=None,
    cross_entropy=F.cross_entropy,
    bce_with_logits=F.binary_cross_entropy_with_logits,
    mse_loss=F.mse_loss,
)


def _reference_ops():
    from . import functional as RF
    return SimpleNamespace(
        name="reference",
        embedding=RF.embedding, linear=RF.linear, layer_norm=RF.layer_norm, gelu=RF.gelu,
        tanh=RF.tanh, dropout=RF.dropout,
        linear_gelu=lambda x, w, b: RF.bias_gelu(RF.linear(x, w, None), b),
        add_layer_norm=RF.add_layer_norm, attention=RF.attention, packed_attention=None,
        cross_entropy=RF.cross_entropy,
        bce_with_logits=RF.bce_with_logits, mse_loss=RF.mse_loss)


def _fused_ops():
    from . import ops
    return SimpleNamespace(**{**vars(torch_ops), "name": "fused",
                              "attention": ops.fused_attention,
                              "packed_attention": ops.packed_attention,
                              "packed_attention_runs": ops.packed_attention_runs,
                              "dropout": ops.fused_dropout,
                              "cross_entropy": ops.softmax_cross_entropy,
                              "linear": ops.linear,
                              "linear_gelu": lambda x, w, b: ops.bias_gelu(ops.linear(x, w), b),
                              "add_layer_norm": ops.add_layer_norm})


_BUILDERS = {"torch": lambda: torch_ops, "reference": _reference_ops, "fused": _fused_ops}
_cache: dict[str, SimpleNamespace] = {}


def get_ops(impl: str) -> SimpleNamespace:
    if impl not in _cache:
        if impl not in _BUILDERS:
            raise ValueError(f"impl: expected one of {tuple(_BUILDERS)}, got {impl!r}")
        _cache[impl] = _BUILDERS[impl]()
    return _cache[impl]
