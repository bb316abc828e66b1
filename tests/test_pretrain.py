"""minift pretrain and predict --mlm: masked-LM training on real text, its checkpoint in transformers,
fine-tuning from it, fill-in-the-blank, resume, and the mistakes a user can make.

(The masking rule's statistics and the gathered-positions loss against the full-sequence loss with
ignore_index are in tests/test_masking.py.)
"""
import contextlib
import csv
import io
import json
import math
from pathlib import Path

import pytest
import torch

import minift
from minift import cli, tasks
from minift import pretraining as P
from minift.config import TrainConfig
from minift.ops import extension_available


def run_cli(*argv):
    """minift in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """Real review snippets as plain text files: 600 lines to train on, 150 held out (the task's dev split)."""
    d = tmp_path_factory.mktemp("text")
    ds = tasks.rotten_tomatoes()
    (d / "train.txt").write_text("\n".join(ex.text for ex in ds.train[:600]) + "\n", encoding="utf-8")
    (d / "dev.txt").write_text("\n".join(ex.text for ex in ds.dev[:150]) + "\n", encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def run(texts, tmp_path_factory):
    """`minift pretrain --config tiny`: 38 steps (2 epochs of 19) on 600 snippets; about 10 s on one thread."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    code, stdout, stderr = run_cli("pretrain", "--config", "tiny", "--text", texts / "train.txt", "--dev",
                                   texts / "dev.txt", "--epochs", 2, "--lr", 2e-3, "--out", out, "--no-progress",
                                   "--log-every", 5, "--device", "cpu")
    assert code == 0, stderr
    return out, stdout


def test_pretraining_lowers_held_out_loss_on_real_text(run):
    out, stdout = run
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["history"][0], metrics["history"][-1]
    assert before["epoch"] == 0 and after["epoch"] == 2 and metrics["problem"] == "masked_lm"
    # From the uniform guess over 30,522 tokens (log V = 10.33) to well below it: the word frequencies
    # and more. Every epoch is scored on the same held-out masks.
    assert before["dev_mlm_loss"] > 10.0
    assert after["dev_mlm_loss"] < before["dev_mlm_loss"] - 2.0
    assert metrics["dev_perplexity"] == pytest.approx(math.exp(metrics["dev_mlm_loss"]), rel=1e-12)
    assert "held-out perplexity" in stdout and "model: a new BERT from scratch (--config tiny" in stdout
    if extension_available():
        assert "fused softmax-cross-entropy (minift.ops.softmax_cross_entropy)" in stdout
    assert "C = 30,522" in stdout
    lines = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert lines[0]["epoch"] == 0 and "dev_perplexity" in lines[0]          # the "before" point
    assert any("loss" in x and "step" in x for x in lines)
    assert [x["epoch"] for x in lines if "dev_perplexity" in x] == [0, 1, 2]
    assert (out / "training.png").stat().st_size > 5000
    info = json.loads((out / "last" / "run.json").read_text())
    assert info["masking"]["mlm_probability"] == 0.15 and info["settings"]["config"] == "tiny"


def test_checkpoint_is_hugging_face_format_with_equal_mlm_logits(run):
    transformers = pytest.importorskip("transformers")
    best = run[0] / "best"
    config = json.loads((best / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"]
    from safetensors.torch import load_file
    keys = set(load_file(str(best / "model.safetensors")))
    assert {"cls.predictions.bias", "cls.predictions.transform.dense.weight",
            "bert.embeddings.word_embeddings.weight"} <= keys
    assert not any("pooler" in k for k in keys)           # from scratch: no pooler, as HF's BertForMaskedLM
    assert {"vocab.txt", "tokenizer.json"} <= {p.name for p in best.iterdir()}
    tok = minift.Tokenizer.from_pretrained(best)
    batch = tok(["the film was [MASK].", "a quiet, devastating triumph that never lets go of you", "dull."])
    ours = minift.BertForMaskedLM.from_pretrained(best).eval()
    assert not ours.load_report.missing_initialised and not ours.load_report.unexpected
    theirs = transformers.BertForMaskedLM.from_pretrained(str(best), attn_implementation="eager").eval()
    with torch.no_grad():
        a = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits
        b = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   token_type_ids=batch["token_type_ids"]).logits
    real = batch["attention_mask"].bool()
    assert a.shape == b.shape == (3, batch["input_ids"].shape[1], 30522)
    assert (a - b).abs()[real].max() <= 1e-5


def test_finetune_from_the_pretrained_checkpoint(run, tmp_path):
    ds = tasks.rotten_tomatoes()
    for name, rows in (("train", ds.train[:64]), ("dev", ds.dev[:32])):
        with open(tmp_path / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows([ex.text, ex.label] for ex in rows)
    code, stdout, stderr = run_cli("finetune", "--model", run[0] / "best", "--train", tmp_path / "train.csv",
                                   "--dev", tmp_path / "dev.csv", "--epochs", 1, "--batch-size", 32,
                                   "--out", tmp_path / "ft", "--no-progress", "--device", "cpu")
    assert code == 0, stderr
    # the MLM head is left behind, the pooler (which MLM does not train) is new, as in Hugging Face
    assert "newly initialised (not in the checkpoint): bert.pooler.dense.weight" in stdout
    assert "unused weights in the checkpoint: cls.predictions.bias" in stdout
    assert "dev_accuracy" in json.loads((tmp_path / "ft" / "metrics.json").read_text())


def test_predict_mlm_prints_top_k_for_each_mask(run):
    code, stdout, stderr = run_cli("predict", "--mlm", "--model", run[0] / "best", "--top-k", 4,
                                   "the film was [MASK].", "[MASK] is a [MASK] movie")
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[0] == "the film was [MASK]." and lines[2] == "[MASK] is a [MASK] movie"
    assert [line.split(":")[0] for line in lines] == [
        "the film was [MASK].", "  [MASK] 1", "[MASK] is a [MASK] movie", "  [MASK] 1", "  [MASK] 2"]
    for line in (lines[1], lines[3], lines[4]):
        words = line.split(": ", 1)[1].split()
        tokens, probs = words[0::2], [float(p) for p in words[1::2]]
        assert len(tokens) == 4 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


def test_fill_mask_matches_the_full_logits(run):
    best = run[0] / "best"
    model, tok = minift.BertForMaskedLM.from_pretrained(best).eval(), minift.Tokenizer.from_pretrained(best)
    [[top]] = P.fill_mask(model, tok, ["a [MASK] movie."], top_k=3)
    batch = tok(["a [MASK] movie."])
    with torch.no_grad():
        logits = model(batch["input_ids"]).logits[0, 2]                        # (V,) at the [MASK]
    p, ids = torch.softmax(logits, -1).topk(3)
    assert [t for t, _ in top] == [tok.backend.id_to_token(i) for i in ids.tolist()]
    assert [q for _, q in top] == pytest.approx(p.tolist(), abs=1e-6)


@pytest.mark.parametrize("argv,message", [
    (["the film was good."], "text 1 has no [MASK] to fill"),
    (["[MASK] here", "no mask here"], "text 2 has no [MASK]"),
    (["--top-k", "0", "a [MASK]."], "--top-k: expected 1..30522, got 0"),
])
def test_predict_mlm_errors(run, argv, message):
    code, _, stderr = run_cli("predict", "--mlm", "--model", run[0] / "best", *argv)
    assert code == 2 and message in stderr, stderr


def test_predict_mlm_refuses_a_model_without_mlm_head(tiny_model_dir):
    for model in ("minilm", tiny_model_dir):
        code, _, stderr = run_cli("predict", "--mlm", "--model", model, "the film was [MASK].")
        assert code == 2 and "has no masked-LM head" in stderr, stderr


def test_refuses_an_earlier_run_and_a_resume_that_changes_settings(run, texts):
    out = run[0]
    common = ["pretrain", "--config", "tiny", "--text", texts / "train.txt", "--dev", texts / "dev.txt",
              "--out", out, "--no-progress"]
    code, _, stderr = run_cli(*common)
    assert code == 2 and "holds an earlier run" in stderr and "--overwrite" in stderr
    code, _, stderr = run_cli(*common, "--resume", "--whole-word-mask")
    assert code == 2 and "--whole-word-mask True (the run has False)" in stderr
    code, _, stderr = run_cli(*common, "--resume", "--lr", "1e-3")
    assert code == 2 and "--lr 0.001 (the run has 0.002)" in stderr


@pytest.mark.parametrize("argv,message", [
    (["--config", "tiny", "--model", "minilm"], "--config (a new model, from scratch) and --model"),
    (["--layers", "3"], "--layers: set the size of a new model, so they need --config"),
    (["--config", "tiny", "--hidden", "100", "--heads", "3"], "--hidden 100 must be a multiple of --heads 3"),
    (["--config", "tiny", "--layers", "0"], "--layers: expected an integer >= 1"),
    (["--config", "huge"], "--config: expected one of ['tiny'] or a config.json"),
    (["--mlm-probability", "1.5"], "--mlm-probability: expected a share in (0, 1)"),
    (["--task", "sentiment", "--text", "x.txt"], "--task and --text: choose one"),
    (["--dev", "x.txt"], "--dev needs --text"),
    (["--task", "reviews"], "--task: expected one of sentiment, topic, pos"),
    (["--resume", "--overwrite"], "--resume continues the run in --out and --overwrite replaces it"),
    (["--config", "tiny", "--lr", "-1"], "--lr: expected a positive number"),
])
def test_flag_errors_before_anything_loads(argv, message, tmp_path):
    code, _, stderr = run_cli("pretrain", "--out", tmp_path / "out", *argv)
    assert code == 2 and message in stderr, stderr


def test_training_defaults_depend_on_from_scratch_or_continued(tmp_path):
    parser = cli.build_parser()

    def check(*argv):
        args = parser.parse_args(["pretrain", "--out", str(tmp_path / "out"), *argv])
        cfg, info, model_config = cli._check_pretrain_args(args)
        return cfg, model_config
    cfg, model_config = check("--config", "tiny")
    assert (cfg.lr, cfg.epochs) == (1e-3, 10.0) and model_config.hidden_size == 128
    cfg, model_config = check()                                          # MiniLM, continued
    assert (cfg.lr, cfg.epochs) == (1e-4, 1.0) and model_config.hidden_size == 384
    cfg, model_config = check("--config", "tiny", "--lr", "5e-4", "--layers", "4", "--heads", "4")
    assert cfg.lr == 5e-4 and (model_config.num_hidden_layers, model_config.num_attention_heads,
                               model_config.hidden_size) == (4, 4, 128)


def test_text_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "one.txt").write_text("a single line\n")
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 1000, "hidden_size": 64, "num_attention_heads": 4}))
    cases = [(["--text", tmp_path / "empty.txt"], "no text (every line is blank)"),
             (["--text", tmp_path / "folder"], "the folder has no .txt files"),
             (["--text", tmp_path / "missing.txt"], "no such file or folder"),
             (["--text", tmp_path / "one.txt"], "too few lines to hold out"),
             (["--config", tmp_path / "config.json"], "vocab_size 1000, but the model learns the bundled MiniLM")]
    for argv, message in cases:
        code, _, stderr = run_cli("pretrain", "--out", tmp_path / "out", *argv)
        assert code == 2 and message in stderr, (argv, stderr)


def test_corpora_and_long_lines(tmp_path, tokenizer):
    rt = P.corpus_from_task("sentiment")
    assert (len(rt.train), len(rt.dev), len(rt.test)) == (10207, 1267, 1278)
    # a folder: every .txt file in it, one example per non-blank line; held out by the SHA-1 of the line
    (tmp_path / "a").mkdir()
    lines = [f"line number {i} of a small corpus" for i in range(200)]
    (tmp_path / "a" / "one.txt").write_text("\n".join(lines[:100]) + "\n\n")
    (tmp_path / "a" / "two.txt").write_text("\n".join(lines[100:]))
    (tmp_path / "a" / "skip.csv").write_text("not,text\n")
    c = P.corpus_from_files(tmp_path / "a")
    assert sorted(c.train + c.dev) == sorted(lines) and 0 < len(c.dev) < 50 and not c.test
    # a line longer than max_length is cut into pieces, nothing dropped
    long = " ".join(f"word{i}" for i in range(60))
    ids = P.encode_text(tokenizer, [long, "short one"], max_length=16)
    assert ids.num_split == 1 and all(len(x) <= 16 for x in ids.input_ids)
    inner = [t for x in ids.input_ids[:-1] for t in x[1:-1]]
    assert inner == tokenizer.backend.encode(long, add_special_tokens=False).ids
    assert all(x[0] == tokenizer.cls_token_id and x[-1] == tokenizer.sep_token_id for x in ids.input_ids)


def test_a_tokenizer_built_from_vocab_txt_keeps_special_tokens_whole(tokenizer, minilm_dir):
    from_vocab = minift.Tokenizer.from_vocab(minilm_dir / "vocab.txt")
    text = "The film was [MASK]. [SEP] isn't [UNK]"
    assert from_vocab.tokenize(text) == tokenizer.tokenize(text) == \
        ["the", "film", "was", "[MASK]", ".", "[SEP]", "isn", "'", "t", "[UNK]"]


def small_trainer(out, tokenizer, corpus, torch_seed=0, whole_word_mask=False, **cfg):
    """A 1-layer, H = 32 model from scratch on ``corpus``: 3 epochs of 6 steps, a second or two."""
    torch.manual_seed(torch_seed)
    config = P.scratch_config("tiny", num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                              intermediate_size=64)
    model = minift.BertForMaskedLM(config)
    cfg = TrainConfig(**{"lr": 2e-3, "epochs": 3, "batch_size": 16, "progress": False, "seed": 3, **cfg})
    return P.PretrainTrainer(model, tokenizer, corpus, cfg, out, log=lambda *a: None, whole_word_mask=whole_word_mask)


@pytest.fixture(scope="module")
def small_corpus():
    rt = P.corpus_from_task("sentiment")
    return P.Corpus("rt_small", rt.train[:96], rt.dev[:48], [])


def test_dynamic_masks_reproducible_held_out_masks_fixed(small_corpus, tokenizer, tmp_path):
    a = small_trainer(tmp_path / "a", tokenizer, small_corpus)
    e0, e0_again, e1 = a.masked_train(0), a.masked_train(0), a.masked_train(1)
    assert e0.input_ids == e0_again.input_ids and e0.labels == e0_again.labels        # seeded
    assert e0.labels != e1.labels                                                     # new masks each epoch
    assert sum(t != -100 for row in e0.labels for t in row) > 0.1 * sum(len(r) - 2 for r in e0.labels)
    # the held-out masks do not depend on the run's seed or masking mode
    b = small_trainer(tmp_path / "b", tokenizer, small_corpus, seed=11, whole_word_mask=True)
    assert b.masked_train(0).labels != e0.labels
    assert a.dev_set.labels == b.dev_set.labels and a.dev_set.input_ids == b.dev_set.input_ids


def test_whole_word_masking_in_training(small_corpus, tokenizer, tmp_path):
    tr = P.PretrainTrainer(minift.BertForMaskedLM(P.scratch_config("tiny", hidden_size=32, intermediate_size=64)),
                           tokenizer, small_corpus, TrainConfig(progress=False), tmp_path, whole_word_mask=True)
    labels, words = tr.masked_train(0).labels, tr.text["train"].word_ids
    split_words = 0
    for lab, wid in zip(labels, words):
        for w in set(wid) - {-1}:
            chosen = {lab[t] != -100 for t, x in enumerate(wid) if x == w}
            assert len(chosen) == 1, "a word is chosen whole or not at all"
            split_words += sum(x == w for x in wid) > 1
    assert split_words > 20


@pytest.mark.skipif(not extension_available(), reason="the compiled extension is not built")
def test_the_loss_runs_through_the_fused_softmax_cross_entropy(small_corpus, tokenizer, tmp_path):
    tr = small_trainer(tmp_path, tokenizer, small_corpus)
    tr.model.set_impl("fused")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        tr.train_step(list(range(16)))
    names = {e.name for e in prof.events()}
    assert "minift::xent_fwd" in names and "minift::xent_bwd" in names, sorted(n for n in names if "minift" in n)


def test_resume_equals_uninterrupted(small_corpus, tokenizer, tmp_path):
    full = small_trainer(tmp_path / "full", tokenizer, small_corpus)
    m_full = full.fit()
    killed = small_trainer(tmp_path / "killed", tokenizer, small_corpus)
    original = killed.train_step

    def dies_in_epoch_2(indices):
        if killed.epoch == 1 and killed.schedule.last_step == killed.steps_per_epoch + 2:
            raise KeyboardInterrupt("killed")
        return original(indices)
    killed.train_step = dies_in_epoch_2
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    resumed = small_trainer(tmp_path / "killed", tokenizer, small_corpus, torch_seed=12345)  # other RNG state
    resumed.resume()
    assert resumed.epoch == 1
    m_res = resumed.fit()
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert [e["dev_mlm_loss"] for e in m_full["history"]] == [e["dev_mlm_loss"] for e in m_res["history"]]
    assert m_full["history"][-1]["dev_mlm_loss"] < m_full["history"][0]["dev_mlm_loss"]

    def log(run):
        return [(r.get("step"), r["epoch"], r.get("loss"), r.get("dev_mlm_loss"))
                for r in map(json.loads, (tmp_path / run / "train_log.jsonl").read_text().splitlines())]
    assert log("killed") == log("full")
    # a resume with other masking is refused
    other = small_trainer(tmp_path / "killed", tokenizer, small_corpus, whole_word_mask=True)
    with pytest.raises(ValueError, match="whole_word_mask True \\(the run has False\\)"):
        other.resume()


def test_continued_from_minilm_reports_the_new_head_and_keeps_the_pooler(texts, tmp_path):
    """One step on 16 snippets: the MLM head is new (said so), the pooler passes through unchanged."""
    out = tmp_path / "run"
    dev = tmp_path / "dev.txt"
    dev.write_text("\n".join((texts / "dev.txt").read_text().splitlines()[:40]))
    code, stdout, stderr = run_cli("pretrain", "--text", texts / "train.txt", "--dev", dev,
                                   "--max-train-examples", 16, "--batch-size", 16, "--epochs", 1,
                                   "--eval-batch-size", 64, "--out", out, "--no-progress", "--device", "cpu")
    assert code == 0, stderr
    assert "the masked-LM head is new (not in the checkpoint; initialised at random): cls.predictions.bias" in stdout
    assert "kept unchanged in the output (masked-LM training does not use it): bert.pooler.dense.bias" in stdout
    from safetensors.torch import load_file
    from minift.pretrained import resolve
    saved, original = load_file(str(out / "best" / "model.safetensors")), \
        load_file(str(resolve("minilm") / "model.safetensors"))
    assert torch.equal(saved["bert.pooler.dense.weight"], original["pooler.dense.weight"])
    assert not torch.equal(saved["bert.embeddings.word_embeddings.weight"],
                           original["embeddings.word_embeddings.weight"])
    clf = minift.BertForSequenceClassification.from_pretrained(out / "best")
    assert clf.load_report.missing_initialised == ["classifier.weight", "classifier.bias"]


def test_torchrun_two_processes_equal_one(texts, tmp_path):
    """Masks are drawn per piece, not per batch or process: two processes train what one does
    (dropout off, since each process draws its own dropout masks)."""
    import os
    import subprocess
    import sys
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                                  "intermediate_size": 64, "hidden_dropout_prob": 0.0,
                                  "attention_probs_dropout_prob": 0.0}))
    train, dev = tmp_path / "train.txt", tmp_path / "dev.txt"
    train.write_text("\n".join((texts / "train.txt").read_text().splitlines()[:128]))
    dev.write_text("\n".join((texts / "dev.txt").read_text().splitlines()[:40]))
    common = ["pretrain", "--config", str(config), "--text", str(train), "--dev", str(dev), "--epochs", "2",
              "--batch-size", "16", "--lr", "2e-3", "--no-progress", "--device", "cpu",
              "--precision", "fp32"]
    code, _, stderr = run_cli(*common, "--out", tmp_path / "one")
    assert code == 0, stderr
    root = Path(__file__).resolve().parent.parent
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "minift.cli", *common, "--out", str(tmp_path / "two")], cwd=root,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "(2 process(es))" in two.stdout
    from safetensors.torch import load_file
    a, b = load_file(str(tmp_path / "one" / "last" / "model.safetensors")), \
        load_file(str(tmp_path / "two" / "last" / "model.safetensors"))
    assert set(a) == set(b) and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    history = [json.loads((tmp_path / run / "metrics.json").read_text())["history"] for run in ("one", "two")]
    assert [e["dev_mlm_loss"] for e in history[0]] == pytest.approx([e["dev_mlm_loss"] for e in history[1]], abs=1e-6)


def test_pretrain_flags_name_every_corpus_and_no_label_options():
    """--task's help lists every bundled corpus; the options about labelled classes are not offered."""
    from minift.cli import build_parser
    from minift.tasks import TASKS
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["pretrain"]
    flags = {o: a for a in sub._actions for o in a.option_strings}
    assert all(name in flags["--task"].help for name in TASKS), flags["--task"].help
    assert "--class-weights" not in flags and "--sampler" not in flags
