"""`babydistill study` running: the shared stages, the symlinked arm runs, the stores, then the models, in this
process or in a pool of `babydistill` subprocesses (``--jobs``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from babydistill.pipeline.config import model_name
from babydistill.workflows.experiments.study_carry import Carried, carried_cell, carry_mismatches
from babydistill.workflows.experiments.study_protocol import cell_name, record_cell
from babydistill.workflows.experiments.study_spec import SHARED_LINKS, Arm, Study, StudyError
from babydistill.workflows.experiments.study_units import (
    Unit,
    arm_units,
    ensemble_name,
    ensemble_stage,
    refuse_stale,
    run_in_study,
    teacher_units,
    unit_commands,
    unit_done,
)
from babydistill.workflows.runner import (
    capture_stage,
    prepare_stage,
    teacher_stage,
    tokenize_stage,
    tokenizer_stage,
)
from babydistill.workflows.stage import stage_status


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


def _symlink(link: Path, target: Path) -> None:
    relative = os.path.relpath(target, link.parent)
    if link.is_symlink():
        if os.readlink(link) == relative:
            return
        link.unlink()
    elif link.exists():
        raise StudyError(f"{link} exists and is not a symlink to {target}; move it away so that the study can link it")
    link.symlink_to(relative, target_is_directory=target.is_dir())


def link_arm(study: Study, arm: Arm, seeds: list[int]) -> None:
    """The arm's run dir (and under per_seed captures each seed's), its shared inputs linked to the base run's."""
    runs = {arm.run_path, *(arm.seed_config(s).run_path for s in seeds if s in arm.seeds)}
    for run in sorted(runs):
        run.mkdir(parents=True, exist_ok=True)
        for name in SHARED_LINKS:
            _symlink(run / name, study.base.run_path / name)


def link_teacher(study: Study, name: str) -> Path:
    """``study/teachers/NAME/``: the teacher's files (not its evaluation), where its study evaluation goes."""
    source, view = study.base.teacher_path(name), study.teacher_view(name)
    view.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.is_file() and not file.name.startswith("eval.json"):
            _symlink(view / file.name, file)
    return view


def _run_in_process(unit: Unit) -> None:
    try:
        with _logged(unit.log):
            if unit.arm is not None:
                run_in_study(unit.student())
            run_in_study(unit.evaluation(), rebuild_stale=True)
    except ValueError as exc:
        raise StudyError(f"{unit.label}: {' '.join(str(exc).split())} (log: {unit.log})") from None


def _run_subprocess(study: Study, unit: Unit, num_threads: int) -> None:
    if unit.arm is not None:
        refuse_stale(unit.student())
    commands = unit_commands(study, unit, num_threads)
    if stage_status(unit.evaluation())[0] == "stale":
        commands[-1].append("--force")  # an evaluation is cheap to redo and derived from the model alone
    for argv in commands:
        _subprocess(argv, unit.log, unit.label)


def _unit_line(unit: Unit, seconds: float | None) -> str:
    e = json.loads((unit.model_dir / "eval.json").read_text(encoding="utf-8"))
    took = "up to date" if seconds is None else f"{seconds:.0f} s"
    return (f"{unit.label}: test CE {e['loss']['test']['ce']:.4f}, val CE {e['loss']['validation']['ce']:.4f}, "
            f"BLiMP {100 * e['blimp']['overall']:.1f}% ({took})")


def _capture_log(arm: Arm, config) -> Path:
    return arm.run_path / "logs" / (f"cacheseed{config.cache.seed}.log" if arm.capture == "per_seed" else "cache.log")


def _capture_label(arm: Arm, config) -> str:
    return f"{arm.name} seed{config.cache.seed}" if arm.capture == "per_seed" else arm.name


def _capture_line(arm: Arm, config, seconds: float | None) -> str:
    from babydistill.stores.logits import store_info

    took = "up to date" if seconds is None else f"{seconds:.0f} s"
    return (f"{_capture_label(arm, config)} cache: "
            f"{store_info(capture_stage(config).out)['bytes_per_token']:.1f} bytes/token ({took})")


def _capture(arm: Arm, config, bar) -> None:
    stage, log = capture_stage(config), _capture_log(arm, config)
    started = time.time()
    try:
        with _logged(log):
            ran = run_in_study(stage)
    except ValueError as exc:
        raise StudyError(f"{_capture_label(arm, config)} cache: {' '.join(str(exc).split())} (log: {log})") from None
    bar.write(_capture_line(arm, config, time.time() - started if ran else None))
    if ran:
        bar.update(1)


def _capture_subprocess(study: Study, arm: Arm, config, num_threads: int) -> None:
    """`babydistill capture` with the arm's settings (and seed), in a subprocess limited to ``num_threads``
    threads: captures side by side must not each spin up every core's worth of threads."""
    refuse_stale(capture_stage(config))
    seed = config.cache.seed if arm.capture == "per_seed" else None
    argv = ["capture", str(study.base_path), *(a for item in study.overrides(arm, seed) for a in ("--set", item))]
    _subprocess(argv, _capture_log(arm, config), f"{_capture_label(arm, config)} cache",
                {"OMP_NUM_THREADS": str(num_threads)})


def _subprocess(argv: list[str], log: Path, label: str, env: dict | None = None) -> None:
    """``babydistill ARGV`` with its output appended to ``log``; a failure raises StudyError naming the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as out:
        out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} $ {shlex.join(['babydistill', *argv])}\n")
        out.flush()
        code = subprocess.run([sys.executable, "-m", "babydistill.workflows", *argv], stdout=out,
                              stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}).returncode
    if code != 0:
        raise StudyError(f"{label}: `babydistill {argv[0]}` failed with exit status {code}; see {log}")


def _available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _shared_stages(study: Study, arms: list[Arm]) -> None:
    """The base run's data, tokenizer, tokens, its teachers and every teacher one of ``arms`` names (skipped when
    done): `--arms A-...` trains no teacher that only other arms need."""
    shared_log = study.root / "logs" / "shared.log"
    thunks = [lambda: prepare_stage(study.base), lambda: tokenizer_stage(study.base),
              lambda: tokenize_stage(study.base)]
    thunks += [lambda seed=seed: teacher_stage(study.base, seed, resume="auto") for seed in study.teacher_seeds_of(arms)]
    for thunk in thunks:
        stage = thunk()
        if stage_status(stage)[0] == "done":
            continue
        print(f"shared stage {stage.name}: running (log: {shared_log})", flush=True)
        try:
            with _logged(shared_log):
                run_in_study(stage)
        except ValueError as exc:
            raise StudyError(f"{' '.join(str(exc).split())} (log: {shared_log})") from None


def _ensembles(study: Study, arms: list[Arm], bar) -> None:
    """The ensemble of each teacher pair ``arms`` distil from, evaluated (validation and test CE), in this process."""
    for names in study.teacher_pairs_of(arms):
        stage = ensemble_stage(study, names)
        if stage_status(stage)[0] != "done":
            log = study.root / "logs" / f"eval-{ensemble_name(names)}.log"
            try:
                with _logged(log):
                    run_in_study(stage, rebuild_stale=True)
            except ValueError as exc:
                raise StudyError(f"{stage.name}: {' '.join(str(exc).split())} (log: {log})") from None
            bar.update(1)
        loss = json.loads(stage.out.read_text(encoding="utf-8"))["loss"]
        record_cell(study, ensemble_name(names), stage)
        bar.write(f"ensemble {', '.join(names)}: test CE {loss['test']['ce']:.4f}, val CE {loss['validation']['ce']:.4f}")


def run_study(study: Study, arms: list[Arm], seeds: list[int], *, jobs: int = 1, carried: Carried | None = None) -> None:
    """Shared stages, teacher and ensemble evaluations, then arm by arm: the store(s) (offline) and one student
    per seed. A cell in ``carried`` (study_carry: ``--carry``) made from the same settings is neither trained nor
    captured for.

    ``jobs`` > 1 captures the stores first, then trains and evaluates up to ``jobs`` models at once, seed by seed
    across the arms (``seed_major``), each in a `babydistill` subprocess with ``train.num_threads = cores // jobs``.
    """
    from tqdm import tqdm

    if jobs < 1:
        raise StudyError(f"--jobs: must be >= 1, got {jobs}")
    if study.protocol is not None and not study.protocol.is_file():
        raise StudyError(f"protocol: {study.protocol} not found: a study's results are recorded under its protocol, "
                         "which must exist before the first run")
    for warning in study.warnings:
        print(f"babydistill: warning: {warning}", file=sys.stderr)
    _shared_stages(study, arms)
    for name in (model_name("teacher", s) for s in study.teacher_seeds_of(arms)):
        link_teacher(study, name)
    for arm in arms:
        link_arm(study, arm, seeds)

    teachers = teacher_units(study, arms)
    per_arm = _not_carried(study, {a.name: arm_units(a, seeds) for a in arms}, carried or {})
    stores = [(a, c) for a in arms for c in a.store_configs()
              if any(a.capture != "per_seed" or u.seed == c.cache.seed for u in per_arm[a.name])]
    units = teachers + [u for a in arms for u in per_arm[a.name]]
    ensembles = [ensemble_stage(study, names) for names in study.teacher_pairs_of(arms)]
    # the bar counts finished work as done from the start, so that its rate and ETA are those of the work left
    num_done = (sum(stage_status(capture_stage(c))[0] == "done" for _, c in stores) + sum(map(unit_done, units))
                + sum(stage_status(e)[0] == "done" for e in ensembles))
    bar = tqdm(total=len(stores) + len(units) + len(ensembles), initial=num_done, unit="unit", desc="study",
               smoothing=0, dynamic_ncols=True)
    try:
        if jobs == 1:
            for unit in teachers:
                _finish_in_process(study, unit, bar)
            _ensembles(study, arms, bar)
            for arm in arms:  # arm by arm, so that a partial study has complete arms
                for a, config in stores:
                    if a is arm:
                        _capture(arm, config, bar)
                for unit in per_arm[arm.name]:
                    _finish_in_process(study, unit, bar)
        else:
            num_threads = max(1, _available_cores() // jobs)
            _capture_pool(study, stores, jobs, num_threads, bar)  # the students need their stores
            _ensembles(study, arms, bar)
            _run_pool(study, teachers + seed_major(per_arm), jobs, num_threads, bar)
    finally:
        bar.close()


def _not_carried(study: Study, per_arm: dict[str, list[Unit]], carried: Carried) -> dict[str, list[Unit]]:
    """``per_arm`` without the units a carried cell stands for (each said on the console, as is a carried cell
    that cannot be used)."""
    for line in carry_mismatches(carried, [u for units in per_arm.values() for u in units]):
        print(f"babydistill: warning: {line}", file=sys.stderr)
    kept = {}
    for name, units in per_arm.items():
        kept[name] = []
        for unit in units:
            cell = carried_cell(carried, unit)
            if cell is None:
                kept[name].append(unit)
            else:
                print(f"{unit.label}: carried from {cell['carried_from']} (val CE {cell['val_ce']:.4f})", flush=True)
    return kept


def seed_major(per_arm: dict[str, list[Unit]]) -> list[Unit]:
    """The arms' units seed by seed (seed 1 of every arm, then seed 2, ...): a pool that stops early leaves
    complete pairs, which the paired comparisons need, rather than complete arms with no partner."""
    units = [u for arm_units_ in per_arm.values() for u in arm_units_]
    seeds = list(dict.fromkeys(sorted(u.seed for u in units)))
    return sorted(units, key=lambda u: seeds.index(u.seed))  # stable: the file's arm order within a seed


def _record(study: Study, unit: Unit) -> None:
    record_cell(study, cell_name(unit.arm and unit.arm.name, unit.seed, unit.model_dir.name), unit.evaluation())


def _finish_in_process(study: Study, unit: Unit, bar) -> None:
    if unit_done(unit):
        _record(study, unit)
        bar.write(_unit_line(unit, None))
        return
    started = time.time()
    _run_in_process(unit)
    _record(study, unit)
    bar.write(_unit_line(unit, time.time() - started))
    bar.update(1)


def _run_pool(study: Study, units: list[Unit], jobs: int, num_threads: int, bar) -> None:
    todo = []
    for unit in units:
        if unit_done(unit):
            _record(study, unit)
            bar.write(_unit_line(unit, None))
        else:
            todo.append(unit)

    def finished(unit: Unit, seconds: float) -> None:
        _record(study, unit)
        bar.write(_unit_line(unit, seconds))
        bar.update(1)

    _pooled(jobs, todo, lambda unit: _run_subprocess(study, unit, num_threads), finished)


def _capture_pool(study: Study, stores: list, jobs: int, num_threads: int, bar) -> None:
    todo = []
    for arm, config in stores:
        if stage_status(capture_stage(config))[0] == "done":
            bar.write(_capture_line(arm, config, None))
        else:
            todo.append((arm, config))

    def finished(store: tuple, seconds: float) -> None:
        bar.write(_capture_line(*store, seconds))
        bar.update(1)

    _pooled(jobs, todo, lambda store: _capture_subprocess(study, *store, num_threads), finished)


def _pooled(jobs: int, items: list, work, finished) -> None:
    """``work(item)`` for every item, ``jobs`` at a time, then ``finished(item, seconds)``. The first failure
    cancels what has not started (what runs finishes) and is raised once all have stopped."""
    failures = []
    started = time.time()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(_timed, work, item): item for item in items}
        for future in as_completed(futures):
            if future.cancelled():
                continue
            try:
                seconds = future.result()
            except StudyError as exc:
                failures.append(str(exc))
                for other in futures:
                    other.cancel()
                continue
            finished(futures[future], seconds)
    if failures:
        more = f" ({len(failures) - 1} more failed; see their logs)" if len(failures) > 1 else ""
        raise StudyError(failures[0] + more + f"; stopped after {time.time() - started:.0f} s")


def _timed(fn, *args) -> float:
    started = time.time()
    fn(*args)
    return time.time() - started
