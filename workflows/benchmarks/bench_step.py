"""Benchmark one training step of the config's model (`babydistill bench step`).

Every mode is timed with the training loop's own ``optimizer_step`` (forward, backward,
clipping, AdamW) on ``train.batch_size x train.grad_accum`` windows, data fetching included,
as in the loop. Modes: ``ce`` (the teacher step, plain CE), ``offline`` (the student step from
the logit store, fused-linear loss), ``online`` (the paper's method: teachers run every step).
``MODES`` maps a name to a setup ``(config, tokens, model, scratch) -> (BatchSource, loss_fn)``;
``scratch`` holds what a mode must build when the run has none: randomly initialised teachers
and a temporary logit store (timing only). Per mode, ``step_peak_extra_mb`` is the peak RSS
of a few steps above the RSS before them, measured in a pass of its own; then the modes are
timed interleaved, one step each in turn, so that noise on a shared machine hits them alike.

The run's ``tokens.zarr`` is used when it exists; otherwise prepare, tokenizer and tokenize run
into a temporary run folder first (removed afterwards) and the result says so.

    python -m babydistill.workflows.benchmarks.bench_step configs/demo.yaml --mode ce --out bench_step.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from babydistill.pipeline.config import Config, load_config, model_name
from babydistill.pipeline.model import build_model, count_parameters
from babydistill.pipeline.training.loop import optimizer_step
from babydistill.pipeline.training.optimizer import build_optimizer
from babydistill.pipeline.training.runtime import resolve_device, resolve_precision
from babydistill.pipeline.training.windows import BatchSource, LossFn, TokenWindows, ce_loss
from babydistill.stores.logits import read_header, store_info
from babydistill.stores.tokens import TokenStore
from babydistill.workflows.benchmarks import machine

# --- modes -------------------------------------------------------------------------------


def _ce_setup(config: Config, tokens: TokenStore, model: torch.nn.Module, scratch: Path
              ) -> tuple[BatchSource, LossFn]:
    """The teacher step: plain CE on training windows."""
    return TokenWindows(tokens, "train", seed=config.train.seed), ce_loss


def _teacher_dirs(config: Config, tokens: TokenStore, scratch: Path) -> list[Path]:
    """The run's teachers when they exist, else two randomly initialised ones (timing only)."""
    from babydistill.workflows.runner import default_teacher_names

    dirs = [config.teacher_path(n) for n in default_teacher_names(config)]
    if all((d / "model.safetensors").is_file() for d in dirs):
        return dirs
    dirs = [scratch / "teachers" / model_name("teacher", seed) for seed in (1, 2)]
    for seed, folder in zip((1, 2), dirs):
        if not (folder / "model.safetensors").is_file():
            build_model(config, tokens, seed).save_pretrained(folder)
    return dirs


def _offline_setup(config: Config, tokens: TokenStore, model: torch.nn.Module, scratch: Path
                   ) -> tuple[BatchSource, LossFn]:
    """The student step from the store: fused-linear sparse KL + CE (with the tail control variate when the
    store keeps the draws' probabilities), no teacher, no logits."""
    from babydistill.pipeline.capture import capture_logits, target_differences
    from babydistill.pipeline.distill import open_offline_source, store_loss
    from babydistill.stores.logits import incomplete_reason

    store = config.logits_path
    if not (store / "zarr.json").is_file() or incomplete_reason(store):
        why = f"no complete {store}"
    else:  # a --set cache.* asks for other targets than the run's store holds
        other = target_differences(read_header(store), config.cache)
        why = f"{store} holds other targets ({'; '.join(other)})" if other else None
    if why:
        store = scratch / "logits.zarr"
        if not (store / "zarr.json").is_file() or incomplete_reason(store):
            print(f"bench step: {why}; capturing a temporary store {store} (a teacher pass over the training split)",
                  file=sys.stderr, flush=True)
            capture_logits(dataclasses.replace(config.cache, workers=1), config.tokens_path, config.tokenizer_path,
                           _teacher_dirs(config, tokens, scratch), store)
    source, use_c_T, tail = open_offline_source(config, config.tokens_path, config.tokenizer_path, store,
                                                config.train.seed)
    return source, store_loss(config.distill, source, use_c_T, tail, store)[0]


def _online_setup(config: Config, tokens: TokenStore, model: torch.nn.Module, scratch: Path
                  ) -> tuple[BatchSource, LossFn]:
    """The paper's released method: the teachers run every step, dense full-vocabulary KL + CE."""
    from babydistill.pipeline.distill import online_loss, online_teachers

    teachers = online_teachers(_teacher_dirs(config, tokens, scratch), tokens.vocab_size, config.train.device)
    return TokenWindows(tokens, "train", seed=config.train.seed), online_loss(config.distill, teachers,
                                                                              config.cache.ensemble)


MODES: dict[str, Callable[[Config, TokenStore, torch.nn.Module, Path], tuple[BatchSource, LossFn]]] = {
    "ce": _ce_setup,
    "offline": _offline_setup,
    "online": _online_setup,
}


def _memory_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak_memory() -> int:
    """Return freed memory to the OS and restart the peak-RSS count; returns the RSS now (kB)."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
    return _memory_kb("VmRSS")


# --- setup -------------------------------------------------------------------------------


@contextlib.contextmanager
def _run_with_tokens(config: Config) -> Iterator[tuple[Config, bool]]:
    """The config itself when its tokens.zarr exists, else a copy whose run is built in a temp folder."""
    if (config.tokens_path / "zarr.json").is_file():
        yield config, False
        return
    from babydistill.workflows.runner import build_token_run

    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        print(f"bench step: {config.tokens_path} does not exist; building a temporary run in {tmp}",
              file=sys.stderr, flush=True)
        yield build_token_run(dataclasses.replace(config, run_dir=tmp)), True


class _ModeRun:
    """One mode's model, optimizer and data, stepped by the training loop's ``optimizer_step``."""

    def __init__(self, config: Config, tokens: TokenStore, mode: str, device: torch.device, amp_dtype,
                 scratch: Path):
        self.config, self.device, self.amp_dtype = config, device, amp_dtype
        self.model = build_model(config, tokens, config.train.seed).to(device)
        self.model.train()
        self.batches, self.loss_fn = MODES[mode](config, tokens, self.model, scratch)
        self.optimizer = build_optimizer(self.model, config.train)
        self.scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        self.per_step = config.train.batch_size * config.train.grad_accum
        if self.batches.num_windows < self.per_step:
            raise ValueError(f"{tokens.path}: {self.batches.num_windows} training windows, fewer than one step "
                             f"({self.per_step}); lower train.batch_size")
        self.num_steps, self.times, self.loss = 0, [], float("nan")

    def step(self) -> float:
        """One training step, data fetching included; returns its wall time in seconds."""
        cfg = self.config.train
        start = (self.num_steps * self.per_step) % (self.batches.num_windows - self.per_step + 1)
        t0 = time.perf_counter()
        micro = [self.batches.batch(0, np.arange(start + m * cfg.batch_size, start + (m + 1) * cfg.batch_size))
                 for m in range(cfg.grad_accum)]
        loss, _, _ = optimizer_step(self.model, self.optimizer, micro, self.loss_fn, device=self.device,
                                    amp_dtype=self.amp_dtype, scaler=self.scaler, max_grad_norm=cfg.max_grad_norm)
        self.loss = loss.item()  # waits for the step to finish (CUDA is asynchronous)
        self.num_steps += 1
        return time.perf_counter() - t0


def _time_modes(config: Config, tokens: TokenStore, modes: list[str], steps: int, warmup: int,
                device: torch.device, amp_dtype, scratch: Path) -> dict:
    """Memory per mode in a pass of its own, then timing with the modes interleaved step by step,
    so that a load spike on a shared machine hits every mode alike and the ratios stay fair."""
    runs, memory = {}, {}
    for mode in modes:
        runs[mode] = _ModeRun(config, tokens, mode, device, amp_dtype, scratch)
        rss_before_kb = _reset_peak_memory()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(max(2, warmup)):
            runs[mode].step()
        memory[mode] = round((_memory_kb("VmHWM") - rss_before_kb) / 1024, 1)
        if device.type == "cuda":
            memory[mode + "_cuda"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(steps):
        for mode in modes:
            times[mode].append(runs[mode].step())
    results = {}
    tokens_per_step = config.train.batch_size * config.train.grad_accum * tokens.seq_len
    for mode in modes:
        median = statistics.median(times[mode])
        results[mode] = {"params": count_parameters(runs[mode].model), "median_step_ms": round(median * 1000, 2),
                         "min_step_ms": round(min(times[mode]) * 1000, 2), "tokens_per_step": tokens_per_step,
                         "tokens_per_second": round(tokens_per_step / median, 1),
                         "final_loss": round(runs[mode].loss, 4), "step_peak_extra_mb": memory[mode]}
        if mode == "offline":
            info = store_info(runs[mode].batches.path)
            results[mode]["store"] = {key: info[key] for key in ("mode", "k", "samples", "slots")}
            results[mode]["store"]["tail_logp"] = "tail_logp" in info["arrays"]
        if device.type == "cuda":
            results[mode]["cuda_peak_mb"] = memory[mode + "_cuda"]
    return results


# --- benchmark ---------------------------------------------------------------------------


def bench_step(config_path: Path, out: Path | None = None, mode: str = "ce", steps: int = 10, warmup: int = 3,
               overrides: list[str] | None = None) -> dict:
    """Median wall time and tokens/s of one training step per mode ("all" = every mode); writes JSON to ``out``."""
    modes = list(MODES) if mode == "all" else [mode]
    problems = [f"unknown mode {m!r} (known: {', '.join(MODES)}, all)" for m in modes if m not in MODES]
    if steps < 1:
        problems.append(f"steps must be >= 1, got {steps}")
    if warmup < 0:
        problems.append(f"warmup must be >= 0, got {warmup}")
    if problems:
        raise ValueError("; ".join(problems))
    started = machine.start()
    config = load_config(config_path, overrides)
    cfg = config.train
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    amp_dtype = resolve_precision(cfg.precision, device)
    with _run_with_tokens(config) as (run_config, temporary), tempfile.TemporaryDirectory(prefix="bench_") as scratch:
        tokens = TokenStore(run_config.tokens_path)
        results = _time_modes(run_config, tokens, modes, steps, warmup, device, amp_dtype, Path(scratch))
    params = next(iter(results.values()))["params"]
    ratios = {}
    if {"ce", "offline"} <= set(results):
        ratios["offline_over_ce_time"] = round(results["offline"]["median_step_ms"] / results["ce"]["median_step_ms"], 3)
        ratios["offline_over_ce_peak_memory"] = round(
            results["offline"]["step_peak_extra_mb"] / max(results["ce"]["step_peak_extra_mb"], 1e-9), 3)
    if {"online", "offline"} <= set(results):
        ratios["offline_over_online_time"] = round(
            results["offline"]["median_step_ms"] / results["online"]["median_step_ms"], 3)
    report = {
        "config": str(config_path), "device": str(device), "precision": str(amp_dtype or "fp32"),
        "num_threads": torch.get_num_threads(), "params": params, "seq_len": tokens.seq_len,
        "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "steps": steps, "warmup": warmup,
        "temporary_run": temporary, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "modes": results, "ratios": ratios, "machine": machine.finish(started),
    }
    for name, r in results.items():
        print(f"bench step {name}: {r['median_step_ms']:.1f} ms/step, {r['tokens_per_second']:,.0f} tok/s "
              f"({params / 1e6:.2f}M params, {cfg.batch_size}x{cfg.grad_accum}x{tokens.seq_len} tokens, "
              f"{device}, {report['num_threads']} threads), step peak +{r['step_peak_extra_mb']} MB", flush=True)
    for name, value in ratios.items():
        print(f"bench step {name}: {value}", flush=True)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m babydistill.workflows.benchmarks.bench_step", description=__doc__.splitlines()[0])
    p.add_argument("config", help="the run's YAML config (e.g. configs/demo.yaml)")
    p.add_argument("--mode", default="ce", help=f"{' | '.join(MODES)} | all (default: ce)")
    p.add_argument("--out", help="JSON file to write (default: print only)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default: 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    args = p.parse_args(argv)
    bench_step(Path(args.config), Path(args.out) if args.out else None, mode=args.mode, steps=args.steps,
               warmup=args.warmup, overrides=args.set)
    return 0


if __name__ == "__main__":
    sys.exit(main())
