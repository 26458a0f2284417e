"""A stage, and running it: skip, resume, --force; what `run`, `status` and every stage verb go through.

A stage's output is a folder (or a file) under the run directory. When a stage finishes, a marker is written in
its output (``workflows/markers.py``) recording a *fingerprint*: a hash of the stage's config sections (which
ones: ``pipeline/stages.py``) and of its inputs' fingerprints. So:

- output present, marker fingerprint equal to the current one -> up to date, skipped;
- output present, fingerprint differs -> its inputs or config changed: refused unless ``--force``;
- otherwise the stage runs. Folder stages build in ``<out>.partial`` and are renamed into place
  when done, so an interrupted stage never leaves an output that looks finished; a partial
  folder from the same inputs is kept so that training resumes from its checkpoints.
  Stages marked ``in_place`` (the logit store's capture) resume inside the output itself and report
  their own completeness.

No training is lost because a config changed. A partial folder records the *recipe* it was made from
(the config keys and inputs its fingerprint hashes): when they differ, a training stage asked to resume
carries on if only keys that extend a run changed (``EXTENDABLE``: ``train.max_steps``, ``train.epochs``),
and otherwise the stage is refused in one line naming the keys; ``--force`` moves the partial folder
aside (``<name>.aside-<time>``, named on the console), it never removes it. (The partial folders of
prepare, tokenizer, tokenize and report hold nothing a rerun does not redo in seconds: they are replaced.)

What a fingerprint hashes comes from one declaration: every field of the config sections a stage
reads, except those ``pipeline.config`` marks ``EXECUTION_ONLY`` (see ``pipeline.config.identity``).

Resume: the training stages take ``resume`` as ``pipeline.training.loop.train_loop`` does, default False
everywhere (a stage verb without ``--resume`` refuses to continue checkpoints it did not ask for).
``run`` and ``study`` pass "auto": they exist to pick up where an interrupted run stopped, and a
partial folder is kept only when it was made from the same inputs (its fingerprint).

Only rank 0 of a torchrun job touches the file system here.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from babydistill.stores.checksum import file_records
from babydistill.workflows.console import stage_output, status_line
from babydistill.workflows.markers import (
    MARKER,
    PARTIAL_MARKER,
    STORE_MARKER,
    changed_outputs,
    file_marker,
    marker_in,
    output_files,
    read_marker,
    write_marker,
    write_partial_marker,
)

EXTENDABLE = ("train.max_steps", "train.epochs")
"""Keys a resumed training run may change: continuing a run for longer is what users do."""


class StageError(ValueError):
    """A stage cannot run as asked (missing input, changed inputs, ...)."""


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def say(message: str) -> None:
    if is_rank_zero():
        print(message, flush=True)


@dataclass
class Stage:
    name: str
    """Shown to the user: `teacher t1`, `capture`, ..."""
    out: Path
    fingerprint: str | None
    """None when an input is missing (see ``waiting_for``)."""
    build: Callable[[Path], Any]
    command: str
    """The command that runs this stage alone."""
    waiting_for: str | None = None
    in_place: bool = False
    incomplete: Callable[[Path], str | None] | None = None
    rebuilt_when_damaged: bool = False
    """A stage that remakes its output in seconds, the same each time (prepare, tokenizer, tokenize, evaluate):
    an output whose files changed is rebuilt, not refused."""
    is_file: bool = False
    store: bool = False
    """The output is a Zarr store: its marker is a zarr node (``_stage/zarr.json``)."""
    derived: bool = False
    """Made from other outputs alone in seconds (the report): rebuilt when stale, no ``--force`` needed."""
    recipe: dict | None = None
    """The config keys and inputs (``input.*``) the fingerprint hashes, flat: recorded in a partial folder so
    that a change can be named key by key."""
    resume: Any = False
    """A training stage's resume request (``pipeline.training.loop.train_loop``): False, True, "auto" or a path."""
    earlier_fingerprints: tuple[str, ...] = ()
    """What an earlier version of this stage's fingerprint gave for the same inputs: an output recording one
    of these is up to date too, so that changing how a fingerprint is made does not make finished runs stale."""

    @property
    def marker(self) -> Path:
        if self.is_file:
            return file_marker(self.out)
        return marker_in(self.out) if self.store else self.out / MARKER

    @property
    def work(self) -> Path:
        return self.out if self.in_place or self.is_file else self.out.with_name(self.out.name + ".partial")


def stage_status(stage: Stage) -> tuple[str, str]:
    """(state, why): state is done | stale | damaged | unmarked | incomplete | partial | waiting | todo."""
    if stage.fingerprint is None:
        return "waiting", f"run {stage.waiting_for} first"
    record = read_marker(stage.marker) if stage.out.exists() else None
    if record is None and stage.recipe is not None and stage.out.is_dir() and any(stage.out.iterdir()):
        return "unmarked", (f"it has no stage marker ({stage.marker.name}: deleted, or made elsewhere); "
                            f"`{stage.command} --force` rebuilds it (the folder is moved aside, not deleted)")
    if record is None:
        if stage.work.exists() and stage.work != stage.out:
            return "partial", f"interrupted; {stage.work.name} will be resumed"
        if stage.in_place and stage.out.exists():
            return "partial", "interrupted; the unfinished chunks will be redone"
        return "todo", "not run yet"
    if record.get("fingerprint") not in (stage.fingerprint, *stage.earlier_fingerprints):
        rebuild = f"`{stage.command}`" if stage.derived else f"`{stage.command} --force`"
        return "stale", (f"its inputs or config changed since it was made; {rebuild} (with the same --set "
                         "options) rebuilds it")
    if why := changed_outputs(stage.out, stage.is_file, record):
        if stage.rebuilt_when_damaged or stage.derived:
            return "incomplete", f"{why}; it is rebuilt"
        return "damaged", f"{why}; `{stage.command} --force` rebuilds it (the folder is moved aside, not deleted)"
    reason = stage.incomplete(stage.out) if stage.incomplete else None
    if reason:
        return "incomplete", reason
    return "done", f"finished {record.get('finished', '?')} in {record.get('seconds', '?')} s"


def recipe_differences(old: dict, new: dict) -> list[str]:
    """``["train.eval_every: 10 -> 5", ...]`` for every key whose value differs (absent: ``-``)."""
    keys = [key for key in dict.fromkeys([*old, *new]) if old.get(key, "-") != new.get(key, "-")]
    return [f"{key}: {json.dumps(old.get(key, '-'), default=str)} -> {json.dumps(new.get(key, '-'), default=str)}"
            for key in keys]


def move_aside(path: Path) -> Path:
    """Rename ``path`` to ``<name>.aside-YYYYmmdd-HHMMSS`` beside it (never deleted) and return the new path."""
    from babydistill.pipeline.training.checkpoint import move_to_free_name

    base = next((path.name[:-len(end)] for end in (".partial", ".old") if path.name.endswith(end)), path.name)
    return move_to_free_name(path, path.with_name(f"{base}.aside-{time.strftime('%Y%m%d-%H%M%S')}"))


def _keep_or_refuse_partial(stage: Stage, partial: dict) -> None:
    """A partial folder made from another recipe: resume it when only ``EXTENDABLE`` keys changed and the stage
    was asked to resume (its marker then records the new recipe), otherwise refuse naming the keys."""
    old = partial.get("recipe")
    changes = recipe_differences(old, stage.recipe or {}) if old is not None else []
    extends = bool(changes) and all(change.split(":")[0] in EXTENDABLE for change in changes)
    if old is not None and stage.recipe is not None and stage.resume not in (False, None) and extends:
        say(f"[note] {stage.name}: resuming {stage.work} with {'; '.join(changes)}")
        write_partial_marker(stage.work, stage.fingerprint, stage.recipe)
        return
    if changes:
        what = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
    else:
        what = "its record predates per-key recipes" if old is None else "its inputs changed"
    hint = (" (resume with --resume to continue it longer)" if extends else
            " (set them back to resume it)" if changes else "")
    raise StageError(f"{stage.name}: {stage.work} holds work made from other settings ({what}){hint}; "
                     f"--force moves it aside and starts over")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _remove_marker(stage: Stage) -> None:
    marker = stage.marker
    _remove(marker.parent if marker.name == "zarr.json" else marker)  # a store's marker node: its folder


def stage_log(log_dir: Path, stage: Stage) -> Path:
    """``RUN_DIR/logs/teacher-t1.log``: where a stage's messages go (workflows/console.py)."""
    return log_dir / f"{stage.name.replace(' ', '-')}.log"


def run_stage(stage: Stage, *, force: bool = False, log_dir: Path | None = None, quiet: bool = False) -> bool:
    """Run ``stage`` unless it is up to date. Returns True when it ran.

    With ``log_dir``, the stage's output goes to its log file there (and to the console too unless
    ``quiet``: under ``run`` the console gets one line per stage); see workflows/console.py.
    """
    state, why = stage_status(stage)
    if state == "waiting":
        raise StageError(f"{stage.name}: {why}")
    if state == "done" and not force:
        say(f"[skip] {stage.name}: up to date ({stage.out})")
        return False
    if state in ("stale", "unmarked", "damaged") and not (force or stage.derived):
        raise StageError(f"{stage.name}: {stage.out} exists but {why}")
    if is_rank_zero():
        _make_room(stage, state, force)
    started = time.time()
    log = stage_log(log_dir, stage) if log_dir is not None and is_rank_zero() else None
    result = _build(stage, log, quiet)
    if is_rank_zero():
        seconds = round(time.time() - started, 1)
        _finish(stage, result, seconds)
        say(f"[done] {stage.name} in {seconds} s" + (f" (log: {log})" if log is not None else ""))
    return True


def _make_room(stage: Stage, state: str, force: bool) -> None:
    """Before a stage runs: what ``--force`` replaces moved aside, a stale marker removed, a partial folder kept
    when it was made from the same inputs (or the same recipe but for keys that extend a run)."""
    partial = read_marker(stage.work / PARTIAL_MARKER) if not (stage.in_place or stage.is_file) else None
    if force and stage.work.exists() and not stage.is_file:
        if stage.derived:
            _remove(stage.work)
        else:
            say(f"[note] {stage.name}: moved {stage.work} aside to {move_aside(stage.work)} (--force)")
        partial = None
    elif force and stage.is_file:
        _remove_marker(stage)
    elif state in ("stale", "incomplete") or stage.in_place:
        _remove_marker(stage)  # an in-place stage is unfinished until it says otherwise
    if partial is not None and partial.get("fingerprint") != stage.fingerprint:
        if stage.recipe is None:  # not a training stage: its partial folder holds no work worth keeping
            say(f"[note] {stage.name}: discarding {stage.work} (made from other inputs)")
            _remove(stage.work)
        else:
            _keep_or_refuse_partial(stage, partial)
    if stage.is_file:
        stage.out.parent.mkdir(parents=True, exist_ok=True)
        return
    stage.work.mkdir(parents=True, exist_ok=True)
    if not stage.in_place:
        write_partial_marker(stage.work, stage.fingerprint, stage.recipe)


def _build(stage: Stage, log: Path | None, quiet: bool) -> Any:
    if log is None:
        say(f"[run ] {stage.name} -> {stage.out}")
        return stage.build(stage.work)
    with stage_output(log, quiet=quiet):
        print(f"[run ] {stage.name} -> {stage.out}  ({time.strftime('%Y-%m-%d %H:%M:%S')})", flush=True)
        if not quiet:
            return stage.build(stage.work)
        with status_line(f"[run ] {stage.name} -> {stage.out}"):
            return stage.build(stage.work)


def _finish(stage: Stage, result: Any, seconds: float) -> None:
    """Write the stage's marker (with its files' sizes and crc32) and put a folder output in place."""
    record = {"stage": stage.name, "fingerprint": stage.fingerprint, "seconds": seconds,
              "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "command": stage.command}
    if isinstance(result, dict):
        record["result"] = result
    if stage.is_file:
        record["files"] = file_records(stage.out.parent, [stage.out.name])
    elif not stage.in_place:
        record["files"] = file_records(stage.work, output_files(stage.work))
    if stage.in_place or stage.is_file:
        if stage.store:
            (stage.out / MARKER).unlink(missing_ok=True)  # of a store written before markers were nodes
        write_marker(stage.out / STORE_MARKER if stage.store else stage.marker, record)
        return
    (stage.work / PARTIAL_MARKER).unlink(missing_ok=True)
    write_marker(stage.work / (STORE_MARKER if stage.store else MARKER), record)
    old = stage.out.with_name(stage.out.name + ".old")
    if stage.out.exists():
        stage.out.rename(old)
    stage.work.rename(stage.out)
    if old.exists() and not (stage.derived or stage.rebuilt_when_damaged):  # what --force replaced: kept
        say(f"[note] {stage.name}: the output it replaced is in {move_aside(old)}")
    _remove(old)
