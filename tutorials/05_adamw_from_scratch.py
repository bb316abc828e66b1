# %% [markdown]
# # Tutorial 5: AdamW from scratch, and what "decoupled" weight decay means
#
# The fine-tuning update, in the form the literature writes it:
#
#     theta <- theta - eta * u(grad L) - eta * lambda * theta
#
# u is the optimizer's direction; the last term is weight decay, applied to the weights directly
# ("decoupled"), not added to the gradient. We write Adam's u in ten lines, check the whole update
# against `torch.optim.AdamW`, and show why decoupling matters.

# %%
import torch

from minift import optim

# %% [markdown]
# ## Adam's direction
# m = running mean of gradients (momentum), v = running mean of squared gradients (a per-weight
# scale). Both start at 0, which biases early averages toward 0; dividing by (1 - beta^t) undoes
# that. The step is m_hat / (sqrt(v_hat) + eps): roughly +-1 per weight, whatever the gradient's size.

# %%
def adamw_step(theta, grad, state, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    b1, b2 = betas
    state["t"] += 1
    state["m"] = b1 * state["m"] + (1 - b1) * grad                      # first moment
    state["v"] = b2 * state["v"] + (1 - b2) * grad * grad                # second moment
    m_hat = state["m"] / (1 - b1 ** state["t"])                          # bias correction
    v_hat = state["v"] / (1 - b2 ** state["t"])
    return theta - lr * m_hat / (v_hat.sqrt() + eps) - lr * weight_decay * theta


# %% [markdown]
# ## Check against torch.optim.AdamW on a real problem
# A least-squares fit with 300 steps; the gradients come from the problem, not from random numbers.

# %%
g = torch.Generator().manual_seed(0)
A, target = torch.randn(64, 20, generator=g, dtype=torch.float64), torch.randn(64, generator=g, dtype=torch.float64)


def loss_grad(theta):
    return A.t() @ (A @ theta - target) / 64                              # d/dtheta of mean squared error / 2


theta0 = torch.randn(20, generator=g, dtype=torch.float64)
mine, state = theta0.clone(), {"t": 0, "m": torch.zeros(20, dtype=torch.float64), "v": torch.zeros(20, dtype=torch.float64)}
p_torch = torch.nn.Parameter(theta0.clone())
p_minift = torch.nn.Parameter(theta0.clone())
opt_torch = torch.optim.AdamW([p_torch], lr=0.01, weight_decay=0.01)
opt_minift = optim.AdamW([p_minift], lr=0.01, weight_decay=0.01)
for step in range(300):
    mine = adamw_step(mine, loss_grad(mine), state, lr=0.01)
    for p, o in ((p_torch, opt_torch), (p_minift, opt_minift)):
        p.grad = loss_grad(p.detach())
        o.step()
err_torch = (mine - p_torch.detach()).abs().max().item()
err_minift = (p_minift.detach() - p_torch.detach()).abs().max().item()
print(f"after 300 steps: ten-line AdamW vs torch.optim.AdamW {err_torch:.1e}, minift.optim.AdamW vs torch {err_minift:.1e}")
assert err_torch < 1e-12 and err_minift < 1e-12

# %% [markdown]
# ## Decoupled decay is not L2 regularisation (for Adam)
# Adding lambda*theta to the gradient (L2) sends it through Adam's normalisation: a weight with
# large gradients has a large sqrt(v), and its decay is divided by that and mostly disappears.
# Decoupled decay shrinks every weight by the same factor (1 - eta*lambda) per step.
# Experiment: two weights, one with large and noisy gradients, one with none, both starting at 1.

# %%
def run(decoupled, steps=500, lr=0.01, wd=0.1):
    theta = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = optim.AdamW([theta], lr=lr, weight_decay=wd if decoupled else 0.0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        noise = torch.tensor([10.0 * torch.randn(1, generator=gen).item(), 0.0], dtype=torch.float64)
        theta.grad = noise + (0.0 if decoupled else wd * theta.detach())   # L2: decay inside the gradient
        opt.step()
    return theta.detach()


dec, l2 = run(True), run(False)
print(f"decoupled: busy weight {dec[0]:+.3f}, idle weight {dec[1]:.3f}   (idle = (1 - 0.001)^500 = {0.999 ** 500:.3f})")
print(f"L2 in Adam: busy weight {l2[0]:+.3f}, idle weight {l2[1]:.3f}")
assert abs(dec[1].item() - 0.999 ** 500) < 1e-9, "decoupled decay shrinks an idle weight by exactly (1 - eta lambda)^t"
assert l2[1].item() < 0.1, "with L2 in Adam the idle weight is pushed to 0 at a full Adam step (its v is tiny)"
assert l2[0].item() > dec[0].item() + 0.2, "and the busy weight hardly decays at all"

# %% [markdown]
# The same two runs, step by step: the busy weight (top) and the idle weight (bottom), under
# decoupled decay and under L2 inside Adam.

# %%
import matplotlib.pyplot as plt


def trajectory(decoupled, steps=500, lr=0.01, wd=0.1):
    """run(), recording both weights after every step."""
    theta = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = optim.AdamW([theta], lr=lr, weight_decay=wd if decoupled else 0.0)
    gen = torch.Generator().manual_seed(1)
    path = [theta.detach().clone()]
    for _ in range(steps):
        noise = torch.tensor([10.0 * torch.randn(1, generator=gen).item(), 0.0], dtype=torch.float64)
        theta.grad = noise + (0.0 if decoupled else wd * theta.detach())
        opt.step()
        path.append(theta.detach().clone())
    return torch.stack(path)                                                # (steps + 1, 2)


paths = {"decoupled (AdamW)": trajectory(True), "L2 inside Adam": trajectory(False)}
assert torch.equal(paths["decoupled (AdamW)"][-1], dec) and torch.equal(paths["L2 inside Adam"][-1], l2)
fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True, constrained_layout=True)
for label, path in paths.items():
    axes[0].plot(path[:, 0], label=label)
    axes[1].plot(path[:, 1], label=label)
axes[1].plot(0.999 ** torch.arange(501.0), "k:", label="(1 - eta lambda)^t")
axes[0].set(ylabel="busy weight", title="weight decay 0.1, lr 0.01, gradient 10 N(0, 1) on the busy weight")
axes[1].set(ylabel="idle weight (no gradient)", xlabel="step")
axes[0].legend()
axes[1].legend()
plt.show()

# %% [markdown]
# Decoupled decay treats both weights alike: each shrinks by (1 - eta lambda) per step, the idle
# one to 0.999^500 = 0.61 exactly. L2 inside Adam does the opposite of what regularisation is
# for: the busy weight's decay term is drowned by its large gradients in sqrt(v) and it hardly
# decays (0.97), while the idle weight's only gradient *is* the decay, which Adam normalises to a
# full step of about eta, driving it to 0 whatever lambda is. That is Loshchilov & Hutter's
# observation, and why BERT fine-tuning uses AdamW.
#
# ## The schedule
# BERT's recipe warms the learning rate up linearly over the first 10% of steps, then decays it
# linearly to 0. minift.optim.LRSchedule matches torch's LambdaLR with the same function.

# %%
factor = optim.linear_warmup_decay(warmup_steps=10, total_steps=100)
lrs = [factor(s) for s in range(101)]
assert lrs[0] == 0 and lrs[10] == 1.0 and lrs[55] == 0.5 and lrs[100] == 0
print("lr factor at steps 0, 5, 10, 55, 100:", [round(lrs[s], 2) for s in (0, 5, 10, 55, 100)])
