"""The BERT encoder and its task heads, in one file, top to bottom.

Class and attribute names follow Hugging Face's ``modeling_bert.py`` so that a checkpoint loads by
key and the two files can be read side by side. Every op goes through ``ops = get_ops(impl)``: the
same model runs on plain PyTorch ("torch"), on our hand-derived backward passes ("reference") or on
the compiled kernels ("fused"); ``model.config.impl`` chooses, and ``set_impl`` changes it.

Shape legend: B batch, T tokens, H hidden size, nh heads, D head dim (H = nh * D),
I intermediate (feed-forward) size, V vocabulary, C classes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .backends import get_ops
from .config import IGNORE_INDEX, IMPLS, BertConfig
from .functional import check_class_weight, key_padding_keep


@dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor        # (B, T, H)
    pooler_output: torch.Tensor | None     # (B, H); None for heads built without a pooler


@dataclass
class HeadOutput:
    loss: torch.Tensor | None = None       # scalar, when labels were given
    logits: torch.Tensor | None = None     # (B, C) or (B, T, C) or (B, T, V)
    start_logits: torch.Tensor | None = None  # (B, T), question answering only
    end_logits: torch.Tensor | None = None    # (B, T), question answering only


@dataclass
class Packing:
    """Where a padded batch's real tokens go when the encoder runs on them alone (see pack_batch).

    index (N,): the kept positions of the flattened (B*T) batch, in order, so batch row b's tokens
    are rows cu[b] .. cu[b+1]-1 of the packed (N, H) activations; T: the padded length;
    first (B,): the packed row of each sequence's first token ([CLS])."""
    index: torch.Tensor
    cu: torch.Tensor
    T: int
    first: torch.Tensor

    @property
    def B(self) -> int:
        return self.first.shape[0]


def pack_batch(attention_mask) -> Packing:
    """The Packing of a (B, T) 0/1 mask. Any mask packs (holes included): each query then attends
    to its own row's kept tokens, which is what the key-padding mask asks of the padded batch."""
    keep = attention_mask.reshape(-1) != 0
    index = keep.nonzero().squeeze(1)                                             # (N,)
    lengths = (attention_mask != 0).sum(1)                                        # (B,)
    cu = torch.zeros(lengths.shape[0] + 1, dtype=torch.long, device=attention_mask.device)
    torch.cumsum(lengths, 0, out=cu[1:])
    return Packing(index=index, cu=cu, T=attention_mask.shape[1], first=cu[:-1])


def _packing_for(config: BertConfig, attention_mask, probe: torch.Tensor) -> Packing | None:
    """Pack when it pays and is the same function: impl="fused" with the compiled packed attention
    for activations like ``probe`` (the CPU kernel), config.pack_padding, some position padded, and
    every row's first token kept (the pooler and the [CLS]-row last layer read it)."""
    if attention_mask is None or config.impl != "fused" or not config.pack_padding:
        return None
    ops = get_ops(config.impl)
    if getattr(ops, "packed_attention", None) is None or not ops.packed_attention_runs(probe):
        return None
    keep = attention_mask != 0
    if bool(keep.all()) or not bool(keep[:, 0].all()):
        return None
    return pack_batch(attention_mask)


def check_inputs(config: BertConfig, input_ids, attention_mask, token_type_ids):
    """Clear errors for the mistakes that otherwise surface as an index error deep inside."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids: expected a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids: expected an integer tensor (torch.long), got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected shape (batch, tokens), got {tuple(input_ids.shape)}")
    T = input_ids.shape[1]
    if T > config.max_position_embeddings:
        raise ValueError(f"input_ids: sequence length {T} exceeds max_position_embeddings "
                         f"({config.max_position_embeddings}); truncate the input (tokenizer max_length)")
    if input_ids.numel():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= config.vocab_size:
            raise ValueError(f"input_ids: token ids must lie in [0, {config.vocab_size}), "
                             f"got values in [{lo}, {hi}]")
    for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if t is not None and tuple(t.shape) != tuple(input_ids.shape):
            raise ValueError(f"{name}: expected shape {tuple(input_ids.shape)} like input_ids, "
                             f"got {tuple(t.shape)}")
    if token_type_ids is not None and token_type_ids.numel():
        hi = int(token_type_ids.max())
        if int(token_type_ids.min()) < 0 or hi >= config.type_vocab_size:
            raise ValueError(f"token_type_ids: expected values in [0, {config.type_vocab_size}), got max {hi}")


def dense(ops, layer: nn.Linear, x):
    """layer(x) through the chosen ops, plus the low-rank update B A x when the layer carries a
    LoRA adapter (see minift.peft): y = x W^T + b + s (x A^T) B^T."""
    y = ops.linear(x, layer.weight, layer.bias)
    if getattr(layer, "lora_A", None) is not None:
        y = y + ops.linear(ops.linear(x, layer.lora_A, None), layer.lora_B, None) * layer.lora_scale
    return y


# ------------------------------------------------------------------------------------------
# The encoder
# ------------------------------------------------------------------------------------------

class BertEmbeddings(nn.Module):
    """x_t = LayerNorm(word[id_t] + position[t] + token_type[type_t]), then dropout."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids, token_type_ids, packing: Packing | None = None):
        """(B, T) ids give (B, T, H); with a packing, the kept tokens' (N, H), in packed order."""
        ops = get_ops(self.config.impl)
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device)                          # (T,)
        if packing is not None:
            input_ids = input_ids.reshape(-1)[packing.index]                          # (N,)
            token_type_ids = token_type_ids.reshape(-1)[packing.index]                # (N,)
            positions = packing.index % T                                             # (N,) each token's own position
        x = ops.embedding(input_ids, self.word_embeddings.weight)                    # (B, T, H)
        x = x + ops.embedding(positions, self.position_embeddings.weight)            # (B, T, H)
        x = x + ops.embedding(token_type_ids, self.token_type_embeddings.weight)     # (B, T, H)
        x = ops.layer_norm(x, self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps)
        return ops.dropout(x, self.config.hidden_dropout_prob, self.training)         # (B, T, H)


class BertSelfAttention(nn.Module):
    """softmax(Q K^T / sqrt(D) + mask) V for each of the nh heads."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x, key_padding_mask, xq=None, packing: Packing | None = None):
        """x (B, T, H) gives the keys and values; the queries come from xq (B, Tq, H), x itself
        by default (Tq = T). The last layer under a pooler passes xq = x[:, :1] (see BertEncoder).
        Packed (see BertModel.forward): x is (N, H), the real tokens of every row one after another,
        and xq (N, H) or the rows' first tokens (B, H)."""
        ops = get_ops(self.config.impl)
        if packing is not None:
            return self._packed(ops, x, x if xq is None else xq, packing)
        xq = x if xq is None else xq
        B, T, H = x.shape
        Tq = xq.shape[1]
        nh, D = self.config.num_attention_heads, self.config.head_dim
        q = dense(ops, self.query, xq).view(B, Tq, nh, D).transpose(1, 2)  # (B, nh, Tq, D)
        k = dense(ops, self.key, x).view(B, T, nh, D).transpose(1, 2)      # (B, nh, T, D)
        v = dense(ops, self.value, x).view(B, T, nh, D).transpose(1, 2)  # (B, nh, T, D)
        p_drop = self.config.attention_probs_dropout_prob if self.training else 0.0
        y = ops.attention(q, k, v, key_padding_mask, p_drop, 1.0 / math.sqrt(D))                # (B, nh, Tq, D)
        return y.transpose(1, 2).reshape(B, Tq, H)                                             # (B, Tq, H)

    def _packed(self, ops, x, xq, packing: Packing):
        nh, D = self.config.num_attention_heads, self.config.head_dim
        N, H = x.shape
        Nq = xq.shape[0]
        q = dense(ops, self.query, xq).view(Nq, nh, D)                                # (Nq, nh, D)
        k = dense(ops, self.key, x).view(N, nh, D)                                   # (N, nh, D)
        v = dense(ops, self.value, x).view(N, nh, D)                                 # (N, nh, D)
        if xq is x:                                   # every token queries its own row's tokens
            cu_q, Tq = packing.cu, packing.T
        else:                                         # one query per row: its first token
            cu_q, Tq = torch.arange(packing.B + 1, device=x.device), 1
        p_drop = self.config.attention_probs_dropout_prob if self.training else 0.0
        y = ops.packed_attention(q, k, v, cu_q, packing.cu, Tq, packing.T, p_drop, 1.0 / math.sqrt(D))
        return y.reshape(Nq, H)                                                       # (Nq, H)


class BertSelfOutput(nn.Module):
    """LayerNorm(x + dropout(dense(attention output))): the post-LN residual."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, y, x):
        ops = get_ops(self.config.impl)
        y = dense(ops, self.dense, y)                                                # (B, T, H)
        return ops.add_layer_norm(y, x, self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps,
                                  self.config.hidden_dropout_prob, self.training)    # (B, T, H)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x, key_padding_mask, xq=None, packing: Packing | None = None):
        xq = x if xq is None else xq
        return self.output(self.self(x, key_padding_mask, xq, packing), xq)          # (B, Tq, H); packed (Nq, H)


class BertIntermediate(nn.Module):
    """GELU(dense(x)), the first half of the feed-forward block."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x):
        ops = get_ops(self.config.impl)
        # one op, so "fused" can add the bias inside the GELU kernel (no LoRA adapter sits on this layer)
        return ops.linear_gelu(x, self.dense.weight, self.dense.bias)                 # (B, T, I)


class BertOutput(nn.Module):
    """LayerNorm(x + dropout(dense(h))), the second half of the feed-forward block."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h, x):
        ops = get_ops(self.config.impl)
        y = dense(ops, self.dense, h)                                                # (B, T, H)
        return ops.add_layer_norm(y, x, self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps,
                                  self.config.hidden_dropout_prob, self.training)    # (B, T, H)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x, key_padding_mask, xq=None, packing: Packing | None = None):
        """Every row of x attends to all of x; with xq, only xq's rows are computed (B, Tq, H)."""
        x = self.attention(x, key_padding_mask, xq, packing)                         # (B, Tq, H); packed (Nq, H)
        return self.output(self.intermediate(x), x)                                  # (B, Tq, H)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x, key_padding_mask, first_row_only: bool = False, packing: Packing | None = None):
        """first_row_only: the last layer computes row 0 ([CLS]) alone, and (B, 1, H) comes back
        ((B, H) packed: the rows' first tokens). Packed, x is (N, H) and so is every layer's output.

        A pooler reads only h[:, 0], and in the last layer nothing else depends on the other rows:
        their keys and values come from the layer's input, which every row still gives. So the last
        layer needs one query, one row of output projection, LayerNorms and feed-forward: in a
        model of L layers that is 10/12 of one layer's matrix work per token left out (Q, the output
        projection and the 4x-wide feed-forward are 10 of the 12 H x H products per token), 14% of
        MiniLM's 6 layers. The result is the same function: only the rounding of those rows' sums
        may differ."""
        last = len(self.layer) - 1
        for i, layer in enumerate(self.layer):
            # a copy (B x H numbers): on the strided view x[:, :1] the matrix-product kernels pick
            # another summation order, which rounds differently from the same layer run on T rows
            xq = None
            if first_row_only and i == last:
                xq = x.index_select(0, packing.first) if packing is not None else x[:, :1].contiguous()
            x = layer(x, key_padding_mask, xq, packing)                              # (B, T, H); (B, 1, H) last
        return x                                                                      # packed: (N, H); (B, H) last


class BertPooler(nn.Module):
    """tanh(dense(h_[CLS])): the sentence vector that classification heads read."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, h):
        ops = get_ops(self.config.impl)
        return ops.tanh(dense(ops, self.dense, h[:, 0]))      # (B, H)


class BertPreTrainedModel(nn.Module):
    """Weight init, impl switching and the Hugging Face load/save shared by every model below."""

    base_model_prefix = "bert"

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config

    def init_weights(self):
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
                if m.padding_idx is not None:
                    with torch.no_grad():
                        m.weight[m.padding_idx].zero_()
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        return self

    def set_impl(self, impl: str):
        """Run every op of the model on "torch", "reference" or "fused"."""
        if impl not in IMPLS:
            raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
        self.config.impl = impl
        return self

    @classmethod
    def from_pretrained(cls, name_or_path, impl: str = "torch", **config_overrides):
        """Load a Hugging Face-format directory (or the alias "minilm"); see minift.pretrained."""
        from .pretrained import load_pretrained
        return load_pretrained(cls, name_or_path, impl=impl, **config_overrides)

    def save_pretrained(self, directory):
        """Write config.json + model.safetensors that minift and transformers both load."""
        from .pretrained import save_pretrained
        save_pretrained(self, directory)


class BertModel(BertPreTrainedModel):
    """The encoder: embeddings, nh-head self-attention layers, and (optionally) the pooler."""

    base_model_prefix = ""

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None,
                pooled_only: bool = False, pack: bool = True) -> EncoderOutput:
        """pooled_only: compute what the pooler reads and no more (the last layer's [CLS] row; see
        BertEncoder.forward); last_hidden_state is then (B, 1, H), the [CLS] vectors only.

        Padding costs as much as text: a batch padded from 27 to 128 tokens spends 79% of its
        projections, layer norms and feed-forward on pad positions whose outputs nothing reads. So
        under impl="fused" on the CPU a padded batch runs packed (pack_batch): the real tokens of
        all rows one after another, (N, H), with attention per row (minift.ops.packed_attention).
        The real tokens' outputs are the same function as padded; last_hidden_state has 0 at the
        padded positions (transformers computes them from the pad token). The heads that read only
        real positions (the pooler, token tags with -100 at the pad, masked tokens) let it pack;
        pack=False computes every position, as BertForQuestionAnswering needs (its loss is a
        softmax over all T positions, padded ones included, as in transformers), and so does
        config.pack_padding = False for every call."""
        check_inputs(self.config, input_ids, attention_mask, token_type_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        key_padding_mask = key_padding_keep(attention_mask, "attention_mask")       # (B, T), True = keep
        packing = _packing_for(self.config, attention_mask, self.embeddings.word_embeddings.weight) if pack else None
        x = self.embeddings(input_ids, token_type_ids, packing)                      # (B, T, H); packed (N, H)
        h = self.encoder(x, key_padding_mask, first_row_only=pooled_only, packing=packing)  # (B, T, H) or (B, 1, H)
        if packing is not None:                       # back to the batch's shape, 0 at padded positions
            B, T = input_ids.shape
            if pooled_only:
                h = h.unsqueeze(1)                                                    # (B, 1, H)
            else:
                h = h.new_zeros(B * T, h.shape[-1]).index_copy(0, packing.index, h).view(B, T, -1)
        pooled = self.pooler(h) if self.pooler is not None else None                  # (B, H)
        return EncoderOutput(last_hidden_state=h, pooler_output=pooled)


# ------------------------------------------------------------------------------------------
# Task heads
# ------------------------------------------------------------------------------------------

def _classifier_dropout(config: BertConfig) -> float:
    return config.hidden_dropout_prob if config.classifier_dropout is None else config.classifier_dropout


class BertForSequenceClassification(BertPreTrainedModel):
    """A linear layer on the pooled [CLS] vector.

    The loss follows ``config.problem_type``: softmax cross-entropy for single-label
    classification (integer labels), binary cross-entropy with logits for multi-label (float
    0/1 labels of shape (B, C)), mean squared error for regression (num_labels == 1). When it is
    None it is inferred from the labels as Hugging Face does.
    """

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def problem_type(self, labels) -> str:
        if self.config.problem_type is not None:
            return self.config.problem_type
        if self.num_labels == 1:
            return "regression"
        if labels.dtype in (torch.long, torch.int32, torch.int16, torch.int8, torch.uint8):
            return "single_label_classification"
        return "multi_label_classification"

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                reduction: str = "mean", weight=None) -> HeadOutput:
        ops = get_ops(self.config.impl)
        # only the pooled [CLS] vector is read: the last layer computes that row alone
        pooled = self.bert(input_ids, attention_mask, token_type_ids, pooled_only=True).pooler_output  # (B, H)
        pooled = ops.dropout(pooled, _classifier_dropout(self.config), self.training)
        logits = dense(ops, self.classifier, pooled)      # (B, C)
        loss = None if labels is None else self.loss(logits, labels, reduction, weight=weight)
        return HeadOutput(loss=loss, logits=logits)

    def loss(self, logits, labels, reduction: str = "mean", weight=None):
        """The loss of ``problem_type``, in at least float32. "mean": Hugging Face's (the mean over examples of
        each example's loss); "sum": the sum over the batch's examples of the same per-example loss,
        so that micro-batches and processes add up to one big batch exactly.

        weight: optional class weights (C,) for single-label classification, F.cross_entropy's
        ``weight=``: example n's loss is scaled by w_{y_n}, and "mean" divides by sum_n w_{y_n}
        ("sum" divides by nothing). Moved to the logits' device and dtype here (see _class_weight)."""
        _check_reduction(reduction)
        ops = get_ops(self.config.impl)
        logits = _at_least_fp32(logits)                   # (B, C)
        B = logits.shape[0]
        kind = self.problem_type(labels)
        if weight is not None and kind != "single_label_classification":
            raise ValueError(f"weight: class weights apply to single-label classification, not to {kind}")
        if kind == "single_label_classification":
            return ops.cross_entropy(logits, labels.view(-1).long(), reduction=reduction,
                                     weight=_class_weight(weight, logits))
        if kind == "regression":                         # per example: the mean of (z - y)^2 over outputs
            loss = ops.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(logits.squeeze(-1).shape))
        elif kind == "multi_label_classification":       # per example: the mean over its C labels
            if tuple(labels.shape) != tuple(logits.shape):
                raise ValueError(f"multi-label labels: expected shape {tuple(logits.shape)}, "
                                 f"got {tuple(labels.shape)}")
            loss = ops.bce_with_logits(logits, labels.to(logits.dtype))
        else:
            raise ValueError(f"problem_type: unknown {kind!r}")
        return loss * B if reduction == "sum" else loss  # these ops average; the sum is B means


def _at_least_fp32(logits):
    """Losses are computed in float32 (or float64), also from fp16/bf16 logits under autocast."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _class_weight(weight, logits):
    """Class weights (C,) (a tensor or a list) on the logits' device and in their dtype (the loss's
    dtype is the head's choice, see _at_least_fp32), checked the same way for every impl
    (minift.functional.check_class_weight; F.cross_entropy itself takes negative weights)."""
    if weight is None:
        return None
    weight = torch.as_tensor(weight).to(device=logits.device, dtype=logits.dtype)
    check_class_weight(weight, logits, "weight")
    return weight


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")


class BertForTokenClassification(BertPreTrainedModel):
    """A linear layer on every token vector; labels of IGNORE_INDEX (sub-words, padding) are ignored."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                reduction: str = "mean") -> HeadOutput:
        ops = get_ops(self.config.impl)
        h = self.bert(input_ids, attention_mask, token_type_ids).last_hidden_state     # (B, T, H)
        h = ops.dropout(h, _classifier_dropout(self.config), self.training)
        logits = dense(ops, self.classifier, h)          # (B, T, C)
        loss = None if labels is None else self.loss(logits, labels, reduction)
        return HeadOutput(loss=loss, logits=logits)

    def loss(self, logits, labels, reduction: str = "mean", weight=None):
        """Cross-entropy over the scored tokens, in at least float32: their mean, or ("sum") their sum.
        weight: optional class weights (C,), as in BertForSequenceClassification.loss (the mean
        then divides by the sum of the scored tokens' weights)."""
        _check_reduction(reduction)
        ops = get_ops(self.config.impl)
        logits = _at_least_fp32(logits).reshape(-1, self.num_labels)                  # (B*T, C)
        return ops.cross_entropy(logits, labels.reshape(-1).long(), reduction=reduction,
                                 weight=_class_weight(weight, logits))                # against (B*T,)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h):
        ops = get_ops(self.config.impl)
        h = ops.gelu(dense(ops, self.dense, h))               # (B, T, H)
        return ops.layer_norm(h, self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps)


class BertLMPredictionHead(nn.Module):
    """Transform, then project onto the vocabulary with the (tied) word-embedding matrix."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h, word_embeddings):
        ops = get_ops(self.transform.config.impl)
        return ops.linear(self.transform(h), word_embeddings, self.bias)              # (B, T, V)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)


class BertForMaskedLM(BertPreTrainedModel):
    """Masked-language-model head; its decoder shares the word-embedding matrix (weight tying).

    Without labels, ``logits`` are (B, T, V): every position. With labels (-100 where a token is
    not predicted; see minift.masking) only the N chosen positions (about 15% of the tokens) are
    scored: their hidden states are gathered *before* the transform and the projection onto the
    vocabulary, so the (B*T, V) logits, 30,522 floats per token, are never formed. The loss is the
    same mean cross-entropy over the N positions as the full-sequence loss with ignore_index, and
    ``logits`` is then (N, V), positions in row-major (sentence, token) order.
    """

    # Keys Hugging Face may write for the decoder; they are the tied embedding and bias.
    tied_keys = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                reduction: str = "mean") -> HeadOutput:
        ops = get_ops(self.config.impl)
        h = self.bert(input_ids, attention_mask, token_type_ids).last_hidden_state     # (B, T, H)
        word_embeddings = self.bert.embeddings.word_embeddings.weight                   # (V, H), the tied decoder
        if labels is None:
            return HeadOutput(logits=self.cls.predictions(h, word_embeddings))          # (B, T, V)
        _check_reduction(reduction)
        chosen = labels != IGNORE_INDEX                                                 # (B, T)
        logits = self.cls.predictions(h[chosen], word_embeddings)                       # (N, V)
        loss = ops.cross_entropy(logits, labels[chosen].long(), reduction=reduction)    # over the N chosen
        return HeadOutput(loss=loss, logits=logits)


class BertForQuestionAnswering(BertPreTrainedModel):
    """Extractive QA: a start and an end score for every token."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None,
                start_positions=None, end_positions=None) -> HeadOutput:
        ops = get_ops(self.config.impl)
        # every position, padded ones too: the start/end softmax below runs over all T of them
        h = self.bert(input_ids, attention_mask, token_type_ids, pack=False).last_hidden_state  # (B, T, H)
        logits = dense(ops, self.qa_outputs, h)          # (B, T, 2)
        start_logits, end_logits = logits[..., 0], logits[..., 1]                     # (B, T) each
        loss = None
        if start_positions is not None and end_positions is not None:
            # Positions outside the sequence (answer truncated away) are ignored, as in HF.
            T = start_logits.shape[1]
            start, end = start_positions.clamp(0, T), end_positions.clamp(0, T)
            start, end = start.masked_fill(start == T, IGNORE_INDEX), end.masked_fill(end == T, IGNORE_INDEX)
            loss = (ops.cross_entropy(start_logits, start) + ops.cross_entropy(end_logits, end)) / 2
        return HeadOutput(loss=loss, start_logits=start_logits, end_logits=end_logits)
