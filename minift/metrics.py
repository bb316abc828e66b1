"""Accuracy, the per-class precision/recall/F1 report, entity-level F1 for BIO tags, multi-label
scores and per-class thresholds, and regression scores (MSE, Pearson, Spearman)."""
from __future__ import annotations


def accuracy(pred: list[int], gold: list[int]) -> float:
    if len(pred) != len(gold):
        raise ValueError(f"accuracy: {len(pred)} predictions for {len(gold)} labels")
    return sum(p == g for p, g in zip(pred, gold)) / max(1, len(gold))


def _prf(tp: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def classification_report(pred: list[int], gold: list[int], names: list[str]) -> dict:
    """Per class: precision = TP/(TP+FP), recall = TP/(TP+FN), F1 = 2PR/(P+R), support = #gold."""
    report = {}
    for c, name in enumerate(names):
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        n_pred, n_gold = sum(p == c for p in pred), sum(g == c for g in gold)
        p, r, f = _prf(tp, n_pred, n_gold)
        report[name] = {"precision": p, "recall": r, "f1": f, "support": n_gold}
    k = max(1, len(names))
    report["macro avg"] = {m: sum(report[n][m] for n in names) / k for m in ("precision", "recall", "f1")}
    report["macro avg"]["support"] = len(gold)
    report["accuracy"] = accuracy(pred, gold)
    return report


def format_report(report: dict) -> str:
    names = [k for k in report if k != "accuracy"]
    width = max([len(n) for n in names] + [9])
    lines = [f"{'':{width}}  precision  recall      f1  support"]
    for n in names:
        r = report[n]
        lines.append(f"{n:{width}}  {r['precision']:9.4f}  {r['recall']:6.4f}  {r['f1']:6.4f}  {r['support']:7d}")
    lines.append(f"{'accuracy':{width}}  {'':9}  {'':6}  {report['accuracy']:6.4f}  {report['macro avg']['support']:7d}")
    return "\n".join(lines)


def _chunk_ends(prev_tag, tag, prev_type, type_) -> bool:
    """Does the chunk that ran up to the previous token end there?"""
    return (prev_tag in ("E", "S")
            or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
            or (prev_tag not in ("O", ".") and prev_type != type_))


def _chunk_starts(prev_tag, tag, prev_type, type_) -> bool:
    """Does a chunk start at this token?"""
    return (tag in ("B", "S")
            or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
            or (tag not in ("O", ".") and prev_type != type_))


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, first, last) spans from IOB2/IOBES tags, with seqeval's default (lenient) rules:
    an I-X after O or after another type starts a chunk, a change of type ends one."""
    spans = set()
    prev_tag, prev_type, begin = "O", "", 0
    for i, chunk in enumerate(list(tags) + ["O"]):
        tag = chunk[0]
        type_ = chunk[1:].split("-", maxsplit=1)[-1] or "_"
        if _chunk_ends(prev_tag, tag, prev_type, type_):
            spans.add((prev_type, begin, i - 1))
        if _chunk_starts(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return spans


def entity_f1(pred_seqs: list[list[str]], gold_seqs: list[list[str]]) -> dict:
    """Micro-averaged entity precision/recall/F1 over all sentences, and per entity type."""
    tp = n_pred = n_gold = 0
    per: dict[str, list[int]] = {}
    for i, (ps, gs) in enumerate(zip(pred_seqs, gold_seqs)):
        if len(ps) != len(gs):
            raise ValueError(f"entity_f1: sentence {i} has {len(ps)} predicted and {len(gs)} gold tags")
        P, G = entities(ps), entities(gs)
        tp += len(P & G)
        n_pred += len(P)
        n_gold += len(G)
        for kind, *_ in P | G:
            per.setdefault(kind, [0, 0, 0])
        for e in P & G:
            per[e[0]][0] += 1
        for e in P:
            per[e[0]][1] += 1
        for e in G:
            per[e[0]][2] += 1
    p, r, f = _prf(tp, n_pred, n_gold)
    out = {"precision": p, "recall": r, "f1": f,
           "per_type": {k: dict(zip(("precision", "recall", "f1"), _prf(*v)), support=v[2])
                        for k, v in sorted(per.items())}}
    return out


def is_bio(names: list[str]) -> bool:
    """Whether a tag set is IOB2/IOBES (every tag "O" or B-/I-/E-/S- plus a type, at least one B- or
    S-): entity-level scores are then meaningful. Wider than ``crf.is_bio``, which asks for the B-/I-
    tags alone that the CRF's transition constraints are written for."""
    import re
    return (all(n == "O" or re.fullmatch(r"[BIES]-.+", n) for n in names)
            and any(n.startswith(("B-", "S-")) for n in names))


def token_scores(pred_seqs: list[list[int]], gold_seqs: list[list[int]], names: list[str]) -> dict:
    """A token task's scores from per-sentence tag ids: token accuracy and macro-F1 over the tags
    (with the per-tag report), and for BIO tags the entity precision/recall/F1 (``entity_f1``)."""
    report = classification_report([t for s in pred_seqs for t in s], [t for s in gold_seqs for t in s], names)
    out = {"accuracy": report["accuracy"], "macro_f1": report["macro avg"]["f1"]}
    if is_bio(names):
        ent = entity_f1([[names[t] for t in s] for s in pred_seqs], [[names[t] for t in s] for s in gold_seqs])
        out.update(entity_precision=ent["precision"], entity_recall=ent["recall"], entity_f1=ent["f1"])
        out["entity_report"] = ent["per_type"]
    out["report"] = report
    return out


def multi_label_scores(pred: list[set[int]], gold: list[set[int]], num_labels: int) -> dict:
    """Multi-label: exact match (the whole set right), micro-F1 (all (example, class) decisions
    pooled) and macro-F1 (the mean over classes of each class's F1)."""
    if len(pred) != len(gold):
        raise ValueError(f"multi_label_scores: {len(pred)} predictions for {len(gold)} label sets")
    exact = sum(p == g for p, g in zip(pred, gold)) / max(1, len(gold))
    tp = sum(len(p & g) for p, g in zip(pred, gold))
    micro = _prf(tp, sum(len(p) for p in pred), sum(len(g) for g in gold))[2]
    per_class = [_prf(sum(c in p and c in g for p, g in zip(pred, gold)), sum(c in p for p in pred),
                      sum(c in g for g in gold))[2] for c in range(num_labels)]
    return {"exact_match": exact, "micro_f1": micro, "macro_f1": sum(per_class) / max(1, num_labels)}


def _pearson(x: list[float], y: list[float]) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sx, sy = sum((a - mx) ** 2 for a in x) ** 0.5, sum((b - my) ** 2 for b in y) ** 0.5
    return cov / (sx * sy) if sx > 0 and sy > 0 else 0.0


def ranks(x: list[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of the ranks they span (as scipy.stats.rankdata)."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1        # positions i..j hold ranks i+1..j+1: their mean
        i = j + 1
    return r


def regression_scores(pred: list[float], gold: list[float]) -> dict:
    """Mean squared error; Pearson's r = cov(p, y) / (std(p) std(y)); Spearman's rho = Pearson's r
    of the ranks (ties averaged). A constant side gives 0, where scipy gives NaN."""
    n = len(gold)
    if len(pred) != n or n == 0:
        raise ValueError(f"regression_scores: {len(pred)} predictions for {n} targets")
    mse = sum((p - g) ** 2 for p, g in zip(pred, gold)) / n
    return {"mse": mse, "pearson": _pearson(pred, gold), "spearman": _pearson(ranks(pred), ranks(gold))}


def choose_thresholds(probs, gold, default: float = 0.5) -> list[float]:
    """Per class, the threshold t (a class is predicted when its probability > t) with the best F1
    on these examples: probs and gold (N, C) tensors (gold 0/1). The candidates are the midpoints
    between neighbouring distinct probabilities of the class, and ``default``; ties go to the one
    nearest ``default``. A class with no positive example keeps ``default``."""
    import torch
    probs, gold = probs.double(), gold > 0.5
    out = []
    for c in range(probs.shape[1]):
        p, g = probs[:, c], gold[:, c]
        if not g.any():
            out.append(default)
            continue
        u = torch.unique(p)                                                  # sorted
        cand = torch.cat([(u[1:] + u[:-1]) / 2, u[:1] - 1e-6, torch.tensor([default], dtype=p.dtype)])
        pred = p[None, :] > cand[:, None]                                    # (M, N)
        tp = (pred & g).sum(1).double()
        f1 = 2 * tp / (pred.sum(1) + g.sum()).double()                       # 2TP / (#pred + #gold)
        best = f1.max()
        ok = torch.nonzero(f1 >= best - 1e-12).flatten()
        out.append(float(cand[ok[(cand[ok] - default).abs().argmin()]]))
    return out
