"""The `minift` command line: finetune, pretrain, evaluate, predict, gradcheck, doctor, bench, assignment.

Each sub-command is a function ``cmd_<name>(args)`` below; heavy modules are imported inside it so
that ``minift --help`` stays fast.
"""
from __future__ import annotations

import argparse
import os
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
    from ._build import compiler_of, links_shared_libstdcxx
    named = os.environ.get("CXX")
    cxx = shutil.which(compiler_of(named)) if named else (shutil.which("c++") or shutil.which("g++"))
    static = cxx is not None and links_shared_libstdcxx(named or cxx) is False
    note = " (finds only the static libstdc++: the build picks another compiler, see minift/_build.py)" if static else ""
    print(f"C++ compiler{f' (CXX={named})' if named else ''}: "
          f"{_tool_version([cxx, '--version']) + note if cxx else 'not found'}")
    nvcc = shutil.which("nvcc")
    print(f"nvcc: {_tool_version([nvcc, '--version']) if nvcc else 'not found'}")
    print(f"ninja: {_tool_version(['ninja', '--version']) if shutil.which('ninja') else 'not found'}")
    print(f"torch built with CUDA: {torch.version.cuda}; CUDA available: {torch.cuda.is_available()}")
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"GPU {i}: {p.name}, {p.total_memory / 2 ** 30:.0f} GiB, compute capability {p.major}.{p.minor}")
    print(f"CPU threads used by torch: {torch.get_num_threads()}")
    if status["mode"] is not None:
        print(f"float32 CPU matmul of impl='fused' (MINIFT_GEMM): {ops.gemm_backend_why()}")
    from .trainer import choose_precision, cpu_bf16_speed
    speed = {"amx": "AMX-BF16 tiles", "avx512": "AVX512-BF16", "emulated": "emulated (no AMX-BF16, no AVX512-BF16)"}
    print(f"CPU vector width: {torch.backends.cpu.get_cpu_capability()}; bf16 matrix multiplies: "
          f"{speed[cpu_bf16_speed()]}; --precision auto on the CPU: {choose_precision('auto', 'cpu')[1]}")
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
    from .selfcheck import resolve_impl
    return resolve_impl(impl, device)


def _device(name):
    """``--device`` checked (None: the GPU when there is one, else the CPU)."""
    import torch

    from .errors import UserError
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: expected cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine has no usable CUDA GPU (torch.cuda.is_available() is False)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: there are {torch.cuda.device_count()} GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device: expected cpu, cuda or cuda:N, got {name!r}")
    return device


def _model_config(model_path):
    """The BertConfig of ``--model`` (config.json only, no weights): for checks before loading."""
    from .pretrained import read_config, resolve
    return read_config(resolve(model_path))


def _build_model(model_path, dataset, impl, crf=False, **overrides):
    import minift
    from .data import SINGLE_LABEL
    if crf:                        # BIO tags: the CRF allows I-X only after B-X or I-X
        from .crf import BertCRFForTokenClassification, is_bio
        return BertCRFForTokenClassification.from_pretrained(
            model_path, impl=impl, constraints="BIO" if is_bio(dataset.labels) else None,
            id2label=dict(enumerate(dataset.labels)), **overrides)
    cls = minift.BertForTokenClassification if dataset.task == "token" else minift.BertForSequenceClassification
    if dataset.task != "token" and dataset.problem != SINGLE_LABEL:
        overrides["problem_type"] = dataset.problem
    return cls.from_pretrained(model_path, impl=impl, id2label=dict(enumerate(dataset.labels)), **overrides)


def _train_config(args, defaults: dict | None = None):
    """TrainConfig from the flags (``defaults``: a command's own defaults, e.g. pretrain's); with
    --resume, the run's own config, which given flags must equal."""
    import dataclasses
    from pathlib import Path

    from . import checkpoint
    from .config import TrainConfig
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    if not args.resume:
        return TrainConfig(**{**(defaults or {}), **given}), None
    info = checkpoint.read_run_info(Path(args.out) / "last" if args.resume == "last" else args.resume)
    saved = TrainConfig(**info["config"])
    changed = saved.differences(dataclasses.replace(saved, **given))
    if changed:
        from .errors import UserError
        raise UserError(f"--resume continues the run with the settings it was started with; these flags "
                        f"would change it: {'; '.join(changed)}. Leave them out, or start a new run "
                        f"(--overwrite, or another --out)")
    return dataclasses.replace(saved, **given), info


def _check_finetune_args(args):
    """Every flag and combination, before anything heavy loads. Returns (TrainConfig, run info or None)."""
    from . import tasks
    from .errors import UserError
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it: choose one")
    if not args.train:
        for name in ("dev", "test"):
            if getattr(args, name):
                raise UserError(f"--{name} needs --train (your own data); the bundled tasks bring their splits")
        if args.token_task:
            raise UserError("--token-task needs --train (a CoNLL file); for the bundled tagger use --task pos")
        tasks.check_task(args.task or "sentiment")
    elif args.task:
        raise UserError("--task and --train: choose one (a bundled task, or your files)")
    if args.problem != "auto" and (args.token_task or args.task == "pos"):
        raise UserError(f"--problem {args.problem}: token tasks have one tag per word; leave --problem out")
    if args.crf and not (args.token_task or args.task == "pos"):
        raise UserError("--crf is a tagging head: it needs a token task (--task pos, or --token-task --train FILE)")
    if getattr(args, "crf_lr", 0.0) and not args.crf:
        raise UserError(f"--crf-lr {args.crf_lr}: the learning rate of a CRF head, which needs --crf")
    cfg, info = _train_config(args)
    cfg.check()
    model_cfg = _model_config(args.model)
    if args.max_length is None and info is None and cfg.max_length > model_cfg.max_position_embeddings:
        cfg.max_length = model_cfg.max_position_embeddings   # the default, capped by a small model's limit
    cfg.check_model(model_cfg)
    n = model_cfg.num_hidden_layers
    if sum((args.freeze is not None, args.train_top_layers is not None, args.lora != 0)) > 1:
        raise UserError("--freeze, --train-top-layers and --lora are alternatives: choose one")
    if args.train_top_layers is not None and not 0 <= args.train_top_layers <= n:
        raise UserError(f"--train-top-layers: expected 0..{n} (the model has {n} layers), got {args.train_top_layers}")
    if args.lora < 0:
        raise UserError(f"--lora: expected a rank >= 0 (0: off), got {args.lora}")
    if info is not None:
        settings = _run_settings(args)
        saved = info.get("settings", {})
        changed = [f"--{k.replace('_', '-')} {settings[k]} (the run has {saved[k]})"
                   for k in settings if k in saved and saved[k] != settings[k]]
        if changed:
            raise UserError(f"--resume continues the run as it was started; these differ: {'; '.join(changed)}")
    return cfg, info


def _run_settings(args) -> dict:
    """The flags outside TrainConfig that a resumed run must repeat (stored in last/run.json)."""
    return {"model": str(args.model), "task": args.task, "freeze": args.freeze,
            "train_top_layers": args.train_top_layers, "lora": args.lora, "impl": args.impl,
            "problem": args.problem, "crf": args.crf}


def _check_crf_tags(dataset, args) -> None:
    """BIO tags under a CRF: every gold sequence must be a valid path (IOB1 data is not)."""
    from .crf import bio_violation, is_bio
    from .errors import UserError
    if not is_bio(dataset.labels):
        return
    for split, path in (("train", args.train), ("dev", args.dev), ("test", args.test)):
        for k, ex in enumerate(getattr(dataset, split), 1):
            bad = bio_violation(ex.label)
            if bad is not None:
                where = (f"{path}, line {ex.line + bad[0]}" if path and ex.line else
                         f"{dataset.name} ({split}), sentence {k}, word {bad[0] + 1}")
                raise UserError(f"{where}: {bad[1]}; with --crf, BIO tags need I-X after B-X or I-X (convert "
                                f"IOB1 data to BIO first)")


def _resume_hint(args, argv) -> str:
    import shlex
    from pathlib import Path
    last = Path(args.out) / "last"
    if not (last / "trainer_state.pt").is_file() and not (last.with_name("last.old") / "trainer_state.pt").is_file():
        return f"interrupted before the first checkpoint (written after epoch 1); nothing to resume in {args.out}"
    from .checkpoint import read_run_info
    epoch = read_run_info(last)["epoch"]
    words = [w for w in argv if w != "--overwrite"]
    if "--resume" not in words:
        words.append("--resume")
    return (f"interrupted; the checkpoint after epoch {epoch} is in {last}. Continue with:\n"
            f"  minift {shlex.join(words)}")


def _keep_freed_memory(device) -> None:
    """Training on the CPU: glibc keeps freed memory for reuse (minift.memory says why); each process
    does it, rank 0 says so."""
    import torch

    from . import memory
    from .trainer import is_main
    if torch.device(device).type == "cpu":
        how = memory.keep_freed_memory()
        if is_main():
            print(f"memory: {how}")


def _say_matmul(impl: str, precision: str, device) -> None:
    """A float32 run of impl "fused" on the CPU: which matrix multiply its linear layers use, and why
    (minift.ops.gemm_backend times both once)."""
    import torch

    from . import ops
    from .trainer import autocast_dtype, is_main
    device = torch.device(device)
    if device.type != "cpu":
        return
    fp32 = autocast_dtype(precision, device) is None      # every rank calls it: auto broadcasts rank 0's choice
    if fp32 and is_main() and ops.extension_available() and _resolve_impl(impl, device) == "fused":
        print(f"matmul: {ops.gemm_backend_why()}")


def cmd_finetune(args) -> int:
    from . import checkpoint
    from .trainer import autocast_dtype, is_main

    cfg, info = _check_finetune_args(args)                  # every flag, before the model loads
    device = _setup_distributed()
    if args.device is not None:
        device = _device(args.device)
    autocast_dtype(cfg.precision, device)
    _keep_freed_memory(device)
    _say_matmul(args.impl, cfg.precision, device)
    if is_main():   # lock the folder now; an earlier run is cleared (--overwrite) only when training starts
        checkpoint.start_run(args.out, resume=bool(args.resume), overwrite=args.overwrite, clear=False)
    try:
        return _finetune(args, cfg, info, device)
    finally:
        if is_main():
            checkpoint.release_lock(args.out)


def _finetune(args, cfg, info, device) -> int:
    import logging
    import time

    import torch
    import torch.distributed as dist

    import minift
    from . import data, metrics, peft, tasks
    from .trainer import NonFiniteLoss, Trainer, check_resumable, is_main
    torch.manual_seed(cfg.seed)
    if args.train:
        dataset = data.from_files(args.train, args.dev, args.test, token_task=args.token_task, encoding=args.encoding,
                                  problem=data.PROBLEMS.get(args.problem, "auto"), label_sep=args.label_sep)
    else:
        dataset = tasks.load_task(args.task or "sentiment")
        if args.problem != "auto" and data.PROBLEMS[args.problem] != dataset.problem:
            from .errors import UserError
            own = {v: k for k, v in data.PROBLEMS.items()}[dataset.problem]
            raise UserError(f"--problem {args.problem}: the task {args.task or 'sentiment'} is {own}")
    if info is not None and info.get("labels") is not None and info["labels"] != dataset.labels:
        check_resumable({"labels": info["labels"], "config": info["config"]}, cfg, dataset.labels, args.out)
    say = print if is_main() else (lambda *a, **k: None)
    say(f"task {dataset.name}: {dataset.sizes()}, {len(dataset.labels)} labels"
        + ("" if dataset.test else " (no test set: no test metric)"))
    if dataset.task != "token":
        name = {v: k for k, v in data.PROBLEMS.items()}[dataset.problem]
        how = ("given by --problem" if args.problem != "auto" else
               f"chosen from the data: {dataset.problem_reason}; --problem sets it" if args.train else
               f"the task's own: {dataset.problem_reason}")
        say(f"problem: {name} ({how})")
    if args.crf:
        _check_crf_tags(dataset, args)
    logging.getLogger("minift").setLevel(logging.INFO)
    model = _build_model(args.model, dataset, _resolve_impl(args.impl, device), crf=args.crf)
    if args.crf:
        constrained = not bool(model.crf.allowed_transitions.all() and model.crf.allowed_start.all())
        say("CRF head: " + ("BIO constraints (I-X only after B-X or I-X)" if constrained else
                            "no constraints (the tags are not BIO)") + "; Viterbi decoding")
    say(model.load_report.summary())
    tokenizer = minift.Tokenizer.from_pretrained(args.model)
    say(peft.apply(model, freeze=args.freeze, train_top_layers=args.train_top_layers, lora_rank=args.lora))
    trainer = Trainer(model, tokenizer, dataset, cfg, args.out, device=device, log=say, overwrite=args.overwrite)
    trainer.settings = _run_settings(args)
    if args.resume:
        trainer.resume(None if args.resume == "last" else args.resume)
        say("resuming with the run's own settings (flags that would change them are refused)")
    say(f"training on {device} ({trainer.world} process(es)), impl={model.config.impl}, "
        f"{trainer.steps_per_epoch} steps per epoch, writing to {args.out}")
    t0 = time.time()
    try:
        result = trainer.fit()
    except NonFiniteLoss as e:
        print(f"minift finetune: error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        if is_main():
            print(f"\nminift finetune: {_resume_hint(args, args.argv)}", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if is_main():
        for split in ("dev", "test"):
            if f"{split}_report" in result:
                print(f"\n{split} report ({dataset.name}, best epoch by dev score):")
                print(metrics.format_report(result[f"{split}_report"]))
        if "thresholds" in result:
            print("\nper-class thresholds, chosen on dev (saved as best/thresholds.json): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in result["thresholds"].items()))
        shown = "  ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in result.items()
                          if k.startswith(("dev_", "test_")) and isinstance(v, float))
        print(f"\n{shown}  wall time {time.time() - t0:.0f} s")
        written = [n for n in ("best", "metrics.json", "train_log.jsonl", "training.png")
                   if (trainer.out / n).exists()]
        print(f"wrote in {args.out}: {', '.join(written)}")
    return 0


# ------------------------------------------------------------------------------------------
# minift pretrain: masked-language modelling (minift.pretraining)
# ------------------------------------------------------------------------------------------

_SIZE_FLAGS = {"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
               "intermediate": "intermediate_size"}


def _pretrain_settings(args) -> dict:
    """The flags outside TrainConfig that a resumed pre-training run must repeat (last/run.json)."""
    return {"model": None if args.config else str(args.model or "minilm"), "config": args.config,
            **{k: getattr(args, k) for k in _SIZE_FLAGS}, "task": args.task,
            "text": [str(t) for t in args.text] if args.text else None, "dev": args.dev,
            "mlm_probability": args.mlm_probability, "whole_word_mask": args.whole_word_mask, "impl": args.impl}


def _refuse_changed_settings(info: dict, settings: dict) -> None:
    from .errors import UserError
    saved = info.get("settings", {})
    changed = [f"--{k.replace('_', '-')} {settings[k]} (the run has {saved[k]})"
               for k in settings if k in saved and saved[k] != settings[k]]
    if changed:
        raise UserError(f"--resume continues the run as it was started; these differ: {'; '.join(changed)}")


def _check_pretrain_args(args):
    """Every flag and combination, before anything heavy loads: (TrainConfig, run info or None, BertConfig)."""
    from . import pretraining, tasks
    from .config import PRETRAIN_CONFIGS, PRETRAIN_DEFAULTS
    from .errors import UserError
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it: choose one")
    if args.text:
        if args.task:
            raise UserError("--task and --text: choose one (a bundled corpus's text, or your files)")
    else:
        if args.dev:
            raise UserError("--dev needs --text (your files); the bundled corpora bring their held-out split")
        tasks.check_task(args.task or "sentiment")
    if args.config and args.model:
        raise UserError("--config (a new model, from scratch) and --model (continue a checkpoint): choose one")
    sizes = {_SIZE_FLAGS[k]: getattr(args, k) for k in _SIZE_FLAGS if getattr(args, k) is not None}
    if sizes and not args.config:
        given = ", ".join(f"--{k}" for k in _SIZE_FLAGS if getattr(args, k) is not None)
        raise UserError(f"{given}: set the size of a new model, so they need --config (e.g. --config tiny); "
                        f"a checkpoint (--model) has its own size")
    for k in _SIZE_FLAGS:
        if getattr(args, k) is not None and getattr(args, k) < 1:
            raise UserError(f"--{k}: expected an integer >= 1, got {getattr(args, k)}")
    if not 0.0 < args.mlm_probability < 1.0:
        raise UserError(f"--mlm-probability: expected a share in (0, 1), got {args.mlm_probability}")
    if "hidden_size" in sizes or "num_attention_heads" in sizes:
        base = PRETRAIN_CONFIGS.get(args.config, {})
        hidden = sizes.get("hidden_size", base.get("hidden_size"))
        heads = sizes.get("num_attention_heads", base.get("num_attention_heads"))
        if hidden is not None and heads is not None and hidden % heads:
            raise UserError(f"--hidden {hidden} must be a multiple of --heads {heads} (each head gets hidden/heads)")
    cfg, info = _train_config(args, PRETRAIN_DEFAULTS["scratch" if args.config else "continued"])
    cfg.check()
    model_cfg = (pretraining.scratch_config(args.config, **sizes) if args.config
                 else _model_config(args.model or "minilm"))
    if args.max_length is None and info is None and cfg.max_length > model_cfg.max_position_embeddings:
        cfg.max_length = model_cfg.max_position_embeddings
    cfg.check_model(model_cfg)
    if info is not None:
        _refuse_changed_settings(info, _pretrain_settings(args))
    return cfg, info, model_cfg


def cmd_pretrain(args) -> int:
    from . import checkpoint
    from .trainer import autocast_dtype, is_main

    cfg, info, model_cfg = _check_pretrain_args(args)        # every flag, before the model loads
    device = _setup_distributed()
    if args.device is not None:
        device = _device(args.device)
    autocast_dtype(cfg.precision, device)
    _keep_freed_memory(device)
    _say_matmul(args.impl, cfg.precision, device)
    if is_main():
        checkpoint.start_run(args.out, resume=bool(args.resume), overwrite=args.overwrite, clear=False)
    try:
        return _pretrain(args, cfg, model_cfg, device)
    finally:
        if is_main():
            checkpoint.release_lock(args.out)


def _pretrain(args, cfg, model_cfg, device) -> int:
    import time

    import torch
    import torch.distributed as dist

    import minift
    from . import pretraining as P
    from .trainer import NonFiniteLoss, is_main
    torch.manual_seed(cfg.seed)
    say = print if is_main() else (lambda *a, **k: None)
    corpus = P.corpus_from_files(args.text, args.dev, args.encoding) if args.text else \
        P.corpus_from_task(args.task or "sentiment")
    say(f"text {corpus.name}: {corpus.sizes()}" + ("" if args.text else " (the task's text; labels unused)"))
    impl = _resolve_impl(args.impl, device)
    if args.config:
        tokenizer = minift.Tokenizer.from_pretrained("minilm")
        model_cfg.impl = impl
        model, keep = minift.BertForMaskedLM(model_cfg), {}
        n = sum(p.numel() for p in model.parameters())
        say(f"model: a new BERT from scratch (--config {args.config}: {model_cfg.num_hidden_layers} layers, hidden "
            f"{model_cfg.hidden_size}, {model_cfg.num_attention_heads} heads, FFN {model_cfg.intermediate_size}; "
            f"{n / 1e6:.1f} M parameters), the bundled MiniLM vocabulary ({tokenizer.vocab_size:,} WordPiece tokens)")
    else:
        source = args.model or "minilm"
        model, keep = P.load_for_pretraining(source, impl)
        tokenizer = minift.Tokenizer.from_pretrained(source)
        say(f"model: continued from {model.load_report.path}")
        new = P.new_mlm_head(model)
        if new:
            say(f"  the masked-LM head is new (not in the checkpoint; initialised at random): {', '.join(new)}; "
                f"its decoder is the word-embedding matrix (tied)")
        if keep:
            say(f"  kept unchanged in the output (masked-LM training does not use it): {', '.join(sorted(keep))}")
    rule = "whole words" if args.whole_word_mask else "per token"
    say(f"masking: {args.mlm_probability:.0%} of the tokens ({rule}; 80% [MASK], 10% random, 10% unchanged), "
        f"drawn afresh each epoch; held-out masks drawn once (seed {P.EVAL_MASK_SEED}, per token)")
    loss_op = {"fused": "the fused softmax-cross-entropy (minift.ops.softmax_cross_entropy)",
               "reference": "the hand-derived cross-entropy (minift.functional)",
               "torch": "torch.nn.functional.cross_entropy"}[impl]
    say(f"loss: {loss_op} over the masked positions only, C = {model.config.vocab_size:,}")
    trainer = P.PretrainTrainer(model, tokenizer, corpus, cfg, args.out, mlm_probability=args.mlm_probability,
                                whole_word_mask=args.whole_word_mask, keep_tensors=keep, device=device, log=say,
                                overwrite=args.overwrite)
    trainer.settings = _pretrain_settings(args)
    split = {k: v for k, v in trainer.num_split.items() if v}
    if split:
        say(f"lines longer than --max-length {cfg.max_length} were cut into pieces (none dropped): {split}")
    if args.resume:
        trainer.resume(None if args.resume == "last" else args.resume)
        say("resuming with the run's own settings (flags that would change them are refused)")
    say(f"training on {device} ({trainer.world} process(es)), impl={impl}, {len(trainer.lengths)} pieces, "
        f"{trainer.steps_per_epoch} steps per epoch, writing to {args.out}")
    t0 = time.time()
    try:
        result = trainer.fit()
    except NonFiniteLoss as e:
        print(f"minift pretrain: error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        if is_main():
            print(f"\nminift pretrain: {_resume_hint(args, args.argv)}", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if is_main():
        before = result["history"][0]
        line = (f"\nheld-out perplexity {before['dev_perplexity']:.1f} before training, "
                f"{result['dev_perplexity']:.1f} after (best epoch; MLM loss {before['dev_mlm_loss']:.3f} -> "
                f"{result['dev_mlm_loss']:.3f}, top-1 accuracy {result['dev_mlm_accuracy']:.3f})")
        if "test_perplexity" in result:
            line += f"; test perplexity {result['test_perplexity']:.1f}"
        say(line + f"  wall time {time.time() - t0:.0f} s")
        written = [n for n in ("best", "metrics.json", "train_log.jsonl", "training.png")
                   if (trainer.out / n).exists()]
        say(f"wrote in {args.out}: {', '.join(written)}; best/ is a Hugging Face BertForMaskedLM checkpoint "
            f"(minift finetune --model {trainer.out / 'best'}; minift predict --mlm --model {trainer.out / 'best'})")
    return 0


def _load_finetuned(model_dir, impl="torch"):
    """A model saved by `minift finetune` (or any HF BERT classifier): its head from config.json."""
    import minift
    from .errors import UserError
    from .pretrained import resolve
    cfg = _model_config(model_dir)                           # names a missing folder, file or bad JSON
    path = resolve(model_dir)
    import json
    raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    arch = (raw.get("architectures") or ["BertForSequenceClassification"])[0]
    token_archs = ("BertForTokenClassification", "BertCRFForTokenClassification")
    if arch not in ("BertForSequenceClassification", *token_archs):
        raise UserError(f"{path}: expected a sequence or token classification model, got {arch}")
    if not cfg.id2label:
        raise UserError(f"{path / 'config.json'}: has no id2label; expected a fine-tuned classifier "
                        f"(the best/ folder that minift finetune writes)")
    if arch == "BertCRFForTokenClassification":          # its CRF (transitions, constraints) comes from the file
        from .crf import BertCRFForTokenClassification as cls
    else:
        cls = getattr(minift, arch)
    model = cls.from_pretrained(path, impl=impl)
    return model, minift.Tokenizer.from_pretrained(path), arch in token_archs


def cmd_evaluate(args) -> int:
    import json

    from . import data, metrics, tasks
    from .errors import UserError
    from .trainer import predict_labels, predict_values, read_thresholds
    if args.test and args.task:
        raise UserError("--task and --test: choose one (a bundled task's split, or your file)")
    if not args.test:
        tasks.check_task(args.task or "sentiment")
    if args.max_length < 2:
        raise UserError(f"--max-length: expected an integer >= 2, got {args.max_length}")
    device = _device(args.device)
    model, tok, token_task = _load_finetuned(args.model, _resolve_impl(args.impl, device))
    if args.max_length > model.config.max_position_embeddings:
        raise UserError(f"--max-length: the model reads at most {model.config.max_position_embeddings} tokens, "
                        f"got {args.max_length}")
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    problem = "token" if token_task else _problem_of(model)
    if args.test:
        if token_task:
            examples = data.read_conll(args.test, encoding=args.encoding)
        else:
            examples = data.read_classification_file(args.test, encoding=args.encoding, problem=problem,
                                                     label_sep=args.label_sep)
        name = args.test
    else:
        task = args.task or "sentiment"
        dataset = tasks.load_task(task)
        if dataset.task != ("token" if token_task else "classification") or (
                not token_task and dataset.problem != problem):
            raise UserError(f"--task {task}: its labels are not what the model {args.model} predicts "
                            f"({problem.replace('_', ' ')})")
        examples, name = getattr(dataset, args.split), f"{task} ({args.split})"
    if problem != data.REGRESSION:
        data.check_labels(examples, labels, str(name))
    if token_task:
        enc = data.encode_tokens(tok, examples, labels, args.max_length)
    else:
        enc = data.encode_classification(tok, examples, labels, args.max_length, problem)
    model.to(device)
    print(f"{name}: {len(examples)} examples on {device}"
          + (f", {enc.num_truncated} truncated" if enc.num_truncated else ""))
    if problem in (data.REGRESSION, data.MULTI_LABEL):
        thresholds = read_thresholds(_model_path(args.model), labels) if problem == data.MULTI_LABEL else None
        pred, gold = predict_values(model, enc, tok.pad_token_id, 128, device,
                                    thresholds if thresholds is not None else 0.5)
        if problem == data.REGRESSION:
            scores = metrics.regression_scores(pred, gold)
        else:
            scores = metrics.multi_label_scores(pred, gold, len(labels))
            print("thresholds: " + ("per class, chosen on dev (thresholds.json)" if thresholds else "0.5"))
        print("  ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in scores.items()))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(scores, f, indent=2)
        return 0
    if token_task:
        pred, gold, _ = predict_labels(model, enc, tok.pad_token_id, 128, device, True, return_probs=True)
        scores = metrics.token_scores(pred, gold, labels)
    else:
        pred, gold = predict_labels(model, enc, tok.pad_token_id, 128, device, False)
        report = metrics.classification_report(pred, gold, labels)
        scores = {"accuracy": report["accuracy"], "macro_f1": report["macro avg"]["f1"], "report": report}
    print(metrics.format_report(scores["report"]))
    print(f"macro-F1 {scores['macro_f1']:.4f}  accuracy {scores['accuracy']:.4f}"
          + (f"  entity precision {scores['entity_precision']:.4f}  recall {scores['entity_recall']:.4f}  "
             f"F1 {scores['entity_f1']:.4f}" if "entity_f1" in scores else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(scores, f, indent=2)
    return 0


def _problem_of(model) -> str:
    """A sequence model's problem type: its config's, else Hugging Face's rule (one output: regression)."""
    from .data import REGRESSION, SINGLE_LABEL
    return model.config.problem_type or (REGRESSION if model.config.num_labels == 1 else SINGLE_LABEL)


def _model_path(model_dir):
    from .pretrained import resolve
    return resolve(model_dir)


def _read_stdin(encoding: str) -> list[tuple[int, str]]:
    from .errors import UserError
    raw = sys.stdin.buffer.read()
    try:
        text = raw.decode("utf-8-sig" if encoding.lower() in ("utf-8", "utf8") else encoding)
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"standard input, line {line}: not valid {encoding} (byte 0x{raw[e.start]:02x}); "
                        f"give its encoding with --encoding") from None
    return list(enumerate(text.replace("\r\n", "\n").split("\n"), 1))


def cmd_predict(args) -> int:
    import torch

    from . import data
    from .errors import UserError
    from .trainer import predict_labels
    device = _device(args.device)
    if args.texts and args.file:
        raise UserError("give texts as arguments or --file, not both")
    if args.texts:
        for i, t in enumerate(args.texts, 1):
            if not t.strip():
                raise UserError(f"text {i} is empty; nothing to label")
        texts = args.texts
    else:
        lines = (list(enumerate(data.read_text(args.file, args.encoding).split("\n"), 1)) if args.file
                 else _read_stdin(args.encoding))
        texts = [t for _, t in lines if t.strip()]           # blank lines separate nothing: skipped
    if not texts:
        raise UserError("no input: give texts as arguments, --file FILE, or lines on standard input")
    if args.mlm:
        return _predict_mlm(args, texts, device)
    model, tok, token_task = _load_finetuned(args.model, _resolve_impl(args.impl, device))
    names = model.config.id2label
    limit = model.config.max_position_embeddings
    if token_task:
        examples = [data.Example(t.split(), ["?"] * len(t.split())) for t in texts]
        enc = data.encode_tokens(tok, examples, ["?"], limit)
    else:
        examples = [data.Example(t, "?") for t in texts]
        enc = data.encode_classification(tok, examples, ["?"], limit)
    if enc.num_truncated:
        print(f"minift predict: warning: {enc.num_truncated} of {len(texts)} text(s) are longer than the "
              f"model's {limit} tokens; only their beginning was read", file=sys.stderr)
    model.to(device)
    problem = None if token_task else _problem_of(model)
    if problem in (data.REGRESSION, data.MULTI_LABEL):
        from .trainer import predict_logits, read_thresholds
        logits, _ = predict_logits(model, enc, tok.pad_token_id, 64, device)             # (N, C)
        if problem == data.REGRESSION:
            for ex, z in zip(examples, logits[:, 0].tolist()):
                print(f"{z:.4f}\t{ex.text}")
            return 0
        labels = [names[i] for i in range(len(names))]
        thresholds = read_thresholds(_model_path(args.model), labels)
        probs = torch.sigmoid(logits)
        chosen = probs > torch.tensor(thresholds if thresholds is not None else [0.5] * len(labels))
        for ex, row, keep in zip(examples, probs.tolist(), chosen.tolist()):
            picked = [f"{labels[c]} {row[c]:.4f}" for c in range(len(labels)) if keep[c]]
            print(f"{'|'.join(labels[c] for c in range(len(labels)) if keep[c]) or '(none)'}\t"
                  f"{', '.join(picked)}\t{ex.text}")
        return 0
    pred, _, prob = predict_labels(model, enc, tok.pad_token_id, 64, device, token_task, return_probs=True)
    for ex, p, pr in zip(examples, pred, prob):
        if token_task:
            print(" ".join(f"{w}/{names[t]}" for w, t in zip(ex.text, p)))
        else:
            print(f"{names[p]}\t{pr:.4f}\t{ex.text}")
    return 0


def _predict_mlm(args, texts: list[str], device) -> int:
    """predict --mlm: the top-k tokens, with their probabilities, for each [MASK] of each text."""
    import minift
    from . import pretraining as P
    from .errors import UserError
    from .pretrained import resolve
    path = resolve(args.model)
    _model_config(args.model)                                # names a missing config.json or bad JSON
    model = minift.BertForMaskedLM.from_pretrained(path, impl=_resolve_impl(args.impl, device))
    if P.new_mlm_head(model):
        raise UserError(f"{path}: has no masked-LM head (no cls.predictions.* weights in the checkpoint), so it "
                        f"cannot fill in [MASK]; give a checkpoint written by minift pretrain (OUT/best) or another "
                        f"BertForMaskedLM")
    tok = minift.Tokenizer.from_pretrained(path)
    results = P.fill_mask(model, tok, texts, args.top_k, device)
    for text, masks in zip(texts, results):
        print(text)
        for m, top in enumerate(masks, 1):
            shown = "  ".join(f"{t} {p:.4f}" for t, p in top)
            print(f"  [MASK] {m}: {shown}")
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

    import torch

    from . import bench
    if args.step:
        rows, checked, profile = bench.bench_step_cpu()
        header = bench.run_header(torch.device("cpu"))
        table = bench.format_rows(rows) + f"\n\nChecked first: {checked}.\n\nProfile of minift fused's step at the " \
            "real lengths:\n\n```\n" + profile.strip() + "\n```"
    else:
        rows, header = bench.run(quick=args.quick)
        table = bench.format_rows(rows)
    print(header)
    print(table)
    if args.results:
        path = Path(args.results)
        with open(path, "a", encoding="utf-8") as f:
            flag = " --step" if args.step else " --quick" if args.quick else ""
            f.write(f"\n### `minift bench{flag}`: {header}\n\n{table}\n")
        print(f"appended to {path}")
    return 0


def _add_impl_argument(p) -> None:
    p.add_argument("--impl", default="auto", choices=["auto", "torch", "reference", "fused"],
                   help="auto: fused when the compiled kernels are available, else torch")


def _add_train_config_options(p, defaults: dict | None = None, leave_out: tuple[str, ...] = ()) -> None:
    """One flag per TrainConfig field, its default and help text read from the dataclass
    (``defaults``: a command's own defaults for some fields, e.g. pretrain's; ``leave_out``: fields
    that mean nothing to the command, which then keep their defaults).

    The flags default to None so that a run can tell what was given (for --resume); the
    TrainConfig fills in the rest."""
    import dataclasses

    from .config import TrainConfig, flag
    for f in dataclasses.fields(TrainConfig):
        if f.name in leave_out:
            continue
        text = f"{f.metadata['help']} (default: {(defaults or {}).get(f.name, f.default)})"
        if isinstance(f.default, bool):
            p.add_argument(f"--no-{f.name.replace('_', '-')}", dest=f.name, action="store_const", const=False,
                           default=None, help=f"no {text}")
        else:
            p.add_argument(flag(f.name), type=type(f.default), default=None, choices=f.metadata.get("choices"),
                           help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minift", description="minift: BERT fine-tuning, every step visible.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("doctor", help="report the build mode, versions and the GPU")
    p.set_defaults(run=cmd_doctor)
    p = sub.add_parser("finetune", help="fine-tune a pretrained model (default: MiniLM on Rotten Tomatoes)",
                       description="Fine-tune a model and write the run to --out. A folder that holds an earlier "
                                   "run is not reused unless --overwrite (replace it) or --resume (continue it) "
                                   "is given. --resume continues with the run's own settings: a flag that would "
                                   "change them is refused.")
    p.add_argument("--task", default=None, help="a bundled task: sentiment (default), topic, pos, valence")
    p.add_argument("--train", help="your training file: CSV/TSV/JSONL (text,label[,text_pair]) or CoNLL with "
                                   "--token-task")
    p.add_argument("--problem", default="auto", choices=["auto", "classification", "regression", "multi_label"],
                   help="auto (default): from the labels: numbers with decimals -> regression, lists or "
                        "labels joined by --label-sep -> multi_label, else classification")
    p.add_argument("--label-sep", default="|", help="multi-label CSV/TSV: the separator of a row's labels (default |)")
    p.add_argument("--dev", help="your dev file (default: a hash-chosen 10%% of --train)")
    p.add_argument("--test", help="your test file (none: no test metric)")
    p.add_argument("--token-task", action="store_true", help="the files are CoNLL token tagging data")
    p.add_argument("--crf", action="store_true", help="token tasks: a linear-chain CRF over the word tags (first "
                                                      "sub-word of each word), BIO constraints when the tags are BIO, "
                                                      "Viterbi decoding")
    p.add_argument("--encoding", default="utf-8", help="the encoding of your files (default: utf-8; a BOM is fine)")
    p.add_argument("--model", default="minilm", help="a Hugging Face-format directory or 'minilm'")
    p.add_argument("--out", default="runs/finetune", help="the run folder (default: runs/finetune)")
    p.add_argument("--overwrite", action="store_true", help="replace the earlier run in --out (files you put there stay)")
    p.add_argument("--resume", nargs="?", const="last",
                   help="continue the run in --out from OUT/last (or a given checkpoint) with its own settings")
    _add_train_config_options(p)
    _add_impl_argument(p)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: GPU if there is one)")
    p.add_argument("--freeze", choices=["encoder"], help="train the classifier only (a linear probe)")
    p.add_argument("--train-top-layers", type=int, default=None, help="train only the top K encoder layers")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank on query/value (0: off)")
    p.set_defaults(run=cmd_finetune)
    from .config import PRETRAIN_CONFIGS, PRETRAIN_DEFAULTS
    p = sub.add_parser("pretrain", help="masked-language-model pre-training on raw text, from scratch or continued",
                       description="Masked-language modelling (BERT's 15% / 80-10-10 rule, new masks each epoch) on "
                                   "the text of a bundled corpus or your files, from scratch (--config) or continuing "
                                   "a checkpoint (--model, default MiniLM). Writes the run to --out like finetune "
                                   "(--overwrite, --resume, train_log.jsonl, training.png); OUT/best is a Hugging "
                                   "Face BertForMaskedLM checkpoint. Held-out MLM loss and perplexity each epoch.")
    p.add_argument("--task", default=None, help="a bundled corpus's text, labels unused: sentiment (default), "
                                                "topic, pos, valence")
    p.add_argument("--text", action="append", help="your text: a file (one document or sentence per line) or a "
                                                   "folder of .txt files; repeatable")
    p.add_argument("--dev", help="held-out text file (default: a hash-chosen 10%% of the --text lines)")
    p.add_argument("--encoding", default="utf-8", help="the encoding of your files (default: utf-8; a BOM is fine)")
    p.add_argument("--model", default=None, help="continue pre-training this Hugging Face-format directory or "
                                                 "'minilm' (default, when no --config)")
    p.add_argument("--config", default=None, help=f"a new model from scratch: {', '.join(PRETRAIN_CONFIGS)} or a "
                                                  f"config.json (with the bundled MiniLM vocabulary)")
    p.add_argument("--layers", type=int, help="with --config: number of layers")
    p.add_argument("--hidden", type=int, help="with --config: hidden size H")
    p.add_argument("--heads", type=int, help="with --config: attention heads (H must be a multiple)")
    p.add_argument("--intermediate", type=int, help="with --config: feed-forward size")
    p.add_argument("--mlm-probability", type=float, default=0.15, help="share of tokens chosen (default: 0.15)")
    p.add_argument("--whole-word-mask", action="store_true", help="choose whole words (all their sub-words)")
    p.add_argument("--out", default="runs/pretrain", help="the run folder (default: runs/pretrain)")
    p.add_argument("--overwrite", action="store_true", help="replace the earlier run in --out (files you put there stay)")
    p.add_argument("--resume", nargs="?", const="last",
                   help="continue the run in --out from OUT/last (or a given checkpoint) with its own settings")
    scratch, continued = PRETRAIN_DEFAULTS["scratch"], PRETRAIN_DEFAULTS["continued"]
    # class weights and a balanced sampler are about labelled classes, which pre-training has none of
    _add_train_config_options(p, {k: f"{scratch[k]} with --config, {continued[k]} with --model" for k in scratch},
                              leave_out=("class_weights", "sampler", "crf_lr"))
    _add_impl_argument(p)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: GPU if there is one)")
    p.set_defaults(run=cmd_pretrain)
    p = sub.add_parser("evaluate", help="evaluate a fine-tuned model on a task's split or a test file")
    p.add_argument("--model", required=True, help="a directory written by minift finetune (OUT/best)")
    p.add_argument("--task", default=None, help="a bundled task (default: sentiment)")
    p.add_argument("--split", default="test", choices=["train", "dev", "test"])
    p.add_argument("--test", help="a CSV/TSV/JSONL (or CoNLL for token models) file instead of a task")
    p.add_argument("--encoding", default="utf-8", help="the encoding of --test (default: utf-8)")
    p.add_argument("--label-sep", default="|", help="multi-label CSV/TSV: the separator of a row's labels (default |)")
    p.add_argument("--max-length", type=int, default=128)
    _add_impl_argument(p)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: GPU if there is one)")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.set_defaults(run=cmd_evaluate)
    p = sub.add_parser("predict", help="label texts with a fine-tuned model (arguments, --file or stdin)")
    p.add_argument("--model", required=True)
    p.add_argument("texts", nargs="*", help="texts to label (token models: words separated by spaces)")
    p.add_argument("--file", help="one text per line (blank lines are skipped)")
    p.add_argument("--mlm", action="store_true",
                   help="fill in the blanks: the --top-k tokens for each [MASK] (a model from minift pretrain)")
    p.add_argument("--top-k", type=int, default=5, help="with --mlm: tokens shown per [MASK] (default: 5)")
    p.add_argument("--encoding", default="utf-8", help="the encoding of --file or standard input (default: utf-8)")
    _add_impl_argument(p)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: GPU if there is one)")
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
    p.add_argument("--step", action="store_true",
                   help="only the CPU fine-tuning step against transformers' (B=32: real lengths, T=64, T=128), "
                        "and a profile of minift's step")
    p.add_argument("--results", help="append the table to this markdown file (e.g. benchmarks/RESULTS.md)")
    p.set_defaults(run=cmd_bench)
    p = sub.add_parser("gradcheck", help="check every hand-derived gradient against autograd (float64)")
    p.set_defaults(run=cmd_gradcheck)
    return parser


def main(argv=None) -> int:
    """Run a sub-command. A user's mistake: one line on stderr, exit 2. Ctrl-C: exit 130. A bug:
    its traceback (so that it can be reported and fixed)."""
    from .errors import UserError
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return int(args.run(args) or 0)
    except (UserError, OSError) as e:
        if args.debug:
            raise
        if isinstance(e, OSError) and e.filename is not None and e.strerror:
            message = f"{e.filename}: {e.strerror}"
        else:
            message = " ".join(str(e).split("\n"))
        print(f"minift {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nminift {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
