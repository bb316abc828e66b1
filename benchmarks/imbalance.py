"""Class imbalance on the default task (issue 17): macro-F1 and minority recall with no remedy,
with class weights (--class-weights balanced) and with the balanced sampler (--sampler balanced).

The Rotten Tomatoes training split is made imbalanced by keeping only every 10th rotten snippet
(``--keep-every``); dev and test stay as they are (42% rotten), so the minority class is
"rotten". Each remedy runs with each seed from the same encoded data, and the table gives the test
macro-F1 and the test recall of "rotten" of the best epoch (chosen by dev accuracy, as minift does).

    python benchmarks/imbalance.py                       # MiniLM fine-tuned, full data, 3 epochs, seeds 0 1 2
    python benchmarks/imbalance.py --probe --train-size 2000 --eval-size 600   # a CPU-sized run

``--probe`` (for a CPU): the encoder stays frozen and runs once; each run trains only the
classifier (the head's own loss with its weight=, and the trainer's sampler) on the pooled [CLS]
vectors: a linear probe, so the remedies act on the layer that decides, in seconds per run.

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
from minift import data, metrics, tasks
from minift.selfcheck import resolve_impl
from minift.trainer import (TrainConfig, Trainer, balanced_class_weights, choose_precision, encode_dataset,
                            length_batches)

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


@torch.no_grad()
def pooled(model, tok, examples, max_length: int, batch_size: int = 128):
    """The pooled [CLS] vectors (N, H) that the classification head reads, the encoder frozen."""
    model.eval()
    out = []
    for i in range(0, len(examples), batch_size):
        enc = tok([e.text for e in examples[i:i + batch_size]], max_length=max_length)
        out.append(model.bert(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]).pooler_output)
    return torch.cat(out)                                                         # (N, H)


def probe_run(model, feats, ys, remedy: dict, seed: int, epochs: int, lr: float, batch_size: int) -> dict:
    """Train model.classifier alone on frozen features; the best epoch by dev accuracy; its test report."""
    torch.manual_seed(seed)
    C = model.config.num_labels
    model.classifier.reset_parameters()
    y = ys["train"]
    weight = (torch.tensor(balanced_class_weights(y.tolist(), C)) if remedy.get("class_weights") else None)
    counts = torch.bincount(y, minlength=C).double()
    draw = (1.0 / counts[y]).tolist() if remedy.get("sampler") else None
    opt = torch.optim.AdamW(model.classifier.parameters(), lr=lr, weight_decay=0.01)
    best = (-1.0, None)
    for epoch in range(epochs):
        for b in length_batches([1] * len(y), batch_size, seed, epoch, draw):
            loss = model.loss(model.classifier(feats["train"][b]), y[b], weight=weight)   # the head's own loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            dev = metrics.accuracy(model.classifier(feats["dev"]).argmax(-1).tolist(), ys["dev"].tolist())
            if dev > best[0]:
                test = model.classifier(feats["test"]).argmax(-1).tolist()
                best = (dev, metrics.classification_report(test, ys["test"].tolist(), model.config.id2label and
                                                           [model.config.id2label[i] for i in range(C)]))
    return best[1]


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
    p.add_argument("--impl", default="auto", choices=["auto", "torch", "reference", "fused"],
                   help="the model's layers (auto: the compiled kernels where built, as minift finetune)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="training precision (fp32 by default, so that the table does not depend on the CPU; "
                        "auto: as minift finetune, bf16 where it pays)")
    p.add_argument("--probe", action="store_true", help="frozen encoder, train the classifier only (for a CPU)")
    p.add_argument("--probe-epochs", type=int, default=30)
    p.add_argument("--probe-lr", type=float, default=3e-3)
    args = p.parse_args()
    logging.getLogger("minift").setLevel(logging.WARNING)

    ds = imbalanced_sentiment(args.keep_every, args.train_size, args.eval_size)
    minority = "rotten"
    n_min = sum(e.label == minority for e in ds.train)
    impl = resolve_impl(args.impl, args.device)
    how = (f"linear probe, {args.probe_epochs} epochs, lr {args.probe_lr}" if args.probe else
           f"{args.epochs} epochs, lr {args.lr}, impl {impl}, {choose_precision(args.precision, args.device)[1]}")
    print(f"{ds.name}: {ds.sizes()}; train has {n_min} {minority} / {len(ds.train) - n_min} fresh; "
          f"{args.model}, {how}, batch {args.batch_size}, max length {args.max_length}, "
          f"{args.device}, {torch.get_num_threads()} CPU threads")
    tok = minift.Tokenizer.from_pretrained(args.model)
    rows = {}
    if args.probe:
        t0 = time.time()
        model = minift.BertForSequenceClassification.from_pretrained(args.model, id2label=dict(enumerate(ds.labels)))
        feats = {k: pooled(model, tok, getattr(ds, k), args.max_length) for k in ("train", "dev", "test")}
        ys = {k: torch.tensor([ds.labels.index(e.label) for e in getattr(ds, k)]) for k in feats}
        n = sum(len(v) for v in feats.values())
        print(f"linear probe: pooled vectors of {n} texts in {time.time() - t0:.0f} s; "
              f"{args.probe_epochs} epochs of the classifier, lr {args.probe_lr}, batch {args.batch_size}")
    else:
        encoded = encode_dataset(tok, ds, TrainConfig(max_length=args.max_length))
    for name, remedy in REMEDIES.items():
        for seed in args.seeds:
            t0 = time.time()
            if args.probe:
                rep = probe_run(model, feats, ys, remedy, seed, args.probe_epochs, args.probe_lr, args.batch_size)
                rows.setdefault(name, []).append((rep["macro avg"]["f1"], rep[minority]["recall"]))
                print(f"  {name:16s} seed {seed}: test macro-F1 {rep['macro avg']['f1']:.4f}, {minority} recall "
                      f"{rep[minority]['recall']:.4f}, accuracy {rep['accuracy']:.4f}  ({time.time() - t0:.1f} s)",
                      flush=True)
                continue
            torch.manual_seed(seed)
            model = minift.BertForSequenceClassification.from_pretrained(
                args.model, impl=impl, id2label=dict(enumerate(ds.labels)))
            cfg = TrainConfig(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length,
                              seed=seed, progress=False, precision=args.precision, **remedy)
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
