"""Stages, skip and resume: what `run` and `status` do, and what every stage verb goes through.

A stage's output is a folder (or a file) under the run directory. When a stage finishes, a
marker ``stage.json`` is written inside its output folder (``<file>.stage.json`` beside a file
output; in a Zarr store, ``_stage/zarr.json``, a group node holding the record as its attributes,
so that plain zarr sees a clean hierarchy) recording a *fingerprint*: a hash of the stage's config
sections and of its inputs' fingerprints. So:

- output present, marker fingerprint equal to the current one -> up to date, skipped;
- output present, fingerprint differs -> its inputs or config changed: refused unless ``--force``;
- otherwise the stage runs. Folder stages build in ``<out>.partial`` and are renamed into place
  when done, so an interrupted stage never leaves an output that looks finished; a partial
  folder from the same inputs is kept so that training resumes from its checkpoints.
  Stages marked ``in_place`` (the logit cache) resume inside the output itself and report
  their own completeness.

No training is lost because a config changed. A partial folder records the *recipe* it was made from
(the config keys and inputs its fingerprint hashes): when they differ, a training stage asked to resume
carries on if only keys that extend a run changed (``EXTENDABLE``: ``train.max_steps``, ``train.epochs``),
and otherwise the stage is refused in one line naming the keys; ``--force`` moves the partial folder
aside (``<name>.aside-<time>``, named on the console), it never removes it. (The partial folders of
prepare, tokenizer, tokenize and report hold nothing a rerun does not redo in seconds: they are replaced.)

What a fingerprint hashes comes from one declaration: every field of the config sections a stage
reads, except those ``pipeline.config`` marks ``EXECUTION_ONLY`` (see ``pipeline.config.identity``).

Resume: the training stages take ``resume`` as ``pipeline.train.train_loop`` does, default False
everywhere (a stage verb without ``--resume`` refuses to continue checkpoints it did not ask for).
``run`` and ``study`` pass "auto": they exist to pick up where an interrupted run stopped, and a
partial folder is kept only when it was made from the same inputs (its fingerprint).

Only rank 0 of a torchrun job touches the file system here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from babydistill.pipeline.config import Config, identity, model_name, parse_model_name
from babydistill.stores.checksum import changed_files, file_records, sealed, unsealed
from babydistill.workflows.console import stage_output, status_line

MARKER = "stage.json"
EXTENDABLE = ("train.max_steps", "train.epochs")
"""Keys a resumed training run may change: continuing a run for longer is what users do."""
STORE_MARKER = "_stage/zarr.json"
PARTIAL_MARKER = "stage.partial.json"


class StageError(ValueError):
    """A stage cannot run as asked (missing input, changed inputs, ...)."""


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def say(message: str) -> None:
    if is_rank_zero():
        print(message, flush=True)


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Stage:
    name: str
    """Shown to the user: `teacher t1`, `cache`, ..."""
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
    """A training stage's resume request (``pipeline.train.train_loop``): False, True, "auto" or a path."""
    earlier_fingerprints: tuple[str, ...] = ()
    """What an earlier version of this stage's fingerprint gave for the same inputs: an output recording one
    of these is up to date too, so that changing how a fingerprint is made does not make finished runs stale."""

    @property
    def marker(self) -> Path:
        if self.is_file:
            return self.out.with_name(self.out.name + ".stage.json")
        return marker_in(self.out) if self.store else self.out / MARKER

    @property
    def work(self) -> Path:
        return self.out if self.in_place or self.is_file else self.out.with_name(self.out.name + ".partial")


def marker_in(out: Path) -> Path:
    """The marker of a finished folder output: ``_stage/zarr.json`` in a Zarr store (``stage.json`` in
    stores written before), ``stage.json`` elsewhere."""
    return out / STORE_MARKER if (out / STORE_MARKER).is_file() or (out / "zarr.json").is_file() and \
        not (out / MARKER).is_file() else out / MARKER


def read_marker(path: Path) -> dict | None:
    """A stage marker's record; None when there is none, or it was changed after it was written (its seal)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return unsealed(record.get("attributes") if path.name == "zarr.json" else record)
    except (OSError, ValueError, AttributeError):
        return None


def write_marker(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = sealed(record)
    if path.name == "zarr.json":
        from babydistill.stores.logits import node_json

        path.write_text(node_json(record) + "\n", encoding="utf-8")
    else:
        path.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")


def output_fingerprint(out: Path, is_file: bool = False) -> str | None:
    """The fingerprint of a finished stage output, or None when it is not finished."""
    marker = out.with_name(out.name + ".stage.json") if is_file else marker_in(out)
    record = read_marker(marker)
    return record.get("fingerprint") if record else None


# Not part of a stage's recorded files: markers, what other stages write into the folder, checkpoints (their own
# checksums), logs. The logit cache keeps per-chunk checksums of its own and records none here.
_UNRECORDED = {MARKER, PARTIAL_MARKER, "eval.json", "eval.json.stage.json"}
_UNRECORDED_DIRS = {"trainer_state", "_stage", "logs"}


def output_files(root: Path) -> list[str]:
    """The files of a finished folder output that its stage marker records (size and crc32)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name not in _UNRECORDED
                  and not _UNRECORDED_DIRS & set(p.relative_to(root).parts[:-1]))


def _changed_outputs(stage: Stage, record: dict) -> str | None:
    """Why a finished output's files differ from what its marker recorded, or None."""
    base = stage.out.parent if stage.is_file else stage.out
    changed = changed_files(base, record.get("files") or {})
    if not changed and not stage.is_file and record.get("files") is not None:
        added = set(output_files(stage.out)) - set(record["files"])
        changed = [f"{name} (not written by the stage)" for name in sorted(added)]
    if changed:
        return f"{', '.join(changed[:2])}" + (f" and {len(changed) - 2} more" if len(changed) > 2 else "") + \
            " changed after the stage finished"
    return None


def stage_status(stage: Stage) -> tuple[str, str]:
    """(state, why): state is done | stale | damaged | unmarked | incomplete | partial | waiting | todo."""
    if stage.fingerprint is None:
        return "waiting", f"run {stage.waiting_for} first"
    record = read_marker(stage.marker) if stage.out.exists() else None
    if record is None and stage.recipe is not None and stage.out.is_dir() and any(stage.out.iterdir()):
        return "unmarked", (f"it has no stage marker ({stage.marker.name}: deleted, or made elsewhere); "
                            f"`{stage.command} --force` rebuilds it (the folder is moved aside, not deleted)")
    if record is not None and record.get("fingerprint") in (stage.fingerprint, *stage.earlier_fingerprints) \
            and (why := _changed_outputs(stage, record)):
        if stage.rebuilt_when_damaged or stage.derived:
            return "incomplete", f"{why}; it is rebuilt"
        return "damaged", f"{why}; `{stage.command} --force` rebuilds it (the folder is moved aside, not deleted)"
    if record is not None:
        if record.get("fingerprint") not in (stage.fingerprint, *stage.earlier_fingerprints):
            rebuild = f"`{stage.command}`" if stage.derived else f"`{stage.command} --force`"
            return "stale", (f"its inputs or config changed since it was made; {rebuild} (with the same --set "
                             "options) rebuilds it")
        reason = stage.incomplete(stage.out) if stage.incomplete else None
        if reason:
            return "incomplete", reason
        return "done", f"finished {record.get('finished', '?')} in {record.get('seconds', '?')} s"
    if stage.work.exists() and stage.work != stage.out:
        return "partial", f"interrupted; {stage.work.name} will be resumed"
    if stage.in_place and stage.out.exists():
        return "partial", "interrupted; the unfinished chunks will be redone"
    return "todo", "not run yet"


def recipe(config: Config, sections: tuple[str, ...], **inputs: Any) -> dict:
    """``{"train.lr": 0.003, ..., "input.tokens": "ab12..."}``: what a stage is made from, key by key."""
    flat = {f"{name}.{key}": value for name in sections for key, value in identity(getattr(config, name)).items()}
    return {**flat, **{f"input.{key}": value for key, value in inputs.items()}}


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
    keys = [change.split(":")[0] for change in changes]
    if old is not None and stage.recipe is not None and stage.resume not in (False, None) \
            and keys and all(key in EXTENDABLE for key in keys):
        say(f"[note] {stage.name}: resuming {stage.work} with {'; '.join(changes)}")
        _write_partial_marker(stage)
        return
    what = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "") \
        if changes else "its record predates per-key recipes" if old is None else "its inputs changed"
    hint = (" (resume with --resume to continue it longer)" if keys and all(k in EXTENDABLE for k in keys) else
            " (set them back to resume it)" if changes else "")
    raise StageError(f"{stage.name}: {stage.work} holds work made from other settings ({what}){hint}; "
                     f"--force moves it aside and starts over")


def _write_partial_marker(stage: Stage) -> None:
    record = {"fingerprint": stage.fingerprint, "recipe": stage.recipe}
    (stage.work / PARTIAL_MARKER).write_text(json.dumps(record, default=str), encoding="utf-8")


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
        if not stage.is_file:
            stage.work.mkdir(parents=True, exist_ok=True)
            if not stage.in_place:
                _write_partial_marker(stage)
        else:
            stage.out.parent.mkdir(parents=True, exist_ok=True)

    started = time.time()
    log = stage_log(log_dir, stage) if log_dir is not None and is_rank_zero() else None
    if log is None:
        say(f"[run ] {stage.name} -> {stage.out}")
        result = stage.build(stage.work)
    else:
        with stage_output(log, quiet=quiet):
            print(f"[run ] {stage.name} -> {stage.out}  ({time.strftime('%Y-%m-%d %H:%M:%S')})", flush=True)
            if quiet:
                with status_line(f"[run ] {stage.name} -> {stage.out}"):
                    result = stage.build(stage.work)
            else:
                result = stage.build(stage.work)
    seconds = round(time.time() - started, 1)

    if is_rank_zero():
        record = {"stage": stage.name, "fingerprint": stage.fingerprint, "seconds": seconds,
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "command": stage.command}
        if isinstance(result, dict):
            record["result"] = result
        if stage.is_file:
            record["files"] = file_records(stage.out.parent, [stage.out.name])
        elif not stage.in_place:
            record["files"] = file_records(stage.work, output_files(stage.work))
        if not (stage.in_place or stage.is_file):
            (stage.work / PARTIAL_MARKER).unlink(missing_ok=True)
            write_marker(stage.work / (STORE_MARKER if stage.store else MARKER), record)
            old = stage.out.with_name(stage.out.name + ".old")
            if stage.out.exists():
                stage.out.rename(old)
            stage.work.rename(stage.out)
            if old.exists() and not (stage.derived or stage.rebuilt_when_damaged):  # what --force replaced: kept
                say(f"[note] {stage.name}: the output it replaced is in {move_aside(old)}")
            _remove(old)
        else:
            if stage.store:
                (stage.out / MARKER).unlink(missing_ok=True)  # of a store written before markers were nodes
            write_marker(stage.out / STORE_MARKER if stage.store else stage.marker, record)
        say(f"[done] {stage.name} in {seconds} s" + (f" (log: {log})" if log is not None else ""))
    return True


# --- the stages of a run ------------------------------------------------------------------------


def _corpus_listing(corpus: Path) -> list:
    """Names, sizes and mtimes: the corpus's identity in prepare fingerprints made before 2026-11-27."""
    if not corpus.is_dir():
        return [str(corpus), "missing"]
    return sorted((str(p.relative_to(corpus)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in corpus.rglob("*") if p.is_file())


def _corpus_content(corpus: Path) -> list:
    """Every corpus file's name (relative to the corpus), size and sha256: what the corpus holds, wherever it
    lies and whatever its mtimes, so that a run directory moved or copied with its corpus stays up to date."""
    from babydistill.stores.tokens import file_sha256

    if not corpus.is_dir():
        return ["missing"]
    return sorted((str(p.relative_to(corpus)), p.stat().st_size, file_sha256(p)) for p in corpus.rglob("*")
                  if p.is_file())


def build_token_run(config: Config) -> Config:
    """prepare, tokenizer and tokenize straight into ``config.run_dir``, without stage markers: the tokens that a
    benchmark or a test needs in a throwaway run of its own (a real run goes through the stages). Returns ``config``."""
    from babydistill.pipeline.prepare import prepare_corpus
    from babydistill.pipeline.tokenize import tokenize_corpus
    from babydistill.pipeline.tokenizer import train_tokenizer

    prepare_corpus(config.data, config.corpus_path, config.data_path)
    train_tokenizer(config.tokenizer, config.data_path / "train", config.tokenizer_path)
    tokenize_corpus(config.data, config.data_path, config.tokenizer_path, config.tokens_path)
    return config


def model_fingerprint(model_dir: Path) -> str | None:
    """A finished model's fingerprint; for a checkpoint made elsewhere, one from its weights file."""
    fp = output_fingerprint(model_dir)
    weights = model_dir / "model.safetensors"
    if fp is None and weights.is_file() and not model_dir.name.endswith(".partial"):
        stat = weights.stat()
        fp = fingerprint(str(model_dir.resolve()), stat.st_size, stat.st_mtime_ns)
    return fp


def _upstream(path: Path, what: str, is_file: bool = False) -> tuple[str | None, str | None]:
    fp = output_fingerprint(path, is_file)
    return fp, (None if fp else what)


def prepare_stage(config: Config) -> Stage:
    from babydistill.pipeline.prepare import prepare_corpus

    data = config.data
    # Every identity field of `data` but two: seq_len is the tokenize stage's, and the corpus enters as its
    # contents (before: as its resolved path and file listing).
    recipe = [value for key, value in identity(data).items() if key not in ("corpus", "seq_len")]
    fp = fingerprint("prepare-content", *recipe, _corpus_content(config.corpus_path))
    # Before: the corpus's absolute path and its files' mtimes, which a moved or copied run does not keep.
    earlier = fingerprint("prepare", str(config.corpus_path.resolve()), *recipe, _corpus_listing(config.corpus_path))
    return Stage("prepare", config.data_path, fp,
                 lambda work: _summary_prepare(prepare_corpus(data, config.corpus_path, work)),
                 "babydistill prepare CONFIG", earlier_fingerprints=(earlier,), rebuilt_when_damaged=True)


def _summary_prepare(manifest: dict) -> dict:
    return {split: {"words": s["words"], "documents": s["documents"]} for split, s in manifest["splits"].items()}


def tokenizer_stage(config: Config) -> Stage:
    from babydistill.pipeline.tokenizer import train_tokenizer

    up, waiting = _upstream(config.data_path, "`babydistill prepare CONFIG`")
    fp = fingerprint("tokenizer", config.section_hash("tokenizer"), up) if up else None
    def build(work: Path):
        train_tokenizer(config.tokenizer, config.data_path / "train", work)

    return Stage("tokenizer", config.tokenizer_path, fp, build, "babydistill tokenizer CONFIG", waiting_for=waiting,
                 rebuilt_when_damaged=True)


def tokenize_stage(config: Config) -> Stage:
    from babydistill.pipeline.tokenize import tokenize_corpus
    from babydistill.stores.tokens import incomplete_reason

    up, waiting = _upstream(config.tokenizer_path, "`babydistill tokenizer CONFIG`")
    fp = fingerprint("tokenize", config.data.seq_len, up) if up else None
    return Stage("tokenize", config.tokens_path, fp,
                 lambda work: tokenize_corpus(config.data, config.data_path, config.tokenizer_path, work),
                 "babydistill tokenize CONFIG", waiting_for=waiting, incomplete=incomplete_reason, store=True,
                 rebuilt_when_damaged=True)


def teacher_stage(config: Config, seed: int, name: str | None = None, resume: Any = False) -> Stage:
    from babydistill.pipeline.teacher import train_teacher

    name = name or model_name("teacher", seed)
    up, waiting = _upstream(config.tokens_path, "`babydistill tokenize CONFIG`")
    fp = fingerprint("teacher", config.section_hash("model", "train", "teachers"), seed, up) if up else None

    def build(work: Path):
        train_teacher(config, config.tokens_path, config.tokenizer_path, work, seed=seed, resume=resume)

    return Stage(f"teacher {name}", config.teacher_path(name), fp, build,
                 f"babydistill teacher CONFIG --seed {seed} --name {name}", waiting_for=waiting,
                 recipe=recipe(config, ("model", "train", "teachers"), seed=seed, tokens=up), resume=resume)


def teacher_command(name: str) -> str:
    parsed = parse_model_name(name)
    seed = parsed[1] if parsed and parsed[0] == "teacher" else "S"
    return f"`babydistill teacher CONFIG --seed {seed}" + ("`" if seed != "S" else f" --name {name}`")


def default_teacher_names(config: Config) -> list[str]:
    return [model_name("teacher", seed) for seed in config.teachers.resolved_seeds()]


def cache_stage(config: Config, teacher_names: list[str] | None = None, scheduler: str | None = None) -> Stage:
    from babydistill.pipeline.cache import capture_logits
    from babydistill.stores.logits import incomplete_reason

    names = teacher_names or default_teacher_names(config)
    teacher_dirs = [config.teacher_path(n) for n in names]
    ups = [model_fingerprint(p) for p in teacher_dirs]
    tokens_fp = output_fingerprint(config.tokens_path)
    missing = [teacher_command(n) for n, fp in zip(names, ups) if fp is None]
    if tokens_fp is None:
        missing.insert(0, "`babydistill tokenize CONFIG`")
    fp = None if missing else fingerprint("cache", *identity(config.cache).values(), names, ups, tokens_fp)

    def build(work: Path):
        return capture_logits(config.cache, config.tokens_path, config.tokenizer_path, teacher_dirs, work,
                              workers=config.cache.workers, scheduler=scheduler)

    return Stage("cache", config.logits_path, fp, build,
                 f"babydistill cache CONFIG --teachers {','.join(names)}",
                 waiting_for=", ".join(missing) or None, in_place=True, incomplete=incomplete_reason, store=True)


def student_stage(config: Config, seed: int, name: str | None = None, resume: Any = False,
                  online: bool = False, teacher_names: list[str] | None = None) -> Stage:
    from babydistill.pipeline.distill import student_config, train_student

    name = name or model_name("online" if online else "student", seed)
    names = teacher_names or default_teacher_names(config)
    teacher_dirs = [config.teacher_path(n) for n in names]
    if online:
        ups = [model_fingerprint(p) for p in teacher_dirs]
        missing = [teacher_command(n) for n, fp in zip(names, ups) if fp is None]
        source = ["online", names, ups]
        if config.cache.ensemble != "logits":  # the rule online students average with; under the default
            source.append(config.cache.ensemble)  # the fingerprint is the one students were made with before
    else:
        up = output_fingerprint(config.logits_path)
        missing = [] if up else ["`babydistill cache CONFIG`"]
        source = ["offline", up]
    trained = student_config(config)
    fp = None if missing else fingerprint("student", trained.section_hash("model", "train"),
                                          *identity(trained.distill).values(), seed, source)

    def build(work: Path):
        train_student(config, config.tokens_path, config.tokenizer_path, config.logits_path, work, seed=seed,
                      resume=resume, online=online, teacher_dirs=teacher_dirs if online else None)

    command = f"babydistill distill CONFIG --seed {seed} --name {name}" + (" --online" if online else "")
    return Stage(f"student {name}", config.student_path(name), fp, build, command,
                 waiting_for=", ".join(missing) or None, resume=resume,
                 recipe=recipe(trained, ("model", "train", "distill"), seed=seed, source=source))


def evaluate_stage(config: Config, model_dir: Path) -> Stage:
    from babydistill.pipeline.evaluate import evaluate_model

    model_fp = model_fingerprint(model_dir)
    tokens_fp = output_fingerprint(config.tokens_path)
    missing = ([] if model_fp else [f"the stage that trains {model_dir} (`babydistill run CONFIG`)"]) + \
        ([] if tokens_fp else ["`babydistill tokenize CONFIG`"])
    fp = None if missing else fingerprint("evaluate", config.section_hash("eval"), model_fp, tokens_fp)
    out = model_dir / "eval.json"

    def build(work: Path):
        if config.train.num_threads is not None:
            import torch

            torch.set_num_threads(config.train.num_threads)
        result = evaluate_model(config.eval, model_dir, config.tokens_path, config.tokenizer_path, out=out)
        return {"loss": result["loss"], "blimp_overall": result["blimp"]["overall"]}

    return Stage(f"evaluate {model_dir.name}", out, fp, build, f"babydistill evaluate CONFIG --model {model_dir}",
                 waiting_for=", ".join(missing) or None, is_file=True, rebuilt_when_damaged=True)


def model_dirs(config: Config) -> list[Path]:
    """Every teacher and student of the config, in report order."""
    names = default_teacher_names(config)
    dirs = [config.teacher_path(n) for n in names]
    dirs += [config.student_path(model_name("student", seed)) for seed in config.distill.resolved_seeds()]
    dirs += [config.student_path(model_name("online", seed)) for seed in range(1, config.distill.online_students + 1)]
    return dirs


def report_stage(config: Config) -> Stage:
    from babydistill.pipeline.report import write_report

    evals = [output_fingerprint(d / "eval.json", is_file=True) for d in model_dirs(config)]
    missing = [f"`babydistill evaluate CONFIG --model {d}`" for d, fp in zip(model_dirs(config), evals) if fp is None]
    fp = None if missing else fingerprint("report", evals)

    def build(work: Path):
        write_report(config, work)

    return Stage("report", config.report_path, fp, build, "babydistill report CONFIG", derived=True,
                 waiting_for=", ".join(missing[:2]) + (" ..." if len(missing) > 2 else "") or None)


def pipeline_stages(config: Config) -> list[Callable[[], Stage]]:
    """The whole pipeline in order, as thunks: a stage's fingerprint depends on the ones before it."""
    thunks: list[Callable[[], Stage]] = [lambda: prepare_stage(config), lambda: tokenizer_stage(config),
                                         lambda: tokenize_stage(config)]
    for seed in config.teachers.resolved_seeds():
        thunks.append(lambda seed=seed: teacher_stage(config, seed, resume="auto"))
    if config.distill.students:
        thunks.append(lambda: cache_stage(config))
    for seed in config.distill.resolved_seeds():
        thunks.append(lambda seed=seed: student_stage(config, seed, resume="auto"))
    for seed in range(1, config.distill.online_students + 1):
        thunks.append(lambda seed=seed: student_stage(config, seed, resume="auto", online=True))
    for model_dir in model_dirs(config):
        thunks.append(lambda model_dir=model_dir: evaluate_stage(config, model_dir))
    thunks.append(lambda: report_stage(config))
    return thunks


def run_all(config: Config, *, force: bool = False) -> int:
    """Run every stage in order, skipping finished ones. Returns how many ran."""
    started = time.time()
    if config.eval.zero_shot:
        from babydistill.pipeline.evaluate import load_zero_shot_suites

        load_zero_shot_suites(config.eval)  # a bad data file stops the run now, not after hours of training
    ran = 0
    for thunk in pipeline_stages(config):
        ran += run_stage(thunk(), force=force, log_dir=config.run_path / "logs", quiet=True)
    report = config.report_path / "report.md"
    if ran == 0:
        say(f"Everything is up to date: nothing to do. Report: {report}")
    else:
        say(f"Ran {ran} stage(s) in {time.time() - started:.0f} s. Report: {report}")
    return ran


def status_lines(config: Config) -> list[str]:
    lines = [f"run_dir: {config.run_path}"]
    for thunk in pipeline_stages(config):
        try:
            stage = thunk()
        except ImportError as exc:  # a stage module that this install does not have
            lines.append(f"  {'unavailable':<11} {exc}")
            continue
        state, why = stage_status(stage)
        lines.append(f"  {state:<11} {stage.name:<18} {why}")
    return lines
