"""Course assignments: student copies with the solutions cut out, and an autograder.

Each part is a folder here with one source file and its graded tests. In the source, the
solution sits between two marker lines:

    # BEGIN SOLUTION hint="what to do, in one line"
    ...the instructor's solution...
    # END SOLUTION

(``//`` instead of ``#`` in C++). ``export`` writes a student copy in which each region becomes
``raise NotImplementedError(hint)`` (a failing ``TORCH_CHECK(false, hint)`` in C++), next to the
graded tests; ``export --solution`` writes the instructor's copy. ``grade`` runs each part's tests
in a fresh Python process, from the copy's folder, and gives the part's points times the share
of its tests that pass.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Part:
    name: str
    source: str          # the file with the solution regions
    tests: str           # the graded test file
    points: int
    description: str


PARTS = {p.name: p for p in [
    Part("attention", "attention.py", "test_attention.py", 10,
         "scaled dot-product attention with a key-padding mask"),
    Part("layer_norm_backward", "layer_norm.py", "test_layer_norm.py", 15,
         "the backward pass of layer normalisation, derived by hand"),
    Part("softmax_xent_backward", "xent.py", "test_xent.py", 10,
         "the gradient of the softmax cross-entropy with ignore_index"),
    Part("adamw", "adamw.py", "test_adamw.py", 15,
         "AdamW with bias correction and decoupled weight decay"),
    Part("fused_xent_cpu", "xent_kernel.cpp", "test_xent_kernel.py", 25,
         "a fused softmax cross-entropy kernel in C++"),
    Part("finetune", "finetune.py", "test_finetune.py", 25,
         "a fine-tuning loop that reaches 0.70 held-out accuracy"),
]}

_BEGIN = re.compile(r'^(?P<indent>\s*)(?P<comment>#|//) BEGIN SOLUTION(?: hint="(?P<hint>[^"]*)")?\s*$')
_END = re.compile(r"^\s*(#|//) END SOLUTION\s*$")


def strip_solutions(text: str, filename: str) -> str:
    """Replace every solution region with a stub that raises and carries the hint."""
    out, inside, n_regions = [], False, 0
    for lineno, line in enumerate(text.splitlines(keepends=True), 1):
        begin, end = _BEGIN.match(line), _END.match(line)
        if begin:
            if inside:
                raise ValueError(f"{filename}, line {lineno}: BEGIN SOLUTION inside another region")
            inside, n_regions = True, n_regions + 1
            indent, hint = begin["indent"], (begin["hint"] or "implement this").replace('"', "'")
            if begin["comment"] == "//":
                out.append(f'{indent}TORCH_CHECK(false, "not implemented yet: {hint}");\n')
            else:
                out.append(f'{indent}raise NotImplementedError("{hint}")\n')
        elif end:
            if not inside:
                raise ValueError(f"{filename}, line {lineno}: END SOLUTION without BEGIN")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{filename}: a BEGIN SOLUTION region is not closed")
    if n_regions == 0:
        raise ValueError(f"{filename}: no BEGIN SOLUTION region")
    return "".join(out)


def _parts(names) -> list[Part]:
    if not names:
        return list(PARTS.values())
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}; expected some of {list(PARTS)}")
    return [PARTS[n] for n in names]


def export(directory, parts=None, solution: bool = False) -> list[Path]:
    """Write each part's folder (source + tests) under ``directory``; returns the folders."""
    directory = Path(directory)
    written = []
    for part in _parts(parts):
        dst = directory / part.name
        dst.mkdir(parents=True, exist_ok=True)
        src_text = (HERE / part.name / part.source).read_text(encoding="utf-8")
        if not solution:
            src_text = strip_solutions(src_text, part.source)
        (dst / part.source).write_text(src_text, encoding="utf-8")
        shutil.copy(HERE / part.name / part.tests, dst / part.tests)
        written.append(dst)
    manifest = {"parts": [p.name for p in _parts(parts)], "solution": solution}
    (directory / "assignment.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return written


@dataclass
class PartScore:
    part: str
    passed: int
    total: int
    points: float
    max_points: int


def grade_part(folder: Path, part: Part, timeout: int = 900) -> PartScore:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
               "--rootdir", str(folder), str(folder / part.tests)]
        try:
            subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return PartScore(part.name, 0, 1, 0.0, part.points)
        if not report.is_file():
            return PartScore(part.name, 0, 1, 0.0, part.points)
        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        total = int(suite.get("tests", 0))
        bad = int(suite.get("failures", 0)) + int(suite.get("errors", 0)) + int(suite.get("skipped", 0))
    passed = max(0, total - bad)
    points = round(part.points * passed / total, 2) if total else 0.0
    return PartScore(part.name, passed, total, points, part.points)


def grade(directory, parts=None) -> dict:
    """Grade the parts found under ``directory`` (all exported ones by default)."""
    directory = Path(directory)
    if parts is None and (directory / "assignment.json").is_file():
        parts = json.loads((directory / "assignment.json").read_text())["parts"]
    scores = []
    for part in _parts(parts):
        folder = directory / part.name
        if not (folder / part.source).is_file():
            raise FileNotFoundError(f"{folder}: expected {part.source} (export the part first)")
        scores.append(grade_part(folder, part))
    total = sum(s.points for s in scores)
    return {"parts": [s.__dict__ for s in scores], "total": round(total, 2),
            "max_total": sum(s.max_points for s in scores)}
