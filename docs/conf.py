"""Sphinx configuration of the minift course site: ``bash scripts/docs.sh`` builds it.

Tutorials are the ``tutorials/NN_*.py`` scripts (jupytext percent format, Markdown cells). The
local extension ``_ext/minift_docs.py`` turns each into a notebook and executes it, myst-nb
renders it into a page; the extension also writes the downloadable notebook whose first cell installs minift, and writes one page per
assignment part. Math is rendered by a MathJax copy served from ``_static/mathjax`` (no network).
"""
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(DOCS.parent))          # the minift next to these docs, not another install

import minift  # noqa: E402

project = "minift"
author = "the minift authors"
release = version = minift.__version__
copyright = "the minift authors"

extensions = [
    "myst_nb",                 # Markdown pages and executed notebooks (also loads myst-parser)
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "minift_docs",
]
exclude_patterns = ["_build", "_notebooks", "**.ipynb_checkpoints", "jupyter_execute"]

# --- MathJax, served from this site ------------------------------------------------------------
# scripts/docs.sh copies MathJax 3 (npm package "mathjax") into _static/mathjax.
mathjax_path = "mathjax/tex-chtml.js"
myst_enable_extensions = ["dollarmath", "amsmath"]

# --- tutorials ---------------------------------------------------------------------------------
# minift_docs executes every tutorial before Sphinx reads them (in parallel, failing the build on
# the first cell that raises); myst-nb renders the outputs stored in those notebooks.
nb_execution_mode = "off"
nb_merge_streams = True

# --- API reference -----------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "description"

# --- HTML --------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"minift {release}"
html_static_path = ["_static"]
html_show_sourcelink = False
html_extra_path = ["_notebooks"]      # /notebooks/NN_*.ipynb, written by minift_docs
