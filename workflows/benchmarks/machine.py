"""Where a benchmark ran: every JSON under docs/benchmarks/ carries this record under one key, "machine", so
that a figure can be read against the machine, its load and the code that made it.

    started = machine.start()          # before the first timing: the date and the load at the start
    ...
    result["machine"] = machine.finish(started)   # the rest, with the load at the end
"""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The libraries a benchmark's figures depend on; a missing one is recorded as None.
PACKAGES = ("torch", "triton", "transformers", "zarr", "numcodecs", "numpy")
KEYS = ("cpu_model", "logical_cores", "gpus", "load_average_start", "load_average_end", "date_utc", "commit",
        "dirty", "versions", "command")


def start() -> dict:
    return {"date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "load_average_start": _load_average()}


def finish(started: dict) -> dict:
    """The whole record: ``started`` (from :func:`start`) and what is read now."""
    commit, dirty = _git_state()
    record = {"cpu_model": cpu_model(), "logical_cores": os.cpu_count(), "gpus": _gpus(),
              "load_average_start": started["load_average_start"], "load_average_end": _load_average(),
              "date_utc": started["date_utc"], "commit": commit, "dirty": dirty,
              "versions": {"python": platform.python_version(), **{name: _version(name) for name in PACKAGES}},
              "command": command_line()}
    return {key: record[key] for key in KEYS}


def cpu_model() -> str:
    try:  # Linux names the model here; platform.processor() is often just the architecture
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command_line() -> str:
    """The command as typed: ``python -m babydistill...`` or ``babydistill bench ...`` (the interpreter's and the
    script's folders dropped, they only say where the venv was)."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    if argv and Path(argv[0]).name.startswith("python"):
        argv[0] = "python"
    if len(argv) > 1 and argv[0] == "python" and Path(argv[1]).name == "babydistill":
        argv = argv[1:]
    if argv and Path(argv[0]).name == "babydistill":
        argv[0] = "babydistill"
    return shlex.join(argv)


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_state() -> tuple[str | None, bool | None]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=REPO).stdout.strip()

    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain"))
    except (OSError, subprocess.CalledProcessError):
        return None, None
