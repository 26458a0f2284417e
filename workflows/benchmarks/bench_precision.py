"""How far a bf16 teacher forward moves the stored targets (`babydistill bench precision`).

The capture runs its teachers in bf16 autocast on CUDA (``cache.precision: auto``) and in fp32 on the CPU; a store
counts as the same store either way (``CacheConfig.precision``). This measures, on the CPU (whose autocast
rounds the matmuls to bf16 as a GPU's does, though GPU kernels sum in another order), over the first training
windows of a run with its teachers, per position, fp32 capture vs bf16 capture of the same ensemble:

    head_overlap   |top-k(fp32) & top-k(bf16)| / k, the share of the stored exact ids that stay the same
    max_abs_dlogp  max |logp_bf16 - logp_fp32| over the fp32 top-k ids (the stored head values)
    kl_ensemble    KL(p_fp32 || p_bf16) of the whole ensemble distribution, nats

and, for scale, what the store does anyway: the float16 rounding of the stored logp (max over the same ids) and
the KL of the draws' target (hybrid k + S, as the capture reports as fidelity) from the dense teacher.

    python -m babydistill.workflows.benchmarks.bench_precision configs/demo.yaml --out docs/benchmarks/precision.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from babydistill.pipeline.capture_targets import sample_targets
from babydistill.pipeline.config import load_config
from babydistill.pipeline.model import autocast_context, ensemble_logits, load_teachers
from babydistill.stores.tokens import TokenStore
from babydistill.workflows.benchmarks import machine


def _stats(values: np.ndarray) -> dict:
    return {"mean": float(values.mean()), "p50": float(np.percentile(values, 50)),
            "p99": float(np.percentile(values, 99)), "max": float(values.max())}


def ensemble_logp(teachers, x_BS: torch.Tensor, rule: str, amp_dtype) -> torch.Tensor:
    """[N, V] fp32 log-probabilities of the ensemble with the teachers' forward in ``amp_dtype`` (None: fp32)."""
    with torch.inference_mode(), autocast_context(x_BS.device, amp_dtype):
        logits = [t(input_ids=x_BS).logits for t in teachers]
    zbar = ensemble_logits([z.float() for z in logits], rule)
    return torch.log_softmax(zbar, -1).flatten(0, 1)


def drift(logp32: torch.Tensor, logp16: torch.Tensor, k: int, samples: int, generator: torch.Generator) -> dict:
    """Per-position drift of bf16 from fp32 (see the module docstring) as arrays, and the scale figures."""
    top32, top16 = logp32.topk(k, -1).indices, logp16.topk(k, -1).indices
    overlap = (top32.unsqueeze(-1) == top16.unsqueeze(-2)).any(-1).float().mean(-1)
    head32, head16 = logp32.gather(1, top32), logp16.gather(1, top32)
    p32 = logp32.exp()
    kl = (p32 * (logp32 - logp16)).sum(-1).clamp_min(0)
    fp16_rounding = (head32.half().float() - head32).abs().amax(-1)
    ids, weights = sample_targets(logp32, samples, k + samples, generator, top32)
    w = weights.exp()
    real = w > 0
    q = torch.where(real, w / w.sum(-1, keepdim=True), 0.0)
    draws_kl = torch.where(real, q * (q.clamp_min(1e-300).log() - logp32.gather(1, ids).double()), 0.0).sum(-1)
    return {"head_overlap": overlap.numpy(), "max_abs_dlogp": (head16 - head32).abs().amax(-1).numpy(),
            "kl_ensemble": kl.double().numpy(), "float16_rounding": fp16_rounding.numpy(),
            "draws_kl": draws_kl.numpy()}


def bench_precision(config_path: Path, out: Path | None = None, *, windows: int = 64, batch_size: int = 16,
                    teacher_dirs: list[Path] | None = None, overrides: list[str] | None = None) -> dict:
    """fp32 vs bf16 teacher forward over the first ``windows`` training windows of the config's run."""
    from babydistill.workflows.runner import default_teacher_names

    started = machine.start()
    config = load_config(config_path, overrides)
    dirs = teacher_dirs or [config.teacher_path(n) for n in default_teacher_names(config)]
    missing = [str(d) for d in dirs if not (d / "model.safetensors").is_file()]
    if missing or not (config.tokens_path / "zarr.json").is_file():
        raise ValueError(f"bench precision needs the run's tokens and teachers ({', '.join(missing) or config.tokens_path} "
                         f"missing); run `babydistill run {config_path}` (or its stages up to `teacher`) first")
    tokens = TokenStore(config.tokens_path)
    teachers = load_teachers(dirs, tokens.vocab_size, device=torch.device("cpu"))
    k, samples = config.cache.k, config.cache.samples
    generator = torch.Generator().manual_seed(config.cache.seed)
    ids = np.arange(min(windows, tokens.num_windows("train")))
    parts: dict[str, list[np.ndarray]] = {}
    for b in range(0, len(ids), batch_size):
        x_BS = torch.from_numpy(tokens.windows("train", ids[b:b + batch_size])[:, :-1])
        logp32 = ensemble_logp(teachers, x_BS, config.cache.ensemble, None)
        logp16 = ensemble_logp(teachers, x_BS, config.cache.ensemble, torch.bfloat16)
        for name, values in drift(logp32, logp16, k, samples, generator).items():
            parts.setdefault(name, []).append(values)
    table = {name: np.concatenate(values) for name, values in parts.items()}
    report = {
        "command": " ".join(["python -m babydistill.workflows.benchmarks.bench_precision", str(config_path)]
                            + (["--out", str(out)] if out else [])),
        "config": str(config_path), "teachers": [str(d) for d in dirs], "windows": len(ids),
        "positions": int(len(table["kl_ensemble"])), "vocab_size": tokens.vocab_size, "k": k, "samples": samples,
        "device": "cpu (bf16 autocast)", **{name: _stats(values) for name, values in table.items()},
        "note": ("head_overlap: share of the fp32 top-k ids that bf16 also puts in its top k; max_abs_dlogp: over "
                 "the fp32 top-k ids; kl_ensemble: KL(fp32 || bf16) of the dense ensemble, nats; float16_rounding: "
                 "what storing logp as float16 does to the same values anyway; draws_kl: KL(hybrid k + S target || "
                 "dense fp32 teacher), the noise a sampled store carries by design"),
        "machine": machine.finish(started),
    }
    return publish(report, out, format_report(report))


def format_report(report: dict) -> str:
    lines = [f"bench precision: bf16 vs fp32 teacher forward, {report['positions']} positions, k = {report['k']}"]
    for name in ("head_overlap", "max_abs_dlogp", "kl_ensemble", "float16_rounding", "draws_kl"):
        s = report[name]
        lines.append(f"  {name:<17} mean {s['mean']:.3e}  p50 {s['p50']:.3e}  p99 {s['p99']:.3e}  max {s['max']:.3e}")
    return "\n".join(lines)


def publish(report: dict, out: Path | None, text: str) -> dict:
    """Print a benchmark's ``text`` and write its ``report`` to ``out`` (if given); returns the report."""
    print(text, flush=True)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def config_bench_main(argv: list[str] | None, module: str, doc: str, bench, windows: int) -> int:
    """The command line of a benchmark over a run's first training windows: CONFIG [--out] [--windows] [--set]."""
    p = argparse.ArgumentParser(prog=f"python -m babydistill.workflows.benchmarks.{module}",
                                description=doc.splitlines()[0])
    p.add_argument("config", help="the run's YAML config (its tokens.zarr and teachers must exist)")
    p.add_argument("--out", help="JSON file to write (default: print only)")
    p.add_argument("--windows", type=int, default=windows, help=f"training windows measured (default: {windows})")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    args = p.parse_args(argv)
    bench(Path(args.config), Path(args.out) if args.out else None, windows=args.windows, overrides=args.set)
    return 0


def main(argv: list[str] | None = None) -> int:
    return config_bench_main(argv, "bench_precision", __doc__, bench_precision, 64)

if __name__ == "__main__":
    sys.exit(main())
