"""Accuracy, the per-class precision/recall/F1 report, and entity-level F1 for BIO tags."""
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


def regression_scores(pred: list[float], gold: list[float]) -> dict:
    """Mean squared error and Pearson's r = cov(p, y) / (std(p) std(y)) (0 when either is constant)."""
    n = len(gold)
    if len(pred) != n or n == 0:
        raise ValueError(f"regression_scores: {len(pred)} predictions for {n} targets")
    mse = sum((p - g) ** 2 for p, g in zip(pred, gold)) / n
    mp, mg = sum(pred) / n, sum(gold) / n
    cov = sum((p - mp) * (g - mg) for p, g in zip(pred, gold))
    sp, sg = sum((p - mp) ** 2 for p in pred) ** 0.5, sum((g - mg) ** 2 for g in gold) ** 0.5
    return {"mse": mse, "pearson": cov / (sp * sg) if sp > 0 and sg > 0 else 0.0}
