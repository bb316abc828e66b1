# %% [markdown]
# # Tutorial 9: parameter-efficient fine-tuning: linear probe, top layers, LoRA
#
# Full fine-tuning updates all 22.7 million MiniLM weights. Three cheaper schemes:
#
# - **linear probe**: freeze the encoder, train only the classifier (769 weights here);
# - **top layers**: train the last K encoder layers and the head;
# - **LoRA** (Hu et al., 2021): freeze every weight matrix W and learn a low-rank update,
#   W x + (alpha / r) B A x with A (r x in), B (out x r), r small. B starts at zero, so training
#   starts from exactly the pretrained model, and B A can be folded into W afterwards.
#
# We check LoRA's two promises, then train the three schemes on the same small sentiment set.
# By default 640 snippets, one epoch each (about two minutes on two CPU cores).

# %%
import os
import shutil
import tempfile

import torch

import minift
from minift import data, peft, tasks
from minift.ops import extension_available
from minift.trainer import TrainConfig, Trainer

FAST = os.environ.get("MINIFT_TUTORIAL_FAST") == "1"
N_TRAIN, N_EVAL = (640, 100) if FAST else (640, 400)
IMPL = "fused" if extension_available() else "torch"      # the compiled kernels where built, as the CLI
full = tasks.rotten_tomatoes()
# the schemes are compared on dev accuracy: no test split (the trainer would evaluate it for nothing)
ds = data.Dataset("rt", "classification", full.train[:N_TRAIN], full.dev[:N_EVAL], [], full.labels)
tok = minift.Tokenizer.from_pretrained("minilm")
batch = tok(["An odd, touching film.", "Nothing works."])


def fresh_model():
    torch.manual_seed(0)
    return minift.BertForSequenceClassification.from_pretrained("minilm", impl=IMPL, id2label=dict(enumerate(ds.labels)))


# %% [markdown]
# ## LoRA starts from the pretrained function exactly

# %%
base, lora = fresh_model().eval(), fresh_model().eval()
print(peft.apply(lora, lora_rank=8))
with torch.no_grad():
    a = base(batch["input_ids"], batch["attention_mask"]).logits
    b = lora(batch["input_ids"], batch["attention_mask"]).logits
assert torch.equal(a, b), "B = 0 at the start: the adapter adds exactly nothing"
trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
assert all("lora_" in n or n.startswith("classifier") for n in trainable)
print(f"trainable tensors: {len(trainable)} (LoRA A and B of 6 layers x query/value, and the classifier)")

# %% [markdown]
# ## ... and folds into a plain BERT afterwards
# Give B some values, then compare the adapter model with a plain model whose W is W + s B A.

# %%
with torch.no_grad():
    for m in lora.modules():
        if getattr(m, "lora_B", None) is not None:
            m.lora_B.normal_(std=0.02)
merged = fresh_model().eval()
merged.load_state_dict(peft.merged_state_dict(lora))
with torch.no_grad():
    c = lora(batch["input_ids"], batch["attention_mask"]).logits
    d = merged(batch["input_ids"], batch["attention_mask"]).logits
print(f"adapter model vs merged plain model: {(c - d).abs().max():.1e}")
assert (c - d).abs().max() < 1e-5 and not torch.equal(a, c)

# %% [markdown]
# ## Train the three schemes (and full fine-tuning) on the same data

# %%
results = {}
for name, kw, lr in [("linear probe", dict(freeze="encoder"), 5e-3), ("top 2 layers", dict(train_top_layers=2), 3e-4),
                     ("LoRA r=8", dict(lora_rank=8), 5e-3), ("full", {}, 2e-4)]:
    model = fresh_model()
    summary = peft.apply(model, **kw)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    out = tempfile.mkdtemp(prefix="minift-tutorial9-")
    cfg = TrainConfig(lr=lr, epochs=1, batch_size=16, max_length=64, progress=False)
    trainer = Trainer(model, tok, ds, cfg, out)     # a temporary folder, removed after the run
    fixed = data.collate(trainer.train_set, list(range(64)))          # the same 64 training snippets

    def train_loss():
        model.eval()
        with torch.no_grad():
            return model(fixed["input_ids"], fixed["attention_mask"], labels=fixed["labels"]).loss.item()
    before = train_loss()
    res = trainer.fit()
    after = train_loss()
    assert after < before, f"{name}: the training loss must go down ({before:.3f} -> {after:.3f})"
    # The trainer ends by loading the best checkpoint, in which LoRA's update is merged into W:
    # a frozen W may then differ from the start only by a matrix of rank <= r.
    for n, p in model.named_parameters():
        if n in frozen_before and not n.endswith(("lora_A", "lora_B")):
            delta = (p.detach() - frozen_before[n]).double()
            if name.startswith("LoRA") and n.endswith(("query.weight", "value.weight")):
                assert torch.linalg.matrix_rank(delta, atol=1e-6).item() <= 8, f"{n}: update of rank > 8"
            else:
                assert torch.equal(p.detach(), frozen_before[n]), f"{name}: the frozen weight {n} moved"
    results[name] = (summary.split(": ")[1], res["dev_accuracy"], res["train_seconds"], before, after)
    shutil.rmtree(out)

majority = max(sum(e.label == lab for e in ds.dev) for lab in ds.labels) / len(ds.dev)
print(f"\n{'scheme':14s} {'trainable':48s} {'train loss':>15s} {'dev acc':>7s} {'seconds':>7s}")
for name, (summary, acc, sec, before, after) in results.items():
    print(f"{name:14s} {summary:48s} {before:6.3f} -> {after:5.3f} {acc:7.3f} {sec:7.0f}")
print(f"(majority class on dev: {majority:.3f})")
assert results["full"][1] > majority + 0.05, "full fine-tuning learns the task"

# %% [markdown]
# ## Accuracy against trainable parameters
# Each scheme's dev accuracy against how many parameters it trains (log scale): the trade the
# whole tutorial is about.

# %%
import matplotlib.pyplot as plt


n_trainable = {name: int(r[0].split(" of ")[0].replace(",", "")) for name, r in results.items()}
assert n_trainable["linear probe"] < n_trainable["LoRA r=8"] < n_trainable["top 2 layers"] < n_trainable["full"]
fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
for name, (summary, acc, sec, before, after) in results.items():
    ax.scatter(n_trainable[name], acc, s=60)
    ax.annotate(f"{name}\n{sec:.0f} s", (n_trainable[name], acc), textcoords="offset points", xytext=(8, -4))
ax.axhline(majority, color="k", linestyle=":", label="majority class")
ax.set(xscale="log", xlabel="trainable parameters", ylabel="dev accuracy",
       title=f"one epoch on {len(ds.train)} snippets")
ax.legend(loc="lower right")
plt.show()

# %% [markdown]
# ## Discussion
# The frozen schemes are cheaper per step (no gradients for most weights) and store a tiny
# checkpoint per task. Full fine-tuning learns fastest per step; the
# linear probe is limited by what the pooled vector of a frozen MiniLM already separates. On a few
# hundred examples and one epoch the frozen schemes have barely started (their training losses
# fall, their dev accuracy lags); they shine with more steps, at a fraction of the memory.
# `minift finetune --freeze encoder | --train-top-layers K | --lora R` runs each on a full task.
