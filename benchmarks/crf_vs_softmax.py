"""BERT + CRF against a softmax tagger on UD English-EWT (issue 17): token accuracy of UPOS tags,
and entity F1 on a BIO task derived from the same sentences (runs of proper nouns tagged NAME,
runs of numbers NUM, from the gold UPOS: a real-text span task with a clear licence, not a named
entity corpus), with and without the CRF, a few seeds.

Each word is scored at its first sub-word; the softmax tagger takes each word's argmax, the CRF
decodes the best path with Viterbi (with BIO constraints on the BIO task).

    python benchmarks/crf_vs_softmax.py                  # MiniLM fine-tuned, all of EWT, 3 epochs, seeds 0 1 2
    python benchmarks/crf_vs_softmax.py --probe --train-size 1000 --eval-size 500    # CPU-sized
    python benchmarks/crf_vs_softmax.py --train-size 600 --eval-size 300 --crf-lr 0 1e-2   # fine-tuned, CPU-sized
    python benchmarks/crf_vs_softmax.py --impl auto --precision auto --crf-lr 1e-2   # all of EWT on a CPU with bf16

``--probe`` (for a CPU): the encoder stays frozen and runs once; each run trains only the linear
emission layer (softmax) or the emission layer and the CRF (transitions with start/end, BIO
constraints on the BIO task) on the first sub-word vectors of each word, in seconds per run.
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
from minift.crf import BertCRFForTokenClassification, LinearChainCRF, first_subword_mask, is_bio
from minift.ewt import ud_english_ewt
from minift.selfcheck import resolve_impl
from minift.trainer import TrainConfig, Trainer, choose_precision, encode_dataset, predict_labels


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


@torch.no_grad()
def word_vectors(encoder, tok, examples, max_length: int, batch_size: int = 64) -> list[torch.Tensor]:
    """Per sentence, the frozen encoder's vector (L, H) at the first sub-word of each word (L words,
    fewer when truncated)."""
    encoder.eval()
    out = []
    for i in range(0, len(examples), batch_size):
        enc = tok([e.text for e in examples[i:i + batch_size]], is_split_into_words=True, max_length=max_length)
        h = encoder(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]).last_hidden_state  # (B, T, H)
        keep = first_subword_mask(enc["word_ids"], h.shape[1])                          # (B, T)
        out += [h[b][keep[b]] for b in range(h.shape[0])]
    return out


def padded(vectors: list[torch.Tensor], tags: list[list[int]] | None, idx: list[int]):
    W = max(len(vectors[i]) for i in idx)
    x = torch.zeros(len(idx), W, vectors[idx[0]].shape[-1])                           # (B, W, H)
    y = torch.zeros(len(idx), W, dtype=torch.long)                                      # (B, W)
    mask = torch.zeros(len(idx), W, dtype=torch.bool)
    for r, i in enumerate(idx):
        n = len(vectors[i])
        x[r, :n], mask[r, :n] = vectors[i], True
        if tags is not None:
            y[r, :n] = torch.tensor(tags[i][:n])
    return x, y, mask


def probe_run(feats, tags, labels, crf: bool, seed: int, epochs: int, lr: float, batch_size: int):
    """Train the emission layer (and the CRF) on frozen word vectors; best epoch by dev token accuracy.
    Returns (test predictions per sentence, test gold per sentence)."""
    torch.manual_seed(seed)
    K, H = len(labels), feats["train"][0].shape[-1]
    emit = torch.nn.Linear(H, K)
    chain = LinearChainCRF(K, "BIO" if is_bio(labels) else None, labels) if crf else None
    params = list(emit.parameters()) + (list(chain.parameters()) if crf else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def decode(split):
        pred = []
        with torch.no_grad():
            for i in range(0, len(feats[split]), 256):
                idx = list(range(i, min(i + 256, len(feats[split]))))
                x, _, mask = padded(feats[split], None, idx)
                e = emit(x)                                                             # (B, W, K)
                pred += (chain.decode(e, mask) if crf else
                         [row[:int(m.sum())].tolist() for row, m in zip(e.argmax(-1), mask)])
        return pred

    def token_accuracy(pred, split):
        pairs = [(p, g) for ps, gs in zip(pred, tags[split]) for p, g in zip(ps, gs)]
        return sum(p == g for p, g in pairs) / len(pairs)
    best = (-1.0, None)
    n = len(feats["train"])
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        for i in range(0, n, batch_size):
            x, y, mask = padded(feats["train"], tags["train"], order[i:i + batch_size])
            e = emit(x)                                                                 # (B, W, K)
            loss = (chain.nll(e, y, mask) if crf else
                    torch.nn.functional.cross_entropy(e[mask], y[mask]) * mask.sum() / len(mask))
            opt.zero_grad()
            loss.backward()
            opt.step()
        dev = token_accuracy(decode("dev"), "dev")
        if dev > best[0]:
            best = (dev, decode("test"))
    gold = [t[:len(v)] for t, v in zip(tags["test"], feats["test"])]
    return best[1], gold


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
    p.add_argument("--impl", default="torch", choices=["auto", "torch", "reference", "fused"],
                   help="the model's layers (torch by default; auto: the compiled kernels where built, as "
                        "minift finetune)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="training precision (fp32 by default, so that the table does not depend on the CPU; "
                        "auto: as minift finetune, bf16 where it pays)")
    p.add_argument("--probe", action="store_true", help="frozen encoder, train the emissions (and CRF) only")
    p.add_argument("--probe-epochs", type=int, default=10)
    p.add_argument("--probe-lr", type=float, default=1e-2)
    p.add_argument("--crf-lr", type=float, nargs="+", default=[0.0],
                   help="full fine-tuning: the CRF transitions' learning rate(s), one CRF row each (0: --lr)")
    args = p.parse_args()
    if args.probe and args.crf_lr != [0.0]:
        p.error("--crf-lr is for full fine-tuning; with --probe the CRF trains at --probe-lr")
    logging.getLogger("minift").setLevel(logging.WARNING)
    tok = minift.Tokenizer.from_pretrained(args.model)
    impl = resolve_impl(args.impl, args.device)
    table = []
    feats = None
    for ds in tasks_of(args.train_size, args.eval_size, args.tasks):
        bio = is_bio(ds.labels)
        print(f"{ds.name}: {ds.sizes()} sentences, {len(ds.labels)} tags; {args.model}, "
              + (f"linear probe, {args.probe_epochs} epochs, lr {args.probe_lr}" if args.probe else
                 f"{args.epochs} epochs, lr {args.lr}, impl {impl}, "
                 f"{choose_precision(args.precision, args.device)[1]}") + f", {args.device}, {torch.get_num_threads()} CPU threads",
              flush=True)
        if args.probe:
            if feats is None:       # the same sentences for every task: the encoder runs once
                t0 = time.time()
                encoder = minift.BertModel.from_pretrained(args.model)
                feats = {k: word_vectors(encoder, tok, getattr(ds, k), args.max_length)
                         for k in ("train", "dev", "test")}
                print(f"  word vectors of {sum(len(v) for v in feats.values())} sentences in {time.time() - t0:.0f} s")
            tags = {k: [[ds.labels.index(t) for t in e.label] for e in getattr(ds, k)] for k in feats}
        else:
            encoded = encode_dataset(tok, ds, TrainConfig(max_length=args.max_length))
        for crf, crf_lr in [(False, 0.0)] + [(True, crf_lr) for crf_lr in args.crf_lr]:
            crf_note = "" if not crf or args.probe else f", CRF lr {crf_lr or args.lr:g}"
            scores = []
            for seed in args.seeds:
                t0 = time.time()
                if args.probe:
                    pred, gold = probe_run(feats, tags, ds.labels, crf, seed, args.probe_epochs, args.probe_lr,
                                           args.batch_size)
                    pairs = [(p, g) for ps, gs in zip(pred, gold) for p, g in zip(ps, gs)]
                    row = {"accuracy": sum(p == g for p, g in pairs) / len(pairs)}
                    if bio:
                        row["entity_f1"] = metrics.entity_f1([[ds.labels[t] for t in s] for s in pred],
                                                             [[ds.labels[t] for t in s] for s in gold])["f1"]
                    scores.append(row)
                    print(f"  {'CRF' if crf else 'softmax':8s} seed {seed}: "
                          + ", ".join(f"test {k} {v:.4f}" for k, v in row.items())
                          + f"  ({time.time() - t0:.0f} s)", flush=True)
                    continue
                torch.manual_seed(seed)
                kw = dict(impl=impl, id2label=dict(enumerate(ds.labels)))
                model = (BertCRFForTokenClassification.from_pretrained(args.model, constraints="BIO" if bio else None,
                                                                       **kw) if crf else
                         minift.BertForTokenClassification.from_pretrained(args.model, **kw))
                cfg = TrainConfig(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                                  max_length=args.max_length, seed=seed, progress=False, precision=args.precision,
                                  crf_lr=crf_lr)
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
                print(f"  {'CRF' if crf else 'softmax':8s} seed {seed}{crf_note}: "
                      + ", ".join(f"test {k} {v:.4f}" for k, v in row.items()) + f"  ({time.time() - t0:.0f} s)",
                      flush=True)
            table.append((ds.name, ("BERT + CRF" if crf else "BERT + softmax") + crf_note, scores))
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
