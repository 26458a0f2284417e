"""The training loop, shared by teachers (CE on token windows) and students (distillation).

A caller builds the model, a :class:`BatchSource` and a loss function, and hands them to :func:`train_loop`,
which composes the components beside this module: ``runtime`` (device, precision, DDP, compile),
``optimizer`` (AdamW and the schedule), ``windows`` (which windows a step reads), ``checkpoint``
(save, resume, export) and ``metrics`` (metrics.jsonl, the console, trackers).

Outputs in ``out_dir``: the HF checkpoint (``config.json``, ``model.safetensors``, tokenizer
files), ``metrics.jsonl``, ``run_config.json`` (the resolved run config), ``trainer_state/`` (the
checkpoints) and ``train_summary.json`` (final/best validation loss, steps, hashes, ``extra_meta``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from babydistill.pipeline.config import Config, save_config
from babydistill.pipeline.evaluate import heldout_ce_totals
from babydistill.pipeline.model import autocast_context
from babydistill.pipeline.stages import STAGE_SECTIONS
from babydistill.pipeline.trackers import Trackers, stage_run_name
from babydistill.pipeline.training.checkpoint import (
    INCOMPLETE,
    STATE_DIR,
    UNREADABLE,
    complete_checkpoints,
    export_model,
    incomplete_checkpoints,
    load_checkpoint,
    move_into,
    no_readable_checkpoint,
    prune_checkpoints,
    resume_candidates,
    save_best,
    save_checkpoint,
)
from babydistill.pipeline.training.metrics import METRICS, MetricsLog, reset_metrics_file
from babydistill.pipeline.training.optimizer import build_optimizer, lr_at, set_lr
from babydistill.pipeline.training.runtime import (
    Dist,
    TrainingError,
    barrier,
    leave_distributed,
    parallel_model,
    resolve_device,
    resolve_precision,
    seed_everything,
    setup_distributed,
)
from babydistill.pipeline.training.windows import Batch, BatchSource, LossFn, micro_batches, to_device
from babydistill.stores.tokens import TokenStore

# --- the run ------------------------------------------------------------------------------


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
    fingerprint = {"model": config.section_hash(*STAGE_SECTIONS["checkpoint"]), "tokens_hash": tokens.tokens_hash,
                   "global_batch": global_batch}
    return RunPlan(device, amp_dtype, ddp, global_batch, steps_per_epoch, num_steps, fingerprint)


@dataclass
class Run:
    """One run's fixed parts, from the first step to the export: what the steps, saves and export read."""
    config: Config
    """The resolved config: ``train.seed`` is this run's seed (run_config.json, every checkpoint's meta)."""
    plan: RunPlan
    out_dir: Path
    tokens: TokenStore
    model: torch.nn.Module
    """The model as built (neither compiled nor wrapped in DDP): what checkpoints and the export save."""
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    """fp16 only: the gradient scaler."""

    @property
    def state_dir(self) -> Path:
        return self.out_dir / STATE_DIR


def _start_run(config: Config, model: torch.nn.Module, out_dir: Path, seed: int, batches: BatchSource,
               tokens: TokenStore) -> Run:
    """Plan the run and seed every RNG, then put the model on its device and build the optimizer (and the fp16
    gradient scaler)."""
    run_config = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))
    plan = plan_run(config, batches, tokens)
    seed_everything(seed)
    model.to(plan.device)
    model.train()
    optimizer = build_optimizer(model, config.train)
    scaler = torch.amp.GradScaler("cuda") if plan.amp_dtype == torch.float16 else None
    return Run(run_config, plan, Path(out_dir), tokens, model, optimizer, scaler)


# --- resume or start fresh ------------------------------------------------------------------


def restore(resume, run: Run) -> tuple[dict | None, Path | None]:
    """Load the checkpoint that ``resume`` asks for: (its meta, its folder), or (None, None) to start fresh.

    Tries the candidates newest first; one that cannot be read is moved to ``trainer_state/unreadable/``
    and the previous one is tried. Never starts over on top of checkpoints that could not be read.
    """
    state_dir, ddp = run.state_dir, run.plan.ddp
    meta, resumed_from, unreadable = None, None, []
    for folder in resume_candidates(resume, state_dir, run.out_dir):
        try:
            meta = load_checkpoint(folder, run.plan.fingerprint, run.model, run.optimizer, run.scaler, ddp)
        except TrainingError:
            raise
        except Exception as exc:  # a truncated or garbled file: move it aside, fall back to the previous one
            first_sentence = " ".join(str(exc).split()).split(". ")[0][:200]  # torch's load errors run for lines
            unreadable.append((folder, f"{type(exc).__name__}: {first_sentence}"))
            continue
        resumed_from = folder
        break
    barrier(ddp)  # every rank has read its state before rank 0 touches the folder
    aside = state_dir / UNREADABLE
    if ddp.main:
        for folder, why in unreadable:
            if folder.parent != state_dir:
                continue  # a folder passed by path stays where its owner put it
            target = move_into(folder, aside)
            warnings.warn(f"{folder}: unreadable checkpoint ({why}); moved to {target}", stacklevel=3)
    if meta is None and unreadable and unreadable[-1][0].parent != state_dir:
        raise TrainingError(f"{unreadable[-1][0]}: unreadable checkpoint ({unreadable[-1][1]})")
    if meta is None and (unreadable or (aside.is_dir() and any(aside.iterdir()))):
        raise no_readable_checkpoint(state_dir)
    barrier(ddp)
    return meta, resumed_from


def _prepare_out_dir(run: Run, meta: dict | None) -> None:
    """Rank 0: a fresh start empties metrics.jsonl; a resume cuts metrics.jsonl back to what its checkpoint saw.
    Checkpoint folders without COMPLETE (a save cut short, *.tmp or not) move to trainer_state/incomplete/,
    never deleted. Either way the resolved config is written."""
    if run.plan.ddp.main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        for folder in incomplete_checkpoints(run.state_dir):
            move_into(folder, run.state_dir / INCOMPLETE)
        reset_metrics_file(run.out_dir / METRICS, meta["metrics_bytes"] if meta is not None else None)
        run.state_dir.mkdir(parents=True, exist_ok=True)
        save_config(run.config, run.out_dir / "run_config.json")
    barrier(run.plan.ddp)


def _loop_start(meta: dict | None, resumed_from: Path | None, plan: RunPlan) -> tuple[int, dict]:
    """The step to start from and the loop state (best and last validation loss): fresh, or the checkpoint's."""
    start_step = meta["step"] if meta else 0
    if start_step > plan.num_steps:
        raise TrainingError(f"{resumed_from} is at step {start_step}, past this run's {plan.num_steps} steps "
                            f"(train.epochs / train.max_steps were lowered); raise them or use --force to start over")
    if plan.ddp.main and meta is not None:
        print(f"resuming from {resumed_from} (step {start_step}/{plan.num_steps})", flush=True)
    return start_step, meta["loop"] if meta else {"best_val_loss": None, "best_step": None, "last_val_loss": None}


def _metrics_log(run: Run, start_step: int, extra_meta: dict | None) -> MetricsLog:
    """metrics.jsonl, the console and the trackers of ``train.trackers`` (rank 0 only), named after the stage."""
    plan, cfg = run.plan, run.config.train
    trackers = Trackers(cfg.trackers if plan.ddp.main else [],
                        run_name=stage_run_name(run.out_dir, (extra_meta or {}).get("stage")),
                        run_dir=run.config.run_path, out_dir=run.out_dir, params=run.config.to_dict(),
                        start_step=start_step)
    return MetricsLog(run.out_dir / METRICS, num_steps=plan.num_steps, steps_per_epoch=plan.steps_per_epoch,
                      num_epochs=cfg.epochs, device=plan.device, main=plan.ddp.main, trackers=trackers)


# --- the loop -------------------------------------------------------------------------------


def train_loop(config: Config, model: torch.nn.Module, batches: BatchSource, loss_fn: LossFn, out_dir: Path, *,
               seed: int, resume: bool | str | Path = False, tokens: TokenStore, tokenizer_dir: Path,
               extra_meta: dict | None = None, on_validation: Callable[[int, float], None] | None = None) -> Path:
    """Train ``model`` on ``batches`` with ``loss_fn`` and export it to ``out_dir``; returns ``out_dir``.

    ``resume``: False = start fresh (refuse if complete checkpoints exist), True = the newest complete
    checkpoint (refuse if none), "auto" = it if one exists, or a path to one ``step-N`` folder.
    Only rank 0 writes files and prints. The run lasts ``train.epochs x steps_per_epoch`` optimizer
    steps, capped by ``train.max_steps`` (the cosine schedule spans exactly that).
    ``on_validation(step, val_loss)`` is called on every rank after each validation (a sweep reports it to
    its pruner); an exception it raises ends training there, before that step's checkpoint and export.
    """
    run = _start_run(config, model, out_dir, seed, batches, tokens)
    cfg, plan, ddp = run.config.train, run.plan, run.plan.ddp

    # --- resume or start fresh ---
    meta, resumed_from = restore(resume, run)
    _prepare_out_dir(run, meta)
    start_step, loop = _loop_start(meta, resumed_from, plan)
    train_model = parallel_model(model, compiled=cfg.compile, device=plan.device, ddp=ddp)
    log = _metrics_log(run, start_step, extra_meta)

    # --- loop ---
    step = start_step
    while True:
        last_step = step == plan.num_steps
        epoch, step_in_epoch = divmod(step, plan.steps_per_epoch)
        epoch_end = step_in_epoch == 0 and step > 0
        if step > start_step:  # the resumed step was evaluated and saved before it was written
            if last_step or epoch_end or (cfg.eval_every is not None and step % cfg.eval_every == 0):
                _validate(run, step, loop, log, on_validation)
            if last_step or epoch_end or step % cfg.save_every == 0:
                _save(run, step, loop, log)
        if last_step:
            break
        if log.bar is None or step_in_epoch == 0:
            log.start_epoch(epoch, step_in_epoch)

        # one optimizer step
        t0 = time.perf_counter()
        lr = lr_at(step, cfg, plan.num_steps)
        set_lr(run.optimizer, lr)
        micro = micro_batches(batches, epoch, step_in_epoch, batch_size=cfg.batch_size,
                              grad_accum=cfg.grad_accum, rank=ddp.rank, world_size=ddp.world_size)
        loss, metrics, grad_norm = optimizer_step(train_model, run.optimizer, micro, loss_fn,
                                                  device=plan.device, amp_dtype=plan.amp_dtype,
                                                  scaler=run.scaler, max_grad_norm=cfg.max_grad_norm)
        losses = _synced_losses(loss, metrics, step, run.state_dir, ddp)
        step += 1
        log.step_done(sum(b["input_ids"].numel() for b in micro) * ddp.world_size, time.perf_counter() - t0)
        if step % cfg.log_every == 0 or step == plan.num_steps:
            log.train(step, lr, losses.tolist(), list(metrics), grad_norm.item())

    # --- summary and export ---
    log.close()
    _export(run, loop, tokenizer_dir, extra_meta)
    leave_distributed(ddp)
    return run.out_dir


# --- the loop's steps -----------------------------------------------------------------------


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


def _validate(run: Run, step: int, loop: dict, log: MetricsLog,
              on_validation: Callable[[int, float], None] | None) -> None:
    """The validation loss at ``step``: logged, handed to ``on_validation``, and kept in ``loop`` (the best
    weights saved too with ``train.keep_best``)."""
    cfg, ddp = run.config.train, run.plan.ddp
    val = validation_loss(run.model, run.tokens, max_windows=cfg.eval_windows, batch_size=cfg.batch_size,
                          amp_dtype=run.plan.amp_dtype, ddp=ddp)
    log.val(step, val)
    if on_validation is not None:
        on_validation(step, val)
    loop["last_val_loss"] = val
    if loop["best_val_loss"] is None or val < loop["best_val_loss"]:
        loop["best_val_loss"], loop["best_step"] = val, step
        if cfg.keep_best and ddp.main:
            save_best(run.state_dir, step, run.model)


def _save(run: Run, step: int, loop: dict, log: MetricsLog) -> None:
    """A checkpoint of this step (everything a resume needs), then prune the old ones."""
    plan, cfg = run.plan, run.config.train
    epoch, step_in_epoch = divmod(step, plan.steps_per_epoch)
    meta = {"step": step, "epoch": epoch, "step_in_epoch": step_in_epoch, "num_steps": plan.num_steps,
            "world_size": plan.ddp.world_size, "fingerprint": plan.fingerprint, "loop": loop,
            "best_step": loop["best_step"] if cfg.keep_best else None, "metrics_bytes": log.tell(),
            "config": run.config.to_dict()}
    save_checkpoint(run.state_dir, step, run.model, run.optimizer, run.scaler, meta, plan.ddp)
    if plan.ddp.main:
        prune_checkpoints(run.state_dir, cfg.keep_checkpoints, meta["best_step"])


def _export(run: Run, loop: dict, tokenizer_dir: Path, extra_meta: dict | None) -> None:
    """Rank 0: the HF checkpoint (the best weights with keep_best) and train_summary.json."""
    plan, cfg = run.plan, run.config.train
    if not plan.ddp.main:
        return
    export_model(run.model, run.out_dir, tokenizer_dir, loop["best_step"] if cfg.keep_best else None)
    summary = {"seed": cfg.seed, "num_steps": plan.num_steps, "steps_per_epoch": plan.steps_per_epoch,
               "global_batch": plan.global_batch, "world_size": plan.ddp.world_size,
               "final_val_loss": loop["last_val_loss"], "best_val_loss": loop["best_val_loss"],
               "best_step": loop["best_step"], "exported": "best" if cfg.keep_best else "final",
               "tokens_hash": run.tokens.tokens_hash, "tokenizer_hash": run.tokens.tokenizer_hash,
               **(extra_meta or {})}
    (run.out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"done: {plan.num_steps} steps, val_loss {loop['last_val_loss']:.4f}"
          + (f" (best {loop['best_val_loss']:.4f} at step {loop['best_step']})" if cfg.keep_best else ""),
          flush=True)
