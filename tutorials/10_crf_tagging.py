# %% [markdown]
# # Tutorial 10: tagging with a CRF
#
# A token classifier (Tutorial 7) picks each word's tag on its own. In named-entity tags that
# shows: it can output `O I-PER`, an inside-of-a-person tag with no beginning. A linear-chain
# conditional random field (CRF) scores whole tag sequences instead. With emission scores
# e_t(j) from BERT's classifier, transition scores A(i, j) for tag i followed by tag j, and start
# and end scores,
#
#     s(y) = start(y_0) + sum_t e_t(y_t) + sum_{t>=1} A(y_{t-1}, y_t) + end(y_{L-1})
#     P(y | x) = exp s(y) / Z,     Z = sum over all K^L tag sequences of exp s(y').
#
# One of the course documents builds "a CRF classifier as the output layer" and says training
# "minimises the F1 score". It does not: F1 is how the tagger is *evaluated*; it is a step
# function of the scores whose gradient is zero almost everywhere (checked below). A CRF is
# trained by its negative log-likelihood, -log P(y|x) = log Z - s(y_gold).
#
# This tutorial computes log Z by the forward algorithm, derives its gradient (it is the tag
# marginals), decodes with Viterbi, adds BIO constraints, and then runs the documents' NER
# dataset code on real sentences to count how many labels it puts on the wrong sub-word.
# `minift.crf` holds the same code, checked in tests/test_crf.py.

# %%
import itertools
import os

import torch
from torch.autograd import gradcheck

import minift
from minift import crf, data
from minift.ewt import ud_english_ewt
from minift.metrics import entity_f1

FAST = os.environ.get("MINIFT_TUTORIAL_FAST") == "1"
f64 = dict(dtype=torch.float64)
g = torch.Generator().manual_seed(0)


def valid(seq, names):
    """BIO: every I-X follows a B-X or an I-X."""
    return all(not names[j].startswith("I-") or (t > 0 and names[seq[t - 1]][2:] == names[j][2:])
               for t, j in enumerate(seq))

# %% [markdown]
# ## A tiny example, and log Z by enumeration
#
# Three words, three tags. The numbers are made up; think of them as what a classifier and a
# trained CRF might give.

# %%
tags = ["O", "B-PER", "I-PER"]
words = ["Ada", "Lovelace", "wrote"]
e = torch.tensor([[1.2, 1.0, 0.3],        # Ada:      emission scores for O, B-PER, I-PER
                  [0.2, 1.5, 1.8],        # Lovelace
                  [2.5, 0.1, 0.4]], **f64)  # wrote
A = torch.tensor([[0.5, 0.0, -2.0],        # from O     to O, B-PER, I-PER
                  [0.0, -1.0, 1.5],        # from B-PER
                  [0.3, 0.2, 0.5]], **f64)  # from I-PER
start = torch.tensor([0.2, 0.5, -1.0], **f64)
end = torch.tensor([0.1, -0.2, 0.0], **f64)
K, T = len(tags), len(words)


def score(y):
    return (start[y[0]] + end[y[-1]] + sum(e[t, j] for t, j in enumerate(y))
            + sum(A[y[t - 1], y[t]] for t in range(1, T)))


paths = {y: score(y) for y in itertools.product(range(K), repeat=T)}
log_z_brute = torch.logsumexp(torch.stack(list(paths.values())), 0)
print(f"{len(paths)} paths, log Z = {log_z_brute:.6f}")
assert len(paths) == K ** T

# %% [markdown]
# ## The forward algorithm
#
# Enumeration costs K^L. But every path to tag j at word t passes through some tag i at t-1, so
# the log-sum over prefixes ending in j obeys a recursion:
#
#     alpha_0(j) = start(j) + e_0(j)
#     alpha_t(j) = e_t(j) + logsumexp_i [alpha_{t-1}(i) + A(i, j)]
#     log Z      = logsumexp_j [alpha_{L-1}(j) + end(j)]
#
# L K^2 operations. Working with log-sums (logsumexp subtracts the maximum before exponentiating)
# keeps long sentences from overflowing.

# %%
alpha = [start + e[0]]                                                  # (K,)
for t in range(1, T):
    alpha.append(e[t] + torch.logsumexp(alpha[-1][:, None] + A, dim=0))   # sum over the previous tag i
log_z = torch.logsumexp(alpha[-1] + end, 0)
print("alpha table (rows: words, columns:", " ".join(tags) + ")")
for w, a in zip(words, alpha):
    print(f"  {w:>9s}  " + "  ".join(f"{v:7.3f}" for v in a.tolist()))
print(f"forward algorithm: log Z = {log_z:.6f}")
assert torch.allclose(log_z, log_z_brute, atol=1e-12)
assert torch.allclose(crf.log_partition(e[None], None, A, start, end)[0], log_z, atol=1e-12)

# %% [markdown]
# ## The gradient is the marginals
#
# d log Z / d theta = sum_y (exp s(y) / Z) d s(y) / d theta = E_y[d s(y) / d theta]. A score
# s(y) is a sum of table entries, so d s(y) / d entry is how often y uses the entry, and
#
#     d log Z / d e_t(j)  = P(y_t = j)                                 (the tag marginals)
#     d log Z / d A(i, j) = sum_t P(y_{t-1} = i, y_t = j)              (expected transition counts)
#     d log Z / d start(j) = P(y_0 = j),   d log Z / d end(j) = P(y_{L-1} = j).
#
# With the backward recursion beta_{L-1}(i) = end(i), beta_t(i) = logsumexp_j [A(i,j) +
# e_{t+1}(j) + beta_{t+1}(j)], P(y_t = j) = exp(alpha_t(j) + beta_t(j) - log Z): one
# forward-backward pass gives them all. And the loss gradient is *expected minus observed*:
# d NLL / d e_t(j) = P(y_t = j) - [y_t = j].

# %%
P_tag = torch.zeros(T, K, **f64)
count_A = torch.zeros(K, K, **f64)
for y, s in paths.items():
    p = torch.exp(s - log_z_brute)
    for t, j in enumerate(y):
        P_tag[t, j] += p
        if t:
            count_A[y[t - 1], j] += p
eg, Ag = e.clone().requires_grad_(), A.clone().requires_grad_()
crf.log_partition_autograd(eg[None], None, Ag, start, end).sum().backward()
assert torch.allclose(eg.grad, P_tag, atol=1e-12) and torch.allclose(Ag.grad, count_A, atol=1e-12)
print("P(y_t = j), by enumeration, = d log Z / d e_t(j) by autograd:")
for w, row in zip(words, P_tag.tolist()):
    print(f"  {w:>9s}  " + "  ".join(f"{v:.3f}" for v in row))

gold = torch.tensor([[1, 2, 0]])                                         # B-PER I-PER O
eg = e.clone().requires_grad_()
layer = crf.LinearChainCRF(K).double()
with torch.no_grad():
    layer.transitions.copy_(A), layer.start_transitions.copy_(start), layer.end_transitions.copy_(end)
layer.nll(eg[None], gold).backward()
observed = torch.nn.functional.one_hot(gold[0], K).double()
assert torch.allclose(eg.grad, P_tag - observed, atol=1e-12)
print("d NLL / d e = marginals - one-hot(gold): checked")

# %% [markdown]
# `minift.crf.LogPartition` is a `torch.autograd.Function` whose backward runs the backward
# recursion and returns exactly those marginals (scaled by each sentence's upstream gradient).
# gradcheck compares it with finite differences in float64, on a batch of sentences of
# different lengths (one of them empty), and it equals autograd through the recursion.

# %%
B, T2, K2 = 4, 7, 5
E2 = torch.randn(B, T2, K2, generator=g, **f64)
mask = torch.arange(T2)[None] < torch.tensor([7, 4, 1, 0])[:, None]     # lengths 7, 4, 1, 0
params = [torch.randn(*s, generator=g, **f64).requires_grad_() for s in [(K2, K2), (K2,), (K2,)]]
E2.requires_grad_()
assert gradcheck(lambda E, A_, s_, e_: crf.log_partition(E, mask, A_, s_, e_), (E2, *params), eps=1e-6, atol=1e-8)
hand = torch.autograd.grad(crf.log_partition(E2, mask, *params).sum(), [E2, *params])
auto = torch.autograd.grad(crf.log_partition_autograd(E2, mask, *params).sum(), [E2, *params])
assert all(torch.allclose(h, a, atol=1e-12) for h, a in zip(hand, auto))
print("hand-derived marginals: gradcheck passed, equal to autograd through the recursion")

# %% [markdown]
# Why not "minimise F1", as the document says? Nudge the scores a little: the decoded tags, and
# so the F1, do not move (zero gradient), while the NLL does.

# %%
def f1_of(em):
    pred = layer.decode(em[None])[0]
    return entity_f1([[tags[j] for j in pred]], [[tags[j] for j in gold[0].tolist()]])["f1"]


bump = 1e-3 * torch.randn(T, K, generator=g, **f64)
print(f"entity F1 {f1_of(e):.3f} -> {f1_of(e + bump):.3f} after a small nudge; "
      f"NLL {layer.nll(e[None], gold).item():.6f} -> {layer.nll((e + bump)[None], gold).item():.6f}")
assert f1_of(e) == f1_of(e + bump)
assert layer.nll(e[None], gold).item() != layer.nll((e + bump)[None], gold).item()

# %% [markdown]
# ## Viterbi: the best path
#
# Replace logsumexp by max and remember which i won (back-pointers):
# delta_t(j) = e_t(j) + max_i [delta_{t-1}(i) + A(i, j)]. The best last tag is
# argmax_j delta_{L-1}(j) + end(j); the back-pointers give the rest.

# %%
delta, back = start + e[0], []
for t in range(1, T):
    best, arg = (delta[:, None] + A).max(dim=0)
    delta, back = e[t] + best, back + [arg]
y = [int((delta + end).argmax())]
for arg in reversed(back):
    y.insert(0, int(arg[y[0]]))
brute_best = max(paths, key=lambda p: paths[p].item())
greedy = e.argmax(1).tolist()
print("Viterbi:", [tags[j] for j in y], " per-word argmax:", [tags[j] for j in greedy])
assert tuple(y) == brute_best and y == layer.decode(e[None])[0]
assert not valid(greedy, tags) and valid(y, tags)

# %% [markdown]
# Word by word, "Ada" looks slightly more like O than like B-PER, and "Lovelace" like I-PER:
# the per-word argmax returns an I-PER with no beginning. The CRF scores the whole sequence:
# A(O, I-PER) = -2 and A(B-PER, I-PER) = +1.5 outweigh the 0.2 that "Ada" gains as O.

# %% [markdown]
# ## BIO constraints
#
# Tags O, B-X, I-X: an I-X may only follow B-X or I-X, and cannot start a sentence. Setting the
# forbidden transitions and starts to -inf removes every path through them from Z, and Viterbi
# can never return one. Below: 2,000 random "sentences" with random scores, decoded three ways.

# %%
bio = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]

free = crf.LinearChainCRF(5).double()
constrained = crf.LinearChainCRF(5, constraints="BIO", tags=bio).double()
with torch.no_grad():
    for m in (free, constrained):
        m.transitions.copy_(params[0]), m.start_transitions.copy_(params[1]), m.end_transitions.copy_(params[2])
E3 = torch.randn(2000, 6, 5, generator=g, **f64) * 2
counts = {"per-word argmax": sum(not valid(s, bio) for s in E3.argmax(-1).tolist()),
          "Viterbi, no constraints": sum(not valid(s, bio) for s in free.decode(E3)),
          "Viterbi, BIO constraints": sum(not valid(s, bio) for s in constrained.decode(E3))}
for name, n in counts.items():
    print(f"  {name:26s} {n:5d} invalid sequences of 2000")
assert counts["per-word argmax"] > 0 and counts["Viterbi, no constraints"] > 0
assert counts["Viterbi, BIO constraints"] == 0
# ... and among the valid paths it is still the best one (enumeration over 5^6 paths)
allowed = [p for p in itertools.product(range(5), repeat=6) if valid(p, bio)]
A3, s3, e3 = (t.detach() for t in params)
for b in range(3):
    sc = {p: (s3[p[0]] + e3[p[-1]] + sum(E3[b, t, j] for t, j in enumerate(p))
              + sum(A3[p[t - 1], p[t]] for t in range(1, 6))).item() for p in allowed}
    assert tuple(constrained.decode(E3[b:b + 1])[0]) == max(sc, key=sc.get)
print("constrained Viterbi = the best valid path (checked by enumeration)")

# %% [markdown]
# ## Labels on sub-words: the documents' NER dataset, run on real sentences
#
# The CRF's transitions link word t-1 to word t, so it must see one position per word: the
# first sub-word (labels != -100), gathered into a compact sequence (`crf.compact`). That
# needs the labels on the right sub-words in the first place. The course's NER example builds
# its dataset like this (transcribed; the document uses `bert-base-cased` and CoNLL-2003):

# %%
tokenizer = minift.Tokenizer.from_pretrained("minilm")
MAX_LEN = 64


def documents_ner_item(words, word_tags, tag2id):
    """The documents' Dataset.__getitem__, in substance (their bug kept)."""
    enc = tokenizer([words], is_split_into_words=True, max_length=MAX_LEN)
    input_ids = enc["input_ids"][0].tolist()
    input_ids += [tokenizer.pad_token_id] * (MAX_LEN - len(input_ids))   # padding='max_length'
    labels = [tag2id[t] for t in word_tags][:MAX_LEN]                    # word tags, one per position
    labels += [tag2id["O"]] * (MAX_LEN - len(labels))                    # padded with 'O', scored
    return input_ids, labels


# %% [markdown]
# Label i goes to token position i. But position 0 is [CLS], and a word that WordPiece splits
# takes several positions, so word i's first sub-word sits at position 1 + i + (pieces added by
# the earlier words). Run it on real sentences and count. The sentences are UD English-EWT's;
# for BIO tags we mark each run of proper nouns (UPOS PROPN) as a NAME entity, a crude stand-in
# for named entities ("New/B-NAME York/I-NAME"), good enough to count misplaced labels.

# %%
def propn_bio(upos):
    return ["O" if u != "PROPN" else ("I-NAME" if i and upos[i - 1] == "PROPN" else "B-NAME")
            for i, u in enumerate(upos)]


ewt = ud_english_ewt()
sents = [data.Example(ex.text, propn_bio(ex.label)) for ex in ewt.dev[:200 if FAST else 2000]]
names = ["O", "B-NAME", "I-NAME"]
tag2id = {t: i for i, t in enumerate(names)}
n_words = wrong_pos = wrong_tag = wrong_after_cls_fix = scored_o_filler = 0
for ex in sents:
    ids, labels = documents_ner_item(ex.text, ex.label, tag2id)
    word_ids = tokenizer([ex.text], is_split_into_words=True, max_length=MAX_LEN)["word_ids"][0]
    first = {}                                       # word -> position of its first sub-word
    for pos, w in enumerate(word_ids):
        if w is not None and w not in first:
            first[w] = pos
    for i in first:                                  # words that survived truncation
        n_words += 1
        wrong_pos += first[i] != i                    # where the documents put word i's tag
        wrong_after_cls_fix += first[i] != i + 1      # ... had they shifted by one for [CLS]
        wrong_tag += labels[first[i]] != tag2id[ex.label[i]]   # the tag the right position gets
    scored_o_filler += MAX_LEN - len(ex.text)         # 'O' labels on [SEP], sub-words and padding
print(f"{len(sents)} real sentences, {n_words} words (real tokenizer, real word splits):")
print(f"  word tags placed on a position other than the word's first sub-word: {wrong_pos} "
      f"({100 * wrong_pos / n_words:.1f}%)")
print(f"  still misplaced after a +1 shift for [CLS]: {wrong_after_cls_fix} "
      f"({100 * wrong_after_cls_fix / n_words:.1f}%)")
print(f"  first sub-words that end up with a tag other than their word's: {wrong_tag} "
      f"({100 * wrong_tag / n_words:.1f}%)")
print(f"  filler 'O' labels scored as if they were words: {scored_o_filler}")
assert wrong_pos == n_words                 # every single tag is off by at least the [CLS] position
assert 0 < wrong_after_cls_fix < n_words    # fixing [CLS] alone leaves the split-word shift
assert wrong_tag > 0

# %% [markdown]
# minift's alignment (`data.encode_tokens`, Tutorial 7) reads the tokenizer's `word_ids`: the
# first sub-word of each word gets its tag, every other position gets -100 (ignored by the
# loss and gathered out for the CRF).

# %%
enc = data.encode_tokens(tokenizer, sents, names, MAX_LEN)
n_ok = n_total = 0
for ex, labels in zip(sents, enc.labels):
    scored = [lab for lab in labels if lab != -100]
    n_total += len(scored)
    n_ok += sum(lab == tag2id[t] for lab, t in zip(scored, ex.label))
print(f"minift: {n_ok} of {n_total} words carry their own tag on their first sub-word; "
      f"{sum(lab == -100 for labels in enc.labels for lab in labels)} positions ignored")
assert n_ok == n_total == n_words

# %% [markdown]
# Side by side on one sentence with split words:

# %%
ex = next(s for s in sents if "B-NAME" in s.label and len(s.text) < 12
          and len(tokenizer.tokenize(" ".join(s.text))) > len(s.text) + 1)
ids, doc_labels = documents_ner_item(ex.text, ex.label, tag2id)
ours = data.encode_tokens(tokenizer, [ex], names, MAX_LEN).labels[0]
pieces = tokenizer.backend.encode(ex.text, is_pretokenized=True).tokens
print(f"  {'token':>14s}  {'documents':>9s}  {'minift':>6s}")
for pos, piece in enumerate(pieces):
    print(f"  {piece:>14s}  {names[doc_labels[pos]]:>9s}  {names[ours[pos]] if ours[pos] != -100 else '-':>6s}")

# %% [markdown]
# ## BERT + CRF
#
# `crf.BertCRFForTokenClassification` is `BertForTokenClassification` (its linear layer gives
# the emissions) with a `LinearChainCRF` on top: the loss is the CRF's NLL over the first
# sub-words, `decode` runs Viterbi per sentence, and `save_pretrained` stores the CRF as
# `crf.*` tensors that transformers' BertForTokenClassification ignores.
#
# A short run on part-of-speech tags with the encoder frozen, so that its vectors can be
# computed once and only the linear layer and the CRF train (seconds on a CPU). The model's
# loss is exactly the CRF's NLL of the classifier's scores at the first sub-words; the learned
# transitions should know that a determiner is followed by a noun far more often than by a verb.

# %%
N_TRAIN, N_DEV, EPOCHS = (200, 80, 6) if FAST else (2000, 500, 6)
torch.manual_seed(0)
model = crf.BertCRFForTokenClassification.from_pretrained("minilm", id2label=dict(enumerate(ewt.labels)))
print(model.load_report.summary())
model.eval()                                         # no dropout: the frozen vectors are reusable
train = data.encode_tokens(tokenizer, ewt.train[:N_TRAIN], ewt.labels, MAX_LEN)
batches = []
with torch.no_grad():
    for i in range(0, N_TRAIN, 32):
        b = data.collate(train, list(range(i, min(i + 32, N_TRAIN))))
        h = model.bert(b["input_ids"], b["attention_mask"]).last_hidden_state          # (B, T, H)
        batches.append((b, h))

b, h = batches[0]
emissions, mask, index = crf.compact(model.classifier(h), b["labels"] != -100)         # (B, W, C)
with torch.no_grad():
    direct = model.crf.nll(emissions, b["labels"].gather(1, index), mask)
    assert torch.allclose(model(b["input_ids"], b["attention_mask"], labels=b["labels"]).loss, direct, atol=1e-5)

head = list(model.classifier.parameters()) + list(model.crf.parameters())
opt = torch.optim.Adam(head, lr=1e-2)
losses = []
for epoch in range(EPOCHS):
    for b, h in batches:
        emissions, mask, index = crf.compact(model.classifier(h), b["labels"] != -100)
        loss = model.crf.nll(emissions, b["labels"].gather(1, index), mask)          # mean over sentences
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
print(f"NLL per sentence: first batch {losses[0]:.1f}, last epoch's mean "
      f"{sum(losses[-len(batches):]) / len(batches):.1f}")
assert sum(losses[-len(batches):]) / len(batches) < 0.5 * losses[0]
At = model.crf.transitions.detach()
det, noun, verb = (ewt.labels.index(t) for t in ("DET", "NOUN", "VERB"))
print(f"learned A(DET, NOUN) = {At[det, noun]:.2f}, A(DET, VERB) = {At[det, verb]:.2f}")
assert At[det, noun] > At[det, verb]

dev = data.encode_tokens(tokenizer, ewt.dev[:N_DEV], ewt.labels, MAX_LEN)
b = data.collate(dev, list(range(N_DEV)))
pred = model.decode(b["input_ids"], b["attention_mask"], scored=b["labels"] != -100)
gold_ids = [[lab for lab in row if lab != -100] for row in b["labels"].tolist()]
assert [len(p) for p in pred] == [len(gs) for gs in gold_ids]
n = sum(map(len, gold_ids))
acc = sum(p == q for ps, gs in zip(pred, gold_ids) for p, q in zip(ps, gs)) / n
counts = {}
for row in gold_ids:
    for t in row:
        counts[t] = counts.get(t, 0) + 1
print(f"dev word accuracy, {N_TRAIN} sentences x {EPOCHS} epochs, encoder frozen: {acc:.3f} "
      f"(always the most frequent tag: {max(counts.values()) / n:.3f})")
assert acc > max(counts.values()) / n

# %% [markdown]
# This short run does not say whether the CRF tags better than the softmax head: that needs
# the encoder fine-tuned, the same budget for both, and several seeds. What it shows is the
# mechanics: the loss is the NLL (not F1), the gradient is marginals minus counts, and Viterbi
# reads out one tag per word, never an invalid BIO sequence when the constraints are on.
