"""`babydistill bench gpu`: measure and check every GPU path on the first CUDA device, in one command.

Parts, in order (``gpu_plan``; sized for at most 8 minutes on one H100-class GPU, not yet timed on one: the JSON's
``part_seconds`` records each part):
  checks    the compiled Triton kernel against the float64 reference over the whole grid (workflows/benchmarks/gpu_checks.py)
  loss      fused sparse loss vs F.cross_entropy vs a logits clone() (bf16 logits), and fused-linear vs Liger-Kernel's
            fused-linear cross entropy (when installed) vs materialised logits: forward+backward ms, peak extra MB
  pipeline  every stage on CUDA, a few steps each, of configs/small-16m.yaml on a share of the corpus, into a
            throwaway run folder that the next two parts use
  step      `bench step` on that run: CE / offline / online student step (ms, tokens/s, peak memory)
  capture   the capture's tokens/s with the run's two teachers on one GPU and on every visible GPU, and the
            teachers' forward's share of the capture's time
It writes one JSON (GPU, driver, CUDA / torch / triton versions, commit, command) and prints a one-screen
summary with each goal's measured value. Without CUDA it says so in one line and exits 2. ``plan_on_cpu``
gives the same parts at tiny sizes for the CPU (tests/test_bench_gpu.py runs them through the interpreter).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from babydistill.pipeline.config import PROJECT_ROOT, load_config
from babydistill.workflows.benchmarks import gpu_checks, machine

REPO = PROJECT_ROOT


@dataclass(frozen=True)
class Plan:
    """What `bench gpu` runs, and at what sizes."""
    device: str
    check_shape: tuple[int, int, int, int] = (64, 4099, 32, 64)
    """N, V, k, H of the correctness grid (V odd: a partial last block)."""
    loss_sizes: tuple[tuple[int, int], ...] = ((8192, 16000), (8192, 32000), (4096, 128256))
    loss_k: int = 32
    loss_hidden: int = 1024
    """H of the fused-linear comparison."""
    runs: int = 10
    config: Path = REPO / "configs" / "small-16m.yaml"
    """The run of the pipeline, step and capture parts: one throwaway run folder serves all three."""
    overrides: tuple[str, ...] = ("data.max_train_words=300000", "train.max_steps=20", "train.eval_windows=16",
                                  "eval.max_windows=64", "eval.max_pairs_per_paradigm=10", "distill.students=1")
    """--set values of that run (a share of the corpus, a few steps per stage: minutes, not hours)."""
    step_steps: int = 10
    step_warmup: int = 3
    gpus: int = 0
    """Visible GPUs (0 on the CPU: the all-GPU capture is then the one-worker capture)."""


GOALS = {
    "loss_time_vs_ce": 1.0, "loss_extra_memory_vs_ce": 0.10, "loss_time_vs_clone": 1.5,
    "offline_over_ce_time": 0.85, "offline_over_online_time": 0.40,
    "capture_forward_share": 0.90, "capture_scaling_per_gpu": 0.90,
}


def gpu_plan() -> Plan:
    return Plan(device="cuda", gpus=torch.cuda.device_count())


def plan_on_cpu(config: Path) -> Plan:
    """The same parts at tiny sizes on the CPU (the Triton kernel through its interpreter); ``config`` is a tiny
    run's config."""
    return Plan(device="cpu", check_shape=(3, 48, 4, 8), loss_sizes=((8, 120),), loss_k=4, loss_hidden=8, runs=1,
                config=config, overrides=("train.max_steps=2", "eval.max_windows=4", "eval.max_pairs_per_paradigm=1"),
                step_steps=1, step_warmup=1, gpus=0)


# --- timing and memory -------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fns: dict, runs: int, device: str) -> dict:
    """Median ms of each function (one warm-up), the functions taking turns, and the peak memory each allocates
    beyond what was allocated before it (MB, CUDA; None on the CPU)."""
    from babydistill.workflows.benchmarks.bench_kernels import median_times

    result = {name: {"ms": seconds * 1e3} for name, seconds in median_times(fns, runs, device).items()}
    for name, fn in fns.items():
        result[name]["extra_mb"] = None
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            result[name]["extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return result


# --- part: loss ---------------------------------------------------------------------------------


def _loss_fns(N: int, V: int, k: int, device: str) -> dict:
    """Forward+backward of each provider on the same bf16 logits."""
    from babydistill.kernels import losses
    from babydistill.workflows.benchmarks.bench_kernels import make_inputs

    logits, labels, ids, target_logp = make_inputs(N, V, k, device=device)
    logits = logits.to(torch.bfloat16)
    impl = "triton"

    def fused(inplace: bool):
        z = (logits.clone() if inplace else logits).requires_grad_()
        losses.sparse_distill_loss(z, labels, ids, target_logp, impl=impl, inplace=inplace)[0].backward()

    def cross_entropy():
        z = logits.detach().requires_grad_()
        F.cross_entropy(z.float() if device == "cpu" else z, labels).backward()

    # fused_inplace pays for its own clone() here (the gradient overwrites the logits): its time includes one copy
    return {"fused": lambda: fused(False), "fused_inplace": lambda: fused(True), "cross_entropy": cross_entropy,
            "clone": lambda: logits.clone()}


def _linear_fns(N: int, H: int, V: int, k: int, device: str) -> dict:
    """Fused-linear sparse loss, materialised logits + CE, and Liger's fused-linear CE when installed (bf16)."""
    from babydistill.kernels import losses
    from babydistill.workflows.benchmarks.bench_kernels import make_inputs

    g = torch.Generator(device=device).manual_seed(1)
    hidden = torch.randn(N, H, generator=g, device=device).to(torch.bfloat16)
    weight = (torch.randn(V, H, generator=g, device=device) * 0.05).to(torch.bfloat16)
    _, labels, ids, target_logp = make_inputs(N, V, k, device=device)

    def leaves():
        return hidden.detach().requires_grad_(), weight.detach().requires_grad_()

    def fused_linear():
        h, w = leaves()
        losses.fused_linear_sparse_distill_loss(h, w, labels, ids, target_logp, impl="triton")[0].backward()

    def materialised_ce():
        h, w = leaves()
        F.cross_entropy((h @ w.T).float(), labels).backward()

    fns = {"fused_linear": fused_linear, "materialised_ce": materialised_ce}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return fns
    liger = LigerFusedLinearCrossEntropyLoss()

    def liger_fused_linear_ce():
        h, w = leaves()
        liger(w, h, labels).backward()

    try:  # a third-party comparison: its failure on this GPU is reported, not fatal to the rest
        liger_fused_linear_ce()
    except Exception as exc:  # noqa: BLE001
        print(f"bench gpu: Liger-Kernel's fused-linear CE failed here ({type(exc).__name__}: {exc}); left out",
              file=sys.stderr, flush=True)
        return fns
    fns["liger_fused_linear_ce"] = liger_fused_linear_ce
    return fns


def part_loss(plan: Plan, progress) -> dict:
    rows = []
    for N, V in plan.loss_sizes:
        row = {"N": N, "V": V, "k": plan.loss_k, "dtype": "bf16", "logits_mb": N * V * 2 / 2**20,
               **timed(_loss_fns(N, V, plan.loss_k, plan.device), plan.runs, plan.device)}
        row["linear"] = {"H": plan.loss_hidden,
                         **timed(_linear_fns(N, plan.loss_hidden, V, plan.loss_k, plan.device), plan.runs, plan.device)}
        row["liger_installed"] = "liger_fused_linear_ce" in row["linear"]
        rows.append(row)
        if plan.device == "cuda":
            torch.cuda.empty_cache()
        progress(1)
    return {"sizes": rows}


# --- parts: step, capture, pipeline --------------------------------------------------------------


def _overrides(plan: Plan, run_dir: Path) -> list[str]:
    return [*plan.overrides, f"run_dir={run_dir}", f"train.device={plan.device}", f"cache.device={plan.device}"]


def part_pipeline(plan: Plan, run_dir: Path, progress) -> dict:
    """Every stage on the device, a few steps each, into ``run_dir``."""
    from babydistill.workflows.runner import run_all

    config = load_config(plan.config, _overrides(plan, run_dir))
    started = time.perf_counter()
    stages = run_all(config)
    seconds = time.perf_counter() - started
    students = sorted(p.name for p in config.run_path.glob("students/*") if (p / "eval.json").is_file())
    progress(1)
    return {"stages_run": stages, "seconds": seconds, "report_written": (config.report_path / "report.md").is_file(),
            "students_evaluated": students}


def part_step(plan: Plan, run_dir: Path, progress) -> dict:
    """`bench step` on the pipeline's run: its tokens, teachers and store."""
    from babydistill.workflows.benchmarks.bench_step import bench_step

    report = bench_step(plan.config, None, mode="all", steps=plan.step_steps, warmup=plan.step_warmup,
                        overrides=_overrides(plan, run_dir))
    progress(1)
    return report


def part_capture(plan: Plan, run_dir: Path, progress) -> dict:
    """Tokens/s of a capture with the run's two teachers on one GPU and on every visible GPU (one worker each)."""
    from babydistill.pipeline.capture import capture_logits
    from babydistill.workflows.runner import default_teacher_names

    config = load_config(plan.config, _overrides(plan, run_dir))
    teachers = [config.teacher_path(n) for n in default_teacher_names(config)]
    result = {}
    for name, workers in (("one_gpu", 1), ("all_gpus", max(1, plan.gpus))):
        if name == "all_gpus" and workers == 1:
            result[name] = dict(result["one_gpu"], note="one visible GPU (or the CPU): the one-worker figures")
            break
        summary = capture_logits(dataclasses.replace(config.cache, fidelity_positions=0, workers=workers),
                                 config.tokens_path, config.tokenizer_path, teachers,
                                 run_dir / f"bench-capture-{name}.zarr")
        result[name] = {"workers": workers, "tokens_per_s": summary["tokens_per_s"], "seconds": summary["seconds"],
                        "forward_s": summary["task_forward_s"], "compute_s": summary["task_compute_s"],
                        "write_s": summary["task_write_s"], "write_wait_s": summary["task_write_wait_s"],
                        "capture": summary["capture"], "forward_share": summary["task_forward_s"] / summary["seconds"]}
        progress(1)
    one, every = result["one_gpu"], result["all_gpus"]
    result["scaling_per_gpu"] = every["tokens_per_s"] / one["tokens_per_s"] / max(1, every["workers"])
    return result


# --- environment, goals, summary ---------------------------------------------------------------


def environment(plan: Plan, command: str) -> dict:
    """The device, GPU, driver and CUDA build of this measurement, and its command (the machine, load, commit and
    library versions are in the result's "machine" record)."""
    env = {"device": plan.device, "command": command, "cuda": torch.version.cuda}
    if plan.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), gpus=plan.gpus,
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   driver=_nvidia_smi("driver_version"))
    return env


def _nvidia_smi(query: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def goals(result: dict) -> dict:
    """Each goal of issue 24 with its measured value (None where this run cannot measure it)."""
    measured: dict[str, float | None] = dict.fromkeys(GOALS)
    rows = {row["V"]: row for row in result.get("loss", {}).get("sizes", [])}
    row = rows.get(32000) or (next(iter(rows.values())) if rows else None)
    if row:
        measured["loss_time_vs_ce"] = row["fused"]["ms"] / row["cross_entropy"]["ms"]
        measured["loss_time_vs_clone"] = row["fused"]["ms"] / row["clone"]["ms"]
        if row["fused_inplace"]["extra_mb"] is not None and row["cross_entropy"]["extra_mb"]:
            measured["loss_extra_memory_vs_ce"] = row["fused_inplace"]["extra_mb"] / row["cross_entropy"]["extra_mb"]
    ratios = result.get("step", {}).get("ratios", {})
    measured["offline_over_ce_time"] = ratios.get("offline_over_ce_time")
    measured["offline_over_online_time"] = ratios.get("offline_over_online_time")
    capture = result.get("capture", {})
    if capture:
        measured["capture_forward_share"] = capture["one_gpu"]["forward_share"]
        measured["capture_scaling_per_gpu"] = capture["scaling_per_gpu"] if capture["all_gpus"]["workers"] > 1 else None
    higher_is_better = {"capture_forward_share", "capture_scaling_per_gpu"}
    return {name: {"goal": (">= " if name in higher_is_better else "<= ") + f"{GOALS[name]:g}", "measured": value,
                   "met": None if value is None else (value >= GOALS[name] if name in higher_is_better
                                                      else value <= GOALS[name])}
            for name, value in measured.items()}


def summary_lines(result: dict) -> list[str]:
    env, checks, versions = result["environment"], result["checks"], result["machine"]["versions"]
    lines = [f"bench gpu: {env.get('gpu', env['device'])} (driver {env.get('driver')}, CUDA {env['cuda']}, "
             f"torch {versions['torch']}, triton {versions['triton']}, "
             f"commit {(result['machine']['commit'] or '?')[:10]})",
             f"  kernel checks: {checks['cases'] - checks['failed']}/{checks['cases']} within tolerance"]
    for row in result["loss"]["sizes"]:
        liger = row["linear"].get("liger_fused_linear_ce")
        lines.append(f"  loss {row['N']}x{row['V']} bf16: fused {row['fused']['ms']:.2f} ms, inplace "
                     f"{row['fused_inplace']['ms']:.2f}, CE {row['cross_entropy']['ms']:.2f}, clone "
                     f"{row['clone']['ms']:.2f}; fused-linear {row['linear']['fused_linear']['ms']:.2f} ms, "
                     f"logits+CE {row['linear']['materialised_ce']['ms']:.2f}"
                     + (f", Liger {liger['ms']:.2f}" if liger else ", Liger not installed"))
    for name, mode in result["step"]["modes"].items():
        lines.append(f"  step {name}: {mode['median_step_ms']:.1f} ms, {mode['tokens_per_second']:,.0f} tok/s, "
                     f"peak {mode.get('cuda_peak_mb', mode['step_peak_extra_mb'])} MB")
    cap = result["capture"]
    lines.append(f"  capture: {cap['one_gpu']['tokens_per_s']:,.0f} tok/s on one device "
                 f"({cap['all_gpus']['tokens_per_s']:,.0f} on {cap['all_gpus']['workers']}), forward "
                 f"{100 * cap['one_gpu']['forward_share']:.0f}% of the time")
    pipe = result["pipeline"]
    lines.append(f"  pipeline: {pipe['stages_run']} stages in {pipe['seconds']:.0f} s, report "
                 f"{'written' if pipe['report_written'] else 'MISSING'}")
    lines.append("  seconds per part: " + ", ".join(f"{k} {v:g}" for k, v in result["part_seconds"].items()))
    for name, g in result["goals"].items():
        value = "n/a" if g["measured"] is None else f"{g['measured']:.3f}"
        verdict = {True: "met", False: "MISSED", None: "not measured"}[g["met"]]
        lines.append(f"  goal {name} {g['goal']}: {value} ({verdict})")
    return lines


# --- the command --------------------------------------------------------------------------------


def run_plan(plan: Plan, out: Path | None, command: str) -> dict:
    """Every part of ``plan`` in order, with a progress bar; the JSON to ``out`` and the summary printed."""
    from tqdm import tqdm

    N, V, k, H = plan.check_shape
    total = gpu_checks.num_checks() + len(plan.loss_sizes) + 1 + 1 + 2
    run_started = machine.start()
    result = {"environment": environment(plan, command), "plan": dataclasses.asdict(plan)}
    with (
        tqdm(total=total, desc="bench gpu", unit="step", mininterval=1.0, leave=False) as bar,
        tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp,
    ):
        run_dir, seconds = Path(tmp) / "run", {}
        parts = {"checks": lambda: gpu_checks.run_checks(plan.device, N, V, k, H, bar.update),
                 "loss": lambda: part_loss(plan, bar.update),
                 "pipeline": lambda: part_pipeline(plan, run_dir, bar.update),
                 "step": lambda: part_step(plan, run_dir, bar.update),
                 "capture": lambda: part_capture(plan, run_dir, bar.update)}
        for name, part in parts.items():
            started = time.perf_counter()
            result[name] = part()
            seconds[name] = round(time.perf_counter() - started, 1)
    result["part_seconds"] = seconds
    result["goals"] = goals(result)
    result["machine"] = machine.finish(run_started)
    print("\n".join(summary_lines(result)), flush=True)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"wrote {out}", flush=True)
    return result


def bench_gpu(out: Path | None = None) -> dict:
    """The whole measurement on the first CUDA device; a ValueError (one line, exit 2) without one."""
    if not torch.cuda.is_available():
        raise ValueError(f"bench gpu: no CUDA device here (torch {torch.__version__}, CUDA build "
                         f"{torch.version.cuda or 'none'}); run it on a machine with an NVIDIA GPU after installing a "
                         f"CUDA build of torch into .venv (README, GPU use)")
    command = " ".join(["babydistill", "bench", "gpu"] + (["--out", str(out)] if out else []))
    return run_plan(gpu_plan(), out, command)


def main(argv: list[str] | None = None) -> int:
    from babydistill.workflows.cli import main as cli_main

    return cli_main(["bench", "gpu", *(argv or sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
