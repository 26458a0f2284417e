"""Where the loop's numbers go: ``metrics.jsonl``, one console line per logged step, a progress bar per epoch
and the experiment trackers of ``train.trackers`` (rank 0 only)."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from babydistill.pipeline.trackers import Trackers

METRICS = "metrics.jsonl"


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def format_log_line(step: int, num_steps: int, loss: float, metrics: dict[str, float], lr: float, dt: float,
                    tokens_per_second: float, mem_gb: float) -> str:
    """``step 120/800 | loss 3.412 (ce 3.100 kl 0.312) | lr 6.9e-04 | dt 210ms | tok/s 9,750 | mem 1.2GB``"""
    split = " ".join(f"{k} {v:.3f}" for k, v in metrics.items())
    return (f"step {step}/{num_steps} | loss {loss:.3f}" + (f" ({split})" if split else "")
            + f" | lr {lr:.1e} | dt {dt * 1000:.0f}ms | tok/s {tokens_per_second:,.0f} | mem {mem_gb:.1f}GB")


def reset_metrics_file(path: Path, length: int | None) -> None:
    """Empty metrics.jsonl for a fresh start (``length`` None), or cut it back to the ``length`` bytes a
    resumed checkpoint saw (the lines after it are redone)."""
    if length is None:
        path.write_text("", encoding="utf-8")
    elif path.exists():
        with path.open("r+b") as f:
            f.truncate(length)


def _tqdm_write(line: str, bar) -> None:
    if bar is not None and not bar.disable:
        bar.write(line)
    else:
        print(line, flush=True)


class MetricsLog:
    """Where the loop's numbers go: ``metrics.jsonl``, the console line and the progress bar (rank 0 only).

    ``train`` and ``val`` build the one record of a logged step or an evaluation; whatever else
    should see those numbers (an experiment tracker, a pruning callback) hooks in there, so it sees
    exactly what the log line and metrics.jsonl show. Records: ``{"kind": "train", "step", "epoch"
    (fractional epochs done), "lr", "loss", "tokens_per_second", <loss_fn metrics>, "grad_norm"}``
    every ``train.log_every`` steps and ``{"kind": "val", "step", "epoch", "val_loss"}``.
    """

    def __init__(self, path: Path, *, num_steps: int, steps_per_epoch: int, num_epochs: int, device: torch.device,
                 main: bool, trackers: Trackers | None = None):
        self.num_steps, self.steps_per_epoch, self.num_epochs = num_steps, steps_per_epoch, num_epochs
        self.device, self.main = device, main
        self.file = path.open("ab") if main else None
        self.trackers = trackers  # train.trackers: TensorBoard / MLflow / W&B get every record metrics.jsonl gets
        self.bar = None
        self.window_tokens, self.window_time, self.window_steps = 0, 0.0, 0  # since the last train record

    def tell(self) -> int:
        """Bytes written so far: a checkpoint records it, so a resume cuts the file back to it."""
        return self.file.tell() if self.file is not None else 0

    def _write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write((json.dumps(record) + "\n").encode("utf-8"))
            self.file.flush()
            if self.trackers is not None:
                self.trackers.log(record)

    def start_epoch(self, epoch: int, step_in_epoch: int) -> None:
        """A progress bar per epoch (on a terminal only)."""
        if self.bar is not None:
            self.bar.close()
        self.bar = tqdm(total=self.steps_per_epoch, initial=step_in_epoch, desc=f"epoch {epoch + 1}/{self.num_epochs}",
                        unit="step", disable=not self.main or not sys.stderr.isatty(), leave=False)

    def step_done(self, num_tokens: int, seconds: float) -> None:
        self.window_tokens += num_tokens
        self.window_time += seconds
        self.window_steps += 1
        self.bar.update(1)

    def train(self, step: int, lr: float, losses: list[float], metric_names: list[str], grad_norm: float) -> dict:
        """The record of a logged step: ``losses`` are the step's loss and its metrics, mean over ranks."""
        tokens_per_second = self.window_tokens / max(self.window_time, 1e-9)
        metrics = dict(zip(metric_names, losses[1:]))
        record = {"kind": "train", "step": step, "epoch": step / self.steps_per_epoch, "lr": lr, "loss": losses[0],
                  "tokens_per_second": tokens_per_second, **metrics, "grad_norm": grad_norm}
        self._write(record)
        if self.main:
            _tqdm_write(format_log_line(step, self.num_steps, losses[0], metrics, lr,
                                        self.window_time / self.window_steps, tokens_per_second,
                                        _peak_memory_gb(self.device)), self.bar)
            self.bar.set_postfix(loss=f"{losses[0]:.3f}", lr=f"{lr:.1e}", tok_s=f"{tokens_per_second:,.0f}")
        self.window_tokens, self.window_time, self.window_steps = 0, 0.0, 0
        return record

    def val(self, step: int, val_loss: float) -> dict:
        """The record of an evaluation."""
        record = {"kind": "val", "step": step, "epoch": step / self.steps_per_epoch, "val_loss": val_loss}
        self._write(record)
        if self.main:
            _tqdm_write(f"step {step}/{self.num_steps} | val_loss {val_loss:.4f}", self.bar)
        return record

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.trackers is not None:
            self.trackers.close()

