"""No import circle in minift/: every module imports on its own in a fresh interpreter, and no module
imports (at the top or inside a function) one that imports it back, directly or through others."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "minift"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")



def imported_modules(name: str) -> set[str]:
    """The minift modules that ``minift/<name>.py`` imports anywhere in its code."""
    tree = ast.parse((PACKAGE / f"{name}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:                                   # from .x import y / from . import x
                found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif node.module and node.module.split(".")[0] == "minift":
                parts = node.module.split(".")
                found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("minift.")}
    return {m for m in found if m in MODULES and m != name}


def cycles() -> set[frozenset]:
    """Every set of modules that reach each other (strongly connected components larger than one)."""
    graph = {m: imported_modules(m) for m in MODULES}

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for n in graph[todo.pop()]:
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        return seen
    reachable = {m: reach(m) for m in MODULES}
    return {frozenset({m} | {n for n in reachable[m] if m in reachable[n]})
            for m in MODULES if any(m in reachable[n] for n in reachable[m])}


def test_the_import_graph_sees_imports():
    """The oracle itself: it finds the imports it must find (so an empty answer means something)."""
    assert "data" in imported_modules("ewt")
    assert {"checkpoint", "data", "config"} <= imported_modules("trainer")
    assert "pretrained" in imported_modules("model")                  # imported inside a method


def test_no_module_imports_one_that_imports_it_back():
    found = cycles()
    assert not found, f"import circles: {[sorted(c) for c in found]}"


def test_each_module_imports_alone_in_a_fresh_interpreter():
    """One fresh interpreter (torch is imported once); before each module, every minift module is
    forgotten, so each import starts from nothing of minift, as in a new process."""
    script = (
        "import importlib, sys, traceback\n"
        f"failed = []\n"
        f"for name in {MODULES!r}:\n"
        "    for m in [m for m in sys.modules if m == 'minift' or m.startswith('minift.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module('minift.' + name)\n"
        "    except Exception:\n"
        "        failed.append(name + ': ' + traceback.format_exc(limit=3))\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=PACKAGE.parent, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
