"""Class imbalance on the default task (issue 17): macro-F1 and minority recall with no remedy,
with class weights (--class-weights balanced) and with the balanced sampler (--sampler balanced).

The Rotten Tomatoes training split is made imbalanced by keeping only every 10th rotten snippet
(``--keep-every``); dev and test stay as they are (42% rotten), so the minority class is
"rotten". Each remedy runs with each seed from the same encoded data, and the table gives the test
macro-F1 and the test recall of "rotten" of the best epoch (chosen by dev accuracy, as minift does).

    python benchmarks/imbalance.py                       # MiniLM, full data, 3 epochs, seeds 0 1 2
    python benchmarks/imbalance.py --train-size 1000 --eval-size 300 --epochs 1 --max-length 64  # a CPU-sized run

Library code returns; this script prints (a markdown table to paste into README / RESULTS.md).
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time

import torch

import minift
from minift import data, tasks
from minift.trainer import TrainConfig, Trainer, encode_dataset

REMEDIES = {"none": {}, "class weights": {"class_weights": "balanced"}, "balanced sampler": {"sampler": "balanced"}}


def imbalanced_sentiment(keep_every: int, train_size: int, eval_size: int) -> data.Dataset:
    ds = tasks.rotten_tomatoes()
    train, k = [], 0
    for ex in ds.train:
        if ex.label == "rotten":
            k += 1
            if k % keep_every:
                continue
        train.append(ex)
    train = train[:train_size] if train_size else train
    dev, test = (ds.dev[:eval_size], ds.test[:eval_size]) if eval_size else (ds.dev, ds.test)
    return data.Dataset(f"rotten_tomatoes_1_in_{keep_every}_rotten", "classification", train, dev, test, ds.labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--keep-every", type=int, default=10, help="keep every K-th rotten training snippet (10: 10%%)")
    p.add_argument("--train-size", type=int, default=0, help="first N training examples after the reduction (0: all)")
    p.add_argument("--eval-size", type=int, default=0, help="first N dev and test examples (0: all)")
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    logging.getLogger("minift").setLevel(logging.WARNING)

    ds = imbalanced_sentiment(args.keep_every, args.train_size, args.eval_size)
    minority = "rotten"
    n_min = sum(e.label == minority for e in ds.train)
    print(f"{ds.name}: {ds.sizes()}; train has {n_min} {minority} / {len(ds.train) - n_min} fresh; "
          f"{args.model}, {args.epochs} epochs, lr {args.lr}, batch {args.batch_size}, max length {args.max_length}, "
          f"{args.device}, {torch.get_num_threads()} CPU threads")
    tok = minift.Tokenizer.from_pretrained(args.model)
    encoded = encode_dataset(tok, ds, TrainConfig(max_length=args.max_length))
    rows = {}
    for name, remedy in REMEDIES.items():
        for seed in args.seeds:
            t0 = time.time()
            torch.manual_seed(seed)
            model = minift.BertForSequenceClassification.from_pretrained(
                args.model, id2label=dict(enumerate(ds.labels)))
            cfg = TrainConfig(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length,
                              seed=seed, progress=False, precision="fp32", **remedy)
            with tempfile.TemporaryDirectory() as out:
                m = Trainer(model, tok, ds, cfg, out, device=args.device, log=lambda *a: None,
                            encoded=encoded).fit()
            rep = m["test_report"]
            rows.setdefault(name, []).append((rep["macro avg"]["f1"], rep[minority]["recall"]))
            print(f"  {name:16s} seed {seed}: test macro-F1 {rep['macro avg']['f1']:.4f}, {minority} recall "
                  f"{rep[minority]['recall']:.4f}, accuracy {rep['accuracy']:.4f}  ({time.time() - t0:.0f} s)",
                  flush=True)
    print(f"\n| remedy | test macro-F1, seeds {'/'.join(map(str, args.seeds))} | mean | {minority} recall | mean |")
    print("|---|---|---|---|---|")
    for name, vals in rows.items():
        f1s, recs = [v[0] for v in vals], [v[1] for v in vals]
        print(f"| {name} | {' / '.join(f'{x:.3f}' for x in f1s)} | {statistics.mean(f1s):.3f} | "
              f"{' / '.join(f'{x:.3f}' for x in recs)} | {statistics.mean(recs):.3f} |")


if __name__ == "__main__":
    main()
