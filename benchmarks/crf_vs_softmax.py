"""BERT + CRF against a softmax tagger on UD English-EWT (issue 17): token accuracy of UPOS tags,
and entity F1 on a BIO task derived from the same sentences (runs of proper nouns tagged NAME,
runs of numbers NUM, from the gold UPOS: a real-text span task with a clear licence, not a named
entity corpus), with and without the CRF, a few seeds.

Each word is scored at its first sub-word; the softmax tagger takes each word's argmax, the CRF
decodes the best path with Viterbi (with BIO constraints on the BIO task).

    python benchmarks/crf_vs_softmax.py                  # MiniLM, all of EWT, 3 epochs, seeds 0 1 2
    python benchmarks/crf_vs_softmax.py --train-size 400 --eval-size 300 --epochs 1 --max-length 64  # CPU-sized
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time

import torch

import minift
from minift import data, metrics
from minift.crf import BertCRFForTokenClassification, is_bio
from minift.ewt import ud_english_ewt
from minift.trainer import TrainConfig, Trainer, encode_dataset, predict_labels


def names_and_numbers(tags: list[str]) -> list[str]:
    """UPOS -> BIO: a run of PROPN is one NAME span, a run of NUM one NUM span, the rest O."""
    out, prev = [], None
    for t in tags:
        kind = {"PROPN": "NAME", "NUM": "NUM"}.get(t)
        out.append("O" if kind is None else ("I-" if prev == kind else "B-") + kind)
        prev = kind
    return out


def tasks_of(train_size: int, eval_size: int, which: list[str]) -> list[data.Dataset]:
    ds = ud_english_ewt()
    parts = [ds.train[:train_size] if train_size else ds.train,
             ds.dev[:eval_size] if eval_size else ds.dev, ds.test[:eval_size] if eval_size else ds.test]
    out = []
    if "upos" in which:
        out.append(data.Dataset("ewt_upos", "token", *parts, ds.labels))
    if "bio" in which:
        bio = [[data.Example(e.text, names_and_numbers(e.label)) for e in part] for part in parts]
        out.append(data.Dataset("ewt_names_numbers_bio", "token", *bio, data.label_list(bio[0])))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--tasks", nargs="+", default=["upos", "bio"], choices=["upos", "bio"])
    p.add_argument("--train-size", type=int, default=0, help="first N training sentences (0: all 12,543)")
    p.add_argument("--eval-size", type=int, default=0, help="first N dev and test sentences (0: all)")
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    logging.getLogger("minift").setLevel(logging.WARNING)
    tok = minift.Tokenizer.from_pretrained(args.model)
    table = []
    for ds in tasks_of(args.train_size, args.eval_size, args.tasks):
        bio = is_bio(ds.labels)
        print(f"{ds.name}: {ds.sizes()} sentences, {len(ds.labels)} tags; {args.model}, {args.epochs} epochs, "
              f"lr {args.lr}, {args.device}, {torch.get_num_threads()} CPU threads", flush=True)
        encoded = encode_dataset(tok, ds, TrainConfig(max_length=args.max_length))
        for crf in (False, True):
            scores = []
            for seed in args.seeds:
                t0 = time.time()
                torch.manual_seed(seed)
                kw = dict(impl="torch", id2label=dict(enumerate(ds.labels)))
                model = (BertCRFForTokenClassification.from_pretrained(args.model, constraints="BIO" if bio else None,
                                                                       **kw) if crf else
                         minift.BertForTokenClassification.from_pretrained(args.model, **kw))
                cfg = TrainConfig(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                                  max_length=args.max_length, seed=seed, progress=False, precision="fp32")
                with tempfile.TemporaryDirectory() as out:
                    m = Trainer(model, tok, ds, cfg, out, device=args.device, log=lambda *a: None,
                                encoded=encoded).fit()
                row = {"accuracy": m["test_accuracy"]}
                if bio:   # entity F1 from each sentence's decoded tags (the best checkpoint is loaded by fit)
                    pred, gold, _ = predict_labels(model, encoded["test"], tok.pad_token_id, 128, args.device,
                                                   True, return_probs=True)
                    row["entity_f1"] = metrics.entity_f1([[ds.labels[t] for t in s] for s in pred],
                                                         [[ds.labels[t] for t in s] for s in gold])["f1"]
                scores.append(row)
                print(f"  {'CRF' if crf else 'softmax':8s} seed {seed}: "
                      + ", ".join(f"test {k} {v:.4f}" for k, v in row.items()) + f"  ({time.time() - t0:.0f} s)",
                      flush=True)
            table.append((ds.name, "BERT + CRF" if crf else "BERT + softmax", scores))
    print(f"\n| task | head | test token accuracy, seeds {'/'.join(map(str, args.seeds))} | mean | "
          f"test entity F1 | mean |")
    print("|---|---|---|---|---|---|")
    for name, head, scores in table:
        acc = [s["accuracy"] for s in scores]
        ent = [s["entity_f1"] for s in scores if "entity_f1" in s]
        ents = (f"{' / '.join(f'{x:.3f}' for x in ent)} | {statistics.mean(ent):.3f}" if ent else "- | -")
        print(f"| {name} | {head} | {' / '.join(f'{x:.3f}' for x in acc)} | {statistics.mean(acc):.3f} | {ents} |")


if __name__ == "__main__":
    main()
