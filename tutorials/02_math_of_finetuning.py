# %% [markdown]
# # Tutorial 2: the math of fine-tuning
#
# Fine-tuning is empirical risk minimisation. With a model M_theta and N labelled examples,
#
#     L(theta) = (1/N) sum_i l(M_theta(x_i), y_i)
#
# and gradient descent repeats theta <- theta - eta * dL/dtheta. For a binary label y in {0, 1}
# and a predicted probability M = M_theta(x) in (0, 1), the loss is the binary cross-entropy
#
#     l = -[ y log M + (1 - y) log(1 - M) ]
#
# Here we derive its gradient term by term for a small two-layer sigmoid network on real movie
# reviews, check it three ways, and show that a widely copied write-up of this loss has a sign
# error that makes it useless.

# %%
import torch

from minift import tasks, textbook

reviews = tasks.rotten_tomatoes().train[:600]
x = textbook.bag_of_words([r.text for r in reviews], dim=64)               # (N, F) float64
y = torch.tensor([1.0 if r.label == "fresh" else 0.0 for r in reviews], dtype=torch.float64)
print(f"{len(reviews)} real review snippets, {int(y.sum())} fresh; features {tuple(x.shape)}")

# %% [markdown]
# ## The model and the gradient
# h = sigmoid(x W1^T + b1), M = sigmoid(h w2 + b2). By the chain rule, for any parameter theta_k
#
#     dL/dtheta_k = -(1/N) sum_i ( y_i / M_i - (1 - y_i) / (1 - M_i) ) dM_i/dtheta_k
#
# and with sigmoid' = sigmoid (1 - sigmoid):
#   dM/db2 = M(1-M),  dM/dw2_j = M(1-M) h_j,  dM/dW1_jk = M(1-M) w2_j h_j (1-h_j) x_k.
# `textbook.gradient_by_formula` computes exactly these terms; read it beside this cell.

# %%
params = textbook.init_params(x.shape[1], 8, seed=0)
by_formula = textbook.gradient_by_formula(x, y, params)
by_autograd = textbook.gradient_by_autograd(x, y, params)
for name in params:
    err = (by_formula[name] - by_autograd[name]).abs().max().item()
    print(f"  dL/d{name:3s} formula vs autograd: max error {err:.1e}")
    assert err < 1e-12

# %% [markdown]
# ## A simplification worth seeing
# Multiply out the first factor with dM/dz2 = M(1-M) for the output pre-activation z2:
#   -( y/M - (1-y)/(1-M) ) M(1-M) = -( y(1-M) - (1-y)M ) = M - y.
# The gradient of the cross-entropy with respect to the logit is prediction minus target. This is
# why frameworks fuse sigmoid + BCE (and softmax + cross-entropy, Tutorial 4) into one op.

# %%
_, M = textbook.forward(x, params)
dz2 = (by_formula["b2"])                      # dL/db2 = dL/dz2 summed over examples
assert torch.allclose(dz2, (M - y).mean(), atol=1e-14)
print("dL/dz2 = mean(M - y): checked")

# %% [markdown]
# ## A finite-difference check
# Nudge one weight by +-eps and watch the loss: (L(w+eps) - L(w-eps)) / (2 eps) must equal the
# analytic derivative. `torch.autograd.gradcheck` does this for every input at once.

# %%
def loss_of_w2(w2):
    return textbook.bce(textbook.forward(x, {**params, "w2": w2})[1], y)


w2 = params["w2"].clone().requires_grad_()
assert torch.autograd.gradcheck(loss_of_w2, (w2,), eps=1e-6, atol=1e-8)
eps = 1e-6
e0 = torch.zeros_like(params["w2"])
e0[0] = eps
numeric = (loss_of_w2(params["w2"] + e0) - loss_of_w2(params["w2"] - e0)) / (2 * eps)
print(f"dL/dw2[0]: analytic {by_formula['w2'][0].item():.8f}, finite difference {numeric.item():.8f}")
assert abs(numeric - by_formula["w2"][0]) < 1e-7

# %% [markdown]
# ## Training: the risk goes down, accuracy goes up

# %%
trained, history = textbook.train(x, y, params, textbook.bce, lr=2.0, steps=300)
majority = max(y.mean().item(), 1 - y.mean().item())
acc = textbook.accuracy(x, y, trained)
print(f"loss {history[0]:.4f} -> {history[-1]:.4f}; training accuracy {acc:.3f} (majority class {majority:.3f})")
assert history[-1] < history[0] and acc > majority

# %% [markdown]
# ## The sign error
# One widely copied derivation writes the loss as  -y log M + (1 - y) log(1 - M).
# The second term's sign is wrong. For a negative example (y = 0) it reads log(1 - M), which is
# *smallest* when M -> 1: it rewards the wrong answer, and it has no minimum at all.

# %%
y0 = torch.tensor([0.0], dtype=torch.float64)
for m in (0.1, 0.9, 0.999):
    M_ = torch.tensor([m], dtype=torch.float64)
    print(f"  y=0, M={m}: correct loss {textbook.bce(M_, y0).item():7.3f}   "
          f"copied loss {textbook.wrong_sign_bce(M_, y0).item():7.3f}")
assert textbook.wrong_sign_bce(torch.tensor([0.9], dtype=torch.float64), y0) < \
    textbook.wrong_sign_bce(torch.tensor([0.1], dtype=torch.float64), y0)

bad, bad_history = textbook.train(x, y, params, textbook.wrong_sign_bce, lr=0.5, steps=10)
M_before, M_after = textbook.forward(x, params)[1], textbook.forward(x, bad)[1]
print(f"10 steps on the copied loss: it falls {bad_history[0]:.3f} -> {bad_history[-1]:.3f}, "
      f"while the mean prediction on negatives rises {M_before[y == 0].mean():.3f} -> {M_after[y == 0].mean():.3f}")
assert bad_history[-1] < bad_history[0] and M_after[y == 0].mean() > M_before[y == 0].mean()
assert textbook.bce(M_after, y) > textbook.bce(M_before, y), "the true risk got worse"

# %% [markdown]
# ## The landscape, and where the copied loss leads
# Left: the loss of one negative example (y = 0) as a function of the prediction M. The correct
# loss -log(1 - M) has its minimum at M = 0; the copied log(1 - M) falls without bound as M -> 1.
# Middle: the true risk L as a function of two of the network's parameters (the output bias b2
# and the first output weight w2[0]), the others fixed at the trained values: a smooth bowl with
# the trained point at its bottom. Right: gradient descent on each loss from the same start,
# measured by the *true* risk: the correct derivation descends, the copied one climbs away (a few
# steps further, M reaches 1 in floating point and the copied loss is NaN).

# %%
import matplotlib.pyplot as plt

m = torch.linspace(0.001, 0.999, 200, dtype=torch.float64)
zeros = torch.zeros_like(m)
per_example = [textbook.bce(m[i:i + 1], zeros[i:i + 1]).item() for i in range(len(m))]
per_example_wrong = [textbook.wrong_sign_bce(m[i:i + 1], zeros[i:i + 1]).item() for i in range(len(m))]

b2s = torch.linspace(trained["b2"].item() - 4, trained["b2"].item() + 4, 41)
w20s = torch.linspace(trained["w2"][0].item() - 4, trained["w2"][0].item() + 4, 41)
risk = torch.empty(len(w20s), len(b2s))
for i, w20 in enumerate(w20s):
    for j, b2 in enumerate(b2s):
        w2_ = trained["w2"].clone()
        w2_[0] = w20
        p_ = {**trained, "w2": w2_, "b2": trained["b2"] * 0 + b2}
        risk[i, j] = textbook.bce(textbook.forward(x, p_)[1], y)

true_risk = {"correct loss": [], "copied loss": []}
for label, loss_fn in (("correct loss", textbook.bce), ("copied loss", textbook.wrong_sign_bce)):
    p_ = params
    for step in range(25):
        true_risk[label].append(textbook.bce(textbook.forward(x, p_)[1], y).item())
        p_, _ = textbook.train(x, y, p_, loss_fn, lr=0.5, steps=1)

fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
axes[0].plot(m, per_example, label="correct: -log(1 - M)")
axes[0].plot(m, per_example_wrong, label="copied: log(1 - M)")
axes[0].set(xlabel="prediction M for a negative example (y = 0)", ylabel="loss", title="one example")
axes[0].legend()
cs = axes[1].contourf(b2s, w20s, risk, levels=30, cmap="viridis")
axes[1].plot(trained["b2"].item(), trained["w2"][0].item(), "r*", markersize=12, label="trained")
axes[1].set(xlabel="b2", ylabel="w2[0]", title="true risk L around the trained parameters")
axes[1].legend()
fig.colorbar(cs, ax=axes[1])
for label, values in true_risk.items():
    axes[2].plot(values, label=label)
axes[2].set(xlabel="gradient step (lr 0.5)", ylabel="true risk (binary cross-entropy)",
            title="descending each loss")
axes[2].legend()
plt.show()
assert true_risk["correct loss"][-1] < true_risk["correct loss"][0]
assert true_risk["copied loss"][-1] > true_risk["copied loss"][0], "the copied loss diverges"
assert risk.min() >= risk[20, 20] - 0.05, "the trained point sits near the bottom of the bowl"

# %% [markdown]
# ## Discussion
# The same derivation, with softmax in place of sigmoid, gives the gradient of the softmax
# cross-entropy: softmax(z) - onehot(y). BERT fine-tuning is this, with M a 6- or 12-layer
# Transformer; Tutorial 4 writes the backward pass of each of its layers by hand.
