"""One sweep trial (an ordinary student trained from the run's store, reporting its validation CE to the pruner)
and the worker loop that runs trials until the sweep has its count.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

from babydistill.pipeline.config import Config
from babydistill.pipeline.training.checkpoint import STATE_DIR
from babydistill.workflows.experiments.sweep_optuna import (
    COUNTED,
    SweepError,
    load_study,
    make_sampler,
    open_storage,
    state_counts,
    suggest,
    with_values,
)


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
    config = with_values(job.config, params)
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
        with (
            (out / "train.log").open("a", encoding="utf-8") as log,
            contextlib.redirect_stdout(log),
            contextlib.redirect_stderr(log),
        ):
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
        counts = state_counts(study)
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


def worker_process(job: TrialJob, log_path: Path) -> None:
    """A spawned worker process: its own log, then the trial loop."""
    with log_path.open("a", encoding="utf-8") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        run_worker(job)
