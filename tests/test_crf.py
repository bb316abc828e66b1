"""The linear-chain CRF against brute-force enumeration, autograd and gradcheck; BERT + CRF."""
import itertools
import math

import pytest
import torch
from torch.autograd import gradcheck

import minift
from minift import crf
from minift.data import Example, collate, encode_tokens

from conftest import small_config

f64 = dict(dtype=torch.float64)
BIO_TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def random_crf(B, T, K, seed, lengths=None):
    """Emissions, a prefix mask with irregular lengths (one empty row when B > 2), and scores."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(B, T, K, generator=g, **f64) * 2
    A, s, en = (torch.randn(*shape, generator=g, **f64) for shape in [(K, K), (K,), (K,)])
    if lengths is None:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0] = T
        if B > 2:
            lengths[-1] = 0
    mask = torch.arange(T)[None, :] < torch.as_tensor(lengths)[:, None]
    return e, mask, A, s, en


def path_score(e_b, y, A, s, en):
    """s(y) for one sentence, written out term by term."""
    total = s[y[0]] + en[y[-1]]
    for t, j in enumerate(y):
        total = total + e_b[t, j]
        if t:
            total = total + A[y[t - 1], j]
    return total


def all_paths(e_b, L, A, s, en, allowed=None):
    """{path: score} over all K^L paths (those allowed by the predicate, if given)."""
    K = e_b.shape[-1]
    return {y: path_score(e_b, y, A, s, en) for y in itertools.product(range(K), repeat=L)
            if allowed is None or allowed(y)}


def is_valid_bio(y, tags=BIO_TAGS):
    for t, j in enumerate(y):
        if tags[j].startswith("I-"):
            prev = tags[y[t - 1]] if t else "O"
            if prev not in ("B-" + tags[j][2:], tags[j]):
                return False
    return True


SIZES = [(4, 5, 2), (3, 4, 3), (5, 3, 4), (2, 5, 3), (3, 2, 5), (1, 1, 3)]   # (B, T, K)
CASES = [(B, T, K, seed) for seed, (B, T, K) in enumerate(SIZES)]


# ------------------------------------------------------------------------------------------
# log Z, scores and marginals against enumeration
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,T,K,seed", CASES)
def test_log_partition_and_score_equal_brute_force(B, T, K, seed):
    e, mask, A, s, en = random_crf(B, T, K, seed)
    hand = crf.log_partition(e, mask, A, s, en)
    auto = crf.log_partition_autograd(e, mask, A, s, en)
    g = torch.Generator().manual_seed(100 + seed)
    tags = torch.randint(0, K, (B, T), generator=g)
    score = crf.sequence_score(e, tags, mask, A, s, en)
    for b in range(B):
        L = int(mask[b].sum())
        if L == 0:   # one empty path: Z = 1, score 0
            assert hand[b] == 0 and auto[b] == 0 and score[b] == 0
            continue
        paths = all_paths(e[b], L, A, s, en)
        assert len(paths) == K ** L
        brute = torch.logsumexp(torch.stack(list(paths.values())), 0)
        assert abs(hand[b] - brute) < 1e-10 and abs(auto[b] - brute) < 1e-10
        assert abs(score[b] - paths[tuple(tags[b, :L].tolist())]) < 1e-12


@pytest.mark.parametrize("B,T,K,seed", CASES[:4])
def test_gradient_is_the_marginals_by_enumeration(B, T, K, seed):
    """d log Z / d e_t(j) = P(y_t = j), d/dA(i,j) = expected count of the transition i->j,
    d/dstart, d/dend = P(first tag), P(last tag): each from the explicit distribution over paths."""
    e, mask, A, s, en = random_crf(B, T, K, seed)
    ins = [t.clone().requires_grad_() for t in (e, A, s, en)]
    crf.log_partition(ins[0], mask, *ins[1:]).sum().backward()
    de, dA, ds, den = (t.grad for t in ins)
    want_e, want_A = torch.zeros_like(e), torch.zeros_like(A)
    want_s, want_en = torch.zeros_like(s), torch.zeros_like(en)
    for b in range(B):
        L = int(mask[b].sum())
        if L == 0:
            continue
        paths = all_paths(e[b], L, A, s, en)
        log_z = torch.logsumexp(torch.stack(list(paths.values())), 0)
        for y, sc in paths.items():
            p = torch.exp(sc - log_z)
            want_s[y[0]] += p
            want_en[y[-1]] += p
            for t, j in enumerate(y):
                want_e[b, t, j] += p
                if t:
                    want_A[y[t - 1], j] += p
    for got, want in [(de, want_e), (dA, want_A), (ds, want_s), (den, want_en)]:
        assert torch.allclose(got, want, atol=1e-12)
    unary, pairwise, last = crf.marginals(e, mask, A, s, en)
    assert torch.allclose(unary, want_e, atol=1e-12)
    assert torch.allclose(pairwise.sum((0, 1)), want_A, atol=1e-12)


@pytest.mark.parametrize("B,T,K,seed", [(4, 7, 3, 1), (3, 9, 5, 2), (5, 4, 2, 3)])
def test_hand_derived_gradient_passes_gradcheck_and_equals_autograd(B, T, K, seed):
    e, mask, A, s, en = random_crf(B, T, K, seed)
    ins = tuple(t.clone().requires_grad_() for t in (e, A, s, en))
    fn = lambda e, A, s, en: crf.log_partition(e, mask, A, s, en)  # noqa: E731
    assert gradcheck(fn, ins, eps=1e-6, atol=1e-8, rtol=1e-6)
    g = torch.randn(B, generator=torch.Generator().manual_seed(seed), **f64)  # irregular upstream gradient
    hand = torch.autograd.grad(crf.log_partition(ins[0], mask, *ins[1:]), ins, g)
    auto = torch.autograd.grad(crf.log_partition_autograd(ins[0], mask, *ins[1:]), ins, g)
    for h, a in zip(hand, auto):
        assert torch.allclose(h, a, atol=1e-12)


def test_gradcheck_through_bio_constraints():
    """With -inf on forbidden transitions/starts the gradient stays finite, zero there."""
    K = len(BIO_TAGS)
    layer = crf.LinearChainCRF(K, "BIO", BIO_TAGS).double()
    e, mask, A, s, en = random_crf(3, 6, K, 7)

    def fn(e, A, s, en):
        with torch.no_grad():
            layer.transitions.copy_(A), layer.start_transitions.copy_(s), layer.end_transitions.copy_(en)
        At, st, ent = (A.masked_fill(~layer.allowed_transitions, -math.inf),
                       s.masked_fill(~layer.allowed_start, -math.inf),
                       en.masked_fill(~layer.allowed_end, -math.inf))
        return crf.log_partition(e, mask, At, st, ent)

    ins = tuple(t.clone().requires_grad_() for t in (e, A, s, en))
    assert gradcheck(fn, ins, eps=1e-6, atol=1e-8, rtol=1e-6)
    fn(*ins).sum().backward()
    assert (ins[1].grad[~layer.allowed_transitions] == 0).all() and (ins[2].grad[~layer.allowed_start] == 0).all()


# ------------------------------------------------------------------------------------------
# Viterbi and BIO constraints
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,T,K,seed", CASES)
def test_viterbi_equals_brute_force_argmax(B, T, K, seed):
    e, mask, A, s, en = random_crf(B, T, K, seed)
    paths, scores = crf.viterbi(e, mask, A, s, en)
    for b in range(B):
        L = int(mask[b].sum())
        assert len(paths[b]) == L
        if L == 0:
            continue
        brute = all_paths(e[b], L, A, s, en)
        best = max(brute, key=lambda y: brute[y].item())
        assert tuple(paths[b]) == best        # continuous random scores: no ties
        assert abs(scores[b] - brute[best]) < 1e-12


def test_bio_constraints_viterbi_and_log_z():
    K = len(BIO_TAGS)
    start_ok, trans_ok, _ = crf.bio_constraints(BIO_TAGS)
    assert not start_ok[2] and not trans_ok[0, 2] and not trans_ok[3, 2] and trans_ok[1, 2] and trans_ok[2, 2]
    layer = crf.LinearChainCRF(K, "BIO", BIO_TAGS).double()
    plain = crf.LinearChainCRF(K).double()
    g = torch.Generator().manual_seed(11)
    invalid_unconstrained = 0
    for trial in range(8):
        T = 2 + trial % 4
        e = torch.randn(3, T, K, generator=g, **f64) * 2
        e[..., [2, 4]] += 1.5                 # push the I- tags up: unconstrained paths break BIO often
        A, s, en = (torch.randn(*shape, generator=g, **f64) for shape in [(K, K), (K,), (K,)])
        with torch.no_grad():                 # the same raw scores: only the constraints differ
            for m in (layer, plain):
                m.transitions.copy_(A), m.start_transitions.copy_(s), m.end_transitions.copy_(en)
        ours = layer.decode(e)
        log_z = layer.log_partition(e)
        for b in range(3):
            assert is_valid_bio(ours[b])
            valid = all_paths(e[b], T, A, s, en, allowed=is_valid_bio)
            best = max(valid, key=lambda y: valid[y].item())
            assert tuple(ours[b]) == best
            assert abs(log_z[b] - torch.logsumexp(torch.stack(list(valid.values())), 0)) < 1e-10
        invalid_unconstrained += sum(not is_valid_bio(y) for y in plain.decode(e))
    assert invalid_unconstrained > 0, "the inputs must tempt an unconstrained CRF into invalid paths"


def test_invalid_gold_sequence_is_an_error():
    layer = crf.LinearChainCRF(len(BIO_TAGS), "BIO", BIO_TAGS)
    e = torch.randn(2, 3, len(BIO_TAGS))
    with pytest.raises(ValueError, match=r"sentence\(s\) \[1\]"):
        layer.nll(e, torch.tensor([[1, 2, 0], [0, 2, 0]]))     # O -> I-PER
    with pytest.raises(ValueError, match="BIO"):
        crf.LinearChainCRF(3, "BIO", ["O", "PER", "LOC"])


# ------------------------------------------------------------------------------------------
# Padding, lengths and scored positions
# ------------------------------------------------------------------------------------------

def test_batch_equals_sentences_one_by_one():
    B, T, K = 5, 8, 4
    e, mask, A, s, en = random_crf(B, T, K, 21, lengths=[8, 3, 0, 6, 1])
    layer = crf.LinearChainCRF(K).double()
    with torch.no_grad():
        layer.transitions.copy_(A), layer.start_transitions.copy_(s), layer.end_transitions.copy_(en)
    e = e.clone().requires_grad_()
    tags = torch.randint(0, K, (B, T), generator=torch.Generator().manual_seed(3))
    nll = layer.nll(e, tags, mask, reduction="none")
    nll.sum().backward()
    batch_grads = [e.grad.clone(), layer.transitions.grad.clone()]
    decoded = layer.decode(e.detach(), mask)
    layer.zero_grad()
    de = torch.zeros_like(e)
    for b in range(B):
        L = int(mask[b].sum())
        eb = e.detach()[b:b + 1, :L].clone().requires_grad_()
        one = layer.nll(eb, tags[b:b + 1, :L], reduction="sum")
        assert abs(one - nll[b]) < 1e-12
        if L:
            one.backward()
            de[b, :L] = eb.grad[0]
            assert decoded[b] == layer.decode(eb.detach())[0]
        else:
            assert decoded[b] == []
    assert torch.allclose(batch_grads[0], de, atol=1e-12)        # and exactly 0 on padding
    assert (batch_grads[0][~mask] == 0).all()
    assert torch.allclose(batch_grads[1], layer.transitions.grad, atol=1e-12)


def test_compact_gathers_scored_positions_in_order():
    g = torch.Generator().manual_seed(5)
    keep = torch.rand(4, 9, generator=g) < 0.5
    keep[2] = False                                               # a row with nothing scored
    x = torch.randn(4, 9, 3, generator=g)
    xc, mask, index = crf.compact(x, keep)
    for b in range(4):
        pos = [t for t in range(9) if keep[b, t]]
        assert mask[b].sum() == len(pos) and index[b, :len(pos)].tolist() == pos
        assert torch.equal(xc[b, :len(pos)], x[b, pos])
    with pytest.raises(ValueError, match="prefix"):
        crf.LinearChainCRF(3).log_partition(torch.randn(1, 3, 3), torch.tensor([[True, False, True]]))


def test_first_subword_mask_matches_encode_tokens(tokenizer):
    sents = [Example(["Unbelievably", ",", "tokenizers", "split", "words"], ["ADV", "PUNCT", "NOUN", "VERB", "NOUN"]),
             Example(["Short", "."], ["ADJ", "PUNCT"])]
    labels = ["ADJ", "ADV", "NOUN", "PUNCT", "VERB"]
    batch = collate(encode_tokens(tokenizer, sents, labels, 32), [0, 1])
    enc = tokenizer([s.text for s in sents], is_split_into_words=True)
    T = batch["input_ids"].shape[1]
    assert torch.equal(crf.first_subword_mask(enc["word_ids"], T), batch["labels"] != -100)


# ------------------------------------------------------------------------------------------
# BERT + CRF
# ------------------------------------------------------------------------------------------

def test_head_loss_is_crf_nll_over_first_subwords():
    config = small_config(num_labels=len(BIO_TAGS), id2label=dict(enumerate(BIO_TAGS)))
    torch.manual_seed(0)
    model = crf.BertCRFForTokenClassification(config, constraints="BIO").double().eval()
    with torch.no_grad():
        model.crf.transitions.normal_(), model.crf.start_transitions.normal_()
    ids = torch.randint(1, config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(1))
    attn = torch.ones(3, 10, dtype=torch.long)
    attn[1, 7:] = 0
    labels = torch.full((3, 10), -100)
    labels[0, [1, 2, 4, 8]] = torch.tensor([1, 2, 0, 3])         # gaps: later sub-words unscored
    labels[1, [1, 3, 5]] = torch.tensor([3, 4, 4])
    labels[2, [2]] = torch.tensor([0])
    out = model(ids, attn, labels=labels)
    want = []
    for b in range(3):
        pos = (labels[b] != -100).nonzero().flatten()
        em = out.logits[b:b + 1, pos]
        want.append(crf.log_partition_autograd(em, None, *model.crf.scores())
                    - crf.sequence_score(em, labels[b:b + 1, pos], None, *model.crf.scores()))
    assert torch.allclose(out.loss, torch.cat(want).mean(), atol=1e-12)
    paths = model.decode(ids, attn, scored=labels != -100)
    assert [len(p) for p in paths] == [4, 3, 1] and all(is_valid_bio(p) for p in paths)


def test_save_load_roundtrip_and_transformers_loads_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = small_config(num_labels=len(BIO_TAGS), id2label=dict(enumerate(BIO_TAGS)))
    torch.manual_seed(0)
    model = crf.BertCRFForTokenClassification(config, constraints="BIO").eval()
    with torch.no_grad():
        for p in model.crf.parameters():
            p.normal_()
    model.save_pretrained(tmp_path)
    again = crf.BertCRFForTokenClassification.from_pretrained(tmp_path).eval()
    assert again.load_report.missing_initialised == [] and again.load_report.unexpected == []
    for k, v in model.crf.state_dict().items():
        assert torch.equal(v, again.crf.state_dict()[k]), k
    assert not again.crf.allowed_start[2]                     # the BIO constraints came back too
    ids, attn = torch.randint(1, config.vocab_size, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    scored = torch.ones(2, 9, dtype=torch.bool)
    assert model.decode(ids, attn, scored=scored) == again.decode(ids, attn, scored=scored)
    hf = transformers.BertForTokenClassification.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        assert (hf(input_ids=ids, attention_mask=attn).logits - model(ids, attn).logits).abs().max() <= 1e-5
    # A plain token-classification checkpoint: the CRF is new, and reported as such.
    plain_dir = tmp_path / "plain"
    minift.BertForTokenClassification(config).save_pretrained(plain_dir)
    fresh = crf.BertCRFForTokenClassification.from_pretrained(plain_dir)
    new = set(fresh.load_report.missing_initialised)
    assert {"crf.transitions", "crf.start_transitions", "crf.end_transitions"} <= new
    assert not fresh.load_report.unexpected
    assert fresh.crf.allowed_start.all()                     # no constraints unless asked for
    bio = crf.BertCRFForTokenClassification.from_pretrained(plain_dir, constraints="BIO")
    assert torch.equal(bio.crf.allowed_transitions, crf.bio_constraints(BIO_TAGS)[1])


def test_short_training_on_ud_ewt_lowers_held_out_nll(tokenizer):
    from minift.ewt import ud_english_ewt
    ds = ud_english_ewt()
    train, dev = ds.train[:96], ds.dev[:48]
    enc_train, enc_dev = (encode_tokens(tokenizer, part, ds.labels, 48) for part in (train, dev))
    torch.manual_seed(0)
    config = minift.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                               num_labels=len(ds.labels), id2label=dict(enumerate(ds.labels)),
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = crf.BertCRFForTokenClassification(config)
    dev_batch = collate(enc_dev, list(range(len(dev))))

    def dev_nll():
        model.eval()
        with torch.no_grad():
            return model(dev_batch["input_ids"], dev_batch["attention_mask"], labels=dev_batch["labels"]).loss.item()

    before = dev_nll()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    model.train()
    for epoch in range(4):
        for i in range(0, len(train), 16):
            b = collate(enc_train, order[i:i + 16])
            loss = model(b["input_ids"], b["attention_mask"], labels=b["labels"]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = dev_nll()
    assert after < 0.8 * before, (before, after)
    assert model.crf.transitions.abs().max() > 0.01          # the CRF itself learned
