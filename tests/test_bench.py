"""`minift bench`: the tables it prints and appends, and the step benchmark's check that the three
implementations it times compute the same function (on a small encoder: the timings themselves are
the benchmark's business, not the tests')."""
import math

import pytest
import torch

from minift import bench
from minift.cli import main

pytest.importorskip("transformers")

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def tiny_step(step_bench=bench.bench_step_cpu, **kw):
    kw.setdefault("full_lengths", ())
    return step_bench(repeats=2, profile_steps=1, shape=TINY, batch=4, padded_lengths=(48,), **kw)


def test_step_bench_times_the_same_function_three_ways():
    rows, checked, profile = tiny_step()
    assert [r.impl for r in rows] == ["transformers", "minift torch", "minift fused"] * 2
    assert all(r.case.startswith("train step H=32 L=2 B=4 ") for r in rows)
    assert all(r.case.endswith("(real lengths) fp32") for r in rows[:3])
    assert all(r.case.endswith("T=48 (padded) fp32") for r in rows[3:])
    assert all(math.isfinite(r.ms) and r.ms > 0 for r in rows)
    # the three losses of the first batch: printed, and equal to float32 rounding
    assert checked.startswith("encoder outputs within ")
    losses = [float(part.split()[-1]) for part in checked.split("no dropout: ", 1)[1].split(", ")]
    assert len(losses) == 3 and max(losses) - min(losses) < 1e-4, checked
    assert 0.3 < losses[0] < 1.2, "two classes from a random head: a loss near log 2"
    assert "aten::" in profile and "Self CPU" in profile


def test_step_bench_padded_rows_pack_and_full_rows_have_no_padding():
    rows, _, _ = tiny_step(full_lengths=(40,))
    assert [r.case.split("T=", 1)[1] for r in rows[::3]] == [rows[0].case.split("T=", 1)[1], "48 (padded) fp32",
                                                             "40 (no padding) fp32"]
    fused = [r for r in rows if r.impl == "minift fused"]
    real = int(fused[1].extra.split()[1])
    assert fused[1].extra == f"packed: {real} real tokens of {4 * 48}" and 4 <= real < 4 * 40
    assert fused[2].extra == "", "no padding: nothing to pack"
    assert fused[0].extra == "" or fused[0].extra.startswith("packed: ")


def test_step_bench_refuses_implementations_that_disagree(monkeypatch):
    """torch's GELU made 1% wrong (transformers' activation; minift's fused kernel has its own): the
    benchmark stops before timing anything."""
    gelu = torch.nn.functional.gelu
    monkeypatch.setattr(torch.nn.functional, "gelu", lambda *a, **k: gelu(*a, **k) * 1.01)
    with pytest.raises(RuntimeError, match="disagree before any step"):
        tiny_step()


def test_step_bench_refuses_a_padding_shorter_than_the_batch():
    with pytest.raises(ValueError, match="shorter than the real batch"):
        bench.bench_step_cpu(repeats=1, profile_steps=1, shape=TINY, batch=4, padded_lengths=(8,))


def test_cli_bench_step_prints_and_appends_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "bench_step_cpu", lambda: tiny_step())
    results = tmp_path / "RESULTS.md"
    results.write_text("# earlier results\n")
    assert main(["bench", "--step", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    text = results.read_text()
    assert text.startswith("# earlier results\n"), "appended, never overwritten"
    assert "### `minift bench --step`: " in text and "device cpu" in text
    assert text.count("| train step H=32 L=2 B=4 ") == 6
    assert "Checked first: encoder outputs within " in text and "```" in text and "aten::" in text
    assert "| train step H=32 L=2 B=4 " in out and f"appended to {results}" in out


def test_cli_bench_quick_rows_and_ratios(capsys):
    assert main(["bench", "--quick"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert lines[0] == "| case | impl | ms | vs first | notes |"
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]     # "|---|" is not "| "
    assert {r[1] for r in rows} == {"naive", "sdpa", "minift", "F.cross_entropy", "PyTorch", "copy"}
    assert any(r[0].startswith("bias+GELU") for r in rows) and any(r[0].startswith("add+dropout+LayerNorm") for r in rows)
    first = {}
    for case, impl, ms, ratio, _ in rows:
        first.setdefault(case, float(ms))
        assert float(ms) > 0
        assert abs(float(ratio.rstrip("x")) - first[case] / float(ms)) < 0.01 * first[case] / float(ms) + 0.005


def test_crf_benchmark_refuses_crf_lr_with_probe():
    """--crf-lr sets the fine-tuned CRF's learning rate; with --probe it would be ignored, so it is an error."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "crf_vs_softmax.py"
    r = subprocess.run([sys.executable, str(script), "--probe", "--crf-lr", "1e-2"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert "--crf-lr is for full fine-tuning; with --probe the CRF trains at --probe-lr" in r.stderr


def test_step_bench_adds_the_bf16_step_where_auto_picks_bf16(monkeypatch):
    """On a CPU where --precision auto takes bf16 (here: AVX512-BF16 with a bf16 product timed 3x
    fp32's), the table adds fused's step under bf16 autocast, and the check line gives its first
    loss (bf16 rounding: near the float32 ones, not equal) and auto's reason."""
    from minift import trainer
    monkeypatch.setattr(trainer, "cpu_bf16_speed", lambda: "avx512")
    monkeypatch.setattr(trainer, "cpu_bf16_timing", lambda *a, **k: (3.0, 1.0))
    rows, checked, _ = tiny_step()
    bf16_row = "minift fused, bf16 autocast (--precision auto)"
    assert [r.impl for r in rows] == ["transformers", "minift torch", "minift fused", bf16_row] * 2
    assert all(math.isfinite(r.ms) and r.ms > 0 for r in rows)
    fp32_losses, rest = checked.split("no dropout: ", 1)[1].split(" (fused under bf16 autocast: ")
    fused = float(fp32_losses.split(", ")[-1].split()[-1])
    bf16 = float(rest.split(")")[0])
    assert bf16 != fused and abs(bf16 - fused) < 0.05 * fused, checked
    assert "--precision auto here: bf16 autocast (auto: this CPU has AVX512-BF16, and " in checked
