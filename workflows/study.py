"""`babydistill study STUDY.yaml`: a controlled comparison of student "arms" trained from the same teachers.

A study file names a base config, whose run holds the shared stages (data, tokenizer, tokens, the
teachers), the student seeds (the same for every arm, so that arms are compared seed by seed), a
reference arm and the arms themselves: online distillation, or offline from a logit store captured
with other cache settings. Each arm is a run of its own, ``<base run_dir>/study/<arm>/``, whose
``data``, ``tokenizer``, ``tokens.zarr`` and ``teachers`` are relative symlinks to the base run's.
Every arm therefore sees the same inputs (with the same fingerprints), and only what its ``set``
changes differs. All the work goes through the ordinary stages (workflows.runner), so finished
work is skipped and an interrupted study resumes.

The teachers are evaluated with the study's evaluation settings in
``<base run_dir>/study/teachers/NAME/``, a folder of symlinks to the teacher's files. The base run's
own ``eval.json`` may have been made with other settings and is left alone.

Report (``report.md``, ``results.json``, ``test_ce_vs_bytes.png``): for each arm, the mean ± std
over seeds of validation and test CE, the paired difference to the reference arm with a 95%
t-interval, BLiMP, the store's bytes per token, the capture time and the student step time.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import yaml

from babydistill.pipeline.config import Config, load_config, model_name
from babydistill.workflows.markers import read_marker
from babydistill.workflows.runner import (
    Stage,
    default_teacher_names,
    evaluate_stage,
    prepare_stage,
    run_stage,
    stage_status,
    student_stage,
    teacher_stage,
    tokenize_stage,
    tokenizer_stage,
)
from babydistill.workflows.runner import capture_stage as cache_stage

SHARED_SECTIONS = ("data", "tokenizer", "model", "teachers")
"""Sections that the shared stages (the base run) fix: neither the study nor an arm may change them."""
ARM_FIXED = (*SHARED_SECTIONS, "eval", "run_dir")
"""An arm also keeps the evaluation (every arm is scored the same way) and its run_dir (the study sets it)."""
SHARED_LINKS = ("data", "tokenizer", "tokens.zarr", "teachers")
STUDY_KEYS = ("base", "seeds", "reference", "set", "arms", "contrasts")
ARM_KEYS = ("name", "online", "set")
RESERVED_NAMES = ("report", "teachers", "logs")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class StudyError(ValueError):
    """The study file or the command asks for something that cannot be done."""


# --- the study file ---------------------------------------------------------------------------


@dataclass
class Arm:
    name: str
    online: bool
    """Distil online (teachers every step, no store); otherwise offline from the arm's own store."""
    set: list[str]
    """The arm's overrides, applied after the study-wide ones."""
    config: Config
    """The base config with the study-wide and the arm's overrides, run_dir = ``<base run_dir>/study/<name>``."""

    @property
    def run_path(self) -> Path:
        return self.config.run_path

    def student_name(self, seed: int) -> str:
        return model_name("online" if self.online else "student", seed)

    def student_path(self, seed: int) -> Path:
        return self.config.student_path(self.student_name(seed))


@dataclass
class Study:
    path: Path
    base_path: Path
    base: Config
    """The base config as it is: the shared stages run with it."""
    shared: Config
    """The base config with the study-wide ``set``: the teachers are evaluated with it."""
    seeds: list[int]
    reference: str
    set: list[str]
    arms: list[Arm]
    warnings: list[str]
    contrasts: list[tuple[str, str]]
    """Pairs of arms compared seed by seed besides the reference: each isolates one factor."""

    @property
    def root(self) -> Path:
        return self.base.run_path / "study"

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    def teacher_view(self, name: str) -> Path:
        return self.root / "teachers" / name

    def overrides(self, arm: Arm | None) -> list[str]:
        """What ``--set`` must say to load ``arm``'s config (or the teachers' evaluation config) from the base."""
        if arm is None:
            return list(self.set)
        return [*self.set, *arm.set, f"run_dir={json.dumps(str(arm.run_path))}"]  # JSON strings are YAML


def _section(item: str) -> str:
    return item.split("=", 1)[0].strip().split(".")[0]


def _arm_names(arms_raw, fail, set_list) -> list[str]:
    """Check the study file's arms (keys, names, what their set may change); their names, in order."""
    if not isinstance(arms_raw, list) or not arms_raw:
        fail("arms", "must be a non-empty list of arms, each with a name and optionally online: true and a set list")
    names: list[str] = []
    for i, arm in enumerate(arms_raw):
        key = f"arms[{i}]"
        if not isinstance(arm, dict):
            fail(key, f"must be a mapping with the keys {', '.join(ARM_KEYS)}, got {arm!r}")
        for k in arm:
            if k not in ARM_KEYS:
                fail(f"{key}.{k}", f"unknown key (known keys: {', '.join(ARM_KEYS)})")
        name = arm.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name in RESERVED_NAMES:
            fail(f"{key}.name", f"must be a folder name (letters, digits, . _ -) other than "
                                f"{', '.join(RESERVED_NAMES)}, got {name!r}")
        if name in names:
            fail(f"{key}.name", f"duplicate arm name {name!r}: every arm needs its own name (and folder)")
        names.append(name)
        if not isinstance(arm.get("online", False), bool):
            fail(f"{key}.online", f"must be true or false, got {arm['online']!r}")
        for item in set_list(arm.get("set"), f"{key}.set"):
            if _section(item) in ARM_FIXED:
                fail(f"{key}.set", f"{item!r} changes `{_section(item)}`, which every arm must share (the comparison "
                                   "holds the data, tokenizer, model, teachers and evaluation fixed); change it in "
                                   "the base config, or for eval in the study-wide set")
    return names


def _load_arm_configs(path: Path, base_path: Path, study_set: list[str], arms_raw: list[dict]):
    """(base config, base config with the study-wide set, the arms): load_config names any unknown key or bad value."""
    try:
        base = load_config(base_path)
    except ValueError as exc:
        raise StudyError(f"{path}: base: {exc}") from None
    try:
        shared = load_config(base_path, study_set)
    except ValueError as exc:
        raise StudyError(f"{path}: set: {exc}") from None
    arms = []
    for i, arm in enumerate(arms_raw):
        arm_set = list(arm.get("set") or [])
        run_dir = base.run_path / "study" / arm["name"]
        try:
            config = load_config(base_path, [*study_set, *arm_set, f"run_dir={json.dumps(str(run_dir))}"])
        except ValueError as exc:
            raise StudyError(f"{path}: arms[{i}] ({arm['name']}): {exc}") from None
        arms.append(Arm(arm["name"], bool(arm.get("online", False)), arm_set, config))
    return base, shared, arms


def load_study(path: str | Path) -> Study:
    """Read and check a study file and every arm's config; writes nothing. Raises StudyError (one line)."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"{path}: study file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise StudyError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: must be a YAML mapping with the keys {', '.join(STUDY_KEYS)}")

    def fail(key: str, message: str):
        raise StudyError(f"{path}: {key}: {message}")

    def set_list(value, key: str) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            fail(key, f'must be a list of "section.key=value" strings, got {value!r}')
        return list(value)

    for key in raw:
        if key not in STUDY_KEYS:
            fail(key, f"unknown key (known keys: {', '.join(STUDY_KEYS)})")
    if not isinstance(raw.get("base"), str):
        fail("base", "missing: the babydistill config every arm starts from (a path relative to the study file)")
    base_path = path.parent / raw["base"]

    seeds = raw.get("seeds")
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        fail("seeds", f"must be a list of integer student seeds (the same for every arm), got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        fail("seeds", f"repeats a seed: {seeds}")
    if len(seeds) < 2:
        fail("seeds", f"a paired comparison needs at least 2 seeds (3 or more for a useful interval), got {seeds}")

    study_set = set_list(raw.get("set"), "set")
    for item in study_set:
        if _section(item) in (*SHARED_SECTIONS, "run_dir"):
            fail("set", f"{item!r} changes `{_section(item)}`, which the base run's shared stages fix "
                        f"(data, tokenizer, model, teachers); change it in the base config {base_path}")

    arms_raw = raw.get("arms")
    names = _arm_names(arms_raw, fail, set_list)

    reference = raw.get("reference")
    if reference not in names:
        fail("reference", f"must name one of the arms ({', '.join(names)}): the arm every other arm is compared "
                          f"with, got {reference!r}")

    contrasts = raw.get("contrasts") or []
    if not isinstance(contrasts, list) or not all(isinstance(c, list) and len(c) == 2 for c in contrasts):
        fail("contrasts", f"must be a list of [arm, arm] pairs, got {contrasts!r}")
    for pair in contrasts:
        for name in pair:
            if name not in names:
                fail("contrasts", f"{name!r} is not an arm ({', '.join(names)})")

    base, shared, arms = _load_arm_configs(path, base_path, study_set, arms_raw)

    warnings = []
    if len(seeds) < 3:
        warnings.append(f"{path}: seeds: only {len(seeds)} seeds; the 95% t-interval uses t = 12.7 at n = 2 "
                        "and is very wide: use 3 or more")
    return Study(path, base_path, base, shared, list(seeds), reference, study_set, arms, warnings,
                 [tuple(c) for c in contrasts])


def select(study: Study, arms: list[str] | None, seeds: list[int] | None) -> tuple[list[Arm], list[int]]:
    """The arms and seeds of ``--arms`` / ``--seeds`` (default: all), in the study file's order."""
    names = [a.name for a in study.arms]
    for name in arms or []:
        if name not in names:
            raise StudyError(f"--arms: no arm named {name!r} in {study.path} (arms: {', '.join(names)})")
    for seed in seeds or []:
        if seed not in study.seeds:
            raise StudyError(f"--seeds: {seed} is not one of the study's seeds {study.seeds}")
    return ([a for a in study.arms if arms is None or a.name in arms],
            [s for s in study.seeds if seeds is None or s in seeds])


# --- statistics ---------------------------------------------------------------------------------


def describe(values: list[float]) -> dict:
    """n, mean and sample standard deviation (None where undefined)."""
    n = len(values)
    return {"n": n, "mean": float(np.mean(values)) if n else None,
            "sd": float(np.std(values, ddof=1)) if n >= 2 else None}


def paired_ci(values: dict[int, float], reference: dict[int, float], confidence: float = 0.95) -> dict:
    """Mean paired difference ``values[s] - reference[s]`` over the seeds both have, with a t-interval.

    ``mean ± t_{(1 + confidence) / 2, n - 1} * sd / sqrt(n)``; with fewer than two pairs there is no interval.
    """
    seeds = sorted(set(values) & set(reference))
    d = np.array([values[s] - reference[s] for s in seeds], dtype=np.float64)
    n = len(d)
    result = {"seeds": seeds, "n": n, "mean": float(d.mean()) if n else None, "sd": None,
              "half_width": None, "low": None, "high": None, "confidence": confidence}
    if n >= 2:
        from scipy.stats import t

        sd = float(d.std(ddof=1))
        half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
        result.update(sd=sd, half_width=half, low=result["mean"] - half, high=result["mean"] + half)
    return result


# --- running ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _logged(log: Path):
    """Send this process's prints (stdout and stderr, tracebacks included) to ``log``, appended."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        print(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
        try:
            yield
        except BaseException:
            traceback.print_exc()
            raise


# What a stale output means inside a study. Not run_stage's advice (the stage's command with --force): that
# command lacks the arm's sets, and --force on a shared stage would redo finished work of the other arms.
STALE_IN_STUDY = "was made from other inputs or settings than the study now asks for"


def _refuse_stale(stage: Stage) -> None:
    if stage_status(stage)[0] == "stale":
        raise StudyError(f"{stage.name}: {stage.out} {STALE_IN_STUDY} (did the base config or an arm's set "
                         "change?); move it away to redo it, or give the arm a new name")


def _run(stage: Stage, *, rebuild_stale: bool = False) -> bool:
    """run_stage, with the study's answer to a stale output: rebuild it (evaluations) or refuse (the rest)."""
    if rebuild_stale and stage_status(stage)[0] == "stale":
        return run_stage(stage, force=True)
    _refuse_stale(stage)
    return run_stage(stage)


def _symlink(link: Path, target: Path) -> None:
    relative = os.path.relpath(target, link.parent)
    if link.is_symlink():
        if os.readlink(link) == relative:
            return
        link.unlink()
    elif link.exists():
        raise StudyError(f"{link} exists and is not a symlink to {target}; move it away so that the study can link it")
    link.symlink_to(relative, target_is_directory=target.is_dir())


def link_arm(study: Study, arm: Arm) -> None:
    """The arm's run dir, its shared inputs linked to the base run's."""
    arm.run_path.mkdir(parents=True, exist_ok=True)
    for name in SHARED_LINKS:
        _symlink(arm.run_path / name, study.base.run_path / name)


def link_teacher(study: Study, name: str) -> Path:
    """``study/teachers/NAME/``: the teacher's files (not its evaluation), where its study evaluation goes."""
    source, view = study.base.teacher_path(name), study.teacher_view(name)
    view.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.is_file() and not file.name.startswith("eval.json"):
            _symlink(view / file.name, file)
    return view


@dataclass
class Unit:
    """One model to train (unless it is a teacher) and evaluate."""
    label: str
    arm: Arm | None
    """None for a teacher."""
    seed: int | None
    model_dir: Path
    config: Config
    log: Path

    def student(self) -> Stage:
        return student_stage(self.config, self.seed, self.arm.student_name(self.seed), resume="auto",
                             online=self.arm.online)

    def evaluation(self) -> Stage:
        return evaluate_stage(self.config, self.model_dir)


def teacher_units(study: Study) -> list[Unit]:
    return [Unit(f"teacher {name}", None, None, study.teacher_view(name), study.shared,
                 study.root / "logs" / f"eval-{name}.log") for name in default_teacher_names(study.base)]


def arm_units(arm: Arm, seeds: list[int]) -> list[Unit]:
    return [Unit(f"{arm.name} seed {seed}", arm, seed, arm.student_path(seed), arm.config,
                 arm.run_path / "logs" / f"{arm.student_name(seed)}.log") for seed in seeds]


def unit_done(unit: Unit) -> bool:
    return ((unit.arm is None or stage_status(unit.student())[0] == "done")
            and stage_status(unit.evaluation())[0] == "done")


def unit_commands(study: Study, unit: Unit, num_threads: int) -> list[list[str]]:
    """The `babydistill` argv (without the program) that train and evaluate ``unit`` in a subprocess."""
    sets = [arg for item in [*study.overrides(unit.arm), f"train.num_threads={num_threads}"] for arg in ("--set", item)]
    commands = []
    if unit.arm is not None:
        commands.append(["distill", str(study.base_path), *sets, "--seed", str(unit.seed),
                         "--name", unit.arm.student_name(unit.seed), "--resume", "auto",
                         *(["--online"] if unit.arm.online else [])])
    commands.append(["evaluate", str(study.base_path), *sets, "--model", str(unit.model_dir)])
    return commands


def _run_in_process(unit: Unit) -> None:
    try:
        with _logged(unit.log):
            if unit.arm is not None:
                _run(unit.student())
            _run(unit.evaluation(), rebuild_stale=True)
    except ValueError as exc:
        raise StudyError(f"{unit.label}: {' '.join(str(exc).split())} (log: {unit.log})") from None


def _run_subprocess(study: Study, unit: Unit, num_threads: int) -> None:
    if unit.arm is not None:
        _refuse_stale(unit.student())
    commands = unit_commands(study, unit, num_threads)
    if stage_status(unit.evaluation())[0] == "stale":
        commands[-1].append("--force")  # an evaluation is cheap to redo and derived from the model alone
    unit.log.parent.mkdir(parents=True, exist_ok=True)
    with unit.log.open("a", encoding="utf-8") as log:
        for argv in commands:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} $ {shlex.join(['babydistill', *argv])}\n")
            log.flush()
            code = subprocess.run([sys.executable, "-m", "babydistill.workflows", *argv], stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
            if code != 0:
                raise StudyError(f"{unit.label}: `babydistill {argv[0]}` failed with exit status {code}; "
                                 f"see {unit.log}")


def _unit_line(unit: Unit, seconds: float | None) -> str:
    e = json.loads((unit.model_dir / "eval.json").read_text(encoding="utf-8"))
    took = "up to date" if seconds is None else f"{seconds:.0f} s"
    return (f"{unit.label}: test CE {e['loss']['test']['ce']:.4f}, val CE {e['loss']['validation']['ce']:.4f}, "
            f"BLiMP {100 * e['blimp']['overall']:.1f}% ({took})")


def _capture(arm: Arm, bar) -> None:
    from babydistill.stores.logits import store_info

    stage = cache_stage(arm.config)
    log = arm.run_path / "logs" / "cache.log"
    started = time.time()
    try:
        with _logged(log):
            ran = _run(stage)
    except ValueError as exc:
        raise StudyError(f"{arm.name} cache: {' '.join(str(exc).split())} (log: {log})") from None
    took = f"{time.time() - started:.0f} s" if ran else "up to date"
    bar.write(f"{arm.name} cache: {store_info(stage.out)['bytes_per_token']:.1f} bytes/token ({took})")
    if ran:
        bar.update(1)


def _available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_study(study: Study, arms: list[Arm], seeds: list[int], *, jobs: int = 1) -> None:
    """Shared stages, teacher evaluations, then arm by arm: the store (offline) and one student per seed.

    ``jobs`` > 1 captures the stores first, then trains and evaluates up to ``jobs`` models at once,
    each in a `babydistill` subprocess with ``train.num_threads = cores // jobs``.
    """
    from tqdm import tqdm

    if jobs < 1:
        raise StudyError(f"--jobs: must be >= 1, got {jobs}")
    for warning in study.warnings:
        print(f"babydistill: warning: {warning}", file=sys.stderr)

    # --- shared stages, in the base run (skipped when done)
    shared_log = study.root / "logs" / "shared.log"
    thunks = [lambda: prepare_stage(study.base), lambda: tokenizer_stage(study.base),
              lambda: tokenize_stage(study.base)]
    thunks += [lambda seed=seed: teacher_stage(study.base, seed, resume="auto")
               for seed in study.base.teachers.resolved_seeds()]
    for thunk in thunks:
        stage = thunk()
        if stage_status(stage)[0] == "done":
            continue
        print(f"shared stage {stage.name}: running (log: {shared_log})", flush=True)
        try:
            with _logged(shared_log):
                _run(stage)
        except ValueError as exc:
            raise StudyError(f"{' '.join(str(exc).split())} (log: {shared_log})") from None
    for name in default_teacher_names(study.base):
        link_teacher(study, name)
    for arm in arms:
        link_arm(study, arm)

    # --- the units
    offline = [a for a in arms if not a.online]
    teachers = teacher_units(study)
    per_arm = {a.name: arm_units(a, seeds) for a in arms}
    units = teachers + [u for a in arms for u in per_arm[a.name]]
    # the bar counts finished work as done from the start, so that its rate and ETA are those of the work left
    num_done = sum(stage_status(cache_stage(a.config))[0] == "done" for a in offline) + sum(map(unit_done, units))
    bar = tqdm(total=len(offline) + len(units), initial=num_done, unit="unit", desc="study", smoothing=0,
               dynamic_ncols=True)
    try:
        if jobs == 1:
            for unit in teachers:
                _finish_in_process(unit, bar)
            for arm in arms:  # arm by arm, so that a partial study has complete arms
                if not arm.online:
                    _capture(arm, bar)
                for unit in per_arm[arm.name]:
                    _finish_in_process(unit, bar)
        else:
            for arm in offline:  # the students need their stores
                _capture(arm, bar)
            num_threads = max(1, _available_cores() // jobs)
            _run_pool(study, units, jobs, num_threads, bar)
    finally:
        bar.close()


def _finish_in_process(unit: Unit, bar) -> None:
    if unit_done(unit):
        bar.write(_unit_line(unit, None))
        return
    started = time.time()
    _run_in_process(unit)
    bar.write(_unit_line(unit, time.time() - started))
    bar.update(1)


def _run_pool(study: Study, units: list[Unit], jobs: int, num_threads: int, bar) -> None:
    todo = []
    for unit in units:
        if unit_done(unit):
            bar.write(_unit_line(unit, None))
        else:
            todo.append(unit)
    failures = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        started = time.time()
        futures = {pool.submit(_timed, _run_subprocess, study, unit, num_threads): unit for unit in todo}
        for future in as_completed(futures):
            if future.cancelled():
                continue
            try:
                seconds = future.result()
            except StudyError as exc:
                failures.append(str(exc))
                for other in futures:
                    other.cancel()  # the ones not started; the running ones finish
                continue
            bar.write(_unit_line(futures[future], seconds))
            bar.update(1)
    if failures:
        more = f" ({len(failures) - 1} more failed; see their logs)" if len(failures) > 1 else ""
        raise StudyError(failures[0] + more + f"; stopped after {time.time() - started:.0f} s")


def _timed(fn, *args) -> float:
    started = time.time()
    fn(*args)
    return time.time() - started


# --- results ------------------------------------------------------------------------------------


def _read_eval(path: Path) -> dict:
    e = json.loads(path.read_text(encoding="utf-8"))
    return {"val_ce": e["loss"]["validation"]["ce"], "test_ce": e["loss"]["test"]["ce"],
            "blimp": e["blimp"]["overall"], "eval_json": str(path),
            "eval_settings": {"validation_windows": e["loss"]["validation"]["num_windows"],
                              "test_windows": e["loss"]["test"]["num_windows"], "blimp_pairs": e["blimp"]["num_pairs"],
                              "max_pairs_per_paradigm": e["blimp"].get("max_pairs_per_paradigm")}}


def _model_cell(unit: Unit) -> dict:
    """A finished model's numbers, or why there are none (never a number from a stale or missing stage)."""
    cell = {"model": str(unit.model_dir), "val_ce": None, "test_ce": None, "blimp": None}
    if unit.arm is not None:
        state, why = stage_status(unit.student())
        if state == "stale":
            why = f"it {STALE_IN_STUDY}; move it away to redo it"
        if state != "done":
            return {**cell, "status": f"student {state}: {why}"}
    evaluation = unit.evaluation()
    state, why = stage_status(evaluation)
    if state != "done":
        return {**cell, "status": f"evaluation {state}: {why}"}
    return {**cell, "status": "done", **_read_eval(evaluation.out)}


def step_seconds(model_dir: Path) -> float | None:
    """Median seconds per optimizer step over the logged windows of ``metrics.jsonl``.

    Uses a ``dt`` field when the training loop logs one; otherwise global batch x seq_len / tokens_per_second
    (what the loop logs today, averaged over each ``log_every`` window).
    """
    path = model_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = [r for r in records if r.get("kind") == "train"]
    if not records:
        return None
    if all("dt" in r for r in records):
        return float(np.median([r["dt"] for r in records]))
    summary = json.loads((model_dir / "train_summary.json").read_text(encoding="utf-8"))
    run_config = json.loads((model_dir / "run_config.json").read_text(encoding="utf-8"))
    tokens_per_step = summary["global_batch"] * run_config["data"]["seq_len"]
    return float(np.median([tokens_per_step / r["tokens_per_second"] for r in records if r["tokens_per_second"] > 0]))


def cache_label(arm: Arm) -> str:
    if arm.online:
        return "online (teachers every step)"
    cache = arm.config.cache
    parts = [cache.mode]
    if cache.mode in ("topk", "hybrid"):
        parts.append(f"k={cache.k}")
    if cache.mode in ("sample", "hybrid"):
        parts.append(f"S={cache.samples}" + (f" x {cache.draw_sets} sets" if cache.draw_sets > 1 else ""))
    if cache.tail_logp:
        parts.append("tail_logp")
    parts.append(f"{cache.order} order")
    return " ".join(parts)


def _store(arm: Arm) -> dict | None:
    from babydistill.stores.logits import store_info

    if arm.online:
        return None
    stage = cache_stage(arm.config)
    state, why = stage_status(stage)
    empty = {"path": str(stage.out), "bytes_per_token": None, "disk_bytes": None, "num_tokens": None,
             "capture_seconds": None}
    if state != "done":
        return {**empty, "status": f"cache {state}: {why}"}
    info = store_info(stage.out)
    return {**empty, "status": "done", "bytes_per_token": info["bytes_per_token"], "disk_bytes": info["disk_bytes"],
            "num_tokens": info["num_tokens"], "capture_seconds": (read_marker(stage.marker) or {}).get("seconds"),
            "fingerprint": stage.fingerprint}


def collect_results(study: Study) -> dict:
    """Every per-seed number of every arm and teacher that is finished; reads, never writes."""
    teachers = []
    for unit in teacher_units(study):
        teachers.append({"name": unit.label.split()[-1], **_model_cell(unit)})
    done_teachers = [t for t in teachers if t["status"] == "done"]
    best = min(done_teachers, key=lambda t: t["test_ce"]) if done_teachers else None

    arms = []
    for arm in study.arms:
        per_seed = {}
        for unit in arm_units(arm, study.seeds):
            cell = _model_cell(unit)
            cell["step_seconds"] = step_seconds(unit.model_dir) if cell["status"] == "done" else None
            per_seed[unit.seed] = cell
        finished = {s: c for s, c in per_seed.items() if c["status"] == "done"}
        cache = arm.config.cache
        arms.append({
            "name": arm.name, "online": arm.online, "set": arm.set, "run_dir": str(arm.run_path),
            "cache": None if arm.online else {"mode": cache.mode, "k": cache.k, "samples": cache.samples,
                                              "tail_logp": cache.tail_logp, "draw_sets": cache.draw_sets,
                                              "order": cache.order},
            "cache_label": cache_label(arm),
            "config": arm.config.to_dict(),
            "per_seed": per_seed, "seeds_finished": sorted(finished),
            **{m: describe([finished[s][m] for s in sorted(finished)]) for m in ("val_ce", "test_ce", "blimp")},
            "step_seconds": (float(np.median([x["step_seconds"] for x in finished.values()]))
                             if finished and all(x["step_seconds"] is not None for x in finished.values()) else None),
            "store": _store(arm),
            "vs_best_teacher": (paired_ci({s: x["test_ce"] for s, x in finished.items()},
                                          {s: best["test_ce"] for s in finished}) if best else None),
        })
    reference = next(a for a in arms if a["name"] == study.reference)
    for a in arms:
        a["vs_reference"] = {m: paired_ci({s: c[m] for s, c in a["per_seed"].items() if c["status"] == "done"},
                                          {s: c[m] for s, c in reference["per_seed"].items() if c["status"] == "done"})
                             for m in ("test_ce", "val_ce", "blimp")}
    by_name = {a["name"]: a for a in arms}

    def done(arm: dict, metric: str) -> dict[int, float]:
        return {s: c[metric] for s, c in arm["per_seed"].items() if c["status"] == "done"}

    contrasts = [{"arm": a, "minus": b, **{m: paired_ci(done(by_name[a], m), done(by_name[b], m))
                                           for m in ("test_ce", "val_ce")}} for a, b in study.contrasts]
    for a in arms:
        a["per_seed"] = {str(s): c for s, c in a["per_seed"].items()}  # JSON keys
    return {"study": str(study.path), "base_config": str(study.base_path), "base_run_dir": str(study.base.run_path),
            "seeds": study.seeds, "reference": study.reference, "set": study.set,
            "eval_config": study.shared.to_dict()["eval"],
            "generated": datetime.now(UTC).isoformat(timespec="seconds"),
            "teachers": teachers, "best_teacher": best["name"] if best else None, "arms": arms,
            "contrasts": contrasts}


# --- report -------------------------------------------------------------------------------------


def _mean_sd(summary: dict, scale: float = 1.0, digits: int = 3) -> str:
    if not summary["n"]:
        return "-"
    text = f"{scale * summary['mean']:.{digits}f}"
    return text + (f" ± {scale * summary['sd']:.{digits}f}" if summary["sd"] is not None else " (n=1)")


def _interval(ci: dict, scale: float = 1.0, digits: int = 3) -> str:
    if not ci["n"]:
        return "-"
    text = f"{scale * ci['mean']:+.{digits}f}"
    if ci["half_width"] is None:
        return text + f" (n={ci['n']}, no interval)"
    return text + f" [{scale * ci['low']:+.{digits}f}, {scale * ci['high']:+.{digits}f}]"


def _number(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _label_points(ax, points: list[tuple[str, float, float]], gap_pt: float = 9.0) -> None:
    """Name each point beside it; labels of points close together are pushed apart vertically (at least
    ``gap_pt`` points), each joined to its point by a thin line, so that clustered arms stay legible."""
    ax.figure.canvas.draw()  # fixes the axes' scales, so data map to display points
    to_points = 72.0 / ax.figure.dpi
    placed: list[tuple[float, float]] = []  # (display x, label display y) in points
    for name, x, y in sorted(points, key=lambda p: p[2]):
        px, py = (v * to_points for v in ax.transData.transform((x, y)))
        label_y = py
        for other_x, other_y in placed:
            if abs(other_x - px) < 120 and label_y - other_y < gap_pt:
                label_y = other_y + gap_pt
        placed.append((px, label_y))
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, label_y - py), fontsize=7, va="center",
                    arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.5} if label_y != py else None)


def _plot(results: dict, path: Path) -> bool:
    """Test CE against store bytes per token: one panel per ``distill.normalization`` among the arms (an arm
    is compared with the online arms of its own normalisation), arms named beside their points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def normalization(arm: dict) -> str:
        return arm["config"]["distill"]["normalization"]

    offline = [a for a in results["arms"] if not a["online"] and a["test_ce"]["n"]
               and a["store"]["bytes_per_token"] is not None]
    online = [a for a in results["arms"] if a["online"] and a["test_ce"]["n"]]
    best = next((t for t in results["teachers"] if t["name"] == results["best_teacher"]), None)
    if not offline and not online:
        return False
    panels = sorted({normalization(a) for a in offline + online})
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.2), sharey=True, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        arms = [a for a in offline if normalization(a) == panel]
        for a in arms:
            x, y = a["store"]["bytes_per_token"], a["test_ce"]["mean"]
            ax.errorbar([x], [y], yerr=[a["test_ce"]["sd"] or 0.0], fmt="o", capsize=3, color="tab:blue")
        xs = [a["store"]["bytes_per_token"] for a in arms]
        if xs and max(xs) / max(min(xs), 1e-9) > 10:
            ax.set_xscale("log")
        _label_points(ax, [(a["name"], a["store"]["bytes_per_token"], a["test_ce"]["mean"]) for a in arms])
        # one colour per online arm, so that a panel with several (recipe variants) tells them apart
        for a, color in zip((a for a in online if normalization(a) == panel),
                            itertools.cycle(("tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"))):
            mean, sd = a["test_ce"]["mean"], a["test_ce"]["sd"]
            ax.axhline(mean, color=color, linewidth=1.5, label=f"{a['name']} (online, no store): mean ± std")
            if sd:
                ax.axhspan(mean - sd, mean + sd, color=color, alpha=0.12)
        if best is not None:
            ax.axhline(best["test_ce"], color="tab:gray", linestyle="--", label=f"best teacher {best['name']}")
        ax.set(title=f"distill.normalization: {panel}", xlabel="store bytes per token on disk")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    axes[0][0].set_ylabel("test CE (nats), mean ± std over seeds")
    fig.suptitle("test CE against store size (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _comparison_sections(results: dict) -> list[str]:
    """The report's "students vs the best teacher" and "contrasts" sections."""
    lines: list[str] = []
    best = next((t for t in results["teachers"] if t["name"] == results["best_teacher"]), None)
    if best is not None:
        lines += ["## Students vs the best teacher", "",
                  f"Best teacher by test CE: **{best['name']}**, {best['test_ce']:.3f}. Per arm, mean test CE minus "
                  "the best teacher's, with a 95% t-interval over seeds (the teacher taken as fixed; negative: the "
                  "students beat it):", ""]
        lines += [f"- {a['name']}: {_interval(a['vs_best_teacher'])}" for a in results["arms"]]
        lines.append("")
    else:
        lines += ["No teacher is evaluated yet, so there is no student vs teacher comparison.", ""]

    if results.get("contrasts"):
        lines += ["## Contrasts", "", "Paired by seed, each isolating one factor (negative: the first arm is better):",
                  "", "| arm | minus | Δ val CE (95% CI) | Δ test CE (95% CI) | seeds |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {c['arm']} | {c['minus']} | {_interval(c['val_ce'])} | {_interval(c['test_ce'])} | "
                  f"{c['test_ce']['n']} |" for c in results["contrasts"]]
        lines.append("")
    return lines


def write_study_report(results: dict, out_dir: Path, *, command: str) -> Path:
    """``out_dir``/report.md, results.json and test_ce_vs_bytes.png; returns the report's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {**results, "command": command, "reproduce": f"babydistill study {results['study']}"}
    seeds, ref = results["seeds"], results["reference"]
    num_cells = len(results["arms"]) * len(seeds)
    missing = [(a["name"], s, a["per_seed"][str(s)]["status"]) for a in results["arms"] for s in seeds
               if a["per_seed"][str(s)]["status"] != "done"]
    e = results["eval_config"]

    lines = [f"# Offline vs online: controlled study ({Path(results['study']).name})", "",
             f"Generated {results['generated']}. Base config `{results['base_config']}`, shared stages in "
             f"`{results['base_run_dir']}`; seeds {', '.join(map(str, seeds))} (the same for every arm, differences "
             f"paired by seed); reference arm **{ref}**.", "",
             f"Reproduce: `{results['reproduce']}` (finished work is skipped). This report: `{command}`.", ""]
    if missing:
        lines += [f"**Incomplete: {len(missing)} of {num_cells} arm x seed cells are not finished** (shown as `-`; "
                  "statistics use the finished seeds only, paired differences the seeds finished in both arms).", ""]

    header = ["arm", "cache", "seeds", "val CE", "test CE", f"Δ test CE vs {ref} (95% CI)",
              f"Δ val CE vs {ref} (95% CI)", "BLiMP %", "bytes/token", "capture s", "step s"]
    lines += ["## Arms", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for a in results["arms"]:
        n = len(a["seeds_finished"])
        count = f"{n}/{len(seeds)}" + (" (incomplete)" if n < len(seeds) else "")
        is_ref = a["name"] == ref
        store = a["store"] or {}
        lines.append("| " + " | ".join([
            a["name"], a["cache_label"], count, _mean_sd(a["val_ce"]), _mean_sd(a["test_ce"]),
            "reference" if is_ref else _interval(a["vs_reference"]["test_ce"]),
            "reference" if is_ref else _interval(a["vs_reference"]["val_ce"]),
            _mean_sd(a["blimp"], 100, 1), _number(store.get("bytes_per_token"), ".1f"),
            _number(store.get("capture_seconds"), ".0f"), _number(a["step_seconds"], ".3f")]) + " |")
    for t in results["teachers"]:
        done = t["status"] == "done"
        lines.append("| " + " | ".join([
            t["name"], "teacher", "1" if done else "0 (not evaluated)", _number(t["val_ce"], ".3f"),
            _number(t["test_ce"], ".3f"), "-", "-", _number(t["blimp"] and 100 * t["blimp"], ".1f"),
            "-", "-", "-"]) + " |")
    lines += ["", "CE in nats (lower is better), mean ± sample std over the finished seeds. Δ: mean over seeds of "
              f"(arm - {ref}) on the same seed, with the 95% t-interval mean ± t(0.975, n-1) · sd / √n. "
              "bytes/token: the store's bytes on disk over its tokens. capture s: wall time of the cache stage "
              "(its stage marker; a resumed capture counts its last run only). step s: seconds per optimizer "
              "step, the median over logged windows (global batch x seq_len / tokens per second), median over seeds. "
              f"Evaluation, the same for every row: validation/test windows: {e['max_windows'] or 'all'}; "
              f"BLiMP pairs per paradigm: {e['max_pairs_per_paradigm'] or 'all'}.", ""]

    lines += _comparison_sections(results)
    lines += ["## Test CE per seed", "", "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|" + " --- |" * (len(seeds) + 1)]
    for a in results["arms"]:
        lines.append(f"| {a['name']} | " + " | ".join(_number(a["per_seed"][str(s)]["test_ce"], ".4f")
                                                      for s in seeds) + " |")
    lines.append("")
    if missing:
        lines += ["## Missing cells", ""] + [f"- {arm} seed {seed}: {status}" for arm, seed, status in missing]
        lines.append("")

    if _plot(results, out_dir / "test_ce_vs_bytes.png"):
        lines += ["## Test CE against store size", "", "![test CE vs bytes per token](test_ce_vs_bytes.png)", "",
                  "Offline arms: mean ± std over seeds at their store's bytes per token; the online arm (no store) "
                  "is the solid line with its ± std band, the best teacher the dashed line.", ""]
    lines.append("Every per-seed number is in `results.json`.")

    _write(out_dir / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    path = out_dir / "report.md"
    _write(path, "\n".join(lines) + "\n")
    return path


def study_command(path: str, arms: str | None, seeds: str | None, jobs: int, report_only: bool,
                  out: str | None) -> str:
    argv = ["babydistill", "study", str(path)]
    argv += ["--arms", arms] if arms else []
    argv += ["--seeds", seeds] if seeds else []
    argv += ["--jobs", str(jobs)] if jobs != 1 else []
    argv += ["--report-only"] if report_only else []
    argv += ["--out", out] if out else []
    return shlex.join(argv)
