"""The `minift` command line: finetune, evaluate, predict, gradcheck, doctor, bench, assignment.

Each sub-command is a function ``cmd_<name>(args)`` below; heavy modules are imported inside it so
that ``minift --help`` stays fast.
"""
from __future__ import annotations

import argparse
import sys


def cmd_doctor(args) -> int:
    import platform

    import torch

    import minift
    print(f"minift {minift.__version__}, Python {platform.python_version()}, torch {torch.__version__}")
    print(f"CUDA available: {torch.cuda.is_available()} (torch built with CUDA {torch.version.cuda})")
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name(0)}")
    return 0


def cmd_gradcheck(args) -> int:
    from . import gradcheck
    results = gradcheck.run_all(gradcheck.extra_checks())
    print(gradcheck.format_table(results))
    failed = [r.op for r in results if not r.passed]
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minift", description="minift: BERT fine-tuning, every step visible.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("doctor", help="report the build mode, versions and the GPU")
    p.set_defaults(run=cmd_doctor)
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
