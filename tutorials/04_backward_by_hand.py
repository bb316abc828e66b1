# %% [markdown]
# # Tutorial 4: backward passes by hand
#
# Autograd is the chain rule applied mechanically. To *see* it, we write the backward pass of four
# of BERT's ops ourselves: layer norm, GELU, softmax cross-entropy and attention. Each derivation is
# a few lines; each is checked with `torch.autograd.gradcheck` (finite differences in float64).
# minift keeps the same pairs in `minift/functional.py`, and runs the whole model on them with
# `impl="reference"`.

# %%
import math

import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from minift import functional as RF

g = torch.Generator().manual_seed(0)
f64 = dict(dtype=torch.float64)


def check(fn, *inputs):
    inputs = tuple(t.clone().requires_grad_() for t in inputs)
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    return True


# %% [markdown]
# ## Layer norm
# y = xhat * w + b with xhat = (x - mu) r, r = 1/sqrt(var + eps), over the H features of a row.
# The subtle part is that mu and var depend on every x_i, so
#   d xhat_j / d x_i = r (delta_ij - 1/H - xhat_i xhat_j / H)
# and with g = dy * w (the gradient reaching xhat):
#   dx = r (g - mean(g) - xhat * mean(g * xhat))

# %%
class MyLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        mu, r = x.mean(-1, keepdim=True), torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
        xhat = (x - mu) * r
        ctx.save_for_backward(xhat, r, w)
        return xhat * w + b

    @staticmethod
    def backward(ctx, dy):
        xhat, r, w = ctx.saved_tensors
        gx = dy * w
        dx = r * (gx - gx.mean(-1, keepdim=True) - xhat * (gx * xhat).mean(-1, keepdim=True))
        return dx, (dy * xhat).sum(0), dy.sum(0)


x, w, b = (torch.randn(s, generator=g, **f64) for s in [(4, 10), (10,), (10,)])
assert check(MyLayerNorm.apply, x, w, b)
assert torch.allclose(MyLayerNorm.apply(x, w, b), F.layer_norm(x, (10,), w, b, 1e-5))
print("layer norm backward: gradcheck passed")

# %% [markdown]
# ## GELU
# GELU(x) = x Phi(x), Phi the normal CDF. Product rule: GELU'(x) = Phi(x) + x phi(x),
# phi(x) = exp(-x^2/2)/sqrt(2 pi). (Forgetting the second term is the classic mistake; the check
# below would catch it.)

# %%
def gelu_grad(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)


x = torch.randn(50, generator=g, **f64) * 3
xg = x.clone().requires_grad_()
(auto,) = torch.autograd.grad(F.gelu(xg).sum(), xg)
assert torch.allclose(gelu_grad(x), auto, atol=1e-12)
wrong = 0.5 * (1 + torch.erf(x / math.sqrt(2)))                          # Phi alone
assert not torch.allclose(wrong, auto, atol=1e-3)
print("GELU' = Phi + x phi: matches autograd; Phi alone does not")

# %% [markdown]
# ## Softmax cross-entropy
# l = -log softmax(z)_y = logsumexp(z) - z_y, so dl/dz = softmax(z) - onehot(y): one subtraction.
# With label smoothing the target is q = (1-eps) onehot + eps/C and dl/dz = softmax(z) - q.
# Computing logsumexp as m + log sum exp(z - m), m = max z, keeps it finite at |z| = 1e4.

# %%
z = torch.randn(6, 5, generator=g, **f64) * 2
y = torch.tensor([0, 4, 1, 1, 3, 2])
eps = 0.1
q = torch.full((6, 5), eps / 5, **f64).scatter_add_(1, y[:, None], torch.full((6, 1), 1 - eps, **f64))
mine = (torch.softmax(z, -1) - q) / 6                                    # mean over 6 rows
zg = z.clone().requires_grad_()
(auto,) = torch.autograd.grad(F.cross_entropy(zg, y, label_smoothing=eps), zg)
assert torch.allclose(mine, auto, atol=1e-12)
big = torch.tensor([[1e4, -1e4, 0.0]], **f64)
assert torch.isfinite(RF.cross_entropy(big, torch.tensor([1])))
print("softmax CE gradient = (softmax - q)/N: matches autograd; finite at |z| = 1e4")

# %% [markdown]
# ## Attention
# O = P V, P = softmax(S), S = scale Q K^T (+ mask). Going backwards:
#   dV = P^T dO;  dP = dO V^T;  dS_ij = P_ij (dP_ij - D_i) with D_i = sum_j P_ij dP_ij;
#   dQ = scale dS K;  dK = scale dS^T Q.
# A useful identity: D_i = sum_j P_ij dP_ij = dO_i . O_i, so the backward needs only O, not P,
# to compute it. The fused kernel (Tutorial 8) uses this to avoid storing P at all.

# %%
def attention_backward(dO, q, k, v, scale):
    P = torch.softmax(scale * q @ k.transpose(-2, -1), -1)
    O = P @ v
    dv = P.transpose(-2, -1) @ dO
    dP = dO @ v.transpose(-2, -1)
    Di = (dO * O).sum(-1, keepdim=True)                                  # = (P * dP).sum(-1)
    dS = P * (dP - Di)
    return scale * dS @ k, scale * dS.transpose(-2, -1) @ q, dv


q, k, v = (torch.randn(2, 3, 7, 8, generator=g, **f64) for _ in range(3))
dO = torch.randn(2, 3, 7, 8, generator=g, **f64)
qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
auto = torch.autograd.grad(F.scaled_dot_product_attention(qg, kg, vg), (qg, kg, vg), dO)
for mine, theirs, name in zip(attention_backward(dO, q, k, v, 8 ** -0.5), auto, "qkv"):
    assert torch.allclose(mine, theirs, atol=1e-12), name
print("attention backward (dQ, dK, dV): matches autograd")

# %% [markdown]
# ## The whole model
# minift.functional holds these pairs (with masks, dropout and the rest). Running BERT on them
# (`impl="reference"`) gives the same parameter gradients as PyTorch's autograd.

# %%
import minift

cfg = minift.BertConfig(vocab_size=100, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                        intermediate_size=40, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
torch.manual_seed(0)
model = minift.BertForSequenceClassification(cfg).double()
ids = torch.randint(1, 100, (3, 9), generator=g)
mask = torch.ones(3, 9, dtype=torch.long)
mask[1, 6:] = 0
labels = torch.tensor([0, 1, 1])
grads = {}
for impl in ("torch", "reference"):
    model.zero_grad()
    model.set_impl(impl)(ids, mask, labels=labels).loss.backward()
    grads[impl] = torch.cat([p.grad.flatten() for p in model.parameters()])
rel = ((grads["reference"] - grads["torch"]).norm() / grads["torch"].norm()).item()
print(f"all {grads['torch'].numel():,} parameter gradients, hand-written vs autograd: relative error {rel:.1e}")
assert rel < 1e-10

# %% [markdown]
# ## Every op, one table
# `minift gradcheck` runs the same check for every hand-derived op of `minift.functional`:
# `gradcheck` on ours (finite differences against our backward), and our gradient against
# autograd's through PyTorch's own op, which must agree to 1e-10 in float64.

# %%
import matplotlib.pyplot as plt

from minift import gradcheck as mgc

results = mgc.run_all()
print(mgc.format_table(results))
assert all(r.passed for r in results)

fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(14, 0.42 * len(results) + 1.2),
                                 gridspec_kw={"width_ratios": [1.5, 1]}, constrained_layout=True)
ax_t.axis("off")
table = ax_t.table(cellText=[[r.op, r.shape, f"{r.max_error:.1e}", "passed" if r.passed else "FAILED"]
                             for r in results],
                   colLabels=["op", "inputs", "max |ours - autograd|", "gradcheck"], loc="center")
table.auto_set_font_size(False)
table.set_fontsize(9)
table.scale(1, 1.3)
ax_b.barh([r.op for r in results], [max(r.max_error, 1e-18) for r in results])
ax_b.axvline(1e-10, color="k", linestyle="--", label="tolerance 1e-10")
ax_b.set(xscale="log", xlabel="max |ours - autograd| (float64; exact zeros drawn at 1e-18)")
ax_b.invert_yaxis()
ax_b.legend()
plt.show()
