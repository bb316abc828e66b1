"""The trainer: resume equals an uninterrupted run, atomic checkpoints, NaN stops, DDP equals one process."""
import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import minift
from minift import data, tasks
from minift.trainer import NonFiniteLoss, TrainConfig, Trainer, resolve_checkpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def small_dataset():
    ds = tasks.rotten_tomatoes()
    return data.Dataset("rt_small", "classification", ds.train[:96], ds.dev[:40], ds.test[:40], ds.labels)


def make_trainer(model_dir, dataset, out, seed=0, **cfg):
    torch.manual_seed(seed)
    model = minift.BertForSequenceClassification.from_pretrained(
        model_dir, id2label=dict(enumerate(dataset.labels)))
    tok = minift.Tokenizer.from_pretrained(model_dir)
    config = TrainConfig(**{"lr": 1e-3, "epochs": 3, "batch_size": 16, "progress": False, "seed": 3, **cfg})
    return Trainer(model, tok, dataset, config, out, log=lambda *a: None)


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_equals_uninterrupted(tiny_model_dir, small_dataset, tmp_path):
    full = make_trainer(tiny_model_dir, small_dataset, tmp_path / "full")
    m_full = full.fit()

    killed = make_trainer(tiny_model_dir, small_dataset, tmp_path / "killed")
    original_step = killed.train_step

    def dies_in_epoch_2(indices):
        if killed.epoch == 1 and killed.schedule.last_step == killed.steps_per_epoch + 2:
            raise KeyboardInterrupt("killed")
        return original_step(indices)
    killed.train_step = dies_in_epoch_2
    with pytest.raises(KeyboardInterrupt):
        killed.fit()

    resumed = make_trainer(tiny_model_dir, small_dataset, tmp_path / "killed", seed=12345)  # other RNG state
    resumed.resume()
    assert resumed.epoch == 1
    m_res = resumed.fit()
    for k, v in weights(full.model).items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert m_full["test_accuracy"] == m_res["test_accuracy"]
    assert m_full["dev_accuracy"] == m_res["dev_accuracy"]
    assert [e["dev_accuracy"] for e in m_full["history"]] == [e["dev_accuracy"] for e in m_res["history"]]
    # train_log.jsonl holds one run's history: the resumed log has the uninterrupted one's lines, no repeats
    def log(run):
        return [(r.get("step"), r["epoch"], r.get("loss"), r.get("dev_accuracy"))
                for r in map(json.loads, (tmp_path / run / "train_log.jsonl").read_text().splitlines())]
    assert log("killed") == log("full")
    assert [e for _, e, _, acc in log("killed") if acc is not None] == [1, 2, 3]


def test_checkpoint_write_is_atomic(tiny_model_dir, small_dataset, tmp_path, monkeypatch):
    tr = make_trainer(tiny_model_dir, small_dataset, tmp_path, epochs=1)
    tr.fit()
    before = (tmp_path / "last" / "model.safetensors").read_bytes()
    # A crash while the new checkpoint is being written: the old one stays in place.
    import safetensors.torch as st
    monkeypatch.setattr(st, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    tr.epoch = 5
    with pytest.raises(OSError):
        tr.save_last()
    monkeypatch.undo()
    assert (tmp_path / "last" / "model.safetensors").read_bytes() == before
    assert torch.load(tmp_path / "last" / "trainer_state.pt", weights_only=False)["epoch"] == 1
    # A crash between the two renames (old moved aside, new not yet in place): resume finds the old.
    real_replace = os.replace
    calls = []

    def second_rename_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("killed between renames")
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(OSError):
        tr.save_last()
    monkeypatch.undo()
    assert not (tmp_path / "last").exists()
    found = resolve_checkpoint(tmp_path / "last")
    assert found.name == "last.old"
    fresh = make_trainer(tiny_model_dir, small_dataset, tmp_path, epochs=1)
    fresh.resume()
    assert fresh.epoch == 1


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_model_dir, small_dataset, tmp_path):
    tr = make_trainer(tiny_model_dir, small_dataset, tmp_path, epochs=3)
    original = tr._loss_sum

    def nan_in_epoch_2(batch):
        loss = original(batch)
        return loss * float("nan") if tr.epoch == 1 else loss
    tr._loss_sum = nan_in_epoch_2
    with pytest.raises(NonFiniteLoss, match="epoch 2.*Checkpoints written so far are kept"):
        tr.fit()
    state = torch.load(tmp_path / "last" / "trainer_state.pt", weights_only=False)
    assert state["epoch"] == 1
    reloaded = minift.BertForSequenceClassification.from_pretrained(tmp_path / "best")
    assert all(torch.isfinite(p).all() for p in reloaded.parameters())


def test_gradient_accumulation_equals_one_big_batch(tiny_model_dir, small_dataset, tmp_path):
    a = make_trainer(tiny_model_dir, small_dataset, tmp_path / "a", epochs=1)
    b = make_trainer(tiny_model_dir, small_dataset, tmp_path / "b", epochs=1, grad_accum=4)
    a.fit()
    b.fit()
    for k, v in a.model.state_dict().items():
        assert (v - b.model.state_dict()[k]).abs().max() <= 1e-5, k


def test_outputs_written(tiny_model_dir, small_dataset, tmp_path):
    tr = make_trainer(tiny_model_dir, small_dataset, tmp_path, epochs=2)
    m = tr.fit()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert {"dev_accuracy", "test_accuracy", "test_report"} <= set(saved)
    assert saved["test_accuracy"] == m["test_accuracy"]
    assert (tmp_path / "training.png").stat().st_size > 5000
    lines = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert any("dev_accuracy" in x for x in lines)


def test_torchrun_two_processes_equal_one(tiny_model_dir, tmp_path):
    train_csv = tmp_path / "train.csv"
    ds = tasks.rotten_tomatoes()
    with open(train_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for ex in ds.train[:64]:
            w.writerow([ex.text, ex.label])
    dev_csv = tmp_path / "dev.csv"
    with open(dev_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for ex in ds.dev[:16]:
            w.writerow([ex.text, ex.label])
    common = ["finetune", "--model", str(tiny_model_dir), "--train", str(train_csv), "--dev", str(dev_csv),
              "--test", str(dev_csv), "--epochs", "2", "--batch-size", "16", "--lr", "1e-3",
              "--no-progress", "--device", "cpu", "--precision", "fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "minift.cli", *common, "--out", str(tmp_path / "one")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "minift.cli", *common, "--out", str(tmp_path / "two")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "(2 process(es))" in two.stdout
    # fp32 with the fused kernels on the CPU: which float32 matmul runs, said once (rank 0)
    for out in (one.stdout, two.stdout):
        said = [line for line in out.splitlines() if line.startswith("matmul: ")]
        assert len(said) == 1 and ("minift's own kernel" in said[0] or "PyTorch's (torch.mm)" in said[0]), out[-2000:]
    from safetensors.torch import load_file
    a, b = load_file(str(tmp_path / "one" / "last" / "model.safetensors")), \
        load_file(str(tmp_path / "two" / "last" / "model.safetensors"))
    assert set(a) == set(b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    moved = load_file(str(tiny_model_dir / "model.safetensors"))
    assert (a["bert.pooler.dense.weight"] - moved["pooler.dense.weight"]).abs().max() > 1e-4


def test_fractional_epochs_train_part_of_the_last_one(tiny_model_dir, small_dataset, tmp_path):
    """epochs=1.5: one full pass, then the first half of the second pass's batches, the schedule
    reaching zero at the last step; the half epoch is the first half of what epoch 2 would see."""
    half = make_trainer(tiny_model_dir, small_dataset, tmp_path / "half", epochs=1.5)
    seen = []
    original = half.train_step
    half.train_step = lambda indices: (seen.append(list(indices)), original(indices))[1]
    metrics = half.fit()
    per_epoch = half.steps_per_epoch                                 # 96 examples / 16 = 6
    assert half.total_steps == round(1.5 * per_epoch) == len(seen) == 9
    assert metrics["epochs_run"] == 2 and len(metrics["history"]) == 2
    assert [r["epochs_trained"] for r in metrics["history"]] == [1.0, 1.5]   # the plot's x axis
    assert half.schedule.get_last_lr()[0] == 0.0
    two = make_trainer(tiny_model_dir, small_dataset, tmp_path / "two", epochs=2)
    full_order = []
    two.train_step = lambda indices: full_order.append(list(indices)) or 0.0
    two.fit()
    assert seen == full_order[:9]
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="epochs: expected a positive number"):
            make_trainer(tiny_model_dir, small_dataset, tmp_path / "bad", epochs=bad)


def _reframed(problem):
    """Real review snippets, reframed: regression (fresh 1.0 / rotten 0.0) or multi-label
    ({fresh?, negation?}: the snippet says "not" or "n't")."""
    ds = tasks.rotten_tomatoes()

    def label(ex):
        if problem == data.REGRESSION:
            return 1.0 if ex.label == "fresh" else 0.0
        words = ex.text.lower().replace("n't", " not ").split()
        return [name for name, yes in (("fresh", ex.label == "fresh"), ("negation", "not" in words)) if yes]

    def part(rows):
        return [data.Example(ex.text, label(ex)) for ex in rows]
    labels = ["score"] if problem == data.REGRESSION else ["fresh", "negation"]
    return data.Dataset(f"rt_{problem}", "classification", part(ds.train[:96]), part(ds.dev[:40]),
                        part(ds.test[:40]), labels, problem=problem)


@pytest.mark.parametrize("problem", ["regression", "multi_label_classification"])
def test_regression_and_multi_label_train_through_the_heads_loss(tiny_model_dir, tmp_path, problem):
    import torch.nn.functional as F
    ds = _reframed(problem)
    torch.manual_seed(0)
    model = minift.BertForSequenceClassification.from_pretrained(
        tiny_model_dir, id2label=dict(enumerate(ds.labels)), problem_type=problem)
    tok = minift.Tokenizer.from_pretrained(tiny_model_dir)
    tr = Trainer(model, tok, ds, TrainConfig(lr=3e-3, epochs=6, batch_size=16, grad_accum=2, progress=False,
                                             max_length=64), tmp_path, log=lambda *a: None)
    everything = data.collate(tr.train_set, list(range(len(ds.train))))

    def oracle(indices):    # the textbook loss of the batch, by torch.nn.functional on the same model
        b = data.collate(tr.train_set, indices)
        with torch.no_grad():
            z = model(b["input_ids"], b["attention_mask"], b["token_type_ids"]).logits
        if problem == data.REGRESSION:
            return F.mse_loss(z.squeeze(-1), b["labels"]).item()
        return F.binary_cross_entropy_with_logits(z, b["labels"]).item()
    first = list(range(16))
    expected, start = oracle(first), oracle(list(range(len(ds.train))))
    assert abs(tr.train_step(first) - expected) <= 1e-6                 # two micro-batches, summed
    m = tr.fit()
    assert oracle(list(range(len(ds.train)))) < start - 0.02, "training lowers the training loss"
    # The stored dev metrics equal an independent computation from the best model's outputs.
    b = data.collate(tr.dev_set, list(range(len(ds.dev))))
    with torch.no_grad():
        z = model.eval()(b["input_ids"], b["attention_mask"], b["token_type_ids"]).logits
    if problem == data.REGRESSION:
        assert abs(m["dev_mse"] - F.mse_loss(z.squeeze(-1), b["labels"]).item()) <= 1e-6
        p, y = z.squeeze(-1).double(), b["labels"].double()
        r = torch.corrcoef(torch.stack([p, y]))[0, 1].item()
        assert abs(m["dev_pearson"] - r) <= 1e-6
    else:
        pred, gold = torch.sigmoid(z) > 0.5, b["labels"] > 0.5
        assert m["dev_exact_match"] == (pred == gold).all(1).float().mean().item()
        tp = (pred & gold).sum().item()
        micro = 2 * tp / (pred.sum().item() + gold.sum().item())
        assert abs(m["dev_micro_f1"] - micro) <= 1e-12
    assert json.loads((tmp_path / "metrics.json").read_text())["problem"] == problem
    assert everything["labels"].dtype == torch.float32


def test_plot_history_leaves_the_process_backend_alone(tmp_path):
    """training.png is drawn without pyplot: a notebook's backend (here svg) and its open figures
    stay as they were (the plot used to switch the whole process to Agg)."""
    code = textwrap.dedent(f"""
        import matplotlib, matplotlib.pyplot as plt
        from pathlib import Path
        from minift.trainer import History, plot_history
        plt.figure()
        h = History(steps=[{{"step": i, "epoch": 0, "loss": 1 / (i + 1), "lr": 1e-3}} for i in range(30)],
                    epochs=[{{"epoch": 0, "epochs_trained": 1, "dev_accuracy": 0.7}}])
        plot_history(h, Path({str(tmp_path / "t.png")!r}))
        print(matplotlib.get_backend(), len(plt.get_fignums()))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "MPLBACKEND": "svg"}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["svg", "1"], r.stdout
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_precision_choice_on_the_cpu(monkeypatch):
    """auto: bf16 on a CPU with AMX-BF16, or with AVX512-BF16 where its timed matrix multiply is
    BF16_MIN_SPEEDUP times fp32's; bf16 may be forced anywhere (with a warning where it is
    emulated); fp16 needs a GPU. Each choice says why."""
    from minift import trainer as T
    from minift.errors import UserError
    cpu = torch.device("cpu")
    monkeypatch.setattr(T, "cpu_bf16_speed", lambda: "amx")
    assert T.choose_precision("auto", cpu) == (torch.bfloat16, "bf16 autocast (auto: this CPU has AMX-BF16)")
    monkeypatch.setattr(T, "cpu_bf16_speed", lambda: "emulated")
    dtype, why = T.choose_precision("auto", cpu)
    assert dtype is None and "neither AMX-BF16 nor AVX512-BF16" in why and "--precision bf16" in why
    dtype, why = T.choose_precision("bf16", cpu)
    assert dtype is torch.bfloat16 and "warning" in why and "slower" in why
    monkeypatch.setattr(T, "cpu_bf16_speed", lambda: "avx512")
    assert T.choose_precision("bf16", cpu)[1].endswith("this CPU has AVX512-BF16)")
    # AVX512-BF16: the timing decides, at BF16_MIN_SPEEDUP (1.3x) exactly and either side of it
    for f32, b16, want in ((2.9, 0.88, torch.bfloat16), (1.3, 1.0, torch.bfloat16), (1.29, 1.0, None),
                           (1.0, 1.1, None)):
        monkeypatch.setattr(T, "cpu_bf16_timing", lambda f32=f32, b16=b16: (f32, b16))
        dtype, why = T.choose_precision("auto", cpu)
        assert dtype is want, (f32, b16, why)
        assert f"took {b16:.2f} ms against fp32's {f32:.2f} ms" in why, why
        assert ("--precision bf16 forces it" in why) == (want is None), why
    assert T.choose_precision("fp32", cpu) == (None, "fp32 (asked for)")
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        T.choose_precision("fp16", cpu)
    with pytest.raises(UserError, match="expected auto, fp32, bf16 or fp16, got 'half'"):
        T.choose_precision("half", cpu)


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_bf16_autocast_on_the_cpu_trains_like_fp32(tiny_model_dir, small_dataset, tmp_path, impl, monkeypatch):
    """--precision bf16 on the CPU: the matrix multiplies run in bf16 (the logits come out bf16),
    the weights stay fp32, evaluation runs in fp32, and the run follows the fp32 run to bf16's
    rounding."""
    from minift import trainer as T
    runs = {}
    for precision in ("fp32", "bf16"):
        t = make_trainer(tiny_model_dir, small_dataset, tmp_path / precision, precision=precision, epochs=1)
        t.model.set_impl(impl)
        if precision == "bf16":
            batch = data.collate(t.train_set, list(range(8)))
            with t._autocast():
                out = t.model(batch["input_ids"], batch["attention_mask"])
            assert out.logits.dtype == torch.bfloat16
            # evaluation (dev each epoch, the test) runs in fp32, as `minift evaluate` does
            evaluated = []
            real = T.predict_labels

            def spy(*a, **k):
                evaluated.append(torch.is_autocast_enabled("cpu"))
                return real(*a, **k)
            monkeypatch.setattr(T, "predict_labels", spy)
        t.fit()
        if precision == "bf16":
            assert evaluated and not any(evaluated), evaluated
        assert all(p.dtype == torch.float32 for p in t.model.parameters())
        runs[precision] = [r["loss"] for r in t.history.steps]
    fp32, bf16 = torch.tensor(runs["fp32"]), torch.tensor(runs["bf16"])
    assert len(fp32) == len(bf16) >= 6
    assert not torch.equal(fp32, bf16), "bf16 rounding should show in the losses"
    assert (fp32 - bf16).abs().max() < 0.03, (fp32, bf16)


def test_auto_precision_takes_rank_0s_choice_in_every_process(tmp_path):
    """Two gloo processes whose CPUs would choose differently (rank 0: AVX512-BF16 with bf16 timed 3x
    faster; rank 1: no bf16 at all) both train in what rank 0 chose: processes of one run must not
    train in different precisions, and a rank whose CPU would not time must still take part."""
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(f"""
        import os

        import torch.distributed as dist
        import torch.multiprocessing as mp

        def rank_main(rank):
            dist.init_process_group("gloo", init_method={(tmp_path / 'rendezvous').as_uri()!r}, rank=rank,
                                    world_size=2)
            from minift import trainer
            trainer.cpu_bf16_speed = lambda: "avx512" if rank == 0 else "emulated"
            trainer.cpu_bf16_timing = lambda *a: (3.0, 1.0)
            for _ in range(2):      # the command line's check, then the trainer's
                dtype, why = trainer.choose_precision("auto", "cpu")
                # one write(2) of the whole line: the two processes share the pipe, and a write of less
                # than PIPE_BUF bytes is never interleaved (print's text and newline could be: they were)
                os.write(1, f"{{rank}} {{dtype}} {{why}}\\n".encode())
            dist.destroy_process_group()

        if __name__ == "__main__":
            mp.spawn(rank_main, nprocs=2)
    """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = sorted(r.stdout.strip().splitlines())
    assert len(lines) == 4, r.stdout
    for line in lines:
        assert line[2:].startswith("torch.bfloat16 bf16 autocast (auto: this CPU has AVX512-BF16, "), line
        assert "took 1.00 ms against fp32's 3.00 ms on one thread" in line, line


def test_bf16_timing_runs_and_restores_the_thread_count(monkeypatch):
    """The real timing (the tests pin it elsewhere): two positive times, one thread while timing,
    torch's thread count as it was after."""
    from minift import ops
    from minift import trainer as T
    monkeypatch.undo()                                    # conftest's pinned timing
    T.cpu_bf16_timing.cache_clear()
    threads = torch.get_num_threads()
    seen = []
    real_linear = ops.linear                              # the product timed: what impl="fused" runs
    try:
        torch.set_num_threads(2)
        ops.linear = lambda x, w: (seen.append(torch.get_num_threads()), real_linear(x, w))[1]
        f32, b16 = T.cpu_bf16_timing(64, 48, 80, 2)
        after = torch.get_num_threads()
    finally:
        ops.linear = real_linear
        torch.set_num_threads(threads)
        T.cpu_bf16_timing.cache_clear()
    assert f32 > 0 and b16 > 0
    assert seen and set(seen) == {1}, seen
    assert after == 2


def test_resume_keeps_the_precision_auto_chose(tiny_model_dir, small_dataset, tmp_path, monkeypatch):
    """auto chooses when a run starts; a resumed run keeps that choice even where this start's
    timing would choose otherwise (bf16 now timed 3x faster), and says so."""
    from minift import trainer as T
    first = make_trainer(tiny_model_dir, small_dataset, tmp_path / "run", epochs=2)
    assert first.autocast_dtype is None                  # the tests' auto: fp32
    first.cfg.epochs = 2
    first.fit()
    monkeypatch.setattr(T, "cpu_bf16_timing", lambda *a, **k: (3.0, 1.0))
    logged = []
    again = make_trainer(tiny_model_dir, small_dataset, tmp_path / "run", epochs=2)
    again.log = logged.append
    assert again.autocast_dtype is torch.bfloat16        # a fresh start would take bf16 now
    again.resume()
    assert again.autocast_dtype is None and again.precision_note == first.precision_note
    assert any("keeping the run's fp32 (auto:" in line and "not this start's bf16 autocast" in line
               for line in logged), logged
