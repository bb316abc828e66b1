r"""Parameter-efficient fine-tuning: train a small part of the model, keep the rest frozen.

- ``freeze="encoder"``: a linear probe; only the task head learns.
- ``train_top_layers=K``: the head, the pooler and the top K encoder layers learn.
- ``lora_rank=r`` (LoRA, Hu et al. 2021): every query and value projection W (O, I) stays frozen
  and learns a low-rank update instead, y = x W^T + b + (\alpha/r) x A^T B^T with A (r, I) small
  random and B (O, r) zero, so training starts from the pretrained function exactly. The head
  trains fully. ``merged_state_dict`` folds W + (\alpha/r) B A back in for a plain BERT checkpoint.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .errors import UserError


def _head_names(model) -> list[str]:
    return [n for n, _ in model.named_children() if n != "bert"]


def add_lora(layer: nn.Linear, rank: int, alpha: float | None = None) -> None:
    O, I = layer.weight.shape
    alpha = 2.0 * rank if alpha is None else alpha
    layer.lora_A = nn.Parameter(torch.empty(rank, I, dtype=layer.weight.dtype, device=layer.weight.device))
    nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))
    layer.lora_B = nn.Parameter(torch.zeros(O, rank, dtype=layer.weight.dtype, device=layer.weight.device))
    layer.lora_scale = alpha / rank


def apply(model, freeze: str | None = None, train_top_layers: int | None = None, lora_rank: int = 0) -> str:
    """Set requires_grad for the chosen scheme; returns a one-line summary of what trains."""
    chosen = sum((freeze is not None, train_top_layers is not None, bool(lora_rank)))
    if chosen > 1:
        raise UserError("choose one of --freeze, --train-top-layers, --lora")
    n_layers = model.config.num_hidden_layers
    if freeze is not None and freeze != "encoder":
        raise UserError(f"freeze: expected 'encoder', got {freeze!r}")
    if train_top_layers is not None and not 0 <= train_top_layers <= n_layers:
        raise UserError(f"train_top_layers: expected 0..{n_layers}, got {train_top_layers}")
    if lora_rank < 0:
        raise UserError(f"lora rank: expected >= 0, got {lora_rank}")
    if freeze or train_top_layers is not None or lora_rank:
        for p in model.bert.parameters():
            p.requires_grad_(False)
    if train_top_layers is not None:
        for layer in model.bert.encoder.layer[n_layers - train_top_layers:]:
            layer.requires_grad_(True)
        if model.bert.pooler is not None:
            model.bert.pooler.requires_grad_(True)
    if lora_rank:
        for layer in model.bert.encoder.layer:
            add_lora(layer.attention.self.query, lora_rank)
            add_lora(layer.attention.self.value, lora_rank)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    scheme = ("linear probe (encoder frozen)" if freeze else
              f"top {train_top_layers} layer(s) + head" if train_top_layers is not None else
              f"LoRA rank {lora_rank} on query/value + head" if lora_rank else "full fine-tuning")
    return f"{scheme}: {trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%)"


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict with every LoRA update folded into its weight: W <- W + s B A."""
    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if getattr(module, "lora_A", None) is not None:
            prefix = f"{name}." if name else ""
            delta = (module.lora_B @ module.lora_A) * module.lora_scale
            state[prefix + "weight"] = (module.weight + delta).detach()
            del state[prefix + "lora_A"], state[prefix + "lora_B"]
    return state
