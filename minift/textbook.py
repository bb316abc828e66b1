r"""The textbook derivation of fine-tuning's gradient, as code that a test checks.

Model: a two-layer sigmoid network on bag-of-words features x (N, F),

    h = \sigma(x W_1^T + b_1)   (N, K),      M(x) = \sigma(h w_2 + b_2)   (N,)

Empirical risk with the binary cross-entropy:

    L(\theta) = (1/N) \sum_i l_i,   l_i = -[ y_i \log M(x_i) + (1 - y_i) \log(1 - M(x_i)) ]

and its gradient, parameter by parameter:

    \partial L / \partial \theta_k = -(1/N) \sum_i ( y_i / M(x_i) - (1 - y_i) / (1 - M(x_i)) ) \partial M(x_i) / \partial \theta_k

with \partial M / \partial \theta from the chain rule (\sigma' = \sigma (1 - \sigma)):

    \partial M / \partial b_2 = M (1 - M)
    \partial M / \partial w_{2j} = M (1 - M) h_j
    \partial M / \partial b_{1j} = M (1 - M) w_{2j} h_j (1 - h_j)
    \partial M / \partial W_{1jk} = M (1 - M) w_{2j} h_j (1 - h_j) x_k

A widely copied write-up gives the loss as -y \log M + (1 - y) \log(1 - M): the second term has the
wrong sign. For y = 0 that "loss" is \log(1 - M), which *decreases* as M -> 1, so minimising it
pushes every negative example toward the wrong class. ``wrong_sign_bce`` keeps it so that the
tests and tutorial 2 can show it numerically.
"""
from __future__ import annotations

import hashlib
import re

import torch


def bag_of_words(texts: list[str], dim: int = 64) -> torch.Tensor:
    """Hashed word counts, log1p-scaled: a fixed, dependency-free featurisation (N, dim) float64."""
    x = torch.zeros(len(texts), dim, dtype=torch.float64)
    for i, text in enumerate(texts):
        for word in re.findall(r"[a-z']+", text.lower()):
            x[i, int(hashlib.md5(word.encode()).hexdigest(), 16) % dim] += 1.0
    return torch.log1p(x)


def init_params(F: int, K: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"W1": torch.randn(K, F, generator=g, dtype=torch.float64) * 0.3,
            "b1": torch.zeros(K, dtype=torch.float64),
            "w2": torch.randn(K, generator=g, dtype=torch.float64) * 0.3,
            "b2": torch.zeros((), dtype=torch.float64)}


def forward(x, p):
    h = torch.sigmoid(x @ p["W1"].t() + p["b1"])                   # (N, K)
    M = torch.sigmoid(h @ p["w2"] + p["b2"])                       # (N,)
    return h, M


def bce(M, y):
    """L = -(1/N) sum_i [y_i log M_i + (1 - y_i) log(1 - M_i)]."""
    return -(y * torch.log(M) + (1 - y) * torch.log(1 - M)).mean()


def wrong_sign_bce(M, y):
    """The copied typo: (1/N) sum_i [-y_i log M_i + (1 - y_i) log(1 - M_i)]. Not a loss."""
    return (-y * torch.log(M) + (1 - y) * torch.log(1 - M)).mean()


def gradient_by_formula(x, y, p) -> dict[str, torch.Tensor]:
    """dL/dtheta_k = -(1/N) sum_i (y_i/M_i - (1-y_i)/(1-M_i)) dM_i/dtheta_k, term by term."""
    N = x.shape[0]
    h, M = forward(x, p)
    outer = -(y / M - (1 - y) / (1 - M)) / N                       # (N,)  -(1/N)(y/M - (1-y)/(1-M))
    dM_dz2 = M * (1 - M)                                           # (N,)  sigma'(z2)
    dM_dh = dM_dz2[:, None] * p["w2"][None, :]                     # (N, K)
    dM_dz1 = dM_dh * h * (1 - h)                                   # (N, K)
    return {
        "b2": (outer * dM_dz2).sum(),                              # sum_i outer_i M(1-M)
        "w2": (outer[:, None] * dM_dz2[:, None] * h).sum(0),        # ... * h_j
        "b1": (outer[:, None] * dM_dz1).sum(0),                    # ... * w2_j h_j (1-h_j)
        "W1": (outer[:, None] * dM_dz1).t() @ x,                   # ... * x_k
    }


def gradient_by_autograd(x, y, p, loss_fn=bce) -> dict[str, torch.Tensor]:
    leaves = {k: v.detach().clone().requires_grad_() for k, v in p.items()}
    loss = loss_fn(forward(x, leaves)[1], y)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads))


def train(x, y, p, loss_fn=bce, lr: float = 0.5, steps: int = 300):
    """Full-batch gradient descent; returns the trained parameters and the loss per step."""
    p = {k: v.clone() for k, v in p.items()}
    history = []
    for _ in range(steps):
        grads = gradient_by_autograd(x, y, p, loss_fn)
        history.append(loss_fn(forward(x, p)[1], y).item())
        for k in p:
            p[k] -= lr * grads[k]
    return p, history


def accuracy(x, y, p) -> float:
    return ((forward(x, p)[1] > 0.5).to(y.dtype) == y).double().mean().item()
