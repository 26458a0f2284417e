"""Load a script of the repo that is not a module of the package (tools/, analysis/), by its path from the root."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: Path):
    """The module of the script at ``ROOT / relative``, executed once (its ``if __name__ == "__main__"`` part not)."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
