"""What a stage prints, and where: the console keeps our lines, the stage's log file gets everything.

While a stage runs (:func:`stage_output`):

- its stdout (training step lines, summaries) goes to ``RUN_DIR/logs/<stage>.log``, and also to the
  console for a single stage verb (``babydistill teacher ...``); under ``babydistill run`` only to the
  file, so the console shows one line per stage plus transient progress bars;
- transformers' log messages go to the file only, and its progress bars ("Loading weights",
  "Writing model shards") are off: they flash by for every checkpoint load and leave blank lines;
- a warning goes to the file, and to the console as one line when our code raised it (a tracker
  that could not start, a store that does not suit the loss, ...), not when a library did;
- under ``run`` with a console that is not a terminal (a pipe, CI), stderr goes to the file too:
  there the progress bars could not be transient, only noise.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
OUR_PACKAGES = tuple(str(PROJECT_ROOT / name) for name in ("pipeline", "kernels", "stores", "workflows"))


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """``babydistill: warning: ...`` for ours; ``warning: <Category> (<file>:<line>): ...`` for a library's."""
    text = " ".join(str(message).split())
    if str(filename).startswith(OUR_PACKAGES):
        return f"babydistill: warning: {text}\n"
    return f"warning: {category.__name__} ({filename}:{lineno}): {text}\n"


class _Tee:
    """A text stream writing to two others (the console and the stage log)."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def write(self, text: str) -> int:
        self.second.write(text)
        return self.first.write(text)

    def flush(self) -> None:
        self.first.flush()
        self.second.flush()

    def isatty(self) -> bool:
        return self.first.isatty()

    def __getattr__(self, name: str):
        return getattr(self.first, name)  # encoding, fileno, ...: a library asking is asking about the console


@contextlib.contextmanager
def stage_output(log_path: Path, *, quiet: bool):
    """Route the output of the code run inside as the module docstring says; restore everything after."""
    from transformers.utils import logging as hf_logging

    hf_logging.get_verbosity()  # makes transformers attach its own stderr handler now, so we can swap it out
    hf_logger = logging.getLogger("transformers")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a", encoding="utf-8") as log:
        console_out, console_err = sys.stdout, sys.stderr
        saved_handlers, saved_propagate = hf_logger.handlers[:], hf_logger.propagate
        bars_were_on, saved_showwarning = hf_logging.is_progress_bar_enabled(), warnings.showwarning

        def show_warning(message, category, filename, lineno, file=None, line=None):
            text = one_line_warning(message, category, filename, lineno)
            log.write(text)
            log.flush()
            if text.startswith("babydistill:"):
                console_err.write(text)
                console_err.flush()

        sys.stdout = log if quiet else _Tee(console_out, log)
        if quiet and not console_err.isatty():
            sys.stderr = log
        hf_logger.handlers = [logging.StreamHandler(log)]
        hf_logger.propagate = False
        hf_logging.disable_progress_bar()
        warnings.showwarning = show_warning
        try:
            yield
        finally:
            warnings.showwarning = saved_showwarning
            if bars_were_on:
                hf_logging.enable_progress_bar()
            hf_logger.handlers, hf_logger.propagate = saved_handlers, saved_propagate
            sys.stdout, sys.stderr = console_out, console_err


def status_line(text: str):
    """A transient line under which the stage's progress bars draw, on a terminal; nothing elsewhere."""
    from tqdm import tqdm

    return tqdm(total=0, bar_format="{desc}", desc=text, leave=False, disable=not sys.stderr.isatty())
