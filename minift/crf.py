r"""A linear-chain conditional random field (CRF) for tagging, from scratch, and BERT + CRF.

Shape legend: B sentences, T positions (the scored positions of a sentence, left-aligned; see
``compact``), K tags. ``mask`` (B, T) is True at the first ``L_b`` positions of sentence b.

**The model.** A token classifier scores each position on its own: the emission e_t(j) is the
score of tag j at position t. A CRF adds a score A(i, j) for tag i followed by tag j, plus
start(j) and end(j) for the first and last tag, and scores whole tag sequences y = (y_0 .. y_{L-1}):

.. math::

    s(y) = \mathrm{start}(y_0) + \sum_{t=0}^{L-1} e_t(y_t) + \sum_{t=1}^{L-1} A(y_{t-1}, y_t)
           + \mathrm{end}(y_{L-1}),
    \qquad P(y \mid x) = \frac{e^{s(y)}}{Z}, \quad Z = \sum_{y'} e^{s(y')} .

Z sums over all K^L paths. Training minimises the negative log-likelihood of the gold path,
-log P(y|x) = log Z - s(y), which is differentiable. (One of the course documents says a BERT+CRF
tagger is trained by "minimising the F1 score": F1 is the evaluation metric, a step function of
the predictions with zero gradient almost everywhere; the CRF is trained by its NLL.)

**Forward algorithm** (log space, so that long sentences do not overflow): alpha_t(j) is the log
of the summed exp-scores of all prefixes y_0..y_t that end in tag j,

.. math::

    \alpha_0(j) = \mathrm{start}(j) + e_0(j), \quad
    \alpha_t(j) = e_t(j) + \operatorname{logsumexp}_i\,[\alpha_{t-1}(i) + A(i, j)], \quad
    \log Z = \operatorname{logsumexp}_j\,[\alpha_{L-1}(j) + \mathrm{end}(j)] .

O(L K^2) instead of O(K^L). **Viterbi** is the same recursion with max in place of logsumexp,
keeping the argmax (back-pointers) to read the best path backwards. The gradient of log Z is
derived by hand in ``LogPartition``; ``log_partition_autograd`` runs the recursion through
PyTorch's autograd, the oracle it is checked against.

**Padding and sub-words.** Only the first sub-word of each word carries a tag (labels != -100).
The CRF's transitions must link word t-1 to word t, not a sub-word to the next sub-word, so the
scored positions are first gathered into a compact, left-aligned sequence per sentence
(``compact``); padding is then the tail of each row, which ``mask`` cuts off.

**BIO constraints.** With tags O, B-X, I-X, an I-X may only follow B-X or I-X and may not start a
sentence. ``bio_constraints`` gives the allowed starts and transitions; the CRF sets the others
to -inf, so no path through them has any probability and Viterbi never outputs one.
"""
from __future__ import annotations

import torch
from torch import nn

from .model import BertForTokenClassification, HeadOutput

NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------------
# Inputs: scored positions -> compact sequences
# ------------------------------------------------------------------------------------------

def compact(x: torch.Tensor, keep: torch.Tensor):
    """Gather the positions where ``keep`` is True to the left of each row, in order.

    x (B, T, ...), keep (B, T) bool. Returns ``(xc, mask, index)``: xc (B, W, ...) with W the
    largest number of kept positions in a row, mask (B, W) True at the first (number kept)
    positions, and index (B, W) the original position of each compact one (beyond the mask: some
    other position, whose value the CRF ignores). Differentiable in x (a gather).
    """
    if keep.dim() != 2 or tuple(keep.shape) != tuple(x.shape[:2]):
        raise ValueError(f"keep: expected a (B, T) mask matching x's first two dims {tuple(x.shape[:2])}, "
                         f"got {tuple(keep.shape)}")
    keep = keep.bool()
    B, T = keep.shape
    lengths = keep.sum(1)                                                       # (B,)
    W = int(lengths.max()) if B else 0
    index = torch.argsort((~keep).to(torch.int32), dim=1, stable=True)[:, :W]   # (B, W) kept ones first
    mask = torch.arange(W, device=keep.device)[None, :] < lengths[:, None]      # (B, W)
    gather_index = index.reshape(B, W, *([1] * (x.dim() - 2))).expand(B, W, *x.shape[2:])
    return x.gather(1, gather_index), mask, index


def first_subword_mask(word_ids: list[list[int | None]], T: int) -> torch.Tensor:
    """(B, T) bool, True at the first sub-word of each word, from the tokenizer's ``word_ids``."""
    out = torch.zeros(len(word_ids), T, dtype=torch.bool)
    for b, ids in enumerate(word_ids):
        prev = None
        for t, w in enumerate(ids[:T]):
            out[b, t] = w is not None and w != prev
            prev = w
    return out


def _check(emissions, mask):
    if emissions.dim() != 3:
        raise ValueError(f"emissions: expected shape (B, T, K), got {tuple(emissions.shape)}")
    B, T, _ = emissions.shape
    if mask is None:
        return torch.ones(B, T, dtype=torch.bool, device=emissions.device)
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"mask: expected shape {(B, T)}, got {tuple(mask.shape)}")
    mask = mask.bool()
    if T > 1 and (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("mask: expected each row to be True on a prefix (left-aligned sequences); "
                         "gather the scored positions with minift.crf.compact first")
    return mask


# ------------------------------------------------------------------------------------------
# Scores, the forward algorithm and its hand-derived gradient
# ------------------------------------------------------------------------------------------

def sequence_score(emissions, tags, mask, transitions, start, end) -> torch.Tensor:
    """s(y) of the given tag sequences, (B,). tags (B, T) long; values beyond the mask are ignored."""
    mask = _check(emissions, mask)
    B, T, K = emissions.shape
    if T == 0:
        return emissions.new_zeros(B)
    lengths = mask.sum(1)                                                       # (B,)
    y = tags.long().masked_fill(~mask, 0)                                       # (B, T)
    e = emissions.gather(2, y[..., None]).squeeze(-1)                           # (B, T)   e_t(y_t)
    s = torch.where(mask, e, 0.0).sum(1)                                        # (B,)
    if T > 1:
        a = transitions[y[:, :-1], y[:, 1:]]                                    # (B, T-1) A(y_{t-1}, y_t)
        s = s + torch.where(mask[:, 1:], a, 0.0).sum(1)
    last = y.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)          # (B,)     y_{L-1}
    return s + torch.where(lengths > 0, start[y[:, 0]] + end[last], 0.0)


def log_partition_autograd(emissions, mask, transitions, start, end) -> torch.Tensor:
    """log Z (B,) by the forward algorithm in plain PyTorch ops; autograd differentiates it.

    This is the oracle for ``LogPartition``. A sentence with no positions has one empty path and
    log Z = 0.
    """
    mask = _check(emissions, mask)
    B, T, K = emissions.shape
    if T == 0:
        return emissions.new_zeros(B)
    alpha = start + emissions[:, 0]                                             # (B, K)  alpha_0
    for t in range(1, T):
        nxt = torch.logsumexp(alpha[:, :, None] + transitions, dim=1) + emissions[:, t]  # (B, K)
        alpha = torch.where(mask[:, t, None], nxt, alpha)                       # held past the end
    log_z = torch.logsumexp(alpha + end, dim=1)                                 # (B,)
    return torch.where(mask[:, 0], log_z, 0.0)


def forward_alphas(emissions, mask, transitions, start) -> torch.Tensor:
    """alpha_t(j) for every t, (B, T, K); past a sentence's end the last alpha is held."""
    B, T, K = emissions.shape
    alphas = emissions.new_empty(B, T, K)
    alpha = start + emissions[:, 0]                                             # (B, K)  alpha_0(j) = start(j) + e_0(j)
    alphas[:, 0] = alpha
    for t in range(1, T):
        # alpha_t(j) = e_t(j) + logsumexp_i [alpha_{t-1}(i) + A(i, j)]
        nxt = torch.logsumexp(alpha[:, :, None] + transitions, dim=1) + emissions[:, t]  # (B, K)
        alpha = torch.where(mask[:, t, None], nxt, alpha)
        alphas[:, t] = alpha
    return alphas


def backward_betas(emissions, mask, transitions, end) -> torch.Tensor:
    """beta_t(i), (B, T, K): log of the summed exp-scores of all continuations after tag i at t."""
    B, T, K = emissions.shape
    betas = emissions.new_empty(B, T, K)
    beta = end.expand(B, K)                                                     # (B, K)  beta_{L-1}(i) = end(i)
    betas[:, T - 1] = beta
    for t in range(T - 2, -1, -1):
        # beta_t(i) = logsumexp_j [A(i, j) + e_{t+1}(j) + beta_{t+1}(j)]
        nxt = torch.logsumexp(transitions + (emissions[:, t + 1] + beta)[:, None, :], dim=2)  # (B, K)
        beta = torch.where(mask[:, t + 1, None], nxt, end.expand(B, K))         # t >= L-1: the end
        betas[:, t] = beta
    return betas


def _marginals(emissions, mask, transitions, end, alphas, betas, log_z):
    """P(y_t = j) (B, T, K), P(y_{t-1} = i, y_t = j) (B, T-1, K, K), P(y_{L-1} = j) (B, K)."""
    lz = log_z[:, None, None]                                                   # (B, 1, 1)
    # P(y_t = j) = exp(alpha_t(j) + beta_t(j) - log Z)
    unary = torch.where(mask[..., None], torch.exp(alphas + betas - lz), 0.0)   # (B, T, K)
    # P(y_{t-1} = i, y_t = j) = exp(alpha_{t-1}(i) + A(i, j) + e_t(j) + beta_t(j) - log Z)
    pair = alphas[:, :-1, :, None] + transitions + (emissions[:, 1:] + betas[:, 1:])[:, :, None, :]
    pairwise = torch.where(mask[:, 1:, None, None], torch.exp(pair - lz[..., None]), 0.0)  # (B, T-1, K, K)
    # P(y_{L-1} = j) = exp(alpha_{L-1}(j) + end(j) - log Z)
    last = torch.where(mask[:, :1], torch.exp(alphas[:, -1] + end - log_z[:, None]), 0.0)  # (B, K)
    return unary, pairwise, last


def marginals(emissions, mask, transitions, start, end):
    """Posterior marginals from one forward-backward pass (no gradient): unary (B, T, K),
    pairwise (B, T-1, K, K) and last-tag (B, K) probabilities."""
    mask = _check(emissions, mask)
    with torch.no_grad():
        alphas = forward_alphas(emissions, mask, transitions, start)
        log_z = torch.where(mask[:, 0], torch.logsumexp(alphas[:, -1] + end, dim=1), 0.0)
        betas = backward_betas(emissions, mask, transitions, end)
        return _marginals(emissions, mask, transitions, end, alphas, betas, log_z)


class LogPartition(torch.autograd.Function):
    r"""log Z by the forward algorithm; its gradient by hand, from a forward-backward pass.

    Write log Z = log \sum_y exp s(y). For any score parameter theta,

    .. math::

        \frac{\partial \log Z}{\partial \theta} = \sum_y \frac{e^{s(y)}}{Z}
            \frac{\partial s(y)}{\partial \theta} = \mathbb{E}_{y \sim P}\left[
            \frac{\partial s(y)}{\partial \theta}\right],

    and s(y) is a sum of table entries, so d s(y) / d entry = how many times y uses it. Hence
    the gradient is the *expected count* of each entry under the model:

    .. math::

        \frac{\partial \log Z}{\partial e_t(j)} = P(y_t = j), \quad
        \frac{\partial \log Z}{\partial A(i, j)} = \sum_{t=1}^{L-1} P(y_{t-1} = i, y_t = j),

        \frac{\partial \log Z}{\partial \mathrm{start}(j)} = P(y_0 = j), \quad
        \frac{\partial \log Z}{\partial \mathrm{end}(j)} = P(y_{L-1} = j).

    The marginals come from the forward and backward log-sums: with
    beta_{L-1}(i) = end(i), beta_t(i) = logsumexp_j [A(i, j) + e_{t+1}(j) + beta_{t+1}(j)],
    every path through (t, j) has prefix sum alpha_t(j) and suffix sum beta_t(j), so

    .. math::

        P(y_t = j) = e^{\alpha_t(j) + \beta_t(j) - \log Z}, \qquad
        P(y_{t-1} = i, y_t = j) = e^{\alpha_{t-1}(i) + A(i, j) + e_t(j) + \beta_t(j) - \log Z}.

    (The NLL's gradient is then marginal minus observed count: d(log Z - s(y))/d e_t(j) =
    P(y_t = j) - [y_t = j].) With an upstream gradient g_b per sentence, each sentence's
    marginals are scaled by g_b; entries set to -inf by constraints get probability 0.

    forward saves emissions, mask, transitions, end, the alphas (B, T, K) and log Z (B,);
    backward computes the betas and returns d emissions (B, T, K), d transitions (K, K),
    d start (K,), d end (K,).
    """

    @staticmethod
    def forward(ctx, emissions, mask, transitions, start, end):
        B, T, K = emissions.shape
        if T == 0:
            ctx.empty = True
            return emissions.new_zeros(B)
        ctx.empty = False
        alphas = forward_alphas(emissions, mask, transitions, start)           # (B, T, K)
        log_z = torch.logsumexp(alphas[:, -1] + end, dim=1)                     # (B,) lse_j alpha_{L-1}(j) + end(j)
        log_z = torch.where(mask[:, 0], log_z, 0.0)                             # empty sentence: log 1 = 0
        ctx.save_for_backward(emissions, mask, transitions, end, alphas, log_z)
        return log_z

    @staticmethod
    def backward(ctx, dlog_z):
        if ctx.empty:
            return None, None, None, None, None
        emissions, mask, transitions, end, alphas, log_z = ctx.saved_tensors
        betas = backward_betas(emissions, mask, transitions, end)              # (B, T, K)
        unary, pairwise, last = _marginals(emissions, mask, transitions, end, alphas, betas, log_z)
        g = dlog_z                                                              # (B,)
        demissions = g[:, None, None] * unary                                   # dlogZ/de_t(j) = P(y_t = j)
        dtransitions = torch.einsum("b,btij->ij", g, pairwise)                  # sum_t P(y_{t-1}=i, y_t=j)
        dstart = (g[:, None] * unary[:, 0]).sum(0)                              # P(y_0 = j)
        dend = (g[:, None] * last).sum(0)                                       # P(y_{L-1} = j)
        return demissions, None, dtransitions, dstart, dend


def log_partition(emissions, mask, transitions, start, end) -> torch.Tensor:
    """log Z (B,) with the hand-derived gradient (``LogPartition``)."""
    mask = _check(emissions, mask)
    return LogPartition.apply(emissions, mask, transitions, start, end)


def viterbi(emissions, mask, transitions, start, end):
    """The highest-scoring tag sequence of each sentence and its score.

    delta_0(j) = start(j) + e_0(j); delta_t(j) = e_t(j) + max_i [delta_{t-1}(i) + A(i, j)],
    remembering the best i (back-pointer); the last tag is argmax_j delta_{L-1}(j) + end(j), and
    the back-pointers give the rest. Returns (list of B tag-id lists of length L_b, scores (B,)).
    """
    mask = _check(emissions, mask)
    B, T, K = emissions.shape
    if T == 0:
        return [[] for _ in range(B)], emissions.new_zeros(B)
    with torch.no_grad():
        delta = start + emissions[:, 0]                                         # (B, K)
        identity = torch.arange(K, device=emissions.device).expand(B, K)        # (B, K)
        pointers = []
        for t in range(1, T):
            best, arg = (delta[:, :, None] + transitions).max(dim=1)            # (B, K) max_i delta(i) + A(i, j)
            delta = torch.where(mask[:, t, None], best + emissions[:, t], delta)
            pointers.append(torch.where(mask[:, t, None], arg, identity))       # past the end: stay
        score, tag = (delta + end).max(dim=1)                                   # (B,)
        path = [tag]
        for bp in reversed(pointers):
            tag = bp.gather(1, tag[:, None]).squeeze(1)                         # (B,)
            path.append(tag)
        path = torch.stack(path[::-1], dim=1)                                   # (B, T)
        lengths = mask.sum(1).tolist()
        paths = [path[b, :n].tolist() for b, n in enumerate(lengths)]
        return paths, torch.where(mask[:, 0], score, 0.0)


# ------------------------------------------------------------------------------------------
# Constraints and the module
# ------------------------------------------------------------------------------------------

def bio_constraints(tags: list[str]):
    """Allowed (start (K,), transitions (K, K), end (K,)) for BIO (IOB2) tags O, B-X, I-X:
    I-X only after B-X or I-X, and not first."""
    for t in tags:
        if not (t == "O" or t.startswith(("B-", "I-"))):
            raise ValueError(f"BIO constraints: expected tags 'O', 'B-X' or 'I-X', got {t!r}")
    K = len(tags)
    start = torch.tensor([not t.startswith("I-") for t in tags])
    trans = torch.ones(K, K, dtype=torch.bool)
    for j, tj in enumerate(tags):
        if tj.startswith("I-"):
            for i, ti in enumerate(tags):
                trans[i, j] = ti in ("B-" + tj[2:], tj)
    return start, trans, torch.ones(K, dtype=torch.bool)


def is_bio(tags: list[str]) -> bool:
    """Is this tag set BIO (IOB2): only O, B-X and I-X, and at least one B-X or I-X?"""
    return (all(t == "O" or t.startswith(("B-", "I-")) for t in tags)
            and any(t != "O" for t in tags))


def bio_violation(tags: list[str]) -> tuple[int, str] | None:
    """The first position whose I-X follows neither B-X nor I-X (or starts the sentence), and why."""
    prev = "O"
    for i, t in enumerate(tags):
        if t.startswith("I-") and prev not in ("B-" + t[2:], t):
            return i, f"{t!r} after {prev!r}" if i else f"{t!r} starts the sentence"
        prev = t
    return None


class LinearChainCRF(nn.Module):
    """Transition scores A (K, K) (``transitions[i, j]``: tag i followed by tag j), start and end
    scores (K,), and boolean masks of the allowed ones (saved with the model).

    Zero-initialised: at the start of training the CRF adds nothing to the emissions, and the
    NLL is the sum of the words' softmax cross-entropies.
    """

    def __init__(self, num_tags: int, constraints: str | None = None, tags: list[str] | None = None):
        super().__init__()
        K = self.num_tags = int(num_tags)
        self.transitions = nn.Parameter(torch.zeros(K, K))                     # (K, K) A(i, j)
        self.start_transitions = nn.Parameter(torch.zeros(K))                  # (K,)
        self.end_transitions = nn.Parameter(torch.zeros(K))                    # (K,)
        self.register_buffer("allowed_transitions", torch.ones(K, K, dtype=torch.bool))
        self.register_buffer("allowed_start", torch.ones(K, dtype=torch.bool))
        self.register_buffer("allowed_end", torch.ones(K, dtype=torch.bool))
        self.set_constraints(constraints, tags)

    def set_constraints(self, constraints: str | None, tags: list[str] | None = None):
        """None (every path allowed) or "BIO" (needs the K tag names)."""
        K = self.num_tags
        if constraints is None:
            start, trans, end = (torch.ones(K, dtype=torch.bool), torch.ones(K, K, dtype=torch.bool),
                                 torch.ones(K, dtype=torch.bool))
        elif constraints == "BIO":
            if tags is None or len(tags) != K:
                raise ValueError(f"BIO constraints: expected the names of the {K} tags, got {tags!r}")
            start, trans, end = bio_constraints(list(tags))
        else:
            raise ValueError(f"constraints: expected None or 'BIO', got {constraints!r}")
        with torch.no_grad():
            self.allowed_start.copy_(start)
            self.allowed_transitions.copy_(trans)
            self.allowed_end.copy_(end)
        return self

    def scores(self):
        """(A, start, end) with the disallowed entries at -inf (their gradient is zero)."""
        return (self.transitions.masked_fill(~self.allowed_transitions, NEG_INF),
                self.start_transitions.masked_fill(~self.allowed_start, NEG_INF),
                self.end_transitions.masked_fill(~self.allowed_end, NEG_INF))

    def log_partition(self, emissions, mask=None, impl: str = "hand") -> torch.Tensor:
        """log Z (B,); impl "hand" (LogPartition) or "autograd" (through the recursion)."""
        fn = {"hand": log_partition, "autograd": log_partition_autograd}.get(impl)
        if fn is None:
            raise ValueError(f"impl: expected 'hand' or 'autograd', got {impl!r}")
        return fn(emissions, mask, *self._typed(emissions))

    def score(self, emissions, tags, mask=None) -> torch.Tensor:
        return sequence_score(emissions, tags, mask, *self._typed(emissions))

    def nll(self, emissions, tags, mask=None, reduction: str = "mean", impl: str = "hand") -> torch.Tensor:
        """-log P(tags | emissions) = log Z - s(tags), summed or averaged over the B sentences."""
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
        gold = self.score(emissions, tags, mask)                               # (B,)
        if not torch.isfinite(gold).all():
            bad = torch.nonzero(~torch.isfinite(gold)).flatten().tolist()
            raise ValueError(f"gold tag sequence(s) of sentence(s) {bad} break the CRF's constraints "
                             "(I-X must follow B-X or I-X; IOB1 data must be converted to BIO first)")
        nll = self.log_partition(emissions, mask, impl) - gold                 # (B,)
        return nll if reduction == "none" else (nll.sum() if reduction == "sum" else nll.mean())

    def decode(self, emissions, mask=None) -> list[list[int]]:
        """Viterbi: the best tag ids per sentence (length = its number of positions)."""
        return viterbi(emissions, mask, *self._typed(emissions))[0]

    def marginals(self, emissions, mask=None):
        return marginals(emissions, mask, *self._typed(emissions))

    def _typed(self, emissions):
        return tuple(s.to(emissions.dtype) for s in self.scores())


# ------------------------------------------------------------------------------------------
# BERT + CRF
# ------------------------------------------------------------------------------------------

class BertCRFForTokenClassification(BertForTokenClassification):
    """BertForTokenClassification's linear layer gives the emissions, a CRF scores the tag path.

    Labels are as for the plain head: a tag id at the first sub-word of each word, -100 elsewhere
    (later sub-words, [CLS], [SEP], padding). The loss is the CRF's NLL over the scored positions,
    averaged over sentences (the plain head averages cross-entropy over words instead).
    The CRF's tensors are saved as ``crf.*``: ``from_pretrained`` of this class restores them,
    a checkpoint without them gets a fresh (zero) CRF and says so in ``load_report``, and
    transformers' BertForTokenClassification loads the file and ignores them.
    """

    loss_per_sentence = True   # one NLL term per sentence (the trainer averages over sentences)

    def __init__(self, config, constraints: str | None = None):
        super().__init__(config)
        tags = None if config.id2label is None else [config.id2label[i] for i in range(config.num_labels)]
        self.crf = LinearChainCRF(config.num_labels, constraints, tags)

    @classmethod
    def from_pretrained(cls, name_or_path, impl: str = "torch", constraints: str | None = None,
                        **config_overrides):
        """As for every head; ``constraints="BIO"`` (tag names from id2label) replaces the saved ones."""
        model = super().from_pretrained(name_or_path, impl=impl, **config_overrides)
        if constraints is not None:
            id2label = model.config.id2label or {}
            model.crf.set_constraints(constraints, [id2label.get(i) for i in range(model.config.num_labels)])
        return model

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                reduction: str = "mean") -> HeadOutput:
        """``reduction``: the NLL's "mean" or "sum" over the batch's sentences."""
        logits = super().forward(input_ids, attention_mask, token_type_ids).logits    # (B, T, C) emissions
        loss = None
        if labels is not None:
            scored = labels != -100                                                   # (B, T)
            emissions, mask, index = compact(logits, scored)                          # (B, W, C), (B, W)
            tags = labels.gather(1, index)                                            # (B, W)
            loss = self.crf.nll(emissions.float() if emissions.dtype in (torch.float16, torch.bfloat16)
                                else emissions, tags, mask, reduction=reduction)
        return HeadOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def decode(self, input_ids, attention_mask=None, token_type_ids=None, scored=None) -> list[list[int]]:
        """Viterbi tag ids, one per scored position (per word). ``scored`` (B, T) bool marks the
        first sub-word of each word: ``labels != -100`` or ``first_subword_mask(word_ids, T)``."""
        if scored is None:
            raise ValueError("scored: expected a (B, T) mask of the first sub-word of each word "
                             "(labels != -100, or minift.crf.first_subword_mask(word_ids, T))")
        logits = super().forward(input_ids, attention_mask, token_type_ids).logits    # (B, T, C)
        emissions, mask, _ = compact(logits, scored.to(logits.device))               # (B, W, C)
        return self.crf.decode(emissions, mask)
