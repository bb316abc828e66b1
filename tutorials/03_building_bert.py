# %% [markdown]
# # Tutorial 3: building BERT, from embeddings to pooler
#
# `minift/model.py` is the whole encoder in one file. Here we run it one block at a time on a real
# sentence, with the real all-MiniLM-L6-v2 weights, and write each block again in a few lines of
# plain PyTorch to see that nothing is hidden. At the end, the whole model is checked against
# Hugging Face transformers.

# %%
import math

import torch
import torch.nn.functional as F

import minift

model = minift.BertModel.from_pretrained("minilm").eval()
tok = minift.Tokenizer.from_pretrained("minilm")
cfg = model.config
print(f"layers {cfg.num_hidden_layers}, hidden H={cfg.hidden_size}, heads {cfg.num_attention_heads} "
      f"(D={cfg.head_dim}), feed-forward {cfg.intermediate_size}, vocabulary {cfg.vocab_size}")
batch = tok(["A quiet, devastating triumph."], pairs=["Did the critic like it?"])
ids, types, mask = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
B, T = ids.shape

# %% [markdown]
# ## 1. Embeddings
# x_t = LayerNorm(word[id_t] + position[t] + segment[type_t]). Segment 0 is sentence A, 1 is B.

# %%
E = model.embeddings
x = E.word_embeddings.weight[ids] + E.position_embeddings.weight[:T] + E.token_type_embeddings.weight[types]
x = F.layer_norm(x, (cfg.hidden_size,), E.LayerNorm.weight, E.LayerNorm.bias, cfg.layer_norm_eps)
with torch.no_grad():
    assert torch.allclose(x, E(ids, types), atol=1e-6)
print("embeddings:", tuple(x.shape))

# %% [markdown]
# ## 2. One encoder layer
# Multi-head self-attention, then a residual connection and LayerNorm (post-LN, as in the original
# BERT), then a feed-forward network GELU(x W1) W2 with its own residual and LayerNorm.

# %%
def layer_by_hand(layer, x, keep):
    a = layer.attention.self
    nh, D = cfg.num_attention_heads, cfg.head_dim
    split = lambda t: t.view(B, T, nh, D).transpose(1, 2)                # (B, nh, T, D)
    q, k, v = split(a.query(x)), split(a.key(x)), split(a.value(x))
    s = (q @ k.transpose(-2, -1)) / math.sqrt(D)
    s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    y = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, T, nh * D)  # heads concatenated
    o = layer.attention.output
    x = F.layer_norm(x + o.dense(y), (cfg.hidden_size,), o.LayerNorm.weight, o.LayerNorm.bias, cfg.layer_norm_eps)
    h = F.gelu(layer.intermediate.dense(x))                               # exact erf GELU
    o = layer.output
    return F.layer_norm(x + o.dense(h), (cfg.hidden_size,), o.LayerNorm.weight, o.LayerNorm.bias, cfg.layer_norm_eps)


keep = mask.bool()
with torch.no_grad():
    h = x
    for layer in model.encoder.layer:
        mine = layer_by_hand(layer, h, keep)
        h = layer(h, keep)
        assert torch.allclose(mine, h, atol=1e-5)
print(f"{cfg.num_hidden_layers} layers by hand = minift's layers")

# %% [markdown]
# ## 3. The pooler
# Classification heads read one vector per sentence: tanh(dense(h_[CLS])).

# %%
with torch.no_grad():
    pooled = torch.tanh(model.pooler.dense(h[:, 0]))
    out = model(ids, mask, types)
assert torch.allclose(pooled, out.pooler_output, atol=1e-6)
assert torch.allclose(h, out.last_hidden_state, atol=1e-6)
print("pooler_output:", tuple(out.pooler_output.shape))

# %% [markdown]
# The pooler reads one row of the last layer, and in the last layer no row depends on another
# except through the keys and values, which come from the layer's input. So a classifier can
# ask the last layer for the [CLS] row alone: one query instead of T, one row through the output
# projection, the LayerNorms and the feed-forward. `BertForSequenceClassification` does this
# (`pooled_only=True`); the same numbers come out, for fewer multiply-adds (counted here by
# PyTorch's FlopCounterMode, matrix products only).

# %%
from torch.utils.flop_counter import FlopCounterMode


def matmul_flops(**kw):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        result = model(ids, mask, types, **kw)
    return result, sum(counter.get_flop_counts()["Global"].values())


full, flops_full = matmul_flops()
cls_only, flops_cls = matmul_flops(pooled_only=True)
assert cls_only.last_hidden_state.shape == (ids.shape[0], 1, cfg.hidden_size)
assert torch.allclose(cls_only.pooler_output, full.pooler_output, atol=1e-6)
print(f"pooler_output the same; {flops_full / 1e9:.2f} -> {flops_cls / 1e9:.2f} GFLOP "
      f"({100 * (1 - flops_cls / flops_full):.0f}% fewer) for this batch of T = {ids.shape[1]}")

# %% [markdown]
# ## 4. The same numbers as Hugging Face transformers
# The checkpoint's keys (`encoder.layer.0.attention.self.query.weight`, ...) are our attribute
# names, so loading is a dictionary copy with strict checks. The check: transformers' BertModel on
# the same directory gives the same hidden states to float32 rounding.

# %%
try:
    import transformers
except ImportError:
    transformers = None
    print("transformers is not installed (bash scripts/setup.sh --test installs it); skipping the comparison")
if transformers is not None:
    from minift.pretrained import resolve
    hf = transformers.BertModel.from_pretrained(str(resolve("minilm"))).eval()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    err_h = (theirs.last_hidden_state - out.last_hidden_state).abs().max().item()
    err_p = (theirs.pooler_output - out.pooler_output).abs().max().item()
    print(f"max difference to transformers: hidden states {err_h:.1e}, pooler {err_p:.1e}")
    assert err_h < 1e-5 and err_p < 1e-5

# %% [markdown]
# Layer by layer: the largest difference between minift's hidden states and transformers' after
# the embeddings and after each encoder layer (log scale; the dashed line is the test tolerance),
# and every one of the last layer's numbers, minift's against transformers'.

# %%
if transformers is not None:
    import matplotlib.pyplot as plt

    with torch.no_grad():
        theirs_all = hf(input_ids=ids, attention_mask=mask, token_type_ids=types,
                        output_hidden_states=True).hidden_states              # embeddings + each layer
        ours_all = [model.embeddings(ids, types)]
        for layer in model.encoder.layer:
            ours_all.append(layer(ours_all[-1], keep))
    diffs = [(a - b).abs().max().item() for a, b in zip(ours_all, theirs_all)]
    names = ["embeddings"] + [f"layer {i}" for i in range(cfg.num_hidden_layers)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), constrained_layout=True)
    axes[0].bar(names, diffs)
    axes[0].axhline(1e-5, color="k", linestyle="--", label="tolerance 1e-5")
    axes[0].set(yscale="log", ylabel="max |minift - transformers|", title="hidden states, layer by layer")
    axes[0].legend()
    axes[1].scatter(theirs.last_hidden_state.flatten(), out.last_hidden_state.flatten(), s=2)
    axes[1].set(xlabel="transformers", ylabel="minift",
                title=f"all {out.last_hidden_state.numel():,} numbers of the last hidden state")
    plt.show()
    assert len(diffs) == cfg.num_hidden_layers + 1 and max(diffs) < 1e-5

# %% [markdown]
# ## 5. Counting parameters
# Where do MiniLM's 22.7 million parameters live? Mostly in the word embeddings.

# %%
emb = sum(p.numel() for p in model.embeddings.parameters())
enc = sum(p.numel() for p in model.encoder.parameters())
total = sum(p.numel() for p in model.parameters())
per_layer = 4 * (384 * 384 + 384) + 2 * 384 * 1536 + 1536 + 384 + 2 * 2 * 384
assert enc == cfg.num_hidden_layers * per_layer
print(f"embeddings {emb:,} ({100 * emb / total:.0f}%), encoder {enc:,}, total {total:,}")
