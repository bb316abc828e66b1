"""minift.Tokenizer against transformers' BertTokenizerFast on the same vocabulary."""
import pytest
import torch

import minift

transformers = pytest.importorskip("transformers")

TEXTS = ["Hello, World!", "Ünïcödé café naïve résumé — Crème Brûlée", "東京タワー is 333m tall.",
         "don't   stop\tthe\nmusic", "supercalifragilisticexpialidocious antidisestablishmentarianism", ""]
PAIRS = ["a", "Second segment, a bit longer than the first one.", "ß and ﬁ ligature", "x", "y", "z"]


@pytest.fixture(scope="module")
def hf_tok(minilm_dir):
    return transformers.BertTokenizerFast.from_pretrained(str(minilm_dir))


@pytest.fixture(scope="module", params=["tokenizer.json", "vocab.txt"])
def ours(request, minilm_dir):
    if request.param == "tokenizer.json":
        return minift.Tokenizer.from_pretrained("minilm")
    return minift.Tokenizer.from_vocab(minilm_dir / "vocab.txt", lowercase=True)


def _same(ours_out, theirs_out):
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(ours_out[key], theirs_out[key]), key


def test_single_sentences(ours, hf_tok):
    _same(ours(TEXTS), hf_tok(TEXTS, padding=True, return_tensors="pt"))


def test_pairs(ours, hf_tok):
    _same(ours(TEXTS, pairs=PAIRS), hf_tok(TEXTS, PAIRS, padding=True, return_tensors="pt"))


@pytest.mark.parametrize("max_length", [5, 9, 16])
def test_truncation_longest_first(ours, hf_tok, max_length):
    a = ours(TEXTS, pairs=PAIRS, max_length=max_length)
    b = hf_tok(TEXTS, PAIRS, padding=True, truncation="longest_first", max_length=max_length, return_tensors="pt")
    _same(a, b)
    assert a["input_ids"].shape[1] <= max_length
    assert a["num_truncated"] > 0


def test_words_offsets_and_word_ids(ours, hf_tok):
    words = [["Gratuitous", "violence", "!"], ["naïve", "résumé"]]
    a = ours(words, is_split_into_words=True)
    b = hf_tok(words, is_split_into_words=True, padding=True, return_tensors="pt")
    _same(a, b)
    assert a["word_ids"][0] == b.word_ids(0)
    assert a["word_ids"][1] == b.word_ids(1)
    text = "Gratuitous violence!"
    c = ours([text], return_offsets=True)
    d = hf_tok([text], return_offsets_mapping=True, return_tensors="pt")
    assert torch.equal(c["offset_mapping"], d["offset_mapping"])


def test_default_limit_is_model_max_length(ours):
    out = ours(["word " * 1000])
    assert out["input_ids"].shape[1] == 512
    assert out["num_truncated"] == 1


def test_bad_inputs(ours):
    with pytest.raises(ValueError, match="pairs: expected 2"):
        ours(["a", "b"], pairs=["only one"])
    with pytest.raises(ValueError, match="max_length"):
        ours(["a"], pairs=["b"], max_length=3)


def test_save_and_reload(ours, tmp_path):
    ours.save_pretrained(tmp_path)
    again = minift.Tokenizer.from_pretrained(tmp_path)
    _same(ours(TEXTS, pairs=PAIRS), again(TEXTS, pairs=PAIRS))
