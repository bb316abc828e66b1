"""The command line as a hostile but ordinary user meets it (issue 14): every mistake is one line on
stderr with exit status 2, nothing earlier is lost, nothing is silently ignored; bugs keep their
traceback. Each test names the item of the issue it covers."""
import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minift import cli, tasks

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Real review snippets as the user's CSV files: 64 train, 16 dev, 16 test."""
    d = tmp_path_factory.mktemp("data")
    ds = tasks.rotten_tomatoes()
    for name, rows in (("train", ds.train[:64]), ("dev", ds.dev[:16]), ("test", ds.test[:16])):
        with open(d / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows([ex.text, ex.label] for ex in rows)
    return d


@pytest.fixture(scope="module")
def base(files, tiny_model_dir):
    return ["finetune", "--model", str(tiny_model_dir), "--train", str(files / "train.csv"),
            "--dev", str(files / "dev.csv"), "--epochs", "1", "--batch-size", "16", "--lr", "1e-3",
            "--max-length", "32", "--no-progress", "--device", "cpu", "--impl", "torch"]


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def user_error(code, err, *pieces):
    """Exit 2, one line on stderr, no traceback, and the line says each of ``pieces``."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for p in pieces:
        assert p in lines[0], (p, lines[0])
    return lines[0]


def tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(folder).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def finished(tmp_path_factory, base):
    """A finished 2-epoch run, kept pristine: tests copy it."""
    out = tmp_path_factory.mktemp("runs") / "done"
    assert cli.main([*base, "--epochs", "2", "--out", str(out)]) == 0
    return out


def copy_run(finished, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


# --- Earlier work destroyed ---------------------------------------------------------------------

def test_new_run_into_an_earlier_run_refuses_and_keeps_it(finished, base, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    (out / "best" / "notes.txt").write_text("mine")
    before = tree_hash(out)
    code, _, err = run([*base, "--lr", "5e-2", "--out", out], capsys)
    user_error(code, err, str(out), "earlier run", "--overwrite", "--resume")
    assert tree_hash(out) == before


def test_overwrite_replaces_the_run_but_keeps_the_users_files(finished, base, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    (out / "best" / "notes.txt").write_text("mine")
    (out / "README.txt").write_text("also mine")
    old_best = (out / "best" / "model.safetensors").read_bytes()
    code, _, err = run([*base, "--seed", "7", "--out", out, "--overwrite"], capsys)
    assert code == 0, err
    assert (out / "best" / "notes.txt").read_text() == "mine"
    assert (out / "README.txt").read_text() == "also mine"
    assert (out / "best" / "model.safetensors").read_bytes() != old_best
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if "train_loss" in r] == [1]      # this run's one epoch only
    assert json.loads((out / "metrics.json").read_text())["config"]["seed"] == 7


def test_a_second_run_into_a_locked_folder_fails_at_once_naming_the_pid(base, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from minift import checkpoint; "
                               f"checkpoint.acquire_lock({str(out)!r}); print('locked', flush=True); time.sleep(120)"],
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = run([*base, "--out", out], capsys)
        user_error(code, err, f"pid {holder.pid}", "another minift run")
        assert not (out / "best").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock file is left, with its pid, and is taken over.
    assert (out / ".lock").read_text().strip() == str(holder.pid)
    code, _, err = run([*base, "--out", out], capsys)
    assert code == 0, err


def test_checkpoint_temp_folders_have_unique_names(tmp_path):
    from minift import checkpoint
    seen = []
    for _ in range(2):
        checkpoint.atomic_dir_write(tmp_path / "best", lambda tmp: (seen.append(tmp.name),
                                                                    (tmp / "x").write_text(tmp.name)))
    assert len(set(seen)) == 2 and all(n.startswith(".best.tmp-") for n in seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


# --- Silent wrong results ----------------------------------------------------------------------

def test_unquoted_comma_is_named_with_its_line(base, files, tmp_path, capsys):
    bad = tmp_path / "train.csv"
    text = (files / "train.csv").read_text(encoding="utf-8").splitlines()
    text.insert(5, "loved it, really,fresh")
    bad.write_text("\n".join(text) + "\n", encoding="utf-8")
    argv = [*base, "--out", tmp_path / "o"]
    argv[argv.index("--train") + 1] = str(bad)
    code, _, err = run(argv, capsys)
    user_error(code, err, f"{bad}, line 6", "3 fields", "double quotes")


def test_a_class_with_one_row_is_reported_with_its_line(base, files, tmp_path, capsys):
    bad = tmp_path / "train.csv"
    text = (files / "train.csv").read_text(encoding="utf-8").splitlines()
    text.insert(3, "a lovely film,frseh")
    bad.write_text("\n".join(text) + "\n", encoding="utf-8")
    argv = [*base, "--out", tmp_path / "o"]
    argv[argv.index("--train") + 1] = str(bad)
    code, _, err = run(argv, capsys)
    user_error(code, err, "'frseh' on line(s) 4")


@pytest.mark.parametrize("flag,value,expected", [
    ("--batch-size", "-4", "--batch-size: expected an integer >= 1, got -4"),
    ("--batch-size", "0", "--batch-size: expected an integer >= 1, got 0"),
    ("--grad-accum", "-1", "--grad-accum: expected an integer >= 1, got -1"),
    ("--grad-accum", "0", "--grad-accum: expected an integer >= 1, got 0"),
    ("--lr", "0", "--lr: expected a positive number, got 0.0"),
    ("--warmup-ratio", "5", "--warmup-ratio: expected a share in [0, 1), got 5.0"),
    ("--clip", "-1", "--clip: expected a number >= 0 (0: off), got -1.0"),
    ("--max-train-examples", "-5", "--max-train-examples: expected an integer >= 0 (0: all), got -5"),
    ("--max-length", "100", "--max-length: the model reads at most 64 tokens"),
    ("--epochs", "nan", "--epochs: expected a positive number, got nan"),
])
def test_out_of_range_flags_are_refused_before_training(base, tmp_path, capsys, flag, value, expected):
    out = tmp_path / "o"
    code, _, err = run([*base, flag, value, "--out", out], capsys)
    user_error(code, err, expected)
    assert not out.exists() or not any(out.iterdir())                   # nothing trained, nothing written


def test_no_test_file_no_test_metric(finished, capsys):
    metrics = json.loads((finished / "metrics.json").read_text())
    assert "dev_accuracy" in metrics
    assert not [k for k in metrics if k.startswith("test_")]


def test_with_a_test_file_the_test_metric_is_there(base, files, tmp_path, capsys):
    code, out_text, err = run([*base, "--test", files / "test.csv", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and "test accuracy" in out_text


# --- Tracebacks instead of messages --------------------------------------------------------------

def test_out_names_a_file(base, tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    code, _, err = run([*base, "--out", f], capsys)
    user_error(code, err, str(f), "is a file")


def _read_only_folder(tmp_path) -> Path:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if not os.access(ro, os.W_OK):
        return ro / "run"
    if Path("/sys").is_dir() and not os.access("/sys", os.W_OK):   # root: /sys is read-only for everyone
        return Path("/sys") / "minift-test-run"
    pytest.skip("no read-only folder available")


def test_out_in_a_read_only_folder(base, tmp_path, capsys):
    out = _read_only_folder(tmp_path)
    code, _, err = run([*base, "--out", out], capsys)
    user_error(code, err, "--out", "cannot")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(base, tmp_path, capsys):
    code, _, err = run([*base, "--device", "cuda", "--out", tmp_path / "o"], capsys)
    user_error(code, err, "--device cuda", "no usable CUDA GPU")


def test_truncated_weights_are_named(tiny_model_dir, base, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    argv = [*base, "--out", tmp_path / "o"]
    argv[argv.index("--model") + 1] = str(broken)
    code, _, err = run(argv, capsys)
    user_error(code, err, str(weights), "damaged or incomplete")


def test_invalid_config_json_is_named(tiny_model_dir, base, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["num_attention_heads"] = 5                                    # 32 is not a multiple of 5
    (broken / "config.json").write_text(json.dumps(cfg))
    argv = [*base, "--out", tmp_path / "o"]
    argv[argv.index("--model") + 1] = str(broken)
    code, _, err = run(argv, capsys)
    user_error(code, err, str(broken / "config.json"), "multiple of num_attention_heads")
    (broken / "config.json").write_text("{not json")
    for command in (argv, ["predict", "--model", broken, "hello"]):
        code, _, err = run(command, capsys)
        user_error(code, err, str(broken / "config.json"), "not valid JSON")


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_missing_model_folder_is_named(tmp_path, capsys, command):
    missing = tmp_path / "nope"
    extra = ["hello"] if command == "predict" else []
    code, _, err = run([command, "--model", missing, *extra], capsys)
    line = user_error(code, err, str(missing))
    assert "id2label" not in line


def test_latin1_file_is_named_with_its_line_and_encoding_reads_it(base, files, tmp_path, capsys):
    bad = tmp_path / "train.csv"
    text = (files / "train.csv").read_text(encoding="utf-8").splitlines()
    text = [t.encode("ascii", "replace").decode() for t in text]
    text[6] = "un film très réussi,fresh"
    bad.write_bytes(("\n".join(text) + "\n").encode("latin-1"))
    argv = [*base, "--out", tmp_path / "o"]
    argv[argv.index("--train") + 1] = str(bad)
    code, _, err = run(argv, capsys)
    user_error(code, err, f"{bad}, line 7", "not valid utf-8", "--encoding")
    code, _, err = run([*argv, "--encoding", "latin-1"], capsys)
    assert code == 0, err


def test_a_byte_order_mark_is_accepted(base, files, tmp_path, capsys):
    bom = tmp_path / "train.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + (files / "train.csv").read_bytes())
    argv = [*base, "--out", tmp_path / "o"]
    argv[argv.index("--train") + 1] = str(bom)
    code, _, err = run(argv, capsys)
    assert code == 0, err


def test_predict_names_bad_stdin_a_folder_and_empty_texts(finished, tmp_path, capsys, monkeypatch):
    import io
    model = finished / "best"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("fine film\n".encode() + "caf\xe9\n".encode("latin-1"))))
    code, _, err = run(["predict", "--model", model], capsys)
    user_error(code, err, "standard input, line 2", "utf-8", "--encoding")
    code, _, err = run(["predict", "--model", model, "--file", tmp_path], capsys)
    user_error(code, err, str(tmp_path), "is a folder")
    code, _, err = run(["predict", "--model", model, "good", "  "], capsys)
    user_error(code, err, "text 2 is empty")


def test_predict_says_when_it_truncates(finished, capsys):
    code, out, err = run(["predict", "--model", finished / "best", "--device", "cpu", "word " * 50_000, "short"],
                         capsys)
    assert code == 0, err
    assert "1 of 2 text(s) are longer than the model's 64 tokens" in err
    assert len(out.strip().splitlines()) == 2


def test_resume_with_data_of_another_label_count(finished, base, files, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    three = tmp_path / "three.csv"
    rows = (files / "train.csv").read_text(encoding="utf-8").splitlines()
    rows += [f"{r.rsplit(',', 1)[0]},neutral" for r in rows[1:4]]
    three.write_text("\n".join(rows) + "\n", encoding="utf-8")
    before = tree_hash(out)
    argv = [*base, "--epochs", "2", "--out", out, "--resume"]
    argv[argv.index("--train") + 1] = str(three)
    code, _, err = run(argv, capsys)
    user_error(code, err, "2 labels", "3", "neutral")
    assert tree_hash(out) == before


def test_internal_errors_keep_their_traceback(monkeypatch, capsys):
    def buggy(args):
        raise TypeError("a bug in minift")
    parser = cli.build_parser

    def patched():
        p = parser()
        p._subparsers._group_actions[0].choices["doctor"].set_defaults(run=buggy)
        return p
    monkeypatch.setattr(cli, "build_parser", patched)
    with pytest.raises(TypeError, match="a bug in minift"):
        cli.main(["doctor"])


def test_ctrl_c_keeps_the_checkpoint_and_says_how_to_resume(base, tmp_path):
    out = tmp_path / "run"
    argv = [a if a != "1" or i == 0 or base[i - 1] != "--epochs" else "10" for i, a in enumerate(base)]
    # SIGINT as at a terminal: a shell without job control starts its background commands with
    # SIGINT ignored, and that would pass down to this child through the test run
    proc = subprocess.Popen([sys.executable, "-m", "minift.cli", *argv, "--out", str(out)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not (out / "last" / "run.json").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "--resume" in err and str(out / "last") in err
    command = err.strip().splitlines()[-1].split()
    assert command[0] == "minift" and command[-1] == "--resume"
    epoch = json.loads((out / "last" / "run.json").read_text())["epoch"]
    assert epoch >= 1
    resumed = subprocess.run([sys.executable, "-m", "minift.cli", *command[1:]], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / 'last'} after epoch {epoch}" in resumed.stdout


# --- Silently ignored or accepted -----------------------------------------------------------------

def test_resume_refuses_flags_that_would_change_the_run(finished, base, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    before = tree_hash(out)
    code, _, err = run([*base, "--epochs", "2", "--out", out, "--resume", "--lr", "0.5"], capsys)
    user_error(code, err, "--lr 0.5 (the run has 0.001)")
    code, _, err = run([*base, "--epochs", "2", "--out", out, "--resume", "--lora", "4"], capsys)
    user_error(code, err, "--lora 4 (the run has 0)")
    assert tree_hash(out) == before


def test_resume_without_a_checkpoint(base, tmp_path, capsys):
    code, _, err = run([*base, "--out", tmp_path / "empty", "--resume"], capsys)
    user_error(code, err, "no checkpoint to resume from")


def test_peft_alternatives_are_exclusive_even_with_zero_layers(base, tmp_path, capsys):
    code, _, err = run([*base, "--train-top-layers", "0", "--lora", "4", "--out", tmp_path / "o"], capsys)
    user_error(code, err, "choose one")


def test_whitespace_only_text_is_an_error_with_its_line(base, files, tmp_path, capsys):
    bad = tmp_path / "train.csv"
    text = (files / "train.csv").read_text(encoding="utf-8").splitlines()
    text.insert(2, '"   ",fresh')
    bad.write_text("\n".join(text) + "\n", encoding="utf-8")
    argv = [*base, "--out", tmp_path / "o"]
    argv[argv.index("--train") + 1] = str(bad)
    code, _, err = run(argv, capsys)
    user_error(code, err, f"{bad}, line 3", "only whitespace")


def test_conll_fields_are_stripped(tmp_path):
    from minift import data
    p = tmp_path / "a.conll"
    p.write_text("EU\tB-ORG \nrejects \tO\n\nPeter\t B-PER\n", encoding="utf-8")
    sents = data.read_conll(p)
    assert [s.label for s in sents] == [["B-ORG", "O"], ["B-PER"]]
    assert [s.text for s in sents] == [["EU", "rejects"], ["Peter"]]


def test_flags_and_their_defaults_come_from_train_config():
    import dataclasses

    from minift.config import TrainConfig
    args = cli.build_parser().parse_args(["finetune"])
    cfg, _ = cli._train_config(args)
    assert cfg == TrainConfig()
    assert cfg.epochs == 1.5                                            # as the README documents
    given = cli.build_parser().parse_args(["finetune", "--epochs", "2", "--no-progress", "--batch-size", "8"])
    cfg, _ = cli._train_config(given)
    assert dataclasses.replace(TrainConfig(), epochs=2.0, progress=False, batch_size=8) == cfg
    helps = {a.dest: a.help for a in cli.build_parser()._subparsers._group_actions[0].choices["finetune"]._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["help"] in helps[f.name] and f"(default: {f.default})" in helps[f.name]
