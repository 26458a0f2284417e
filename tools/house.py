"""The house rules of issue 26, checked: no function over 60 lines (Triton kernels excepted), no module over
500 lines, no raw lookup of a store's attributes outside ``stores/`` (a typed header instead), no backslash line
continuation (it hides the rest of a file from structure tools).

    python tools/house.py            # prints each breach, exits 1 if there is one
"""
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("pipeline", "kernels", "stores", "workflows", "tools")
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 500
# ``.attrs`` of a zarr group, or a dict of store attributes named ``attrs``; optuna's ``user_attrs`` is not one.
RAW_ATTRS = re.compile(r"(?<![A-Za-z_])attrs\s*(\[|\.get\()")


def _is_triton_kernel(node: ast.AST) -> bool:
    return any("jit" in ast.unparse(d) for d in getattr(node, "decorator_list", []))


def breaches(root: Path = ROOT) -> list[str]:
    found = []
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root)
            source = path.read_text(encoding="utf-8")
            lines = source.count("\n")
            if lines > MAX_MODULE_LINES:
                found.append(f"{rel}: {lines} lines (at most {MAX_MODULE_LINES})")
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_triton_kernel(node):
                    length = node.end_lineno - node.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        found.append(f"{rel}:{node.lineno}: {node.name} is {length} lines "
                                     f"(at most {MAX_FUNCTION_LINES})")
            for number, line in enumerate(source.splitlines(), 1):
                if line.rstrip().endswith("\\") and not line.lstrip().startswith("#"):
                    found.append(f"{rel}:{number}: a backslash continuation (parenthesise instead)")
            if folder != "stores":
                for number, line in enumerate(source.splitlines(), 1):
                    if RAW_ATTRS.search(line):
                        found.append(f"{rel}:{number}: raw store attrs outside stores/: {line.strip()}")
    return found


if __name__ == "__main__":
    problems = breaches()
    print("\n".join(problems) or "house rules kept")
    sys.exit(1 if problems else 0)
