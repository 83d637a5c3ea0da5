"""The library (`netshrink`) stands apart from the experiment harness (`netshrink_lab`):
no library module imports the harness, except the CLI inside the commands that use it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import netshrink

LIBRARY = Path(netshrink.__file__).parent
LAB = "netshrink_lab"


def _lab_imports(tree: ast.AST) -> list[tuple[ast.AST, str]]:
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found += [(node, n) for n in names if n == LAB or n.startswith(LAB + ".")]
    return found


def test_library_modules_do_not_import_the_lab() -> None:
    offenders = []
    for path in sorted(LIBRARY.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        lab = _lab_imports(tree)
        if path.name == "cli.py" and path.parent == LIBRARY:
            # only inside the functions of the commands that need it
            inside = {id(node) for fn in ast.walk(tree)
                      if isinstance(fn, ast.FunctionDef) for node in ast.walk(fn)}
            lab = [(node, name) for node, name in lab if id(node) not in inside]
        offenders += [f"{path.relative_to(LIBRARY)}:{node.lineno} imports {name}"
                      for node, name in lab]
    assert not offenders, offenders


def test_importing_every_library_module_leaves_the_lab_unimported() -> None:
    script = (
        "import importlib, pkgutil, sys\n"
        "import netshrink\n"
        "for info in pkgutil.walk_packages(netshrink.__path__, 'netshrink.'):\n"
        "    importlib.import_module(info.name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'netshrink_lab'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"

