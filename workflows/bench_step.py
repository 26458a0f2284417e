"""Benchmark one training step of the config's model (`babydistill bench step`).

Every mode is timed with the training loop's own ``optimizer_step`` (forward, backward,
clipping, AdamW) on ``train.batch_size x train.grad_accum`` windows, data fetching included,
as in the loop. ``MODES`` maps a mode name to a setup function ``(config, tokens, model) ->
(BatchSource, loss_fn)``; a new mode (the student's ``offline`` / ``online``) adds one entry.

The run's ``tokens.zarr`` is used when it exists; otherwise prepare, tokenizer and tokenize run
into a temporary run folder first (removed afterwards) and the result says so.

    python -m workflows.bench_step configs/demo.yaml --mode ce --out bench_step.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import transformers

from pipeline.config import Config, load_config
from pipeline.model import build_model, count_parameters
from pipeline.train import (
    BatchSource,
    LossFn,
    TokenWindows,
    build_optimizer,
    ce_loss,
    optimizer_step,
    resolve_device,
    resolve_precision,
)
from stores.tokens import TokenStore

# --- modes -------------------------------------------------------------------------------


def _ce_setup(config: Config, tokens: TokenStore, model: torch.nn.Module) -> tuple[BatchSource, LossFn]:
    """The teacher step: plain CE on training windows."""
    return TokenWindows(tokens, "train", seed=config.train.seed), ce_loss


MODES: dict[str, Callable[[Config, TokenStore, torch.nn.Module], tuple[BatchSource, LossFn]]] = {
    "ce": _ce_setup,
}


# --- setup -------------------------------------------------------------------------------


@contextlib.contextmanager
def _run_with_tokens(config: Config) -> Iterator[tuple[Config, bool]]:
    """The config itself when its tokens.zarr exists, else a copy whose run is built in a temp folder."""
    if (config.tokens_path / "zarr.json").is_file():
        yield config, False
        return
    from pipeline.prepare import prepare_corpus
    from pipeline.tokenize import tokenize_corpus
    from pipeline.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        print(f"bench step: {config.tokens_path} does not exist; building a temporary run in {tmp}",
              file=sys.stderr, flush=True)
        config = dataclasses.replace(config, run_dir=tmp)
        prepare_corpus(config.data, config.corpus_path, config.data_path)
        train_tokenizer(config.tokenizer, config.data_path / "train", config.tokenizer_path)
        tokenize_corpus(config.data, config.data_path, config.tokenizer_path, config.tokens_path)
        yield config, True


def _time_mode(config: Config, tokens: TokenStore, mode: str, steps: int, warmup: int,
               device: torch.device, amp_dtype) -> dict:
    cfg = config.train
    model = build_model(config, tokens, cfg.seed).to(device)
    model.train()
    batches, loss_fn = MODES[mode](config, tokens, model)
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    per_step = cfg.batch_size * cfg.grad_accum
    if batches.num_windows < per_step:
        raise ValueError(f"{tokens.path}: {batches.num_windows} training windows, fewer than one step "
                         f"({per_step}); lower train.batch_size")
    times = []
    for i in range(warmup + steps):
        start = (i * per_step) % (batches.num_windows - per_step + 1)
        t0 = time.perf_counter()
        micro = [batches.batch(0, np.arange(start + m * cfg.batch_size, start + (m + 1) * cfg.batch_size))
                 for m in range(cfg.grad_accum)]
        loss, _, _ = optimizer_step(model, optimizer, micro, loss_fn, device=device, amp_dtype=amp_dtype,
                                    scaler=scaler, max_grad_norm=cfg.max_grad_norm)
        loss.item()  # wait for the step to finish (CUDA is asynchronous)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    tokens_per_step = per_step * tokens.seq_len
    median = statistics.median(times)
    result = {"params": count_parameters(model), "median_step_ms": round(median * 1000, 2), "min_step_ms": round(min(times) * 1000, 2),
              "tokens_per_step": tokens_per_step, "tokens_per_second": round(tokens_per_step / median, 1),
              "final_loss": round(loss.item(), 4)}
    if device.type == "cuda":
        result["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return result


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
    config = load_config(config_path, overrides)
    cfg = config.train
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    amp_dtype = resolve_precision(cfg.precision, device)
    with _run_with_tokens(config) as (run_config, temporary):
        tokens = TokenStore(run_config.tokens_path)
        results = {m: _time_mode(run_config, tokens, m, steps, warmup, device, amp_dtype) for m in modes}
    params = next(iter(results.values()))["params"]
    report = {
        "config": str(config_path), "device": str(device), "precision": str(amp_dtype or "fp32"),
        "num_threads": torch.get_num_threads(), "params": params, "seq_len": tokens.seq_len,
        "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "steps": steps, "warmup": warmup,
        "temporary_run": temporary, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch": torch.__version__, "transformers": transformers.__version__, "machine": platform.machine(),
        "modes": results,
    }
    for name, r in results.items():
        print(f"bench step {name}: {r['median_step_ms']:.1f} ms/step, {r['tokens_per_second']:,.0f} tok/s "
              f"({params / 1e6:.2f}M params, {cfg.batch_size}x{cfg.grad_accum}x{tokens.seq_len} tokens, "
              f"{device}, {report['num_threads']} threads)", flush=True)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workflows.bench_step", description=__doc__.splitlines()[0])
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
