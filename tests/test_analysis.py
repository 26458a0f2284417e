"""The analysis scripts under analysis/ still fit the code: each compiles, and every name it imports from
babydistill (or from a script beside it) exists. They are not run: they read the models of a finished study
(runs/cpu-experiment, hours of CPU), and their JSON outputs record that study; a renamed or removed function
they call is what would break them unnoticed, and this finds it."""
import ast
import importlib
from pathlib import Path

import pytest

ANALYSIS = Path(__file__).resolve().parents[1] / "analysis"
SCRIPTS = sorted(ANALYSIS.rglob("*.py"))


def test_there_are_scripts():
    assert SCRIPTS, f"no analysis scripts under {ANALYSIS}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ANALYSIS)))
def test_the_scripts_imports_exist(script):
    tree = ast.parse(script.read_text(encoding="utf-8"), filename=str(script))
    compile(tree, str(script), "exec")
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or not node.module:
            continue
        if node.module.startswith("babydistill"):
            module = importlib.import_module(node.module)
            missing = [a.name for a in node.names if not hasattr(module, a.name)]
            assert not missing, f"{script.name}: {node.module} has no {', '.join(missing)}"
        elif (script.parent / f"{node.module}.py").is_file():  # a helper script beside it
            beside = ast.parse((script.parent / f"{node.module}.py").read_text(encoding="utf-8"))
            defined = {n.name for n in beside.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            defined |= {t.id for n in beside.body if isinstance(n, ast.Assign) for t in n.targets
                        if isinstance(t, ast.Name)}
            missing = [a.name for a in node.names if a.name not in defined]
            assert not missing, f"{script.name}: {node.module}.py defines no {', '.join(missing)}"
