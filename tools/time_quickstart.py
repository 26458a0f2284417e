"""Time the README's two commands from a fresh clone, and write the figures with the machine they ran on.

    python tools/time_quickstart.py [--out docs/benchmarks/quickstart.json] [--latest] [--keep]

Clones this repository's committed HEAD into a temporary folder (uncommitted changes are not in it), runs
`make test` there (which creates `.venv` from the lock: its time is part of the figure, as for a newcomer),
then `make demo` from an empty `runs/demo`, each timed from outside; with `--latest`, then `make test-latest`
too. It keeps pytest's closing line, the demo's console line count and its models' test CE, and writes one
JSON with the CPU model, cores, load average, date, commit, versions and the commands. Nothing is written
when a command fails: its output's tail is printed instead. About 15 minutes on 2 cores (25 with --latest):
run it on a machine that is otherwise idle, or the load average in the JSON will say it was not.

Standard library only: it runs before any .venv exists, with the Python that `make` would use.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# pytest -q closes with e.g. "545 passed, 1 skipped in 431.23s (0:07:11)"
PYTEST_CLOSING = re.compile(r"^=*\s*(\d+ passed.*? in [\d.]+s.*?)\s*=*$")
# machine.PACKAGES of workflows/benchmarks/machine.py (this script cannot import it: it runs before any .venv),
# and the two whose versions decide whether a fresh install works at all.
VERSIONS = ("torch", "triton", "transformers", "zarr", "numcodecs", "numpy", "kernels", "optuna")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {round(seconds % 60)} s"


def timed(command: list[str], cwd: Path, log: Path) -> dict:
    """Run one command with its output in a log file; its wall time, exit status and the load around it."""
    load_start, start = os.getloadavg(), time.monotonic()
    with log.open("w") as out:
        status = subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.monotonic() - start
    text = log.read_text(errors="replace")
    if status != 0:
        sys.exit(f"time_quickstart: `{' '.join(command)}` exited {status}; the end of its output:\n{text[-3000:]}")
    closing = [m.group(1) for line in text.splitlines() if (m := PYTEST_CLOSING.match(line.strip()))]
    return {"command": " ".join(command), "wall_s": round(seconds, 1), "wall": minutes(seconds),
            "pytest_closing_line": closing[-1] if closing else None,
            "console_lines": len(text.splitlines()),
            "load_average_start": [round(x, 2) for x in load_start],
            "load_average_end": [round(x, 2) for x in os.getloadavg()]}


def installed_versions(python: Path) -> dict:
    code = ("import json, sys\nfrom importlib import metadata\nout = {'python': sys.version.split()[0]}\n"
            f"for name in {VERSIONS!r}:\n"
            "    try:\n        out[name] = metadata.version(name)\n"
            "    except metadata.PackageNotFoundError:\n        out[name] = None\nprint(json.dumps(out))")
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {}


def demo_test_ce(clone: Path) -> dict:
    """name -> test CE of every model the demo evaluated (its report compares them)."""
    out = {}
    for path in sorted((clone / "runs" / "demo").glob("*/*/eval.json")):
        out[path.parent.name] = round(json.loads(path.read_text())["loss"]["test"]["ce"], 4)
    return out


def measure(clone: Path, latest: bool) -> dict:
    logs = clone.parent
    make = shutil.which("make") or "make"
    figures = {"make_test": timed([make, "test"], clone, logs / "make-test.log")}
    figures["make_demo"] = timed([make, "demo"], clone, logs / "make-demo.log")
    figures["make_demo"]["test_ce"] = demo_test_ce(clone)
    figures["versions"] = installed_versions(clone / ".venv" / "bin" / "python")
    if latest:
        figures["make_test_latest"] = timed([make, "test-latest"], clone, logs / "make-test-latest.log")
        diff = [line for line in (logs / "make-test-latest.log").read_text().splitlines()
                if "differ from requirements.lock" in line]
        figures["make_test_latest"]["lock_diff_line"] = diff[-1] if diff else None
        figures["make_test_latest"]["versions"] = installed_versions(clone / ".venv-latest" / "bin" / "python")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "quickstart.json")
    parser.add_argument("--latest", action="store_true", help="also time `make test-latest` (the canary)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone and its logs")
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="babydistill-quickstart-"))
    try:
        clone = work / "babydistill"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        started, load_start = datetime.now(UTC), os.getloadavg()
        figures = measure(clone, args.latest)
    finally:
        if args.keep:
            print(f"time_quickstart: the clone and its logs are in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    command = "python tools/time_quickstart.py" + (" --latest" if args.latest else "")
    # The keys of workflows/benchmarks/machine.py's record (tests/test_benchmarks.py checks every JSON here); the
    # clone holds the committed HEAD only, so its tree is clean by construction.
    versions = figures.pop("versions")
    record = {"what": "git clone, then `make test`, then `make demo` in the clone, each timed from outside",
              **figures,
              "machine": {"cpu_model": cpu_model(), "logical_cores": os.cpu_count(), "gpus": [],
                          "load_average_start": [round(x, 2) for x in load_start],
                          "load_average_end": [round(x, 2) for x in os.getloadavg()],
                          "date_utc": started.isoformat(timespec="seconds"), "commit": commit, "dirty": False,
                          "versions": versions, "command": command,
                          "system": f"{platform.system()} {platform.release()} {platform.machine()}"}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"{args.out}: make test {figures['make_test']['wall']} ({figures['make_test']['pytest_closing_line']}), "
          f"make demo {figures['make_demo']['wall']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
