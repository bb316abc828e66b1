"""Every tutorial executes top to bottom, once per test run: in the build of the course site.

The site build (the ``built_site`` fixture, ``bash scripts/docs.sh`` with MINIFT_TUTORIAL_FAST=1,
which only shrinks the training sets and timing sizes of tutorials 6 to 9) runs each tutorial's
cells in a Jupyter kernel (docs/_ext/minift_docs.py) and fails on the first cell that raises, so each tutorial's own checks
(its asserts) hold when the build passes. These tests then check that every script in tutorials/
came out as an executed page. To run one tutorial by hand: ``python tutorials/NN_name.py``.
"""
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.xdist_group("site")

TUTORIALS = sorted((Path(__file__).resolve().parent.parent / "tutorials").glob("[0-9][0-9]_*.py"))


def test_there_are_nine_tutorials():
    assert len(TUTORIALS) >= 9


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_ran_in_the_site_build(built_site, path):
    executed = built_site / "tutorials" / (path.stem + ".ipynb")       # what the build executed
    assert executed.exists(), f"{path.name} was not executed by the site build"
    nb = json.loads(executed.read_text())
    assert nb["metadata"]["minift"]["fast"] is True and nb["metadata"]["minift"]["executed_seconds"] > 0
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and c["source"]]
    n_cells = sum(line.rstrip() == "# %%" for line in path.read_text().splitlines())
    assert len(code) == n_cells, f"{path.name}: {n_cells} code cells in the script, {len(code)} in the notebook"
    assert all(isinstance(c["execution_count"], int) for c in code), f"{path.name}: a cell did not run"
    # counts 1, 2, 3, ...: one kernel ran the cells in order, top to bottom
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1))
    errors = [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, f"{path.name}: {errors[0]['ename']}: {errors[0]['evalue']}"
    n_figures = path.read_text().count("plt.show()")
    n_images = sum("image/png" in o.get("data", {}) for c in code for o in c["outputs"])
    assert n_images >= n_figures, f"{path.name}: {n_figures} figures shown, {n_images} images in the page"
    page = (built_site / "_build" / "html" / "tutorials" / (path.stem + ".html")).read_text()
    assert "cell_output" in page, f"{path.name}: its page shows no output"
