"""BERT's masking rule on real text, and the masked-LM head's gathered loss against the full one."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import minift
from minift import masking
from minift.ops import extension_available

from conftest import random_batch, small_config

P = 0.15
Z = 5.0      # tolerance in binomial standard deviations: a false alarm about once in 3.5 million


def within_binomial(count, n, p, z=Z):
    """|count - n p| <= z sqrt(n p (1-p)): count is consistent with Binomial(n, p)."""
    return abs(count - n * p) <= z * math.sqrt(n * p * (1 - p))


@pytest.fixture(scope="module")
def real_batch(tokenizer):
    """About 4,000 real English sentences (UD English-EWT), padded, with word ids."""
    from minift.ewt import ud_english_ewt
    sentences = [" ".join(ex.text) for ex in ud_english_ewt().train[:4000]]
    enc = tokenizer(sentences, max_length=64, return_offsets=True)
    special = masking.special_tokens_mask(enc["input_ids"], tokenizer) | (enc["attention_mask"] == 0)
    return enc, special


def draw(real_batch, tokenizer, seed=0, epoch=0, whole_word=False):
    enc, special = real_batch
    return masking.mask_tokens(enc["input_ids"], special, mask_token_id=tokenizer.mask_token_id,
                               vocab_size=tokenizer.vocab_size, prob=P,
                               generator=masking.epoch_generator(seed, epoch),
                               word_ids=enc["word_ids"] if whole_word else None)


def test_masking_statistics_on_real_text(real_batch, tokenizer):
    enc, special = real_batch
    ids = enc["input_ids"]
    V, mask_id = tokenizer.vocab_size, tokenizer.mask_token_id
    corrupted, labels = draw(real_batch, tokenizer)
    chosen = labels != -100
    N, n = int((~special).sum()), int(chosen.sum())
    assert N > 50_000 and (enc["attention_mask"] == 0).sum() > 10_000   # a large sample, with padding
    assert within_binomial(n, N, P), (n, N)
    # never special tokens or padding; labels are the original ids; unchosen tokens untouched
    assert not chosen[special].any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(corrupted[~chosen], ids[~chosen])
    # 80 / 10 / 10 among the chosen. A random draw can hit [MASK] or the original token (1/V each).
    to_mask = corrupted[chosen] == mask_id
    same = corrupted[chosen] == ids[chosen]
    other = ~to_mask & ~same
    assert within_binomial(int(to_mask.sum()), n, 0.8 + 0.1 / V)
    assert within_binomial(int(same.sum()), n, 0.1 + 0.1 / V)
    assert within_binomial(int(other.sum()), n, 0.1 * (1 - 2 / V))
    # the random replacements are uniform over the vocabulary: their mean is (V-1)/2
    rnd = corrupted[chosen][other].double()
    assert abs(rnd.mean() - (V - 1) / 2) <= Z * math.sqrt((V ** 2 - 1) / 12 / len(rnd))


def _words(enc):
    """{(row, word id): [token positions]} for every word."""
    out = {}
    for b, wids in enumerate(enc["word_ids"]):
        for t, w in enumerate(wids):
            if w is not None and enc["attention_mask"][b, t]:
                out.setdefault((b, w), []).append(t)
    return out


def test_whole_word_masking_keeps_words_together(real_batch, tokenizer):
    enc, special = real_batch
    words = _words(enc)
    split = [(k, pos) for k, pos in words.items() if len(pos) > 1]
    assert len(split) > 1000, "the sample must contain many words split into several sub-words"
    _, labels = draw(real_batch, tokenizer, whole_word=True)
    chosen = labels != -100
    n_chosen_words = 0
    for (b, _), pos in words.items():
        flags = chosen[b, pos]
        assert flags.all() or not flags.any(), "a word is chosen whole or not at all"
        n_chosen_words += bool(flags[0])
    assert within_binomial(n_chosen_words, len(words), P)
    assert not chosen[special].any()
    # per-token masking, on the same text, does split words (so the check above has teeth)
    _, per_token = draw(real_batch, tokenizer, whole_word=False)
    c = per_token != -100
    assert any(0 < int(c[b, pos].sum()) < len(pos) for (b, _), pos in split)


def test_masks_are_reproducible_and_new_each_epoch(real_batch, tokenizer):
    a_ids, a_lab = draw(real_batch, tokenizer, seed=3, epoch=1)
    b_ids, b_lab = draw(real_batch, tokenizer, seed=3, epoch=1)
    assert torch.equal(a_ids, b_ids) and torch.equal(a_lab, b_lab)
    c_ids, c_lab = draw(real_batch, tokenizer, seed=3, epoch=2)
    a, c = a_lab != -100, c_lab != -100
    # independent draws: the chance that a chosen token is chosen again is P, not 1
    n = int(a.sum())
    assert within_binomial(int((a & c).sum()), n, P)
    d_ids, _ = draw(real_batch, tokenizer, seed=4, epoch=1)
    assert not torch.equal(a_ids, d_ids)


# ------------------------------------------------------------------------------------------
# The masked-LM head: logits only at the chosen positions
# ------------------------------------------------------------------------------------------

IMPLS = ["torch", "reference"] + (["fused"] if extension_available() else [])


@pytest.mark.parametrize("impl", IMPLS)
def test_gathered_loss_equals_full_sequence_loss(impl):
    config = small_config()
    torch.manual_seed(0)
    model = minift.BertForMaskedLM(config).double().set_impl(impl)
    with torch.no_grad():                      # larger, irregular weights than the 0.02 init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ids, attn, types = random_batch(config, B=4, T=13, seed=2)
    special = (attn == 0) | (torch.arange(13) == 0)
    corrupted, labels = masking.mask_tokens(ids, special, mask_token_id=3, vocab_size=config.vocab_size,
                                            prob=0.3, generator=torch.Generator().manual_seed(1))
    N = int((labels != -100).sum())
    assert 0 < N < int((~special).sum())
    seen = []
    hook = model.cls.predictions.transform.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    out = model(corrupted, attn, types, labels=labels)
    hook.remove()
    assert seen == [(N, config.hidden_size)], "the transform and decoder see only the N chosen positions"
    assert out.logits.shape == (N, config.vocab_size)
    ours = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)

    full = model(corrupted, attn, types).logits                                   # (B, T, V)
    assert full.shape == (4, 13, config.vocab_size)
    oracle = F.cross_entropy(full.reshape(-1, config.vocab_size), labels.reshape(-1), ignore_index=-100)
    theirs = torch.autograd.grad(oracle, list(model.parameters()), allow_unused=True)
    assert abs(out.loss.item() - oracle.item()) <= 1e-12
    assert torch.allclose(out.logits, full[labels != -100], atol=1e-12)
    for (name, _), a, b in zip(model.named_parameters(), ours, theirs):
        if b is None:
            assert a is None or not a.any(), name
        else:
            assert torch.allclose(a, b, atol=1e-12), name


def test_saved_masked_lm_loads_in_transformers_with_equal_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = small_config()
    torch.manual_seed(1)
    model = minift.BertForMaskedLM(config).eval()
    with torch.no_grad():                      # every tensor irregular, the MLM bias included
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path)
    hf = transformers.BertForMaskedLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    assert torch.equal(hf.cls.predictions.bias, model.cls.predictions.bias)
    ids, attn, types = random_batch(config, B=3, T=12, seed=4)
    _, labels = masking.mask_tokens(ids, attn == 0, mask_token_id=3, vocab_size=config.vocab_size,
                                    generator=torch.Generator().manual_seed(2), prob=0.4)
    with torch.no_grad():
        ours = model(ids, attn, types)
        theirs = hf(input_ids=ids, attention_mask=attn, token_type_ids=types, labels=labels)
        gathered = model(ids, attn, types, labels=labels)
    real = attn.bool()
    assert ours.logits.abs().max() > 1.0                   # logits of a size where errors would show
    assert (ours.logits - theirs.logits).abs()[real].max() <= 1e-5
    assert abs(gathered.loss.item() - theirs.loss.item()) <= 1e-5
    assert (gathered.logits - theirs.logits[labels != -100]).abs().max() <= 1e-5
    # float32 leaves rounding only: in float64 the two agree to 1e-10 everywhere
    with torch.no_grad():
        a = model.double()(ids, attn, types).logits
        b = hf.double()(input_ids=ids, attention_mask=attn, token_type_ids=types).logits
    assert (a - b).abs().max() <= 1e-10
