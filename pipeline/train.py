"""The training loop, shared by teachers (CE on token windows) and students (distillation).

A caller builds the model, a :class:`BatchSource` and a loss function, and hands them to
:func:`train_loop`; the loop owns everything else: optimizer, schedule, accumulation, clipping,
autocast, DDP, validation, logging, checkpoints, resume and the final Hugging Face export.

Global batch (DDP): one optimizer step consumes ``G = batch_size x grad_accum x world_size``
windows, positions ``[step_in_epoch * G, (step_in_epoch + 1) * G)`` of the epoch's order.
Micro-step ``m`` of rank ``r`` reads the ``batch_size`` positions starting at
``step_in_epoch * G + (m * world_size + r) * batch_size``. The step's gradient is the mean over
all G windows, so N processes with batch_size B match one process with batch_size N x B (or
grad_accum N x A) up to float summation order. The last partial global batch of an epoch is
dropped.

Resume: ``out_dir/trainer_state/step-000123/`` holds the weights, optimizer, grad scaler
(``*.pt``, loaded with ``weights_only=True``), the RNG states of every rank (safetensors + JSON:
nothing is unpickled) and ``meta.json`` (step, loop state, metrics.jsonl length, resolved
config, and the size and crc32 of every other file); ``COMPLETE`` is written last (with meta.json's crc32)
and the folder is renamed from ``*.tmp`` into place. A checkpoint is loaded all or nothing, after its
checksums; one that cannot be read or whose bytes changed is moved to ``trainer_state/unreadable/`` (never
deleted) and the previous one is tried; when none can be read, training refuses to start over until
``--force``. Folders without ``COMPLETE`` (a save cut short) are moved to ``trainer_state/incomplete/``.
The exported model records its files' checksums in ``checksums.json``, which ``load_model`` checks.
The learning rate is a pure function of the step and the data position a pure function of
(seed, epoch, step_in_epoch), so neither needs more state than the step.

Outputs in ``out_dir``: the HF checkpoint (``config.json``, ``model.safetensors``, tokenizer
files), ``metrics.jsonl``, ``run_config.json`` (the resolved run config) and
``train_summary.json`` (final/best validation loss, steps, hashes, ``extra_meta``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import json
import math
import os
import random
import resource
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from babydistill.pipeline import devices
from babydistill.pipeline.config import Config, TrainConfig, save_config
from babydistill.pipeline.evaluate import heldout_ce_totals
from babydistill.pipeline.model import autocast_context
from babydistill.pipeline.trackers import Trackers, stage_run_name
from babydistill.stores.checksum import changed_files, crc32, file_records
from babydistill.stores.tokens import TokenStore

STATE_DIR = "trainer_state"
COMPLETE = "COMPLETE"
METRICS = "metrics.jsonl"
UNREADABLE = "unreadable"
INCOMPLETE = "incomplete"
CHECKSUMS = "checksums.json"


class ChecksumError(Exception):
    """A checkpoint file's bytes differ from what was written (a flipped bit, a truncation): unreadable."""

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class TrainingError(ValueError):
    """Training cannot start or go on as asked (no checkpoint to resume, NaN loss, ...)."""


# --- batch sources ----------------------------------------------------------------------


class BatchSource(Protocol):
    """Where the loop's windows come from. Stateless addressing makes resume exact:
    the data position is (epoch, positions), nothing else."""

    num_windows: int
    """Windows in one epoch."""

    def batch(self, epoch: int, positions: np.ndarray) -> Batch:
        """The windows at ``positions`` of epoch ``epoch``'s order, as CPU tensors.

        Must hold ``input_ids`` [B, T] (used for validation shape and token counts); anything
        else (``labels``, teacher targets, ...) is for the loss function.
        """
        ...


def epoch_order(seed: int, epoch: int, num_windows: int) -> np.ndarray:
    """The permutation of window ids for one epoch, fixed by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_windows)


class TokenWindows:
    """Windows of one split of tokens.zarr, reshuffled every epoch from (seed, epoch).

    ``random_offset`` shifts every window by an offset in [0, seq_len) drawn per (seed, epoch,
    window), like the paper's dataset.
    """

    def __init__(self, tokens: TokenStore, split: str = "train", *, seed: int, random_offset: bool = False):
        self.tokens, self.split, self.seed, self.random_offset = tokens, split, seed, random_offset
        self.num_windows = tokens.num_windows(split)
        self._epoch: int | None = None

    def _epoch_tables(self, epoch: int) -> None:
        if self._epoch != epoch:
            self._order = epoch_order(self.seed, epoch, self.num_windows)
            self._offsets = (np.random.default_rng([self.seed, epoch, 1]).integers(0, self.tokens.seq_len,
                                                                                 self.num_windows)
                             if self.random_offset else None)
            self._epoch = epoch

    def batch(self, epoch: int, positions: np.ndarray) -> Batch:
        self._epoch_tables(epoch)
        ids = self._order[positions]
        offsets = self._offsets[ids] if self._offsets is not None else None
        windows_BT1 = torch.from_numpy(self.tokens.windows(self.split, ids, offsets))
        return {"input_ids": windows_BT1[:, :-1].contiguous(), "labels": windows_BT1[:, 1:].contiguous()}


def ce_loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean next-token cross-entropy over the batch's tokens (computed in fp32)."""
    logits_BTV = model(input_ids=batch["input_ids"]).logits
    loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), batch["labels"].flatten())
    return loss, {"ce": loss.detach()}


# --- setup: devices, processes, precision, optimizer, schedule --------------------------


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    try:
        return devices.resolve_device(name, "train.device", local_rank)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None


def setup_distributed(device: torch.device) -> Dist:
    """Join the process group when launched by torchrun (RANK / WORLD_SIZE set)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    initialized_here = not dist.is_initialized()
    if initialized_here:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world_size, local_rank, initialized_here)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32 (auto: bf16 on CUDA, fp16 on a GPU without bf16, fp32 on CPU)."""
    try:
        return devices.resolve_precision(precision, device, "train.precision")
    except ValueError as exc:
        raise TrainingError(str(exc)) from None


def compile_model(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """``torch.compile(model)`` when ``train.compile`` asks for it; refused in one line where this torch cannot
    compile (no C++ compiler on the CPU, an unsupported Python, ...)."""
    if not enabled:
        return model
    problem = compile_problem()
    if problem:
        raise TrainingError(f"train.compile=true: {problem}; set train.compile=false")
    return torch.compile(model)


def compile_problem() -> str | None:
    """Why torch.compile cannot run here, or None."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if sys.platform == "win32":
        return "torch.compile is not supported on Windows by this torch"
    try:
        importlib.import_module("torch._dynamo")
        importlib.import_module("torch._inductor")
    except ImportError as exc:
        return f"torch {torch.__version__} cannot compile ({exc})"
    if not torch.cuda.is_available() and not any(shutil.which(cc) for cc in ("cc", "gcc", "clang", "g++")):
        return "torch.compile on the CPU needs a C++ compiler (cc/gcc/clang), and none is on PATH"
    return None


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; like HF's Trainer, 1-D parameters (norm weights, biases) get no weight decay,
    matrices and embeddings do."""
    params = [p for p in model.parameters() if p.requires_grad]
    # A scaled output layer gets a group of its own (at scale 1 the groups, and so checkpoints, are as before).
    head = model.get_output_embeddings().weight if cfg.head_lr_scale != 1.0 else None
    decay = [p for p in params if p.dim() >= 2 and p is not head]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if head is not None:
        groups.append({"params": [head], "weight_decay": cfg.weight_decay, "lr_scale": cfg.head_lr_scale})
    # On CUDA the fused AdamW (one kernel for every parameter) is what a GPU user expects; it is not on the CPU.
    fused = all(p.device.type == "cuda" for p in params) or None
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def _head_lr_scale(param_groups: list[dict]) -> float:
    """The output layer's learning-rate scale of an optimizer's groups (1 when it has no group of its own)."""
    return next((float(g["lr_scale"]) for g in param_groups if "lr_scale" in g), 1.0)


def lr_at(step: int, cfg: TrainConfig, num_steps: int) -> float:
    """Linear warm-up over warmup_steps, then cosine from lr down to lr x min_lr_ratio at num_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, num_steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch on ``device``; on CUDA through pinned host memory, so the copies do not wait for the GPU."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[Batch],
                   loss_fn: LossFn, *, device: torch.device, amp_dtype: torch.dtype | None,
                   scaler: torch.amp.GradScaler | None, max_grad_norm: float
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """One optimizer step over the micro-batches (gradient accumulation); DDP syncs on the last.

    Returns the step's loss, its metrics (means over micro-batches) and the grad norm before
    clipping, all detached (no host sync here: call .item() only when logging).
    """
    num_micro = len(micro_batches)
    loss_sum = torch.zeros((), device=device)
    metric_sums: dict[str, torch.Tensor] = {}
    for m, batch in enumerate(micro_batches):
        batch = to_device(batch, device)
        sync = m == num_micro - 1 or not hasattr(model, "no_sync")
        with (contextlib.nullcontext() if sync else model.no_sync()):
            with autocast_context(device, amp_dtype):
                loss, metrics = loss_fn(model, batch)
            scaled = loss / num_micro
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.detach().float()
        for key, value in metrics.items():
            metric_sums[key] = metric_sums.get(key, 0) + value.detach().float()
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / num_micro, {k: v / num_micro for k, v in metric_sums.items()}, grad_norm.detach()


def validation_loss(model: torch.nn.Module, tokens: TokenStore, *, max_windows: int | None, batch_size: int,
                    amp_dtype: torch.dtype | None, ddp: Dist) -> float:
    """Mean token CE over the first ``max_windows`` validation windows, sharded over ranks (the held-out CE
    of ``pipeline.evaluate``, summed over ranks before dividing)."""
    num_windows = tokens.num_windows("validation")
    if max_windows is not None:
        num_windows = min(num_windows, max_windows)
    was_training = model.training
    model.eval()
    totals = heldout_ce_totals(model, tokens, "validation", np.arange(ddp.rank, num_windows, ddp.world_size),
                               batch_size, amp_dtype=amp_dtype)
    if ddp.world_size > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    return (totals[0] / totals[1]).item()


# --- checkpoints ------------------------------------------------------------------------


def _step_dir(state_dir: Path, step: int) -> Path:
    return state_dir / f"step-{step:06d}"


def complete_checkpoints(state_dir: Path) -> list[Path]:
    """Complete checkpoint folders (with their marker), oldest first."""
    if not state_dir.is_dir():
        return []
    found = [p for p in state_dir.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
             and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: p.name)


def _incomplete_checkpoints(state_dir: Path) -> list[Path]:
    if not state_dir.is_dir():
        return []
    return sorted(p for p in state_dir.glob("step-*") if p.is_dir() and not (p / COMPLETE).is_file())


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(legacy=False), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_rng(path: Path) -> None:
    """Every RNG state as tensors (safetensors) and JSON (its metadata): a resume unpickles nothing, so a
    checkpoint folder from someone else cannot run code."""
    state = _rng_state()
    version, python_key, python_gauss = state["python"]
    tensors = {"python": torch.tensor(python_key, dtype=torch.int64),
               "numpy": torch.from_numpy(state["numpy"]["state"]["key"].astype(np.int64)),
               "torch": state["torch"]}
    for i, cuda in enumerate(state["cuda"] or []):
        tensors[f"cuda{i}"] = cuda
    meta = {"python_version": version, "python_gauss": python_gauss, "numpy_pos": state["numpy"]["state"]["pos"],
            "numpy_has_gauss": state["numpy"]["has_gauss"], "numpy_gauss": state["numpy"]["gauss"],
            "num_cuda": len(state["cuda"] or [])}
    save_file(tensors, str(path), metadata={"rng": json.dumps(meta)})


def _load_rng(path: Path) -> dict:
    """The RNG state saved by ``_save_rng`` (checked for shape, not applied)."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["rng"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    python_key, numpy_key = tensors["python"].tolist(), tensors["numpy"].numpy()
    if len(python_key) != 625 or numpy_key.shape != (624,) or tensors["torch"].dtype != torch.uint8:
        raise ValueError(f"{path}: not an RNG state")
    return {"python": (meta["python_version"], tuple(python_key), meta["python_gauss"]),
            "numpy": {"bit_generator": "MT19937", "state": {"key": numpy_key.astype(np.uint32), "pos": meta["numpy_pos"]},
                      "has_gauss": meta["numpy_has_gauss"], "gauss": meta["numpy_gauss"]},
            "torch": tensors["torch"],
            "cuda": [tensors[f"cuda{i}"] for i in range(meta["num_cuda"])] if meta["num_cuda"] else None}


def _barrier(ddp: Dist) -> None:
    if ddp.world_size > 1:
        dist.barrier()


def save_checkpoint(state_dir: Path, step: int, raw_model: torch.nn.Module, optimizer, scaler, meta: dict,
                    ddp: Dist) -> Path:
    """Write step-N.tmp/ (every rank its RNG state; rank 0 the rest), mark it complete, rename."""
    final = _step_dir(state_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if ddp.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(ddp)
    try:
        _save_rng(tmp / f"rng-rank{ddp.rank}.safetensors")
        _barrier(ddp)
        if ddp.main:
            torch.save(raw_model.state_dict(), tmp / "model.pt")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            if scaler is not None:
                torch.save(scaler.state_dict(), tmp / "scaler.pt")
            files = sorted(p.name for p in tmp.iterdir() if p.suffix in (".pt", ".safetensors"))
            meta_text = json.dumps({**meta, "files": file_records(tmp, files)}, indent=2, sort_keys=True) + "\n"
            (tmp / "meta.json").write_text(meta_text, encoding="utf-8")
            complete = {"step": step, "meta_crc32": f"{crc32(meta_text.encode()):08x}"}
            (tmp / COMPLETE).write_text(json.dumps(complete) + "\n", encoding="utf-8")  # last: the folder is whole
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except (OSError, RuntimeError) as exc:  # disk full or an I/O error (torch.save reports it as RuntimeError)
        shutil.rmtree(tmp, ignore_errors=True)
        why = " ".join(str(exc).split())[:300]
        raise TrainingError(f"{final}: writing the checkpoint failed ({why}); the previous checkpoints are kept: "
                            f"free space and resume with --resume") from exc
    _barrier(ddp)
    return final


def _load_checkpoint(folder: Path, fingerprint: dict, raw_model, optimizer, scaler, ddp: Dist) -> dict:
    """Load a checkpoint all or nothing: every file is read first (tensors with ``weights_only=True`` or
    safetensors, the rest JSON: nothing is unpickled), then applied; if applying fails, the model,
    optimizer, scaler and RNG states are put back as they were."""
    meta = checked_meta(folder)
    if meta["fingerprint"] != fingerprint:
        raise TrainingError(f"{folder} was written for another model, data or global batch "
                            f"({meta['fingerprint']} vs {fingerprint}); use --force to start over")
    model_state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    optimizer_state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    saved_scale, scale = _head_lr_scale(optimizer_state["param_groups"]), _head_lr_scale(optimizer.param_groups)
    if (saved_scale == 1.0) != (scale == 1.0):  # the output layer moved between groups: its state cannot follow
        raise TrainingError(f"{folder} was written with train.head_lr_scale = {saved_scale:g}, this run has "
                            f"{scale:g}; resume with {saved_scale:g}, or use --force to start over")
    rng_file = folder / f"rng-rank{ddp.rank}.safetensors"
    # a checkpoint written by fewer processes has no RNG state for this rank: keep the seeded one
    rng = _load_rng(rng_file) if rng_file.is_file() else None
    if rng is None and (folder / f"rng-rank{ddp.rank}.pt").is_file():
        warnings.warn(f"{folder}: RNG state pickled by an older babydistill, not loaded (pickle can run code); "
                      f"random draws after the resume differ from an uninterrupted run", stacklevel=3)
    scaler_state = (torch.load(folder / "scaler.pt", weights_only=True)
                    if scaler is not None and (folder / "scaler.pt").is_file() else None)
    before = ({k: v.detach().to("cpu", copy=True) for k, v in raw_model.state_dict().items()},
              copy.deepcopy(optimizer.state_dict()), scaler.state_dict() if scaler is not None else None,
              _rng_state())
    try:
        raw_model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        for group in optimizer.param_groups:  # the config's scale, like its lr, not the checkpoint's
            if "lr_scale" in group:
                group["lr_scale"] = scale
        if scaler_state is not None:
            scaler.load_state_dict(scaler_state)
        if rng is not None:
            _set_rng_state(rng)
    except Exception:
        raw_model.load_state_dict(before[0])
        optimizer.load_state_dict(before[1])
        if scaler is not None:
            scaler.load_state_dict(before[2])
        _set_rng_state(before[3])
        raise
    return meta


def checked_meta(folder: Path) -> dict:
    """A checkpoint's meta.json, after checking it and every file it lists against the checksums written with
    them (checkpoints written before checksums have none to check). Raises ChecksumError on a change."""
    meta_bytes = (folder / "meta.json").read_bytes()
    complete = (folder / COMPLETE).read_text(encoding="utf-8", errors="replace").strip()
    if not complete.isdigit():  # a bare step number: written before checksums, nothing to check
        try:
            sealed_by = json.loads(complete)
            recorded, step = sealed_by["meta_crc32"], sealed_by["step"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ChecksumError(f"{COMPLETE} changed after it was written ({type(exc).__name__})") from None
        if f"{crc32(meta_bytes):08x}" != recorded:
            raise ChecksumError(f"meta.json changed after it was written (crc32 {crc32(meta_bytes):08x}, "
                                f"{recorded} written)")
        if json.loads(meta_bytes).get("step") != step:
            raise ChecksumError(f"{COMPLETE} names step {step}, meta.json another")
    meta = json.loads(meta_bytes)
    changed = changed_files(folder, meta.get("files", {}))
    if changed:
        raise ChecksumError(f"files changed after they were written: {', '.join(changed)}")
    return meta


def write_model_checksums(out_dir: Path, names: list[str]) -> None:
    """``checksums.json`` beside an exported model: size and crc32 of each file of the model (``names``)."""
    (Path(out_dir) / CHECKSUMS).write_text(json.dumps(file_records(out_dir, sorted(names)), indent=2) + "\n",
                                           encoding="utf-8")


def move_to_free_name(path: Path, target: Path) -> Path:
    """Move ``path`` to ``target``, or ``target-1``, ``target-2`` ... when taken (never over anything); returns
    where it went."""
    free = target
    for n in range(1, 1000):
        if not free.exists():
            break
        free = target.with_name(f"{target.name}-{n}")
    free.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, free)
    return free


def _move_into(folder: Path, aside: Path) -> Path:
    """Move ``folder`` into ``aside/`` under its own name; never deleted."""
    return move_to_free_name(folder, aside / folder.name)


def prune_checkpoints(state_dir: Path, keep: int, best_step: int | None) -> None:
    """Keep the newest ``keep`` complete checkpoints and the best-weights files they refer to."""
    complete = complete_checkpoints(state_dir)
    kept, dropped = complete[-keep:], complete[:-keep]
    newest = kept[-1].name if kept else ""
    for folder in dropped:  # complete and superseded: keep_checkpoints says how many stay
        shutil.rmtree(folder, ignore_errors=True)
    for folder in [p for p in _incomplete_checkpoints(state_dir) if p.name < newest]:
        _move_into(folder, state_dir / INCOMPLETE)
    referenced = {best_step}
    for folder in kept:
        referenced.add(json.loads((folder / "meta.json").read_text(encoding="utf-8")).get("best_step"))
    for path in state_dir.glob("best-step-*.pt"):
        if int(path.stem.split("-")[-1]) not in referenced:
            path.unlink()


def _save_best(state_dir: Path, step: int, raw_model) -> None:
    path = state_dir / f"best-step-{step:06d}.pt"
    torch.save(raw_model.state_dict(), path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def _resume_candidates(resume, state_dir: Path, out_dir: Path) -> list[Path]:
    """Checkpoint folders to try, newest first; [] = start fresh. Raises on a mode it cannot honour."""
    if resume not in (False, True, "auto"):
        folder = Path(resume)
        if not (folder / COMPLETE).is_file():
            raise TrainingError(f"{folder}: not a complete checkpoint folder (no {COMPLETE} marker)")
        return [folder]
    for folder in _incomplete_checkpoints(state_dir):
        if not folder.name.endswith(".tmp"):
            warnings.warn(f"{folder}: incomplete checkpoint (no {COMPLETE} marker), skipped", stacklevel=3)
    complete = complete_checkpoints(state_dir)[::-1]
    if resume is False and complete:
        raise TrainingError(f"{out_dir} already has checkpoints (newest {complete[0].name}); "
                            f"pass --resume to continue or --force to start over")
    aside = state_dir / UNREADABLE
    if resume is True and not complete and aside.is_dir() and any(aside.iterdir()):
        raise TrainingError(f"no readable checkpoint in {state_dir} (unreadable ones are in {aside}); "
                            f"pass --force to start over, which discards them")
    if resume is True and not complete:
        raise TrainingError(f"no checkpoint in {state_dir}; use --resume auto to start fresh")
    return complete


# --- logging ----------------------------------------------------------------------------


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


def _metrics_file_reset(path: Path, length: int) -> None:
    """Cut metrics.jsonl back to what the checkpoint saw (the lines after it are redone)."""
    if path.exists():
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


# --- the loop's pieces ------------------------------------------------------------------


@dataclass
class RunPlan:
    """What the loop runs on and for how long, fixed before the first step."""
    device: torch.device
    amp_dtype: torch.dtype | None
    ddp: Dist
    global_batch: int
    """Windows per optimizer step over all processes: batch_size x grad_accum x world_size."""
    steps_per_epoch: int
    num_steps: int
    fingerprint: dict
    """What a checkpoint must have been written for, to be resumed."""


def plan_run(config: Config, batches: BatchSource, tokens: TokenStore) -> RunPlan:
    """Threads, device, precision, processes and the batch arithmetic; refuses data that cannot fill a step."""
    cfg = config.train
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    amp_dtype = resolve_precision(cfg.precision, device)
    ddp = setup_distributed(device)
    global_batch = cfg.batch_size * cfg.grad_accum * ddp.world_size
    steps_per_epoch = batches.num_windows // global_batch
    if steps_per_epoch == 0:
        raise TrainingError(f"the training data has {batches.num_windows} windows, fewer than one global batch "
                            f"(train.batch_size x train.grad_accum x processes = {global_batch}); "
                            f"lower train.batch_size or add data")
    if tokens.num_windows("validation") == 0:
        raise TrainingError(f"{tokens.path}: the validation split has no window of data.seq_len={tokens.seq_len} "
                            f"tokens; raise data.validation_fraction or lower data.seq_len")
    num_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        num_steps = min(num_steps, cfg.max_steps)
    fingerprint = {"model": config.section_hash("model", "tokenizer", "data"), "tokens_hash": tokens.tokens_hash,
                   "global_batch": global_batch}
    return RunPlan(device, amp_dtype, ddp, global_batch, steps_per_epoch, num_steps, fingerprint)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def restore(resume, out_dir: Path, plan: RunPlan, model, optimizer, scaler) -> tuple[dict | None, Path | None]:
    """Load the checkpoint that ``resume`` asks for: (its meta, its folder), or (None, None) to start fresh.

    Tries the candidates newest first; one that cannot be read is moved to ``trainer_state/unreadable/``
    and the previous one is tried. Never starts over on top of checkpoints that could not be read.
    """
    state_dir, ddp = out_dir / STATE_DIR, plan.ddp
    meta, resumed_from, unreadable = None, None, []
    for folder in _resume_candidates(resume, state_dir, out_dir):
        try:
            meta = _load_checkpoint(folder, plan.fingerprint, model, optimizer, scaler, ddp)
        except TrainingError:
            raise
        except Exception as exc:  # a truncated or garbled file: move it aside, fall back to the previous one
            first_sentence = " ".join(str(exc).split()).split(". ")[0][:200]  # torch's load errors run for lines
            unreadable.append((folder, f"{type(exc).__name__}: {first_sentence}"))
            continue
        resumed_from = folder
        break
    _barrier(ddp)  # every rank has read its state before rank 0 touches the folder
    aside = state_dir / UNREADABLE
    if ddp.main:
        for folder, why in unreadable:
            if folder.parent != state_dir:
                continue  # a folder passed by path stays where its owner put it
            target = _move_into(folder, aside)
            warnings.warn(f"{folder}: unreadable checkpoint ({why}); moved to {target}", stacklevel=3)
    if meta is None and unreadable and unreadable[-1][0].parent != state_dir:
        raise TrainingError(f"{unreadable[-1][0]}: unreadable checkpoint ({unreadable[-1][1]})")
    if meta is None and (unreadable or (aside.is_dir() and any(aside.iterdir()))):
        # Never start over on top of checkpoints that could not be read: that is for the user to decide.
        raise TrainingError(f"no readable checkpoint in {state_dir} (unreadable ones are in {aside}); "
                            f"pass --force to start over, which discards them")
    _barrier(ddp)
    return meta, resumed_from


def _loop_start(meta: dict | None, resumed_from: Path | None, plan: RunPlan) -> tuple[int, dict]:
    """The step to start from and the loop state (best and last validation loss): fresh, or the checkpoint's."""
    start_step = meta["step"] if meta else 0
    if start_step > plan.num_steps:
        raise TrainingError(f"{resumed_from} is at step {start_step}, past this run's {plan.num_steps} steps "
                            f"(train.epochs / train.max_steps were lowered); raise them or use --force to start over")
    if plan.ddp.main and meta is not None:
        print(f"resuming from {resumed_from} (step {start_step}/{plan.num_steps})", flush=True)
    return start_step, meta["loop"] if meta else {"best_val_loss": None, "best_step": None, "last_val_loss": None}


def _prepare_out_dir(out_dir: Path, meta: dict | None, run_config: Config, ddp: Dist) -> None:
    """Rank 0: a fresh start empties metrics.jsonl; a resume cuts metrics.jsonl back to what its checkpoint saw.
    Checkpoint folders without COMPLETE (a save cut short, *.tmp or not) move to trainer_state/incomplete/,
    never deleted. Either way the resolved config is written."""
    state_dir, metrics_path = out_dir / STATE_DIR, out_dir / METRICS
    if ddp.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for folder in _incomplete_checkpoints(state_dir):
            _move_into(folder, state_dir / INCOMPLETE)
        if meta is None:
            metrics_path.write_text("", encoding="utf-8")
        else:
            _metrics_file_reset(metrics_path, meta["metrics_bytes"])
        state_dir.mkdir(parents=True, exist_ok=True)
        save_config(run_config, out_dir / "run_config.json")
    _barrier(ddp)


def _micro_batches(batches: BatchSource, epoch: int, step_in_epoch: int, cfg: TrainConfig, plan: RunPlan
                   ) -> list[Batch]:
    """This rank's micro-batches of one optimizer step (the layout in the module docstring)."""
    base = step_in_epoch * plan.global_batch
    starts = (base + (m * plan.ddp.world_size + plan.ddp.rank) * cfg.batch_size for m in range(cfg.grad_accum))
    return [batches.batch(epoch, np.arange(start, start + cfg.batch_size)) for start in starts]


def _synced_losses(loss: torch.Tensor, metrics: dict[str, torch.Tensor], step: int, state_dir: Path,
                   ddp: Dist) -> torch.Tensor:
    """The step's loss and metrics, mean over ranks: the one host sync per step. All ranks must agree to
    stop, and a NaN must never reach a checkpoint, so a non-finite loss stops every rank here."""
    reduced = torch.stack([loss, *metrics.values()])
    if ddp.world_size > 1:
        dist.all_reduce(reduced)
        reduced /= ddp.world_size
    if not torch.isfinite(reduced[0]):
        latest = complete_checkpoints(state_dir)
        raise TrainingError(f"step {step + 1}: loss is {reduced[0].item()}; stopped, the last good checkpoint "
                            f"is {latest[-1] if latest else 'none'}; lower train.lr or check the data")
    return reduced


def _update_best(loop: dict, step: int, val: float, keep_best: bool, state_dir: Path, model, ddp: Dist) -> None:
    loop["last_val_loss"] = val
    if loop["best_val_loss"] is None or val < loop["best_val_loss"]:
        loop["best_val_loss"], loop["best_step"] = val, step
        if keep_best and ddp.main:
            _save_best(state_dir, step, model)


def _save(state_dir: Path, step: int, plan: RunPlan, cfg: TrainConfig, loop: dict, log: MetricsLog,
          run_config: Config, model, optimizer, scaler) -> None:
    """A checkpoint of this step (everything a resume needs), then prune the old ones."""
    epoch, step_in_epoch = divmod(step, plan.steps_per_epoch)
    meta = {"step": step, "epoch": epoch, "step_in_epoch": step_in_epoch, "num_steps": plan.num_steps,
            "world_size": plan.ddp.world_size, "fingerprint": plan.fingerprint, "loop": loop,
            "best_step": loop["best_step"] if cfg.keep_best else None, "metrics_bytes": log.tell(),
            "config": run_config.to_dict()}
    save_checkpoint(state_dir, step, model, optimizer, scaler, meta, plan.ddp)
    if plan.ddp.main:
        prune_checkpoints(state_dir, cfg.keep_checkpoints, meta["best_step"])


def _export(out_dir: Path, tokenizer_dir: Path, model, plan: RunPlan, cfg: TrainConfig, loop: dict, *, seed: int,
            tokens: TokenStore, extra_meta: dict | None) -> None:
    """Rank 0: the HF checkpoint (the best weights with keep_best) and train_summary.json."""
    if not plan.ddp.main:
        return
    if cfg.keep_best and loop["best_step"] is not None:
        best = torch.load(out_dir / STATE_DIR / f"best-step-{loop['best_step']:06d}.pt", map_location="cpu",
                          weights_only=True)
        model.load_state_dict(best)
    write_model_checksums(out_dir, export_hf(model, out_dir, tokenizer_dir))
    summary = {"seed": seed, "num_steps": plan.num_steps, "steps_per_epoch": plan.steps_per_epoch,
               "global_batch": plan.global_batch, "world_size": plan.ddp.world_size,
               "final_val_loss": loop["last_val_loss"], "best_val_loss": loop["best_val_loss"],
               "best_step": loop["best_step"], "exported": "best" if cfg.keep_best else "final",
               "tokens_hash": tokens.tokens_hash, "tokenizer_hash": tokens.tokenizer_hash, **(extra_meta or {})}
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"done: {plan.num_steps} steps, val_loss {loop['last_val_loss']:.4f}"
          + (f" (best {loop['best_val_loss']:.4f} at step {loop['best_step']})" if cfg.keep_best else ""),
          flush=True)


# --- the loop ---------------------------------------------------------------------------


def _metrics_log(run_config: Config, out_dir: Path, plan: RunPlan, start_step: int,
                 extra_meta: dict | None) -> MetricsLog:
    """metrics.jsonl, the console and the trackers of ``train.trackers`` (rank 0 only), named after the stage."""
    cfg = run_config.train
    trackers = Trackers(cfg.trackers if plan.ddp.main else [],
                        run_name=stage_run_name(out_dir, (extra_meta or {}).get("stage")), run_dir=run_config.run_path,
                        out_dir=out_dir, params=run_config.to_dict(), start_step=start_step)
    return MetricsLog(out_dir / METRICS, num_steps=plan.num_steps, steps_per_epoch=plan.steps_per_epoch,
                      num_epochs=cfg.epochs, device=plan.device, main=plan.ddp.main, trackers=trackers)


def train_loop(config: Config, model: torch.nn.Module, batches: BatchSource, loss_fn: LossFn, out_dir: Path, *,
               seed: int, resume: bool | str | Path = False, tokens: TokenStore, tokenizer_dir: Path,
               extra_meta: dict | None = None, on_validation: Callable[[int, float], None] | None = None) -> Path:
    """Train ``model`` on ``batches`` with ``loss_fn`` and export it to ``out_dir``; returns ``out_dir``.

    ``resume``: False = start fresh (refuse if complete checkpoints exist), True = the newest complete
    checkpoint (refuse if none), "auto" = it if one exists, or a path to one ``step-N`` folder.
    Only rank 0 writes files and prints. The run lasts ``train.epochs x steps_per_epoch`` optimizer
    steps, capped by ``train.max_steps`` (the cosine schedule spans exactly that); the metrics.jsonl
    records are ``MetricsLog``'s.

    ``on_validation(step, val_loss)`` is called on every rank after each validation (a sweep reports it to
    its pruner); an exception it raises ends training there, before that step's checkpoint and export.
    """
    cfg = config.train
    out_dir = Path(out_dir)
    state_dir = out_dir / STATE_DIR
    run_config = dataclasses.replace(config, train=dataclasses.replace(cfg, seed=seed))
    plan = plan_run(config, batches, tokens)
    ddp, num_steps, steps_per_epoch = plan.ddp, plan.num_steps, plan.steps_per_epoch
    _seed_everything(seed)
    model.to(plan.device)
    model.train()
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda") if plan.amp_dtype == torch.float16 else None

    # --- resume or start fresh ---
    meta, resumed_from = restore(resume, out_dir, plan, model, optimizer, scaler)
    _prepare_out_dir(out_dir, meta, run_config, ddp)
    start_step, loop = _loop_start(meta, resumed_from, plan)
    train_model = compile_model(model, cfg.compile)  # shares the parameters: checkpoints save `model`
    if ddp.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[plan.device.index] if plan.device.type == "cuda" else None)
    log = _metrics_log(run_config, out_dir, plan, start_step, extra_meta)

    # --- loop ---
    step = start_step
    while True:
        last_step = step == num_steps
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        epoch_end = step_in_epoch == 0 and step > 0
        if step > start_step:  # the resumed step was evaluated and saved before it was written
            if last_step or epoch_end or (cfg.eval_every is not None and step % cfg.eval_every == 0):
                val = validation_loss(model, tokens, max_windows=cfg.eval_windows, batch_size=cfg.batch_size,
                                      amp_dtype=plan.amp_dtype, ddp=ddp)
                log.val(step, val)
                if on_validation is not None:
                    on_validation(step, val)
                _update_best(loop, step, val, cfg.keep_best, state_dir, model, ddp)
            if last_step or epoch_end or step % cfg.save_every == 0:
                _save(state_dir, step, plan, cfg, loop, log, run_config, model, optimizer, scaler)
        if last_step:
            break
        if log.bar is None or step_in_epoch == 0:
            log.start_epoch(epoch, step_in_epoch)

        # one optimizer step
        t0 = time.perf_counter()
        lr = lr_at(step, cfg, num_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        micro_batches = _micro_batches(batches, epoch, step_in_epoch, cfg, plan)
        loss, metrics, grad_norm = optimizer_step(train_model, optimizer, micro_batches, loss_fn, device=plan.device,
                                                  amp_dtype=plan.amp_dtype, scaler=scaler,
                                                  max_grad_norm=cfg.max_grad_norm)
        reduced = _synced_losses(loss, metrics, step, state_dir, ddp)
        step += 1
        log.step_done(sum(b["input_ids"].numel() for b in micro_batches) * ddp.world_size, time.perf_counter() - t0)
        if step % cfg.log_every == 0 or step == num_steps:
            log.train(step, lr, reduced.tolist(), list(metrics), grad_norm.item())

    # --- summary and export ---
    log.close()
    _export(out_dir, tokenizer_dir, model, plan, cfg, loop, seed=seed, tokens=tokens, extra_meta=extra_meta)
    _barrier(ddp)
    if ddp.initialized_here:
        dist.destroy_process_group()
    return out_dir


def export_hf(model: torch.nn.Module, out_dir: Path, tokenizer_dir: Path) -> list[str]:
    """A plain Hugging Face checkpoint: config.json, model.safetensors and the run's tokenizer files.
    Returns the names of the files it wrote."""
    model.save_pretrained(out_dir)
    written = [p.name for p in Path(out_dir).iterdir() if p.is_file() and (
        p.suffix == ".safetensors" or p.name in ("config.json", "generation_config.json", "model.safetensors.index.json"))]
    for path in Path(tokenizer_dir).iterdir():
        if path.is_file() and not path.name.startswith("stage."):  # the tokenizer stage's marker is not the model's
            shutil.copy2(path, out_dir / path.name)
            written.append(path.name)
    return sorted(set(written))
