"""Stage `sweep`: Optuna over student hyperparameters, every trial a student trained from the run's store.

A trial is an ordinary student: the run's config with the trial's parameters applied, trained by
:func:`pipeline.distill.train_student` (the code path of `babydistill distill`) into
``run_dir/sweeps/NAME/trial-XXXX/``, which holds its ``run_config.json`` (the parameters applied),
``metrics.jsonl``, ``train.log`` and, when it completes, a Hugging Face checkpoint. After each
validation (``train.eval_every``) the trial reports its validation CE to Optuna, whose pruner
(Hyperband by default; with the TPE sampler, the BOHB of the paper) may stop it there.

Storage: an Optuna RDB storage, by default the SQLite file ``sweeps/NAME/study.db`` (no server;
processes on one machine share it through SQLite's file locks), or any RDB URL (``--storage``,
e.g. PostgreSQL, for workers on several hosts). The study records its signature (search space,
objective, the config it varies, the store); a sweep whose signature differs is refused unless
``force``.

Resume: every running trial writes a heartbeat (``sweep.heartbeat_seconds``); a trial silent for
three heartbeats has lost its process (kill -9, a lost host), is marked failed by Optuna and
retried once with the same parameters, and the retry takes over the trial's folder and resumes
from its last checkpoint. A sweep stops when ``trials`` trials are completed or pruned; completed
and pruned trials are never run again. A trial that raises (e.g. a NaN loss at a high learning
rate) is recorded as failed and does not count.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import socket
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from babydistill.pipeline.config import (
    Config,
    ConfigError,
    SweepConfig,
    config_from_dict,
    identity,
    save_config,
)
from babydistill.pipeline.training.checkpoint import STATE_DIR

COUNTED = ("COMPLETE", "PRUNED")
"""Trial states that count towards ``trials``."""
STUDY_FILE = "study.db"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class SweepError(ValueError):
    """The sweep cannot run as asked (no store, a storage Optuna cannot open, a changed study, ...)."""


# --- the search space ---------------------------------------------------------------------------


def _with_values(config: Config, values: dict) -> Config:
    """``config`` with ``section.key: value`` applied, validated like a loaded config."""
    raw = config.to_dict()
    for key, value in values.items():
        section, name = key.split(".", 1)
        raw[section][name] = value
    return config_from_dict(raw)


def check_space(config: Config) -> None:
    """Every end of every range and every choice must give a valid run config (e.g. a temperature other
    than 1 with a sampled store is refused here, naming the key, rather than in trial 7)."""
    for key, spec in config.sweep.space.items():
        values = spec["choices"] if "choices" in spec else [spec["low"], spec["high"]]
        for value in values:
            try:
                _with_values(config, {key: value})
            except ConfigError as exc:
                raise ConfigError(f"sweep.space.{key}: {value!r} gives an invalid run config ({exc})") from None


def suggest(trial, space: dict[str, dict]) -> dict:
    """The trial's parameters, drawn by Optuna's sampler from ``space`` (names are the config keys)."""
    params = {}
    for key, spec in space.items():
        if "choices" in spec:
            params[key] = trial.suggest_categorical(key, spec["choices"])
        elif isinstance(spec["low"], int):
            params[key] = trial.suggest_int(key, spec["low"], spec["high"], step=spec.get("step", 1), log=spec["log"])
        else:
            params[key] = trial.suggest_float(key, spec["low"], spec["high"], step=spec.get("step"), log=spec["log"])
    return params


def config_point(config: Config) -> dict | None:
    """The config's own values of the space's keys, or None when one of them lies outside the space."""
    point = {}
    for key, spec in config.sweep.space.items():
        section, name = key.split(".", 1)
        value = getattr(getattr(config, section), name)
        inside = value in spec["choices"] if "choices" in spec else spec["low"] <= value <= spec["high"]
        if not inside:
            return None
        point[key] = value
    return point


def signature(config: Config, store_attrs: dict) -> dict:
    """What makes trials comparable: a study made with another signature cannot be continued."""
    varied = {section: identity(getattr(config, section)) for section in SIGNED_SECTIONS}
    return {"space": config.sweep.space, "objective": config.sweep.objective, "student_seed": config.sweep.student_seed,
            "config": _digest(varied), "store": _digest(store_attrs)}


SIGNED_SECTIONS = ("data", "tokenizer", "model", "train", "distill")  # their identity fields (config.EXECUTION_ONLY)


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- storage and study ----------------------------------------------------------------------------


def default_storage_url(sweep_dir: Path) -> str:
    return f"sqlite:///{(sweep_dir / STUDY_FILE).resolve()}"


def open_storage(url: str, heartbeat_seconds: int):
    """An Optuna RDB storage with heartbeats; a stale trial is retried once, inheriting its reported values."""
    import optuna

    engine_kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else None  # writers queue, not fail
    try:
        with warnings.catch_warnings():  # heartbeats and the retry callback are marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_seconds,
                grace_period=3 * heartbeat_seconds,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=1, inherit_intermediate_values=True))
    except Exception as exc:  # the URL's scheme, driver, host or file: Optuna/SQLAlchemy raise many kinds
        why = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise SweepError(f"--storage {url}: Optuna cannot open it ({why}); give an RDB URL such as "
                         f"sqlite:////abs/path/study.db or postgresql://user:pass@host/db") from None


def make_sampler(cfg: SweepConfig, offset: int = 0):
    """``offset`` shifts the seed: a resumed sweep or a second worker must not redraw the same random trials."""
    import optuna

    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed + offset)
    return optuna.samplers.TPESampler(seed=cfg.seed + offset, n_startup_trials=cfg.startup_trials)


def make_pruner(cfg: SweepConfig, eval_every: int):
    import optuna

    min_steps = cfg.min_steps or eval_every
    if cfg.pruner == "hyperband":  # max_resource "auto": the first completed trial's last step
        return optuna.pruners.HyperbandPruner(min_resource=min_steps, reduction_factor=cfg.reduction_factor)
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials // 2 or 1, n_warmup_steps=min_steps)
    return optuna.pruners.NopPruner()


def load_study(config: Config, name: str, storage, *, create: bool):
    import optuna

    cfg = config.sweep
    kwargs = dict(study_name=name, storage=storage, sampler=make_sampler(cfg),
                  pruner=make_pruner(cfg, config.train.eval_every or 1))
    if create:
        return optuna.create_study(direction="minimize", load_if_exists=True, **kwargs)
    return optuna.load_study(**kwargs)


def _counts(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def num_counted(study) -> int:
    counts = _counts(study)
    return sum(counts.get(s, 0) for s in COUNTED)


# --- one trial ------------------------------------------------------------------------------------


def trial_dir(sweep_dir: Path, number: int) -> Path:
    return sweep_dir / f"trial-{number:04d}"


@dataclass
class TrialJob:
    """Everything a worker needs (picklable: it crosses to worker processes and dask tasks)."""

    config: Config
    name: str
    storage_url: str
    sweep_dir: Path
    trials: int
    num_threads: int | None = None
    """train.num_threads for this worker's trials (None = the config's)."""
    worker: int = 0


def _objective(job: TrialJob, trial) -> float:
    import optuna

    from babydistill.pipeline.distill import train_student
    from babydistill.pipeline.training.runtime import TrainingError

    study = trial.study
    # Two workers can start a trial at the same moment when one slot is left: the later one steps back.
    earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number
               and t.state.name in (*COUNTED, "RUNNING")]
    if len(earlier) >= job.trials:
        trial.set_user_attr("surplus", True)
        raise SurplusTrial(f"the sweep already has {job.trials} trials")

    params = suggest(trial, job.config.sweep.space)
    config = _with_values(job.config, params)
    if job.num_threads is not None:
        config.train.num_threads = job.num_threads
    out = trial_dir(job.sweep_dir, trial.number)
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
    history = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(frozen)
    if history and not out.exists() and trial_dir(job.sweep_dir, history[-1]).exists():
        # The retry of a trial whose process died: it takes the folder over and resumes from its checkpoint.
        os.replace(trial_dir(job.sweep_dir, history[-1]), out)
        trial.set_user_attr("resumed_from_trial", history[-1])
    out.mkdir(parents=True, exist_ok=True)
    trial.set_user_attr("dir", out.name)
    trial.set_user_attr("host", socket.gethostname())

    def on_validation(step: int, val_loss: float) -> None:
        trial.report(val_loss, step)
        trial.set_user_attr("steps", step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} (validation CE {val_loss:.4f})")

    try:
        with (out / "train.log").open("a", encoding="utf-8") as log, contextlib.redirect_stdout(log), \
                contextlib.redirect_stderr(log):
            train_student(config, config.tokens_path, config.tokenizer_path, config.logits_path, out,
                          seed=config.sweep.student_seed, resume="auto", on_validation=on_validation)
    except (optuna.TrialPruned, TrainingError):
        # A finished trial is never resumed: its checkpoints only take disk (pruned and failed alike).
        shutil.rmtree(out / STATE_DIR, ignore_errors=True)
        raise
    except KeyboardInterrupt:
        # Optuna records the trial as failed; queue its retry now, as for a dead process, so that the next
        # run resumes it from its checkpoint instead of losing it.
        frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1, inherit_intermediate_values=True)(study, frozen)
        raise
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    summary = json.loads((out / "train_summary.json").read_text(encoding="utf-8"))
    trial.set_user_attr("steps", summary["num_steps"])
    return summary["final_val_loss"]


class SurplusTrial(Exception):
    """A trial started after the sweep already had its count (recorded as failed, marked surplus)."""


def run_worker(job: TrialJob, on_trial=None) -> int:
    """Run trials until the study has ``job.trials`` completed or pruned ones (counting those running).

    Returns how many trials this worker ran. ``on_trial(study, frozen_trial)`` is called after each.
    """
    import optuna

    from babydistill.pipeline.training.runtime import TrainingError

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = open_storage(job.storage_url, job.config.sweep.heartbeat_seconds)
    study = load_study(job.config, job.name, storage, create=False)
    study.sampler = make_sampler(job.config.sweep, offset=len(study.trials) + 1000 * job.worker)
    ran, failures, last = 0, 0, []

    def record(study, frozen) -> None:
        last[:] = [frozen]
        if on_trial is not None:
            on_trial(study, frozen)

    while True:
        counts = _counts(study)
        # A waiting trial (the retry of a dead one) is run first by Optuna, whatever the count.
        if sum(counts.get(s, 0) for s in (*COUNTED, "RUNNING")) >= job.trials and not counts.get("WAITING"):
            return ran
        if failures >= job.trials:
            raise SweepError(f"{failures} trials in a row failed in this worker; see {job.sweep_dir}/trial-*/train.log")
        study.optimize(lambda trial: _objective(job, trial), n_trials=1, catch=(TrainingError, SurplusTrial),
                       callbacks=[record])
        ran += 1
        failed = last and last[0].state.name == "FAIL" and not last[0].user_attrs.get("surplus")
        failures = failures + 1 if failed else 0


def _worker_process(job: TrialJob, log_path: Path) -> None:
    """A spawned worker process: its own log, then the trial loop."""
    with log_path.open("a", encoding="utf-8") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        run_worker(job)


# --- progress -------------------------------------------------------------------------------------


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def trial_line(study, t) -> str:
    """``trial 3 pruned at step 40 | distill.alpha=0.42 train.lr=0.0013 | val 5.2011 | best 4.9012 (trial 1)``"""
    state = t.state.name.lower()
    steps = t.user_attrs.get("steps")
    if state == "pruned" and steps is not None:
        state = f"pruned at step {steps}"
    elif state == "complete":
        state = f"complete ({steps} steps)"
    elif t.user_attrs.get("surplus"):
        state = "surplus (the sweep was full)"
    if t.user_attrs.get("resumed_from_trial") is not None:
        state += f" (trial {t.user_attrs['resumed_from_trial']} resumed from its checkpoint)"
    params = " ".join(f"{k}={_fmt(v)}" for k, v in t.params.items()) or "-"
    value = t.value if t.value is not None else (t.intermediate_values[max(t.intermediate_values)]
                                                 if t.intermediate_values else None)
    complete = [x for x in study.get_trials(deepcopy=False) if x.state.name == "COMPLETE"]
    best = min(complete, key=lambda x: x.value) if complete else None
    return (f"trial {t.number} {state} | {params} | val {value:.4f}" if value is not None else
            f"trial {t.number} {state} | {params} | val -") + \
        (f" | best {best.value:.4f} (trial {best.number})" if best else " | best -")


class Progress:
    """One line per finished trial and an overall bar (trials completed or pruned, with ETA)."""

    def __init__(self, study, total: int):
        from tqdm import tqdm

        self.seen = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
        self.bar = tqdm(total=total, initial=min(total, num_counted(study)), unit="trial", desc="sweep",
                        smoothing=0, dynamic_ncols=True)

    def update(self, study) -> None:
        for t in study.get_trials(deepcopy=False):
            if t.state.is_finished() and t.number not in self.seen:
                self.seen.add(t.number)
                self.bar.write(trial_line(study, t))
        self.bar.n = min(self.bar.total, num_counted(study))
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


# --- the stage ------------------------------------------------------------------------------------


def check_inputs(config: Config, logits_path: Path) -> dict:
    """Refusals before anything is written; returns the store's attributes."""
    from babydistill.stores.logits import incomplete_reason, read_attrs

    if not (logits_path / "zarr.json").is_file():
        raise SweepError(f"{logits_path}: no logit store; trials train from it: run `babydistill cache CONFIG` "
                         f"(or `babydistill run CONFIG`) first")
    reason = incomplete_reason(logits_path, checksum=False)
    if reason:
        raise SweepError(f"{logits_path}: the store is unfinished ({reason}); run `babydistill cache CONFIG` to finish it")
    if not config.sweep.space:
        raise ConfigError("sweep.space: empty; give the keys to search, e.g. distill.alpha: {low: 0.1, high: 0.9}")
    if config.sweep.pruner != "none" and config.train.eval_every is None:
        raise ConfigError("train.eval_every: unset, so trials validate only at epoch ends and the pruner sees "
                          "nothing; set it (e.g. --set train.eval_every=20) or sweep.pruner=none")
    check_space(config)
    return read_attrs(logits_path)


def prepare_study(config: Config, name: str, *, storage_url: str | None = None, force: bool = False):
    """Check the inputs, open (or create) the study and check its signature. Returns (study, url, sweep_dir).

    Writes nothing on bad input. ``force`` discards an existing study of that name and its trial folders.
    """
    import optuna

    if not _NAME.fullmatch(name):
        raise SweepError(f"--name {name!r}: must be a folder name (letters, digits, . _ -)")
    sweep_dir = config.sweep_path(name)
    attrs = check_inputs(config, config.logits_path)
    sign = signature(config, attrs)
    if storage_url is not None:
        storage = open_storage(storage_url, config.sweep.heartbeat_seconds)  # a bad URL fails before any write
    exists = storage_url is not None and name in optuna.get_all_study_names(storage) or \
        storage_url is None and (sweep_dir / STUDY_FILE).is_file()
    if exists and force:
        if storage_url is not None:
            optuna.delete_study(study_name=name, storage=storage)
        shutil.rmtree(sweep_dir, ignore_errors=True)
        exists = False
    if storage_url is None:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        storage_url = default_storage_url(sweep_dir)
        storage = open_storage(storage_url, config.sweep.heartbeat_seconds)
    if exists:
        study = load_study(config, name, storage, create=False)  # the sampler and pruner of this config
        old = study.user_attrs.get("signature", {})
        changed = [k for k in sign if old.get(k) != sign[k]]
        if changed:
            what = {"space": "sweep.space", "objective": "sweep.objective", "student_seed": "sweep.student_seed",
                    "config": "the train/distill/model/data settings", "store": "the logit store"}
            raise SweepError(f"sweep {name!r} in {storage_url} was made with another "
                             f"{' and '.join(what[k] for k in changed)}; its trials would not be comparable: "
                             f"pass --force to discard it, or choose a new --name")
    else:
        study = load_study(config, name, storage, create=True)
        study.set_user_attr("signature", sign)
        baseline = config_point(config)
        if baseline is not None:  # the config's own values first: the sweep's best is never worse than them
            study.enqueue_trial(baseline, user_attrs={"baseline": True}, skip_if_exists=True)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, sweep_dir / "config.json")
    return study, storage_url, sweep_dir


def open_existing(config: Config, name: str, storage_url: str | None = None):
    """An existing sweep, to report on it: (study, storage URL, sweep folder)."""
    import optuna

    sweep_dir = config.sweep_path(name)
    if storage_url is None:
        if not (sweep_dir / STUDY_FILE).is_file():
            raise SweepError(f"{sweep_dir / STUDY_FILE}: no sweep named {name!r}; run `babydistill sweep CONFIG "
                             f"--name {name}` first")
        storage_url = default_storage_url(sweep_dir)
    storage = open_storage(storage_url, config.sweep.heartbeat_seconds)
    if name not in optuna.get_all_study_names(storage):
        raise SweepError(f"{storage_url}: no sweep named {name!r}; run `babydistill sweep CONFIG --name {name} "
                         f"--storage {storage_url}` first")
    return load_study(config, name, storage, create=False), storage_url, sweep_dir


def recover_stale(study, heartbeat_seconds: int) -> None:
    """Trials left running by a process that died are failed (and retried) once their heartbeat is stale;
    a live trial of another worker keeps beating and is left alone."""
    import optuna

    running = {t.number for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"}
    if not running:
        return
    wait = 4 * heartbeat_seconds
    print(f"{len(running)} trial(s) marked running ({', '.join(map(str, sorted(running)))}): waiting up to {wait} s "
          f"for their heartbeat; a dead one is marked failed and retried from its checkpoints", flush=True)
    deadline = time.time() + wait
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        while time.time() < deadline:
            optuna.storages.fail_stale_trials(study)
            if not {t.number for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"} & running:
                return
            time.sleep(1)


def run_sweep(config: Config, name: str, *, trials: int | None = None, workers: int = 1,
              scheduler: str | None = None, storage_url: str | None = None, force: bool = False):
    """Run the sweep until ``trials`` (default ``sweep.trials``) trials are completed or pruned.

    ``workers`` trial processes share the study: 1 = in this process; more = local processes, or with
    ``scheduler`` (a dask.distributed address) tasks on that cluster (``workers`` None = one per worker).
    Returns the study.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    trials = trials or config.sweep.trials
    if trials < 1:
        raise SweepError(f"--trials: must be >= 1, got {trials}")
    if scheduler is None and workers is None:
        workers = 1
    if workers is not None and workers < 1:
        raise SweepError(f"--workers: must be >= 1, got {workers}")
    client = None
    if scheduler is not None:
        client = _connect(scheduler)  # an unreachable scheduler is refused before anything is written
        workers = workers or len(client.scheduler_info()["workers"])
    try:
        study, storage_url, sweep_dir = prepare_study(config, name, storage_url=storage_url, force=force)
        recover_stale(study, config.sweep.heartbeat_seconds)
        started = time.time()
        done_before = num_counted(study)
        print(f"sweep {name}: {done_before}/{trials} trials done; storage {storage_url}; "
              f"{workers} worker(s)" + (f" on {scheduler}" if scheduler else ""), flush=True)
        progress = Progress(study, trials)
        threads = None if workers == 1 and scheduler is None else max(1, (os.cpu_count() or 1) // workers)
        job = TrialJob(config, name, storage_url, sweep_dir, trials, threads)
        try:
            if scheduler is None and workers == 1:
                run_worker(job, on_trial=lambda s, t: progress.update(s))
            elif scheduler is None:
                _run_processes(job, workers, study, progress)
            else:
                _run_dask(client, job, workers, study, progress)
            progress.update(study)
        finally:
            progress.close()
    finally:
        if client is not None:
            client.close()
    counts = _counts(study)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    best = min(complete, key=lambda t: t.value) if complete else None
    print(f"sweep {name}: {num_counted(study)}/{trials} trials done (" + ", ".join(
        f"{n} {s.lower()}" for s, n in sorted(counts.items())) + f") in {time.time() - started:.0f} s"
          + (f"; best trial {best.number}: val {best.value:.4f}" if best else ""), flush=True)
    return study


def _start_one_by_one(starts: list, study, timeout: float = 120.0) -> list:
    """Call each of ``starts`` (each starts one worker), the next only once the previous has taken a waiting
    trial. Optuna's SQLite storage can give one waiting trial (trial 0, the config's own values, or the retry
    of a dead one) to two workers asking at the same moment, and both then train it in the same folder."""
    started = []
    for i, start in enumerate(starts):
        waiting = _counts(study).get("WAITING", 0)
        started.append(start())
        deadline = time.time() + timeout
        while (waiting and i < len(starts) - 1 and time.time() < deadline
               and _counts(study).get("WAITING", 0) >= waiting):
            time.sleep(0.5)
    return started


def _run_processes(job: TrialJob, workers: int, study, progress: Progress) -> None:
    """``workers`` spawned processes run trials against the shared storage; this one reports progress."""
    logs = job.sweep_dir / "logs"
    logs.mkdir(exist_ok=True)
    ctx = multiprocessing.get_context("spawn")  # no forked torch / sqlite state
    procs = [ctx.Process(target=_worker_process, args=(replace(job, worker=i), logs / f"worker-{i}.log"))
             for i in range(workers)]
    _start_one_by_one([p.start for p in procs], study)
    try:
        while any(p.is_alive() for p in procs):
            progress.update(study)
            time.sleep(2)
    finally:
        for p in procs:
            p.join()
    bad = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise SweepError(f"worker {bad[0][0]} exited with code {bad[0][1]}; see {logs / f'worker-{bad[0][0]}.log'}")


def _connect(address: str):
    from dask.distributed import Client

    try:
        return Client(address, timeout=20)
    except (OSError, TimeoutError) as exc:
        raise SweepError(f"--scheduler {address}: cannot connect ({type(exc).__name__}: {exc}); start one with "
                         f"`dask scheduler` and `dask worker ADDRESS`") from None


def _run_dask(client, job: TrialJob, workers: int, study, progress: Progress) -> None:
    """``workers`` long tasks on the cluster, each a trial loop against the shared storage."""
    if job.storage_url.startswith("sqlite"):
        local = {"127.0.0.1", "localhost", socket.gethostname()}
        with contextlib.suppress(OSError):
            local.add(socket.gethostbyname(socket.gethostname()))
        hosts = {addr.split("://")[-1].rsplit(":", 1)[0] for addr in client.scheduler_info()["workers"]}
        if hosts - local:
            raise SweepError(f"dask workers on other hosts ({', '.join(sorted(hosts - local))}) cannot share the SQLite "
                             f"study file: pass --storage with a database server URL (e.g. postgresql://...)")
    futures = _start_one_by_one([
        lambda i=i: client.submit(run_worker, replace(job, worker=i), key=f"sweep-{job.name}-worker-{i}", pure=False)
        for i in range(workers)], study)
    while not all(f.done() for f in futures):
        progress.update(study)
        time.sleep(2)
    for f in futures:
        f.result()  # re-raises a worker's error here
