"""The dependency lock of `make`: check the Python, filter a fresh `uv pip compile`, check a .venv against it.

    python tools/lockfile.py python-ok                 # the interpreter can build .venv (exit 2 and one line if not)
    python tools/lockfile.py filter RAW LOCK           # uv's resolution -> requirements.lock (no torch/triton/CUDA)
    python tools/lockfile.py check LOCK                # exit 1 and one line when the installed versions differ
    python tools/lockfile.py diff LOCK                 # every installed version that differs from LOCK (canary)

Standard library only (``check`` uses ``packaging`` for the lock's environment markers when it is installed,
as it is in any .venv made from the lock): `make` runs this file by path, before anything is installed.

torch, triton and the CUDA wheels stay out of the lock: a GPU user installs the torch of their CUDA (which
pins its own triton and CUDA libraries) into .venv first, and the lock must not fight it. The CPU torch of
this platform is pinned in the Makefile instead (``TORCH_CPU``).
"""

from __future__ import annotations

import re
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

MIN_PYTHON = (3, 11)  # zarr 3 and numcodecs >= 0.15 need 3.11 (pyproject.toml's requires-python)
UNLOCKED = ("torch", "triton")
CUDA_PREFIXES = ("nvidia-", "cuda-")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;]+)\s*(?:;\s*(.*))?$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def python_ok() -> int:
    found = f"{sys.executable} is Python {sys.version.split()[0]}"
    if sys.version_info[:2] < MIN_PYTHON:
        need = ".".join(map(str, MIN_PYTHON))
        print(f"make: {found}; babydistill needs Python >= {need}: run `make PYTHON=python{need}` (or newer)",
              file=sys.stderr)
        return 2
    try:
        import ensurepip  # noqa: F401
        import venv  # noqa: F401
    except ImportError:
        print(f"make: {found} without the venv module (ensurepip): install it (Debian: apt-get install "
              f"python3-venv) or run `make PYTHON=...` with another Python", file=sys.stderr)
        return 2
    return 0


def parse_uv(text: str) -> list[tuple[str, str, list[str]]]:
    """uv's annotated output as (name, requirement line, the packages it comes 'via')."""
    entries: list[tuple[str, str, list[str]]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if not line.startswith((" ", "#")):
            entries.append((canonical(_PIN.match(stripped).group(1)), stripped, []))
        elif entries and stripped.startswith("#"):
            via = stripped.lstrip("#").strip()
            via = via[len("via"):].strip() if via.startswith("via") else via
            if via and not via.startswith(("-c ", "-r ")):
                entries[-1][2].append(canonical(via.split(" (")[0]))
    return entries


def filter_lock(raw: Path, out: Path) -> int:
    """Drop torch, triton, the CUDA wheels and what only the CUDA wheels need; keep the rest pinned."""
    text = raw.read_text(encoding="utf-8")
    entries = parse_uv(text)
    dropped = {name for name, _, _ in entries if name in UNLOCKED or name.startswith(CUDA_PREFIXES)}
    changed = True
    while changed:  # what only the CUDA wheels pull in (a fixpoint: via chains)
        changed = False
        for name, _, via in entries:
            cuda_only = via and all(v in dropped and v not in UNLOCKED for v in via)
            if name not in dropped and cuda_only:
                dropped.add(name)
                changed = True
    command = next((line for line in text.splitlines() if "uv pip compile" in line), "").lstrip("# ").strip()
    header = ["# The exact versions `make` installs, as constraints (pip install -c requirements.lock ...).",
              "# Regenerate with `make lock` (see docs/development.md, 'The lock'); do not edit by hand.",
              f"# Made by: {command}",
              f"# Left out (a GPU user's own torch brings its matching ones): {', '.join(UNLOCKED)}, "
              "nvidia-*, cuda-* and what only they need."]
    kept = [line for name, line, _ in entries if name not in dropped]
    out.write_text("\n".join(header + kept) + "\n", encoding="utf-8")
    print(f"{out}: {len(kept)} pinned, {len(dropped)} left out")
    return 0


def read_lock(path: Path) -> dict[str, str]:
    """name -> pinned version, for the lines whose environment marker holds here."""
    try:
        from packaging.markers import Marker
    except ImportError:  # a .venv without packaging is not one the lock made
        Marker = None
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = _PIN.match(line.strip())
        if not match:
            continue
        name, _, version, marker = match.groups()
        if marker and Marker is not None and not Marker(marker).evaluate():
            continue
        pins[canonical(name)] = version
    return pins


def differences(path: Path) -> list[str]:
    # The environment's own site-packages, not whatever else is on sys.path (setuptools adds its vendored copies)
    places = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {canonical(dist.metadata["Name"]): dist.version for dist in metadata.distributions(path=places)}
    out = []
    for name, version in sorted(read_lock(path).items()):
        have = installed.get(name)
        if have != version:
            out.append(f"{name} {have or 'missing'} (lock: {version})")
    return out


def check(path: Path) -> int:
    diff = differences(path)
    if diff:
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
        print(f"make: {sys.prefix} differs from {path}: {', '.join(diff[:3])}{more}; reinstalling from the lock",
              file=sys.stderr)
        return 1
    return 0


def diff(path: Path) -> int:
    rows = differences(path)
    unlocked = []
    for name in UNLOCKED:
        try:
            unlocked.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    print(f"{len(rows)} installed version(s) differ from {path}; not locked: {', '.join(unlocked) or 'none'}"
          + (":" if rows else ""))
    for row in rows:
        print(f"  {row}")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["python-ok"]:
        return python_ok()
    if argv[:1] == ["filter"] and len(argv) == 3:
        return filter_lock(Path(argv[1]), Path(argv[2]))
    if argv[:1] == ["check"] and len(argv) == 2:
        return check(Path(argv[1]))
    if argv[:1] == ["diff"] and len(argv) == 2:
        return diff(Path(argv[1]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
