# %% [markdown]
# # Tutorial 6: fine-tuning for sentiment on real reviews
#
# The recipe every textbook gives: take a pretrained encoder, put a task layer on top, train all
# of it with a small learning rate, evaluate on held-out data, keep the best, test once.
# Here on Rotten Tomatoes review snippets ("fresh" / "rotten"), with minift's Trainer, and a
# per-class precision / recall / F1 report at the end.
#
# By default this trains on 2,000 snippets for one epoch (about two minutes on two CPU cores);
# `minift finetune` runs the full recipe. MINIFT_TUTORIAL_FAST=1 uses fewer examples.

# %%
import os
import tempfile

import torch

import minift
from minift import data, metrics, tasks
from minift.ops import extension_available
from minift.trainer import TrainConfig, Trainer

FAST = os.environ.get("MINIFT_TUTORIAL_FAST") == "1"
N_TRAIN, N_EVAL = (800, 300) if FAST else (2000, 1278)
EPOCHS, LR = 1, 2e-4
# minift's compiled kernels where they are built, as `minift finetune` does: the same function as
# the plain PyTorch layers (tutorial 8 checks them against each other), in less time
IMPL = "fused" if extension_available() else "torch"

# %% [markdown]
# ## The data and its split
# 12,752 unique snippets. No official split exists, so minift assigns each snippet by the SHA-1
# of its text (0-7 of 10 buckets: train, 8: dev, 9: test). Anyone can recompute it.

# %%
full = tasks.rotten_tomatoes()
print("full corpus:", full.sizes())
ds = data.Dataset("rotten_tomatoes", "classification", full.train[:N_TRAIN], full.dev[:N_EVAL],
                  full.test[:N_EVAL], full.labels)
for ex in ds.train[:3]:
    print(f"  [{ex.label:>6s}] {ex.text[:90]}")

# %% [markdown]
# ## Model: MiniLM + a fresh linear layer on the pooled [CLS] vector
# The load report says which weights are new: only the classifier.

# %%
torch.manual_seed(0)
model = minift.BertForSequenceClassification.from_pretrained("minilm", impl=IMPL, id2label=dict(enumerate(ds.labels)))
tokenizer = minift.Tokenizer.from_pretrained("minilm")
print(model.load_report.summary())
assert model.load_report.missing_initialised == ["classifier.weight", "classifier.bias"]

# %% [markdown]
# ## Before training: the head is random
# Accuracy of the untrained model is what guessing gives.

# %%
out_dir = tempfile.mkdtemp(prefix="minift-tutorial6-")
config = TrainConfig(lr=LR, epochs=EPOCHS, batch_size=32, warmup_ratio=0.1, weight_decay=0.01, clip=1.0,
                     progress=False)
trainer = Trainer(model, tokenizer, ds, config, out_dir)
before = trainer.evaluate(trainer.dev_set)["accuracy"]
majority = max(sum(e.label == lab for e in ds.dev) for lab in ds.labels) / len(ds.dev)
print(f"dev accuracy before training {before:.3f} (majority class {majority:.3f})")

# %% [markdown]
# ## Train
# AdamW (decoupled weight decay 0.01, not on biases and LayerNorm), warm-up over 10% of the steps
# then linear decay, gradient clipping at norm 1. Batches group snippets of similar length, so
# little compute goes to padding.

# %%
result = trainer.fit()
print(f"dev accuracy after training {result['dev_accuracy']:.3f}, test accuracy {result['test_accuracy']:.3f}")
assert result["dev_accuracy"] > majority + 0.05, "fine-tuning must beat the majority class clearly"
assert result["dev_accuracy"] > before + 0.05

# %% [markdown]
# ## The classification report
# Precision: of the snippets we called fresh, how many were. Recall: of the fresh snippets, how
# many we found. F1 is their harmonic mean. The numbers are recomputed here from the predictions
# by hand, as a check of the report.

# %%
print(metrics.format_report(result["test_report"]))
pred, gold = trainer.predict(trainer.test_set)
fresh = ds.labels.index("fresh")
tp = sum(p == fresh and g == fresh for p, g in zip(pred, gold))
precision = tp / sum(p == fresh for p in pred)
recall = tp / sum(g == fresh for g in gold)
assert abs(precision - result["test_report"]["fresh"]["precision"]) < 1e-12
assert abs(recall - result["test_report"]["fresh"]["recall"]) < 1e-12

# %% [markdown]
# ## Training curves and the confusion matrix
# The trainer logs the loss every few steps and the dev accuracy after each epoch to
# `train_log.jsonl` in its output folder. The confusion matrix counts the test snippets by true
# label (rows) and predicted label (columns): the diagonal is what the model got right.

# %%
import json

import matplotlib.pyplot as plt


with open(os.path.join(out_dir, "train_log.jsonl")) as f:
    log = [json.loads(line) for line in f]
steps = [r for r in log if "loss" in r]
epochs = [r for r in log if "dev_accuracy" in r]
confusion = torch.zeros(len(ds.labels), len(ds.labels), dtype=torch.long)
for p, g in zip(pred, gold):
    confusion[g, p] += 1
assert confusion.sum() == len(gold)
assert abs(confusion.trace().item() / len(gold) - result["test_accuracy"]) < 1e-12, "the diagonal is the accuracy"

fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
axes[0].plot([r["step"] for r in steps], [r["loss"] for r in steps], marker=".")
axes[0].set(xlabel="step", ylabel="training loss", title="loss")
axes[1].plot([r["epoch"] for r in epochs], [r["dev_accuracy"] for r in epochs], marker="o", label="dev accuracy")
axes[1].axhline(majority, color="k", linestyle=":", label="majority class")
axes[1].axhline(before, color="gray", linestyle="--", label="before training")
axes[1].set(xlabel="epoch", ylabel="accuracy", title="dev accuracy", xticks=[r["epoch"] for r in epochs])
axes[1].legend()
axes[2].imshow(confusion, cmap="Blues")
for i in range(len(ds.labels)):
    for j in range(len(ds.labels)):
        axes[2].text(j, i, int(confusion[i, j]), ha="center", va="center",
                     color="white" if confusion[i, j] > confusion.max() / 2 else "black")
axes[2].set(xticks=range(len(ds.labels)), xticklabels=ds.labels, yticks=range(len(ds.labels)),
            yticklabels=ds.labels, xlabel="predicted", ylabel="true", title="test confusion matrix")
plt.show()

# %% [markdown]
# ## Using the model
# The best checkpoint is in Hugging Face format (it loads in transformers too).

# %%
best = minift.BertForSequenceClassification.from_pretrained(os.path.join(out_dir, "best")).eval()
texts = ["A gorgeous, generous film.", "Tedious, shrill and far too long."]
enc = tokenizer(texts)
with torch.no_grad():
    probs = torch.softmax(best(enc["input_ids"], enc["attention_mask"]).logits, -1)
for t, p in zip(texts, probs):
    print(f"  {best.config.id2label[int(p.argmax())]:>6s} {p.max().item():.2f}  {t}")
print("files written:", sorted(os.listdir(out_dir)))

# %% [markdown]
# The run's folder was a temporary one: it goes now (two checkpoints of 90 MB each).
# `minift finetune --out DIR` keeps its run where you say.

# %%
import shutil

shutil.rmtree(out_dir)
