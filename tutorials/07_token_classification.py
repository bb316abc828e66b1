# %% [markdown]
# # Tutorial 7: token classification on real tagged text
#
# Part-of-speech tagging: one label per word, from the Universal Dependencies English Web Treebank
# (17 UPOS tags, 12,543 training sentences). Two things differ from sentence classification:
#
# 1. the head is a linear layer on *every* token vector, and
# 2. WordPiece splits words into sub-words, but labels belong to words. The rule used here (and by
#    BERT's authors for NER): the first sub-word of a word carries the word's label, the others get
#    IGNORE_INDEX (-100, minift.config), which the loss ignores. Evaluation is per word.
#
# The corpus comes inside the `decomp` wheel on PyPI, fetched once (82 MB) into ~/.cache/minift.
# By default this trains on 2,000 sentences for one epoch (about two minutes on two CPU cores).

# %%
import os
import tempfile

import torch

import minift
from minift import data
from minift.config import IGNORE_INDEX
from minift.ewt import ud_english_ewt
from minift.ops import extension_available
from minift.trainer import TrainConfig, Trainer

FAST = os.environ.get("MINIFT_TUTORIAL_FAST") == "1"
N_TRAIN, N_EVAL = (400, 100) if FAST else (2000, 1000)
IMPL = "fused" if extension_available() else "torch"      # the compiled kernels where built, as the CLI

full = ud_english_ewt()
print("UD English-EWT:", full.sizes(), "tags:", " ".join(full.labels))
ds = data.Dataset("ewt_upos", "token", full.train[:N_TRAIN], full.dev[:N_EVAL], full.test[:N_EVAL], full.labels)
ex = ds.train[1]
print(" ".join(f"{w}/{t}" for w, t in zip(ex.text, ex.label)))

# %% [markdown]
# ## Labels onto sub-words

# %%
tokenizer = minift.Tokenizer.from_pretrained("minilm")
words = ["Unbelievably", ",", "the", "tokenizer", "splits", "words", "."]
tags = ["ADV", "PUNCT", "DET", "NOUN", "VERB", "NOUN", "PUNCT"]
enc = data.encode_tokens(tokenizer, [data.Example(words, tags)], ds.labels, max_length=64)
pieces = tokenizer.backend.encode(words, is_pretokenized=True).tokens
for piece, lab in zip(pieces, enc.labels[0]):
    print(f"  {piece:>12s}  {ds.labels[lab] if lab != IGNORE_INDEX else f'{IGNORE_INDEX} (ignored)'}")
assert sum(lab != IGNORE_INDEX for lab in enc.labels[0]) == len(words), "exactly one scored sub-word per word"

# %% [markdown]
# ## A baseline to beat: each word's most frequent tag in training (NOUN for unknown words)

# %%
from collections import Counter, defaultdict

counts = defaultdict(Counter)
for s in ds.train:
    for w, t in zip(s.text, s.label):
        counts[w.lower()][t] += 1
gold = [t for s in ds.test for t in s.label]
guess = [counts[w.lower()].most_common(1)[0][0] if w.lower() in counts else "NOUN" for s in ds.test for w in s.text]
baseline = sum(g == p for g, p in zip(gold, guess)) / len(gold)
print(f"most-frequent-tag baseline: {baseline:.3f} word accuracy on {len(gold)} test words")

# %% [markdown]
# ## Fine-tune

# %%
torch.manual_seed(0)
model = minift.BertForTokenClassification.from_pretrained("minilm", impl=IMPL, id2label=dict(enumerate(ds.labels)))
out_dir = tempfile.mkdtemp(prefix="minift-tutorial7-")
trainer = Trainer(model, tokenizer, ds, TrainConfig(lr=3e-4, epochs=1, batch_size=16, progress=False), out_dir)
result = trainer.fit()
print(f"word accuracy: dev {result['dev_accuracy']:.3f}, test {result['test_accuracy']:.3f}")
assert result["test_accuracy"] > baseline, "the fine-tuned tagger beats the lookup table"

# %% [markdown]
# ## Per-tag report (test)

# %%
rep = result["test_report"]
for tag in sorted(ds.labels, key=lambda t: -rep[t]["support"])[:8]:
    r = rep[tag]
    print(f"  {tag:>6s}  P {r['precision']:.3f}  R {r['recall']:.3f}  F1 {r['f1']:.3f}  ({r['support']} words)")
pred, gold_ids = trainer.predict(trainer.test_set)
assert len(pred) == sum(len(s.text) for s in ds.test), "one prediction per word (unless truncated)"

# %% [markdown]
# ## Accuracy per tag, against the lookup baseline
# For each tag, the share of its test words that got it (its recall), for the fine-tuned tagger
# and for the most-frequent-tag baseline; tags ordered by how many test words carry them.

# %%
import matplotlib.pyplot as plt


tags = sorted((t for t in ds.labels if rep[t]["support"] > 0), key=lambda t: -rep[t]["support"])
ours = {t: 0 for t in tags}
base = {t: 0 for t in tags}
for p, g, gs, b in zip(pred, gold_ids, gold, guess):
    assert ds.labels[g] == gs, "the trainer's gold tags are the corpus's, word by word"
    if gs in ours:
        ours[ds.labels[g]] += p == g
        base[gs] += b == gs
acc_ours = [ours[t] / rep[t]["support"] for t in tags]
acc_base = [base[t] / rep[t]["support"] for t in tags]
for t, a in zip(tags, acc_ours):
    assert abs(a - rep[t]["recall"]) < 1e-12, "per-tag accuracy is the tag's recall in the report"

xs = torch.arange(len(tags)).float()
fig, ax = plt.subplots(figsize=(13, 4), constrained_layout=True)
ax.bar(xs - 0.2, acc_ours, width=0.4, label=f"fine-tuned (test accuracy {result['test_accuracy']:.3f})")
ax.bar(xs + 0.2, acc_base, width=0.4, label=f"most frequent tag (accuracy {baseline:.3f})")
ax.set_xticks(xs, [f"{t}\n{rep[t]['support']}" for t in tags], fontsize=8)
ax.set(ylabel="accuracy on the tag's words", ylim=(0, 1.05), title="per-tag accuracy (test; tag and number of words)")
ax.legend(loc="lower left")
plt.show()

# %% [markdown]
# The run's folder was a temporary one (two checkpoints of 90 MB each): it goes now.

# %%
import shutil

shutil.rmtree(out_dir)
