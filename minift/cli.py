"""The `minift` command line: finetune, evaluate, predict, gradcheck, doctor, bench, assignment.

Each sub-command is a function ``cmd_<name>(args)`` below; heavy modules are imported inside it so
that ``minift --help`` stays fast.
"""
from __future__ import annotations

import argparse
import sys


def _tool_version(cmd: list[str]) -> str:
    import subprocess
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
        return out[-1] if "nvcc" in cmd[0] and out else (out[0] if out else "not found")
    except (OSError, subprocess.TimeoutExpired):
        return "not found"


def cmd_doctor(args) -> int:
    import platform
    import shutil

    import torch

    import minift
    from . import ops, selfcheck
    status = ops.extension_status()
    print(f"minift {minift.__version__}, Python {platform.python_version()}, torch {torch.__version__}")
    mode = status["mode"] or "fallback (plain PyTorch ops)"
    print(f"compiled kernels: {mode}")
    print(f"  why: {status['reason']}")
    if status["mode"] is not None:
        print(f"  CPU kernels: {torch.ops.minift.cpu_kernel_info()}")
        if status["cuda"]:
            print("  CUDA kernels: built")
        else:
            print(f"  CPU kernels only: CUDA kernels {status['cuda_build']}")
    cxx = shutil.which("c++") or shutil.which("g++")
    print(f"C++ compiler: {_tool_version([cxx, '--version']) if cxx else 'not found'}")
    nvcc = shutil.which("nvcc")
    print(f"nvcc: {_tool_version([nvcc, '--version']) if nvcc else 'not found'}")
    print(f"ninja: {_tool_version(['ninja', '--version']) if shutil.which('ninja') else 'not found'}")
    print(f"torch built with CUDA: {torch.version.cuda}; CUDA available: {torch.cuda.is_available()}")
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"GPU {i}: {p.name}, {p.total_memory / 2 ** 30:.0f} GiB, compute capability {p.major}.{p.minor}")
    print(f"CPU threads used by torch: {torch.get_num_threads()}")
    if status["mode"] is None:
        return 0
    rows = selfcheck.run()
    print("\nself-check: each compiled kernel against float64, beside PyTorch's own error "
          "(limit = 2 x PyTorch's error + 4 eps)")
    print(selfcheck.format_table(rows))
    failed = [r for r in rows if not r.passed]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def cmd_gradcheck(args) -> int:
    from . import gradcheck
    results = gradcheck.run_all(gradcheck.extra_checks())
    print(gradcheck.format_table(results))
    failed = [r.op for r in results if not r.passed]
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def _setup_distributed():
    """Under torchrun (WORLD_SIZE > 1): one process per device, gloo on CPU, nccl on GPU."""
    import os

    import torch
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _resolve_impl(impl: str, device="cpu") -> str:
    from .ops import resolve_impl
    return resolve_impl(impl, device)


def _build_model(model_path, dataset, impl, **overrides):
    import minift
    cls = minift.BertForTokenClassification if dataset.task == "token" else minift.BertForSequenceClassification
    return cls.from_pretrained(model_path, impl=impl, id2label=dict(enumerate(dataset.labels)), **overrides)


def cmd_finetune(args) -> int:
    import logging
    import time

    import torch
    import torch.distributed as dist

    import minift
    from . import data, metrics, peft
    from .trainer import NonFiniteLoss, TrainConfig, Trainer, is_main

    device = _setup_distributed()
    if args.device is not None:
        device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if args.train:
        dataset = data.from_files(args.train, args.dev, args.test, token_task=args.token_task)
    else:
        dataset = data.load_task(args.task)
    say = print if is_main() else (lambda *a, **k: None)
    say(f"task {dataset.name}: {dataset.sizes()}, {len(dataset.labels)} labels")
    logging.getLogger("minift").setLevel(logging.INFO)
    model = _build_model(args.model, dataset, _resolve_impl(args.impl, device))
    say(model.load_report.summary())
    tokenizer = minift.Tokenizer.from_pretrained(args.model)
    say(peft.apply(model, freeze=args.freeze, train_top_layers=args.train_top_layers, lora_rank=args.lora))
    cfg = TrainConfig(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      max_length=args.max_length, warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
                      clip=args.clip, seed=args.seed, patience=args.patience, precision=args.precision,
                      max_train_examples=args.max_train_examples, progress=not args.no_progress)
    trainer = Trainer(model, tokenizer, dataset, cfg, args.out, device=device, log=say)
    if args.resume:
        trainer.resume(None if args.resume == "last" else args.resume)
    say(f"training on {device} ({trainer.world} process(es)), impl={model.config.impl}, "
        f"{trainer.steps_per_epoch} steps per epoch, writing to {args.out}")
    t0 = time.time()
    try:
        result = trainer.fit()
    except NonFiniteLoss as e:
        print(f"minift finetune: error: {e}", file=sys.stderr)
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if is_main():
        print(f"\ntest report ({dataset.name}, best epoch by dev accuracy):")
        print(metrics.format_report(result["test_report"]))
        print(f"\ndev accuracy {result['dev_accuracy']:.4f}  test accuracy {result['test_accuracy']:.4f}  "
              f"wall time {time.time() - t0:.0f} s")
        print(f"wrote {args.out}/best (Hugging Face format), metrics.json, train_log.jsonl, training.png")
    return 0


def _load_finetuned(model_dir, impl="torch"):
    """A model saved by `minift finetune` (or any HF BERT classifier): its head from config.json."""
    import json
    from pathlib import Path

    import minift
    cfg = json.loads((Path(model_dir) / "config.json").read_text()) if (Path(model_dir) / "config.json").is_file() else {}
    arch = (cfg.get("architectures") or ["BertForSequenceClassification"])[0]
    if arch not in ("BertForSequenceClassification", "BertForTokenClassification"):
        raise ValueError(f"{model_dir}: expected a sequence or token classification model, got {arch}")
    if not cfg.get("id2label"):
        raise ValueError(f"{model_dir}: config.json has no id2label; expected a fine-tuned classifier")
    model = getattr(minift, arch).from_pretrained(model_dir, impl=impl)
    return model, minift.Tokenizer.from_pretrained(model_dir), arch == "BertForTokenClassification"


def cmd_evaluate(args) -> int:
    import json

    import torch

    from . import data, metrics
    from .trainer import predict_labels
    model, tok, token_task = _load_finetuned(args.model, _resolve_impl(args.impl))
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if args.test:
        read = data.read_conll if token_task else data.read_classification_file
        examples, name = read(args.test), args.test
    else:
        examples, name = getattr(data.load_task(args.task), args.split), f"{args.task} ({args.split})"
    data.check_labels(examples, labels, str(name))
    encode = data.encode_tokens if token_task else data.encode_classification
    enc = encode(tok, examples, labels, args.max_length)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    pred, gold = predict_labels(model, enc, tok.pad_token_id, 128, device, token_task)
    report = metrics.classification_report(pred, gold, labels)
    print(f"{name}: {len(examples)} examples" + (f", {enc.num_truncated} truncated" if enc.num_truncated else ""))
    print(metrics.format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"accuracy": report["accuracy"], "report": report}, f, indent=2)
    return 0


def cmd_predict(args) -> int:
    import torch

    from . import data
    from .trainer import predict_labels
    model, tok, token_task = _load_finetuned(args.model, _resolve_impl(args.impl))
    if args.texts:
        texts = args.texts
    elif args.file:
        with open(args.file, encoding="utf-8") as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
    else:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise ValueError("no input: give texts as arguments, --file FILE, or lines on standard input")
    names = model.config.id2label
    if token_task:
        examples = [data.Example(t.split(), ["?"] * len(t.split())) for t in texts]
        enc = data.encode_tokens(tok, examples, ["?"], 512)
    else:
        examples = [data.Example(t, "?") for t in texts]
        enc = data.encode_classification(tok, examples, ["?"], 512)
    pred, _, prob = predict_labels(model, enc, tok.pad_token_id, 64, torch.device("cpu"), token_task, return_probs=True)
    for ex, p, pr in zip(examples, pred, prob):
        if token_task:
            print(" ".join(f"{w}/{names[t]}" for w, t in zip(ex.text, p)))
        else:
            print(f"{names[p]}\t{pr:.4f}\t{ex.text}")
    return 0


def cmd_assignment(args) -> int:
    import json

    from . import assignments as A
    if args.action == "list":
        for p in A.PARTS.values():
            print(f"{p.name:24s} {p.points:3d} points  {p.description}")
        return 0
    if args.action == "export":
        folders = A.export(args.dir, args.part, solution=args.solution)
        kind = "instructor copy (with solutions)" if args.solution else "student copy"
        print(f"wrote the {kind} of {len(folders)} part(s) to {args.dir}:")
        for f in folders:
            print(f"  {f}")
        print(f"grade it with: minift assignment grade {args.dir}")
        return 0
    result = A.grade(args.dir, args.part)
    print(f"{'part':24s} {'tests':>7s} {'points':>12s}")
    for p in result["parts"]:
        print(f"{p['part']:24s} {p['passed']:>3d}/{p['total']:<3d} {p['points']:>6.2f} / {p['max_points']:<3d}")
    print(f"{'total':24s} {'':7s} {result['total']:>6.2f} / {result['max_total']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def cmd_bench(args) -> int:
    from pathlib import Path

    from . import bench
    rows, header = bench.run(quick=args.quick)
    table = bench.format_rows(rows)
    print(header)
    print(table)
    if args.results:
        path = Path(args.results)
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"\n### `minift bench{' --quick' if args.quick else ''}`: {header}\n\n{table}\n")
        print(f"appended to {path}")
    return 0


def _add_impl_argument(p) -> None:
    p.add_argument("--impl", default="auto", choices=["auto", "torch", "reference", "fused"],
                   help="auto: fused when the compiled kernels are available, else torch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minift", description="minift: BERT fine-tuning, every step visible.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("doctor", help="report the build mode, versions and the GPU")
    p.set_defaults(run=cmd_doctor)
    p = sub.add_parser("finetune", help="fine-tune a pretrained model (default: MiniLM on Rotten Tomatoes)")
    p.add_argument("--task", default="sentiment", help="sentiment (default), topic, pos")
    p.add_argument("--train", help="your training file: CSV/JSONL (text,label[,text_pair]) or CoNLL with --token-task")
    p.add_argument("--dev", help="your dev file (default: a hash-chosen 10%% of --train)")
    p.add_argument("--test", help="your test file")
    p.add_argument("--token-task", action="store_true", help="the files are CoNLL token tagging data")
    p.add_argument("--model", default="minilm", help="a Hugging Face-format directory or 'minilm'")
    p.add_argument("--out", default="runs/finetune", help="output directory")
    p.add_argument("--epochs", type=float, default=1.5,
                   help="passes over the training data; a fraction trains part of the last one (1.5)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patience", type=int, default=0, help="early stopping patience in epochs (0: off)")
    _add_impl_argument(p)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: GPU if there is one)")
    p.add_argument("--freeze", choices=["encoder"], help="train the classifier only (a linear probe)")
    p.add_argument("--train-top-layers", type=int, default=None, help="train only the top K encoder layers")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank on query/value (0: off)")
    p.add_argument("--resume", nargs="?", const="last", help="resume from OUT/last (or a given checkpoint)")
    p.add_argument("--max-train-examples", type=int, default=0, help="use only the first N training examples")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=cmd_finetune)
    p = sub.add_parser("evaluate", help="evaluate a fine-tuned model on a task's split or a test file")
    p.add_argument("--model", required=True, help="a directory written by minift finetune (OUT/best)")
    p.add_argument("--task", default="sentiment")
    p.add_argument("--split", default="test", choices=["train", "dev", "test"])
    p.add_argument("--test", help="a CSV/JSONL (or CoNLL for token models) file instead of a task")
    p.add_argument("--max-length", type=int, default=128)
    _add_impl_argument(p)
    p.add_argument("--device", default=None)
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.set_defaults(run=cmd_evaluate)
    p = sub.add_parser("predict", help="label texts with a fine-tuned model (arguments, --file or stdin)")
    p.add_argument("--model", required=True)
    p.add_argument("texts", nargs="*", help="texts to label (token models: words separated by spaces)")
    p.add_argument("--file", help="one text per line")
    _add_impl_argument(p)
    p.set_defaults(run=cmd_predict)
    p = sub.add_parser("assignment", help="course assignments: list, export a student copy, grade it")
    p.add_argument("action", choices=["list", "export", "grade"])
    p.add_argument("dir", nargs="?", default="assignment", help="the assignment folder")
    p.add_argument("--part", action="append", help="a part name (repeatable; default: all parts)")
    p.add_argument("--solution", action="store_true", help="export the instructor copy, solutions included")
    p.add_argument("--json", help="grade: also write the scores to this JSON file")
    p.set_defaults(run=cmd_assignment)
    p = sub.add_parser("bench", help="time minift's kernels and training step against PyTorch / transformers")
    p.add_argument("--quick", action="store_true", help="small sizes only (a smoke run)")
    p.add_argument("--results", help="append the table to this markdown file (e.g. benchmarks/RESULTS.md)")
    p.set_defaults(run=cmd_bench)
    p = sub.add_parser("gradcheck", help="check every hand-derived gradient against autograd (float64)")
    p.set_defaults(run=cmd_gradcheck)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (FileNotFoundError, ValueError, TypeError, KeyError) as e:
        if args.debug:
            raise
        print(f"minift {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
