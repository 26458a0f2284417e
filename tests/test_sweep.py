"""`babydistill sweep`: refusals, a tiny sweep end to end, a pruned trial, kill -9 and rerun, workers and dask."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from babydistill.pipeline.capture import capture_logits
from babydistill.pipeline.config import load_config
from babydistill.pipeline.teacher import train_teacher
from babydistill.workflows.cli import main
from babydistill.workflows.experiments.sweep import open_existing, prepare_study, run_sweep
from babydistill.workflows.experiments.sweep_optuna import config_point

ROOT = Path(__file__).resolve().parents[1]
SPACE = {"distill.alpha": {"low": 0.1, "high": 0.9}, "train.lr": {"low": 1e-4, "high": 1e-2, "log": True},
         "distill.tail": {"choices": ["bucket", "renorm"]}, "distill.temperature": {"choices": [1.0, 2.0]}}


def _write(root: Path, base: dict, **sections) -> Path:
    raw = json.loads(json.dumps(base))
    for section, values in sections.items():
        raw[section] = values if section == "sweep" else {**raw[section], **values}
    path = root / f"sweep-{len(list(root.glob('sweep-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sweep_run(tiny_run, tmp_path_factory):
    """The tiny run with two briefly trained teachers and a top-8 store captured at T = 1, 2; short trials."""
    root = tmp_path_factory.mktemp("sweep")
    shutil.copytree(tiny_run.run_path, root / "run")
    raw = tiny_run.to_dict()
    raw["run_dir"] = str(root / "run")
    raw["train"].update(max_steps=4, save_every=2, eval_every=2, log_every=1)
    base_path = root / "base.yaml"
    base_path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    config = load_config(base_path)
    for seed in (1, 2):
        train_teacher(config, config.tokens_path, config.tokenizer_path, config.teacher_path(f"t{seed}"), seed=seed)
    capture_logits(dataclasses.replace(config.cache, workers=1), config.tokens_path, config.tokenizer_path,
                   [config.teacher_path("t1"), config.teacher_path("t2")], config.logits_path)
    raw["sweep"] = {"space": SPACE, "trials": 3, "startup_trials": 2}
    return root, raw


def _sweep_dirs(root: Path) -> list[Path]:
    return sorted((root / "run" / "sweeps").glob("*")) if (root / "run" / "sweeps").is_dir() else []


# --- refusals: one line naming the key or file, exit 2, nothing written ------------------------------------------


@pytest.mark.parametrize("sweep, expected", [
    ({"space": {"cache.k": {"low": 2, "high": 8}}}, "sweep.space.cache.k: changes the store"),
    ({"space": {"train.nope": {"low": 1, "high": 2}}}, "sweep.space.train.nope: unknown key"),
    ({"space": {"train.lr": {"low": 1e-3, "high": 1e-3}}}, "sweep.space.train.lr: empty range"),
    ({"space": {"distill.tail": {"choices": []}}}, "sweep.space.distill.tail: choices must be a non-empty list"),
    ({"space": {"train.lr": {"low": -1.0, "high": 1e-3, "log": True}}}, "sweep.space.train.lr: log scale needs low > 0"),
    ({"space": {"train.seed": {"low": 1, "high": 4}}}, "sweep.space.train.seed: is not a student hyperparameter"),
    ({"space": {"distill.alpha": {"low": 0.1, "high": 1.5}}},
     "sweep.space.distill.alpha: 1.5 gives an invalid run config (distill.alpha: must be in [0, 1]"),
    ({"space": SPACE, "objective": "test"}, "sweep.objective: the test split is never used to choose"),
    ({"space": {}}, "sweep.space: empty"),
])
def test_bad_sweep_sections_are_refused_in_one_line_and_write_nothing(sweep_run, capsys, sweep, expected):
    root, raw = sweep_run
    before = _sweep_dirs(root)
    assert main(["sweep", str(_write(root, raw, sweep=sweep))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("babydistill: error: ") and err.count("\n") == 1 and expected in err, err
    assert _sweep_dirs(root) == before


def test_a_temperature_the_store_cannot_serve_is_refused_naming_the_key(sweep_run, capsys):
    root, raw = sweep_run
    path = _write(root, raw, cache={"mode": "hybrid"}, sweep={"space": {"distill.temperature": {"low": 1.0, "high": 2.0}}})
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert ("sweep.space.distill.temperature: 2.0 gives an invalid run config (distill.temperature: cannot be served by "
            "cache.mode hybrid: ") in err


def test_no_store_is_refused_with_the_command_that_makes_it(sweep_run, tmp_path, capsys):
    root, raw = sweep_run
    raw = {**raw, "run_dir": str(tmp_path / "empty-run")}
    assert main(["sweep", str(_write(root, raw, sweep=raw["sweep"]))]) == 2
    err = capsys.readouterr().err
    assert "logits.zarr: no logit store" in err and "`babydistill cache CONFIG`" in err and err.count("\n") == 1
    assert not (tmp_path / "empty-run").exists()


@pytest.mark.parametrize("url", ["sqlite:////nonexistent-dir/sub/study.db", "nosuchdb://host/db"])
def test_a_storage_optuna_cannot_open_is_refused(sweep_run, capsys, url):
    root, raw = sweep_run
    before = _sweep_dirs(root)
    assert main(["sweep", str(_write(root, raw, sweep=raw["sweep"])), "--storage", url]) == 2
    err = capsys.readouterr().err
    assert f"babydistill: error: --storage {url}: Optuna cannot open it" in err and err.count("\n") == 1
    assert _sweep_dirs(root) == before and not Path("/nonexistent-dir").exists()


# --- end to end --------------------------------------------------------------------------------------------------


def _best_command_params(report: str) -> dict:
    command = next(line for line in report.splitlines() if line.startswith("babydistill distill "))
    return {k: yaml.safe_load(v) for k, v in re.findall(r"--set (\S+?)=(\S+)", command)}


@pytest.mark.slow
def test_tiny_sweep_end_to_end_then_a_changed_space_is_refused_unless_forced(sweep_run, capsys):
    from transformers import AutoModelForCausalLM

    root, raw = sweep_run
    path = _write(root, raw, sweep=raw["sweep"])
    assert main(["sweep", str(path), "--name", "e2e"]) == 0
    out = capsys.readouterr().out
    sweep_dir = root / "run/sweeps/e2e"
    study, _, _ = open_existing(load_config(path), "e2e")
    counted = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(counted) == 3 and all(f"trial {t.number} " in out for t in counted) and "best " in out
    own = config_point(load_config(path))  # the config's own values are trial 0: the best is never worse
    assert own is not None and study.trials[0].params == own and study.trials[0].user_attrs["baseline"]
    assert (sweep_dir / "study.db").is_file() and (sweep_dir / "config.json").is_file()
    for t in counted:
        folder = sweep_dir / f"trial-{t.number:04d}"
        run_config = json.loads((folder / "run_config.json").read_text())
        for key, value in t.params.items():  # the trial's parameters are in its run config
            section, name = key.split(".")
            assert run_config[section][name] == value
        assert (folder / "metrics.jsonl").is_file() and not (folder / "trainer_state").exists()
        assert t.intermediate_values and min(t.intermediate_values) == 2  # reported at every train.eval_every
    complete = [t for t in counted if t.state.name == "COMPLETE"]
    model = AutoModelForCausalLM.from_pretrained(sweep_dir / f"trial-{complete[0].number:04d}")
    assert model.config.num_hidden_layers == 2

    report = (sweep_dir / "report.md").read_text()
    assert _best_command_params(report) == study.best_params  # exact floats: retraining gives the same student
    assert f"Trial {study.best_trial.number} (`trial-{study.best_trial.number:04d}`)" in report
    assert f"**{study.best_value:.4f}**" in report
    results = json.loads((sweep_dir / "results.json").read_text())
    assert results["best"]["number"] == study.best_trial.number and results["best"]["params"] == study.best_params
    assert (sweep_dir / "history.png").read_bytes()[:4] == b"\x89PNG"
    assert (sweep_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"

    # the same command again: the count is reached, nothing is trained
    stamps = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("trial-*/metrics.jsonl")}
    assert main(["sweep", str(path), "--name", "e2e"]) == 0
    assert {p: p.stat().st_mtime_ns for p in sweep_dir.glob("trial-*/metrics.jsonl")} == stamps
    assert len(open_existing(load_config(path), "e2e")[0].trials) == len(study.trials)

    # another search space against this study: refused, nothing changed; --force starts over
    changed = _write(root, raw, sweep={**raw["sweep"], "space": {"distill.alpha": {"low": 0.2, "high": 0.8}}})
    capsys.readouterr()
    assert main(["sweep", str(changed), "--name", "e2e", "--trials", "1"]) == 2
    err = capsys.readouterr().err
    assert "sweep 'e2e'" in err and "another sweep.space" in err and "--force" in err and err.count("\n") == 1
    assert {p: p.stat().st_mtime_ns for p in sweep_dir.glob("trial-*/metrics.jsonl")} == stamps
    assert main(["sweep", str(changed), "--name", "e2e", "--trials", "1", "--force"]) == 0
    again, _, _ = open_existing(load_config(changed), "e2e")
    assert len(again.trials) == 1 and set(again.trials[0].params) == {"distill.alpha"}


@pytest.mark.slow
def test_a_hopeless_trial_is_pruned_and_recorded_as_pruned(sweep_run):
    root, raw = sweep_run
    path = _write(root, raw, sweep={"space": {"train.lr": {"choices": [3e-3, 1e-7]}}, "pruner": "median",
                                    "startup_trials": 2})
    config = load_config(path)
    study, _, _ = prepare_study(config, "prune")
    study.enqueue_trial({"train.lr": 3e-3}, skip_if_exists=True)  # (the config's own lr is queued already)
    study.enqueue_trial({"train.lr": 1e-7})  # learns nothing: worse than the first at its first validation
    run_sweep(config, "prune", trials=2)
    good, hopeless = open_existing(config, "prune")[0].trials
    assert good.state.name == "COMPLETE" and good.user_attrs["steps"] == 4
    assert hopeless.state.name == "PRUNED" and hopeless.user_attrs["steps"] == 2
    assert hopeless.intermediate_values[2] > good.intermediate_values[2]
    folder = root / "run/sweeps/prune/trial-0001"
    assert (folder / "metrics.jsonl").is_file() and not (folder / "model.safetensors").exists()
    from babydistill.workflows.experiments.sweep_report import write_sweep_report

    report = write_sweep_report(open_existing(config, "prune")[0], config, folder.parent, config_path=str(path),
                                command="x").read_text()
    assert re.search(r"\| 1 \| pruned \| 1e-07 \| [0-9.]+ \| 2 \|", report), report
    assert "Steps run by the completed and pruned trials: 6 of the 8" in report


@pytest.mark.slow
def test_kill_9_mid_trial_then_rerun_completes_the_count_and_resumes_the_trial(sweep_run):
    root, raw = sweep_run
    path = _write(root, raw, train={"max_steps": 30}, sweep={
        "space": {"distill.alpha": {"low": 0.1, "high": 0.9}}, "pruner": "none", "heartbeat_seconds": 1})
    sweep_dir = root / "run/sweeps/kill"
    proc = subprocess.Popen([sys.executable, "-m", "babydistill.workflows", "sweep", str(path), "--name", "kill", "--trials", "3"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not list(sweep_dir.glob("trial-0001/trainer_state/step-*/COMPLETE")):
        assert proc.poll() is None and time.time() < deadline, "the sweep ended before trial 1 saved a checkpoint"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = sweep_dir / "trial-0000/model.safetensors"
    stamp = first.stat().st_mtime_ns

    assert main(["sweep", str(path), "--name", "kill", "--trials", "3"]) == 0
    trials = open_existing(load_config(path), "kill")[0].trials
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == 3 and states.count("FAIL") == 1 and trials[1].state.name == "FAIL"
    retry = next(t for t in trials if t.user_attrs.get("resumed_from_trial") == 1)
    assert retry.params == trials[1].params and retry.state.name == "COMPLETE"
    assert "resuming from" in (sweep_dir / f"trial-{retry.number:04d}/train.log").read_text()
    assert not (sweep_dir / "trial-0001").exists()  # the retry took its folder over
    assert first.stat().st_mtime_ns == stamp  # the completed trial was not run again


@pytest.mark.slow
def test_two_local_workers_and_a_two_worker_dask_cluster_fill_one_study(sweep_run):
    from dask.distributed import LocalCluster

    root, raw = sweep_run
    path = _write(root, raw, sweep={**raw["sweep"], "pruner": "none"})
    config = load_config(path)
    run_sweep(config, "workers", trials=2, workers=2)
    trials = open_existing(config, "workers")[0].trials
    assert [t.state.name for t in trials].count("COMPLETE") == 2
    assert (root / "run/sweeps/workers/logs/worker-0.log").is_file()
    assert (root / "run/sweeps/workers/logs/worker-1.log").is_file()

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        run_sweep(config, "dask", trials=2, scheduler=cluster.scheduler_address)
    trials = open_existing(config, "dask")[0].trials
    assert [t.state.name for t in trials].count("COMPLETE") == 2
    assert all((root / "run/sweeps/dask" / t.user_attrs["dir"] / "model.safetensors").is_file()
               for t in trials if t.state.name == "COMPLETE")


def test_workers_start_one_by_one_while_a_trial_waits():
    """Two workers asking Optuna's SQLite storage for the same waiting trial at once can both get it (seen in
    this suite: both trained trial 0 in one folder); the next worker starts once the previous took it."""
    import threading
    from types import SimpleNamespace

    from babydistill.workflows.experiments.sweep import _start_one_by_one

    states = ["WAITING"]
    seen = []

    class FakeStudy:
        def get_trials(self, deepcopy=False):
            return [SimpleNamespace(state=SimpleNamespace(name=s)) for s in states]

    def first():
        seen.append(("first", list(states)))
        threading.Timer(0.3, states.__setitem__, (0, "RUNNING")).start()  # the worker takes the trial later

    def second():
        seen.append(("second", list(states)))

    _start_one_by_one([first, second], FakeStudy())
    assert seen == [("first", ["WAITING"]), ("second", ["RUNNING"])]
