"""Readers of user data (errors name file, line and problem), the split, and the metrics."""
import random

import pytest

from minift import data, metrics, tasks
from minift.config import IGNORE_INDEX


def test_rotten_tomatoes_split_is_the_documented_one():
    ds = tasks.rotten_tomatoes()
    assert (len(ds.train), len(ds.dev), len(ds.test)) == (10207, 1267, 1278)
    assert ds.labels == ["rotten", "fresh"]
    assert all(data.split_of(e.text) == "test" for e in ds.test)
    assert not {e.text for e in ds.train} & {e.text for e in ds.test}


def test_bbc_news():
    ds = tasks.bbc_news()
    assert len(ds.train) + len(ds.dev) + len(ds.test) == 2225
    assert ds.labels == ["business", "entertainment", "politics", "sports", "tech"]


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_csv_and_jsonl(tmp_path):
    c = write(tmp_path, "a.csv", 'text,label,text_pair\n"Great, really",pos,q1\nbad,neg,\n')
    ex = data.read_classification_file(c)
    assert [(e.text, e.label, e.text_pair) for e in ex] == [("Great, really", "pos", "q1"), ("bad", "neg", None)]
    j = write(tmp_path, "a.jsonl", '{"text": "fine", "label": 1}\n\n{"text": "meh", "label": 0}\n')
    assert [e.label for e in data.read_classification_file(j)] == ["1", "0"]


@pytest.mark.parametrize("name,content,msg", [
    ("missing.csv", "sentence,label\nhi,pos\n", r"missing.csv, line 1: missing column\(s\) \['text'\]"),
    ("empty.csv", "", r"empty.csv: the file is empty"),
    ("header_only.csv", "text,label\n", r"header_only.csv: the file has no examples"),
    ("blank_label.csv", "text,label\nhi,pos\nyo,\n", r"blank_label.csv, line 3: missing or empty 'label'"),
    ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": oops}\n', r"bad.jsonl, line 2: not valid JSON"),
    ("nolabel.jsonl", '{"text": "a"}\n', r"nolabel.jsonl, line 1: missing or empty 'label'"),
])
def test_classification_file_errors(tmp_path, name, content, msg):
    with pytest.raises(ValueError, match=msg):
        data.read_classification_file(write(tmp_path, name, content))


def test_conll(tmp_path):
    p = write(tmp_path, "a.conll", "-DOCSTART- O\n\nEU B-ORG\nrejects O\n\nPeter B-PER\nBlackburn I-PER\n")
    sents = data.read_conll(p)
    assert [s.text for s in sents] == [["EU", "rejects"], ["Peter", "Blackburn"]]
    assert sents[1].label == ["B-PER", "I-PER"]
    bad = write(tmp_path, "bad.conll", "EU NNP B-ORG\nrejects VBZ O\nGerman JJ\n")
    with pytest.raises(ValueError, match=r"bad.conll, line 3: expected 3 columns.*got 2"):
        data.read_conll(bad)
    with pytest.raises(ValueError, match="has no sentences"):
        data.read_conll(write(tmp_path, "empty.conll", "\n\n"))


def test_unseen_label_in_dev(tmp_path):
    tr = write(tmp_path, "tr.csv", "text,label\na,x\nb,y\n")
    dv = write(tmp_path, "dv.csv", "text,label\nc,x\nd,z\n")
    with pytest.raises(ValueError, match=r"dv.csv, example 2: label 'z' was not seen in training"):
        data.from_files(tr, dv, None, token_task=False)


def test_truncation_is_counted(tokenizer):
    ex = [data.Example("word " * 300, "a"), data.Example("short", "b")]
    enc = data.encode_classification(tokenizer, ex, ["a", "b"], max_length=32)
    assert enc.num_truncated == 1 and len(enc.input_ids[0]) == 32


def test_first_subword_gets_the_tag(tokenizer):
    ex = [data.Example(["Gratuitously", "violent", "."], ["ADV", "ADJ", "PUNCT"])]
    enc = data.encode_tokens(tokenizer, ex, ["ADJ", "ADV", "PUNCT"], max_length=32)
    toks = tokenizer.backend.encode(["Gratuitously", "violent", "."], is_pretokenized=True)
    tags = enc.labels[0]
    assert tags[0] == IGNORE_INDEX and tags[-1] == IGNORE_INDEX                      # [CLS], [SEP]
    firsts = [i for i, w in enumerate(toks.word_ids) if w is not None and (i == 0 or toks.word_ids[i - 1] != w)]
    assert [tags[i] for i in firsts] == [1, 0, 2]
    assert sum(t != IGNORE_INDEX for t in tags) == 3                        # one scored position per word


def test_classification_report_by_hand():
    pred, gold = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
    r = metrics.classification_report(pred, gold, ["a", "b", "c"])
    assert r["a"]["precision"] == 0.5 and r["a"]["recall"] == 0.5
    assert r["b"]["precision"] == 1.0 and r["b"]["recall"] == pytest.approx(2 / 3)
    assert r["accuracy"] == pytest.approx(4 / 6)


def test_entity_f1_matches_seqeval():
    seqeval = pytest.importorskip("seqeval.metrics")
    rng = random.Random(0)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    gold = [[rng.choice(tags) for _ in range(rng.randint(1, 15))] for _ in range(300)]
    pred = [[t if rng.random() < 0.7 else rng.choice(tags) for t in s] for s in gold]
    ours = metrics.entity_f1(pred, gold)
    assert ours["f1"] == pytest.approx(seqeval.f1_score(gold, pred), abs=1e-12)
    assert ours["precision"] == pytest.approx(seqeval.precision_score(gold, pred), abs=1e-12)
    assert ours["recall"] == pytest.approx(seqeval.recall_score(gold, pred), abs=1e-12)
    rep = seqeval.classification_report(gold, pred, output_dict=True)
    for kind in ("PER", "LOC", "ORG"):
        assert ours["per_type"][kind]["f1"] == pytest.approx(rep[kind]["f1-score"], abs=1e-12)
        assert ours["per_type"][kind]["support"] == rep[kind]["support"]


def test_is_bio_tells_entity_tags_from_other_tags():
    assert metrics.is_bio(["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])
    assert metrics.is_bio(["O", "S-LOC", "B-LOC", "I-LOC", "E-LOC"])          # IOBES
    assert not metrics.is_bio(["NOUN", "VERB", "ADJ"])                       # UPOS
    assert not metrics.is_bio(["O", "I-PER"])                                # nothing begins an entity
    assert not metrics.is_bio(["O", "B-PER", "B-"])                          # a tag without a type
    assert not metrics.is_bio(["O", "B-PER", "PUNCT"])


def test_token_scores_add_entity_scores_only_for_bio_tags():
    seqeval = pytest.importorskip("seqeval.metrics")
    names = ["O", "B-PER", "I-PER", "B-LOC"]
    gold = [[1, 2, 0, 3], [0, 0, 1], [3, 0]]
    pred = [[1, 2, 0, 0], [0, 1, 2], [3, 0]]
    s = metrics.token_scores(pred, gold, names)
    flat_p, flat_g = sum(pred, []), sum(gold, [])
    assert s["accuracy"] == sum(p == g for p, g in zip(flat_p, flat_g)) / len(flat_g)
    as_tags = lambda seqs: [[names[t] for t in x] for x in seqs]                  # noqa: E731
    assert s["entity_f1"] == pytest.approx(seqeval.f1_score(as_tags(gold), as_tags(pred)), abs=1e-12)
    assert s["entity_precision"] == pytest.approx(seqeval.precision_score(as_tags(gold), as_tags(pred)), abs=1e-12)
    assert s["entity_recall"] == pytest.approx(seqeval.recall_score(as_tags(gold), as_tags(pred)), abs=1e-12)
    assert "entity_f1" not in metrics.token_scores(pred, gold, ["NOUN", "VERB", "ADJ", "DET"])
