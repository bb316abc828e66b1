"""Every tutorial runs top to bottom as a plain script; each asserts its own claims.

CI sets MINIFT_TUTORIAL_FAST=1, which only shrinks the training sets of tutorials 6, 7 and 9.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).resolve().parent.parent / "tutorials").glob("[0-9][0-9]_*.py"))


def test_there_are_nine_tutorials():
    assert len(TUTORIALS) >= 9


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path):
    env = {**os.environ, "MINIFT_TUTORIAL_FAST": os.environ.get("MINIFT_TUTORIAL_FAST", "1"),
           "MPLBACKEND": "Agg"}
    r = subprocess.run([sys.executable, str(path)], cwd=path.parent, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, f"{path.name} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
