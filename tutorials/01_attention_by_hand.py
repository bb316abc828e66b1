# %% [markdown]
# # Tutorial 1: attention by hand
#
# Self-attention is the one new idea in a Transformer. Every token asks a question (its *query*),
# every token offers an answer key (its *key*) and a content (its *value*); a token's new vector is
# the average of all values, weighted by how well its query matches each key:
#
#     Attention(Q, K, V) = softmax(Q K^T / sqrt(D)) V
#
# We compute it by hand on real token vectors from the MiniLM checkpoint, check it against
# PyTorch's `F.scaled_dot_product_attention`, and see what the padding mask is for.
# Run it as a script (`python tutorials/01_attention_by_hand.py`) or open it as a notebook.

# %%
import math

import torch
import torch.nn.functional as F

import minift

torch.manual_seed(0)
model = minift.BertModel.from_pretrained("minilm").eval()
tokenizer = minift.Tokenizer.from_pretrained("minilm")

# %% [markdown]
# ## Real token vectors
# The embedding layer turns ids into vectors x (T, H): word + position + segment, then LayerNorm.
# Layer 0's query, key and value projections then give Q, K, V. MiniLM has H = 384 split into
# nh = 12 heads of D = 32 dimensions; each head attends on its own.

# %%
batch = tokenizer(["The plot is thin but the acting is superb."])
ids = batch["input_ids"]
T = ids.shape[1]
with torch.no_grad():
    x = model.embeddings(ids, torch.zeros_like(ids))                     # (1, T, H)
    attn = model.encoder.layer[0].attention.self
    nh, D = model.config.num_attention_heads, model.config.head_dim
    q = attn.query(x).view(1, T, nh, D).transpose(1, 2)                 # (1, nh, T, D)
    k = attn.key(x).view(1, T, nh, D).transpose(1, 2)
    v = attn.value(x).view(1, T, nh, D).transpose(1, 2)
print("tokens:", tokenizer.tokenize("The plot is thin but the acting is superb."))
print("q, k, v:", tuple(q.shape))

# %% [markdown]
# ## Scores, probabilities, output
# S_ij = q_i . k_j / sqrt(D): how much token i attends to token j. Softmax over j makes each row a
# probability distribution. Dividing by sqrt(D) keeps the scores' spread independent of D (a dot
# product of D unit-variance terms has variance D), so the softmax does not saturate.

# %%
S = q @ k.transpose(-2, -1) / math.sqrt(D)                              # (1, nh, T, T)
P = torch.softmax(S, dim=-1)                                            # rows sum to 1
O = P @ v                                                               # (1, nh, T, D)

assert torch.allclose(P.sum(-1), torch.ones(1, nh, T), atol=1e-6), "each row is a distribution"
reference = F.scaled_dot_product_attention(q, k, v)
err = (O - reference).abs().max().item()
print(f"max |ours - F.scaled_dot_product_attention| = {err:.2e}")
assert err < 1e-5

# %% [markdown]
# Which tokens does [CLS] look at in head 0? The weights are real: a pretrained model's attention.

# %%
toks = ["[CLS]"] + tokenizer.tokenize("The plot is thin but the acting is superb.") + ["[SEP]"]
for t, w in sorted(zip(toks, P[0, 0, 0].tolist()), key=lambda tw: -tw[1])[:5]:
    print(f"  {t:>10s} {w:.3f}")

# %% [markdown]
# ## Every head at once
# Row i of each map is token i's distribution over the keys j (each row sums to 1). The twelve
# heads of layer 0 ask twelve different questions of the same sentence: some look at the next or
# previous token, some at [CLS] or [SEP], some at tokens like themselves.

# %%
import matplotlib.pyplot as plt

fig, axes = plt.subplots(3, 4, figsize=(13, 10.5), constrained_layout=True)
for h, ax in enumerate(axes.flat):
    ax.imshow(P[0, h].numpy(), cmap="viridis", vmin=0, vmax=1)            # (T, T)
    ax.set_title(f"head {h}")
    ax.set_xticks(range(T), toks, rotation=90, fontsize=7)
    ax.set_yticks(range(T), toks, fontsize=7)
fig.suptitle("Layer 0 of MiniLM: P = softmax(Q K^T / sqrt(D)) per head (rows: queries, columns: keys)")
plt.show()

# %% [markdown]
# ## The padding mask
# A batch pads short sentences to the longest with [PAD] tokens. Without a mask, real tokens
# would attend to the padding and their outputs would depend on how long the *other* sentences
# in the batch are. The key-padding mask sets S_ij = -inf for padded keys j, so exp gives 0 weight.

# %%
pair = tokenizer(["The plot is thin but the acting is superb.", "Superb."])
short_alone = tokenizer(["Superb."])
with torch.no_grad():
    out_batch = model(pair["input_ids"], pair["attention_mask"]).last_hidden_state
    out_alone = model(short_alone["input_ids"], short_alone["attention_mask"]).last_hidden_state
    out_nomask = model(pair["input_ids"]).last_hidden_state              # mask left out: wrong
n = short_alone["input_ids"].shape[1]
with_mask = (out_batch[1, :n] - out_alone[0]).abs().max().item()
without = (out_nomask[1, :n] - out_alone[0]).abs().max().item()
print(f"short sentence, padded in a batch vs alone: with mask {with_mask:.2e}, without mask {without:.2e}")
assert with_mask < 1e-4, "with the mask, padding changes nothing"
assert without > 1e-2, "without it, the padding leaks into real tokens"

# %% [markdown]
# ## The mask by hand
# The same thing in three lines: fill the masked scores with -inf before the softmax.

# %%
keep = torch.tensor([[True] * 3 + [False] * (T - 3)])                   # pretend only 3 real tokens
S_masked = S.masked_fill(~keep[:, None, None, :], float("-inf"))
P_masked = torch.softmax(S_masked, -1)
assert (P_masked[..., 3:] == 0).all(), "masked keys get exactly zero weight"
sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
assert (P_masked @ v - sdpa).abs().max() < 1e-5
print("masked attention by hand equals SDPA with a boolean mask")

# %% [markdown]
# ## Discussion
# - The T x T matrix P is the memory cost of attention: T = 512 and 12 heads is 3 million floats
#   per sentence. Tutorial 8 computes the same result without ever storing P.
# - A row whose keys are *all* masked has no distribution to take; minift returns 0 there
#   (softmax would give 0/0 = NaN). It happens for empty sequences in a batch.
