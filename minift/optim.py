r"""Optimizers, the learning-rate schedule and gradient clipping, written out.

Fine-tuning minimises the empirical risk
:math:`L(\theta) = \frac{1}{N} \sum_i l(M_\theta(x_i), y_i)` by steps

.. math::

    \theta \leftarrow \theta - \eta\, u(\nabla L) - \eta \lambda \theta

where u is the optimizer's direction (the gradient itself, a momentum average, or Adam's
normalised moment) and the last term is *decoupled* weight decay (Loshchilov & Hutter): it shrinks
the weights directly instead of adding :math:`\lambda\theta` to the gradient, so Adam's
normalisation does not weaken it. The classes below subclass ``torch.optim.Optimizer`` only for its
bookkeeping (parameter groups, ``state_dict`` for checkpoints); every update is computed here, and
``tests/test_optim.py`` checks each against ``torch.optim``.
"""
from __future__ import annotations

import torch

from .functional import adamw_update_


class SGD(torch.optim.Optimizer):
    r"""SGD with heavy-ball momentum and decoupled weight decay.

    .. math::

        b_t &= \mu\, b_{t-1} + g_t \qquad (b_1 = g_1;\ \text{no momentum: } b_t = g_t) \\
        \theta_t &= \theta_{t-1} - \eta\, b_t - \eta \lambda\, \theta_{t-1}
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD: expected lr, momentum, weight_decay >= 0, got {lr}, {momentum}, {weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if mu != 0.0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = g.clone()                 # b_1 = g_1
                    else:
                        state["momentum_buffer"].mul_(mu).add_(g)           # b_t = mu b_{t-1} + g_t
                    g = state["momentum_buffer"]
                if wd != 0.0:
                    p.mul_(1.0 - lr * wd)                                   # - eta lambda theta
                p.add_(g, alpha=-lr)                                        # - eta b_t
        return loss


class AdamW(torch.optim.Optimizer):
    r"""Adam with bias correction and decoupled weight decay.

    .. math::

        m_t &= \beta_1 m_{t-1} + (1-\beta_1)\, g_t
            \qquad \text{(first moment: a running mean of gradients)} \\
        v_t &= \beta_2 v_{t-1} + (1-\beta_2)\, g_t^2
            \qquad \text{(second moment: of squared gradients)} \\
        \hat m_t &= m_t / (1-\beta_1^t), \quad \hat v_t = v_t / (1-\beta_2^t)
            \qquad \text{(undo the bias toward } m_0 = v_0 = 0) \\
        \theta_t &= \theta_{t-1} - \eta\, \hat m_t / \left(\sqrt{\hat v_t} + \epsilon\right)
            - \eta \lambda\, \theta_{t-1}

    With ``fused=True``, CPU float32/float64 parameters (and CUDA float32 ones in a CUDA build) are
    updated by the compiled kernel ``minift::adamw_step_`` (csrc/elementwise.cpp, csrc/cuda/elementwise.cu):
    the same arithmetic in one pass over memory instead of eight. Other parameters (and a build without
    the kernels) take ``minift.functional.adamw_update_``, with one warning (minift.ops' dispatch rule).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, fused: bool = False):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdamW: expected lr, eps, weight_decay >= 0 and 0 <= betas < 1, "
                             f"got lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.fused = fused                          # the compiled update, minift.ops.adamw_step_

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        update = _compiled_update() if self.fused else adamw_update_
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)                  # m_0 = 0
                    state["exp_avg_sq"] = torch.zeros_like(p)               # v_0 = 0
                state["step"] += 1
                update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], lr, b1, b2, eps, wd, state["step"])
        return loss


def _compiled_update():
    from .ops import adamw_step_    # the compiled kernel where it applies, else adamw_update_
    return adamw_step_


def param_groups(model: torch.nn.Module, weight_decay: float):
    """Weight decay on weight matrices only: biases and LayerNorm gains are not shrunk (BERT's recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def linear_warmup_decay(warmup_steps: int, total_steps: int):
    r"""The multiplier of the base learning rate at step s: s/W for s < W, then (S - s)/(S - W) down to 0."""
    if total_steps <= 0 or warmup_steps < 0:
        raise ValueError(f"schedule: expected total_steps > 0 and warmup_steps >= 0, got {total_steps}, {warmup_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


class LRSchedule:
    """Sets every group's lr to base_lr * factor(step); ``step()`` after each optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, factor):
        self.optimizer, self.factor = optimizer, factor
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.last_step = 0
        self._apply()

    def _apply(self):
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.factor(self.last_step)

    def step(self):
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict):
        self.last_step, self.base_lrs = state["last_step"], list(state["base_lrs"])
        self._apply()


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    r"""Rescale gradients so that their global L2 norm
    :math:`\sqrt{\sum_p \lVert g_p \rVert^2}` is at most ``max_norm``.

    Returns the norm before clipping (non-finite when a gradient overflowed: the caller skips the step).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)                   # 1 when already small enough
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total
