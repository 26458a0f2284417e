"""train.trackers: TensorBoard, MLflow and W&B get the metrics.jsonl numbers, read back with each
library's own reader (W&B offline, MLflow in a local sqlite store, no network); a tracker that cannot
start is one warning line; `babydistill run` prints one line per stage and keeps the rest in logs."""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_config, write_corpus

from babydistill.pipeline.config import ConfigError, config_from_dict
from babydistill.pipeline.teacher import train_teacher
from babydistill.pipeline.trackers import record_metrics, stage_run_name

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No tracker may reach the network or the user's own settings."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def tracked_config(tiny_run, run_dir: Path, trackers: list[str]):
    train = dataclasses.replace(tiny_run.train, max_steps=4, log_every=1, eval_every=2, save_every=2,
                                trackers=trackers)
    return dataclasses.replace(tiny_run, run_dir=str(run_dir), train=train)


def metrics_of(model_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines() if line]


def wandb_records(path: Path):
    """The records of an offline ``run-*.wandb`` file: W&B's protobuf ``Record`` in LevelDB log framing
    (7-byte file header, 32 KiB blocks, each chunk behind a crc32/length/type header)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left for a header: the block is padded
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_every_tracker_gets_the_logged_numbers(tiny_run, tmp_path, offline):
    for extra in ("tensorboard", "mlflow", "wandb"):  # `make test` installs them all (.[trackers])
        pytest.importorskip(extra, reason=f'pip install -e ".[{extra}]" (or make test)')
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    run_dir = tmp_path / "run"
    config = tracked_config(tiny_run, run_dir, ["tensorboard", "mlflow", "wandb"])
    t1 = train_teacher(config, tiny_run.tokens_path, tiny_run.tokenizer_path, run_dir / "teachers" / "t1.partial",
                       seed=1)
    records = metrics_of(t1)
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    val = {r["step"]: r["val_loss"] for r in records if r["kind"] == "val"}
    assert sorted(train) == [1, 2, 3, 4] and sorted(val) == [2, 4]

    # TensorBoard, read with its own reader
    events = EventAccumulator(str(run_dir / "tensorboard" / "teachers" / "t1"))
    events.Reload()
    for key in ("loss", "ce", "lr", "tokens_per_second", "grad_norm"):
        got = {e.step: e.value for e in events.Scalars(f"train/{key}")}
        assert got == pytest.approx({s: r[key] for s, r in train.items()}, rel=1e-6), key
    assert {e.step: e.value for e in events.Scalars("val/loss")} == pytest.approx(val, rel=1e-6)
    assert "config/text_summary" in events.Tags()["tensors"]

    # MLflow: the local store in the run directory; one run named after the stage, the config as params
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("run")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "teacher t1" and run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == str(config.train.lr) and run.data.params["model.num_layers"] == "2"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert history == pytest.approx({s: r["loss"] for s, r in train.items()})
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/loss")} == pytest.approx(val)
    assert json.loads((t1 / "trackers.json").read_text())["mlflow"] == run.info.run_id

    # W&B offline: the run file's history records
    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history, names = {}, []
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(row["_step"], {}).update(row)
        elif kind == "run":
            names.append((record.run.display_name, record.run.run_group))
    assert ("teacher t1", "run") in names
    assert {s: row["train/loss"] for s, row in history.items() if "train/loss" in row} == \
        pytest.approx({s: r["loss"] for s, r in train.items()})
    assert {s: row["val/loss"] for s, row in history.items() if "val/loss" in row} == pytest.approx(val)

    # a second model (TensorBoard only) lands beside the first, as `tensorboard --logdir RUN_DIR` shows them;
    # resuming it from step 2 purges the replayed steps, so each step is drawn once
    t2_config = tracked_config(tiny_run, run_dir, ["tensorboard"])
    t2 = train_teacher(t2_config, tiny_run.tokens_path, tiny_run.tokenizer_path, run_dir / "teachers" / "t2.partial",
                       seed=2)
    train_teacher(t2_config, tiny_run.tokens_path, tiny_run.tokenizer_path, t2, seed=2,
                  resume=t2 / "trainer_state" / "step-000002")
    multiplexer = EventMultiplexer().AddRunsFromDirectory(str(run_dir))
    multiplexer.Reload()
    assert {"tensorboard/teachers/t1", "tensorboard/teachers/t2"} <= set(multiplexer.Runs())
    t2_loss = multiplexer.Scalars("tensorboard/teachers/t2", "train/loss")
    assert [e.step for e in t2_loss] == [1, 2, 3, 4]
    assert [e.value for e in t2_loss] == pytest.approx([r["loss"] for r in metrics_of(t2) if r["kind"] == "train"])


def test_a_tracker_that_cannot_start_is_one_warning_and_training_goes_on(tiny_run, tmp_path, offline, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: `import wandb` raises ImportError
    config = tracked_config(tiny_run, tmp_path / "run", ["wandb"])
    with pytest.warns(UserWarning) as caught:
        out = train_teacher(config, tiny_run.tokens_path, tiny_run.tokenizer_path, tmp_path / "run" / "t", seed=1)
    messages = [str(w.message) for w in caught if "train.trackers" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert messages[0].startswith("train.trackers: wandb could not start (ModuleNotFoundError") \
        and 'pip install -e ".[wandb]"' in messages[0]
    assert len([r for r in metrics_of(out) if r["kind"] == "train"]) == 4 and (out / "model.safetensors").is_file()


def test_config_names_and_records():
    assert config_from_dict({"train": {"trackers": ["tensorboard", "wandb"]}}).train.trackers == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match=r"train.trackers\[0\]: must be one of tensorboard, mlflow, wandb"):
        config_from_dict({"train": {"trackers": ["comet"]}})
    with pytest.raises(ConfigError, match="train.trackers: lists a tracker twice"):
        config_from_dict({"train": {"trackers": ["mlflow", "mlflow"]}})
    # turning trackers on does not make finished training stages stale
    assert config_from_dict({"train": {"trackers": ["mlflow"]}}).section_hash("train") == \
        config_from_dict({}).section_hash("train")
    assert stage_run_name(Path("runs/x/teachers/t1.partial"), "teacher") == "teacher t1"
    assert stage_run_name(Path("runs/x/students/s2"), "student") == "student s2"
    assert record_metrics({"kind": "train", "step": 3, "epoch": 0.1, "lr": 1e-3, "loss": 2.0, "ce": 1.5, "kl": 0.5,
                           "tokens_per_second": 9.0, "grad_norm": 1.0}) == {
        "train/epoch": 0.1, "train/lr": 1e-3, "train/loss": 2.0, "train/ce": 1.5, "train/kl": 0.5,
        "train/tokens_per_second": 9.0, "train/grad_norm": 1.0}
    assert record_metrics({"kind": "val", "step": 4, "epoch": 0.2, "val_loss": 3.0}) == {"val/loss": 3.0}


# --- the console of `babydistill run` --------------------------------------------------------------


@pytest.mark.slow
def test_run_console_is_one_line_per_stage_and_the_rest_is_in_logs(tmp_path):
    pytest.importorskip("tensorboard", reason='pip install -e ".[tensorboard]" (or make test)')
    write_corpus(tmp_path / "corpus", num_files=3, paragraphs=120)
    path = write_config(tmp_path, {"train": {"max_steps": 2, "log_every": 1, "trackers": ["tensorboard", "wandb"]},
                                   "teachers": {"count": 1}, "distill": {"students": 0}})
    broken = tmp_path / "broken" / "wandb"  # a wandb that cannot be imported, ahead of the real one
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('wandb is broken here')\n")
    env = {**os.environ, "PYTHONPATH": str(broken.parent), "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "babydistill.workflows", "run", str(path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "run"
    stages = ["prepare", "tokenizer", "tokenize", "teacher t1", "evaluate t1", "report"]
    lines = done.stdout.splitlines()
    assert len(lines) == len(stages) + 1 and lines[-1].startswith("Ran 6 stage(s) in "), done.stdout
    for stage, line in zip(stages, lines):
        log = run_dir / "logs" / f"{stage.replace(' ', '-')}.log"
        assert line.startswith(f"[done] {stage} in ") and line.endswith(f" s (log: {log})") and log.is_file()
    # stderr: the one warning of the tracker that could not start, nothing else
    assert done.stderr.splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("babydistill: warning: train.trackers: wandb could not start (ImportError: wandb "
                                  "is broken here)")
    assert "Loading weights" not in done.stdout + done.stderr
    teacher_log = (run_dir / "logs" / "teacher-t1.log").read_text()
    assert "step 2/2 | loss" in teacher_log and "wandb could not start" in teacher_log
    assert "val CE" in (run_dir / "logs" / "evaluate-t1.log").read_text()
    assert list((run_dir / "tensorboard" / "teachers" / "t1").glob("events.out.tfevents.*"))
