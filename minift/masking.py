r"""Masked-language-model inputs: which tokens to hide, and what to put in their place.

Shape legend: B sequences, T tokens, V vocabulary size.

BERT's pre-training objective (Devlin et al. 2019, section 3.1 and appendix A.1) hides some
tokens and asks the model to recover them from both sides of the context. The rule:

1. **Choose** 15% of the tokens (never [CLS], [SEP] or padding). Each eligible token is chosen
   independently with probability p = 0.15, so over N eligible tokens the number chosen is
   Binomial(N, p): mean Np, standard deviation sqrt(N p (1 - p)).
2. **Corrupt** each chosen token: with probability 0.8 replace it by [MASK], with 0.1 by a token
   drawn uniformly from the vocabulary, with 0.1 leave it unchanged. (So 12% of all tokens are
   [MASK], 1.5% random, 1.5% unchanged but still predicted.)
3. **Predict** only the chosen tokens: ``labels`` holds the original id there and -100 (ignored
   by the loss) everywhere else.

Why not always [MASK]? [MASK] never appears when the model is fine-tuned, so a model that only
ever predicts at [MASK] would learn nothing useful for the other positions. The random 10% forces
it to doubt every input token; the unchanged 10% keeps its representation of the real token
close to the truth. The paper's ablation (table 8) shows the mixed rule beats 100% [MASK] for
feature-based NER.

**Whole-word masking** (Google's later release of BERT): WordPiece splits "unbelievable" into
"un ##bel ##ie ##vable"; guessing "##vable" with "un ##bel ##ie" visible is easy. With
``word_ids`` (the tokenizer's word index for each token), the draw is per *word* with probability
p, and every sub-word of a chosen word is chosen; steps 2 and 3 stay per token, as in BERT's code.

**Dynamic masking** (RoBERTa, Liu et al. 2019): BERT's original data pipeline fixed the masks once
(duplicating the data 10 times with different masks); drawing them afresh every time a batch is
built shows the model a new masking each epoch. ``epoch_generator(seed, epoch)`` gives a
generator per epoch: the same seed and epoch give the same masks (reproducible, and a resumed run
draws what the interrupted one would have), a new epoch gives new ones.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


def special_tokens_mask(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """(B, T) bool, True at tokens that must never be chosen: [CLS], [SEP], [PAD] and [MASK]."""
    special = [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id]
    special = torch.tensor([i for i in special if i is not None], device=input_ids.device)
    return torch.isin(input_ids, special)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator whose draws depend only on (seed, epoch)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))


def _word_index(word_ids, B: int, T: int) -> torch.Tensor:
    """The tokenizer's word_ids (lists with None, or a (B, T) tensor with -1) as a (B, T) tensor."""
    if isinstance(word_ids, torch.Tensor):
        out = word_ids.long()
    else:
        out = torch.full((B, T), -1, dtype=torch.long)
        for b, ids in enumerate(word_ids):
            for t, w in enumerate(ids[:T]):
                if w is not None:
                    out[b, t] = w
    if tuple(out.shape) != (B, T):
        raise ValueError(f"word_ids: expected shape {(B, T)}, got {tuple(out.shape)}")
    return out


def mask_tokens(input_ids: torch.Tensor, special_mask: torch.Tensor, *, mask_token_id: int,
                vocab_size: int, prob: float = 0.15, generator: torch.Generator | None = None,
                word_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking rule (see the module docstring).

    input_ids (B, T) long; special_mask (B, T) bool, True where a token may never be chosen
    (special tokens and padding: ``special_tokens_mask(input_ids, tokenizer)``, or with padding
    ``| (attention_mask == 0)``); word_ids: None (per-token choice) or the tokenizer's word ids
    (whole-word masking). The draws come from ``generator`` (CPU), so a seed fixes them.
    Returns (corrupted input_ids (B, T), labels (B, T): the original id where chosen, else -100).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected shape (B, T), got {tuple(input_ids.shape)}")
    if tuple(special_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"special_mask: expected shape {tuple(input_ids.shape)}, got {tuple(special_mask.shape)}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob: expected a probability in [0, 1], got {prob}")
    B, T = input_ids.shape
    device = input_ids.device
    eligible = ~special_mask.bool().cpu()                                         # (B, T)

    # 1. choose: per token, or per word with every sub-word of a chosen word
    if word_ids is None:
        chosen = (torch.rand(B, T, generator=generator) < prob) & eligible        # (B, T)
    else:
        words = _word_index(word_ids, B, T).cpu()                                 # (B, T), -1 = no word
        W = int(words.max()) + 1 if words.numel() else 0
        word_chosen = torch.rand(B, max(W, 1), generator=generator) < prob       # (B, W)
        chosen = word_chosen.gather(1, words.clamp(min=0)) & (words >= 0) & eligible  # (B, T)

    # 2. corrupt: 80% [MASK], 10% random token, 10% unchanged
    u = torch.rand(B, T, generator=generator)                                     # (B, T)
    random_ids = torch.randint(0, vocab_size, (B, T), generator=generator)       # (B, T)
    to_mask = chosen & (u < 0.8)
    to_random = chosen & (u >= 0.8) & (u < 0.9)
    corrupted = input_ids.clone()
    corrupted[to_mask.to(device)] = mask_token_id
    corrupted[to_random.to(device)] = random_ids.to(device)[to_random.to(device)]

    # 3. predict only the chosen tokens
    labels = input_ids.masked_fill(~chosen.to(device), IGNORE_INDEX)             # (B, T)
    return corrupted, labels
