"""Experiment trackers (``train.trackers``): TensorBoard, MLflow and W&B, each through its own API.

The training loop hands every metrics.jsonl record to :meth:`Trackers.log` (metrics.jsonl is
always written; trackers are extra). A train record becomes ``train/<key>`` scalars (loss, ce, kl,
lr, tokens_per_second, grad_norm, epoch: the numbers of the log line), a validation record
``val/loss``, both at the record's optimizer step. The resolved run config goes in as parameters
and the run is named after its stage (``teacher t1``, ``student s1``), so every model of a run
lands side by side:

- ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` writing ``RUN_DIR/tensorboard/<kind>/<name>``
  (``tensorboard --logdir RUN_DIR`` shows them all); the config as a text summary. A resumed run
  purges the events past its checkpoint's step, so replayed steps are not drawn twice.
- ``mlflow``: ``MlflowClient`` logging to ``$MLFLOW_TRACKING_URI`` when set, else to the local store
  ``sqlite:///RUN_DIR/mlflow.db`` (MLflow 3 refuses new plain-folder stores); experiment = the run
  directory's name; params = the flattened config (``train.lr``, ...).
- ``wandb``: ``wandb.init(project=$WANDB_PROJECT or "babydistill", group=<run directory's name>,
  name=<stage>, dir=RUN_DIR)``; ``WANDB_MODE=offline`` works without an account or network.

A resumed stage continues the same MLflow / W&B run: their ids are kept in ``OUT_DIR/trackers.json``.
A tracker that cannot start (not installed, no server, no login) or fails while logging costs one
warning line, and training goes on without it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import time
import warnings
from pathlib import Path

TRACKERS = ("tensorboard", "mlflow", "wandb")
EXTRA = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
IDS_FILE = "trackers.json"


def _flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.001}}`` -> ``{"train.lr": "0.001"}``, the form MLflow's params take."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, type(None), bool)) else str(value)
    return flat


def record_metrics(record: dict) -> dict[str, float]:
    """A metrics.jsonl record -> tracker scalars (``train/loss``, ``val/loss``, ...)."""
    if record["kind"] == "val":
        return {"val/loss": record["val_loss"]}
    return {f"train/{key}": value for key, value in record.items()
            if key not in ("kind", "step") and isinstance(value, (int, float))}


# --- one class per tracker: start in __init__, log(metrics, step), close() ---------------------


class TensorBoard:
    def __init__(self, run_name: str, run_dir: Path, params: dict, start_step: int, ids: dict):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        kind, name = run_name.split(" ", 1)
        self.log_dir = run_dir / "tensorboard" / f"{kind}s" / name
        # purge_step: TensorBoard hides this folder's earlier events from that step on. The checkpoint at
        # start_step saw that step's records, so the replay starts after it (a fresh start hides them all).
        self.writer = SummaryWriter(str(self.log_dir), purge_step=start_step + 1)
        if start_step == 0:
            self.writer.add_text("config", "```\n" + json.dumps(params, indent=2) + "\n```", 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        if "val/loss" in metrics:
            self.writer.flush()  # evaluations are rare: make them visible at once

    def close(self) -> None:
        self.writer.close()


class MLflow:
    def __init__(self, run_name: str, run_dir: Path, params: dict, start_step: int, ids: dict):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        # its "Creating initial MLflow database tables" INFO lines go straight to the console on a new store
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        run_id = ids.get("mlflow")
        if run_id is None:
            experiment = self.client.get_experiment_by_name(run_dir.resolve().name)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(run_dir.resolve().name))
            run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            self.client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in _flatten(params).items()])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = ids["mlflow"] = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandB:
    def __init__(self, run_name: str, run_dir: Path, params: dict, start_step: int, ids: dict):
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "babydistill"), group=run_dir.resolve().name,
                              name=run_name, config=params, dir=str(run_dir), id=ids.get("wandb"), resume="allow",
                              reinit="finish_previous")
        ids["wandb"] = self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


CLASSES = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}


# --- the set the loop holds --------------------------------------------------------------------


def _warn(name: str, action: str, exc: BaseException) -> None:
    why = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
    hint = f"; pip install -e \".[{EXTRA[name]}]\"" if isinstance(exc, ImportError) else ""
    warnings.warn(f"train.trackers: {name} {action} ({why}); training goes on without it{hint}", stacklevel=3)


class Trackers:
    """The trackers of one training run. With none configured every call does nothing."""

    def __init__(self, names: list[str], *, run_name: str, run_dir: Path, out_dir: Path, params: dict,
                 start_step: int = 0):
        self.active: dict[str, object] = {}
        if not names:
            return
        run_dir, out_dir = Path(run_dir), Path(out_dir)
        self.ids_path = out_dir / IDS_FILE
        ids = json.loads(self.ids_path.read_text(encoding="utf-8")) if start_step > 0 and self.ids_path.is_file() else {}
        for name in names:
            try:
                self.active[name] = CLASSES[name](run_name, run_dir, params, start_step, ids)
            except Exception as exc:  # noqa: BLE001  (any failure to start is the tracker's, not training's)
                _warn(name, "could not start", exc)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.ids_path.write_text(json.dumps(ids) + "\n", encoding="utf-8")
        atexit.register(self.close)  # a run that stops on an error still flushes and ends its tracker runs

    def log(self, record: dict) -> None:
        """Send one metrics.jsonl record to every tracker."""
        if not self.active:
            return
        metrics = record_metrics(record)
        for name, tracker in list(self.active.items()):
            try:
                tracker.log(metrics, record["step"])
            except Exception as exc:  # noqa: BLE001
                _warn(name, "failed while logging and was dropped", exc)
                del self.active[name]

    def close(self) -> None:
        for name, tracker in list(self.active.items()):
            try:
                tracker.close()
            except Exception as exc:  # noqa: BLE001
                _warn(name, "failed to close", exc)
        self.active.clear()


def stage_run_name(out_dir: Path, stage: str | None) -> str:
    """``teacher t1`` from ``.../teachers/t1.partial`` (the folder the runner builds in) and the stage."""
    name = Path(out_dir).name.removesuffix(".partial")
    return f"{stage or 'model'} {name}"
