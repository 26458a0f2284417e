"""Benchmark of the distillation-loss kernels: JSON plus a Markdown table next to it.

CPU, fp32, k = 32: forward+backward median time (after a warm-up) and peak extra memory (each in a fresh
subprocess: peak RSS above the inputs, from /proc/self/status after resetting the high-water mark) for
    fused       losses.sparse_distill_loss(impl="cpu"): gradient in a new N x V buffer
    fused_inplace   the same with inplace=True (the gradient overwrites the logits)
    reference   kernels.reference.sparse_distill_loss (dense teacher, autograd)
    cross_entropy   F.cross_entropy forward+backward on the same logits (CE alone: the floor)
    clone       one logits.clone() (one read and one write of the logits: the memory floor)
Fused-linear vs materialised logits at N = 8192, H = 256, V = 16000. Variants of the fused path at
N = 4096, V = 16000: temperature 1 and 2 with every tail mode (bucket, renorm, uniform), against
F.cross_entropy in the same runs. On CUDA, when present: Triton vs
reference vs F.cross_entropy, ms, GB/s against a measured device-to-device copy, max_memory_allocated.

    python -m babydistill.workflows.benchmarks.bench_kernels --out FILE.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from babydistill.workflows.benchmarks import machine

K = 32
CPU_SIZES = [(N, V) for N in (4096, 8192) for V in (8000, 16000, 32000)]
QUICK_SIZES = [(1024, 8000), (2048, 16000)]
LINEAR_SIZE = (8192, 256, 16000)  # N, H, V
QUICK_LINEAR_SIZE = (2048, 256, 16000)
CPU_PROVIDERS = ("fused", "fused_inplace", "reference", "cross_entropy", "clone")
VARIANT_SIZE, QUICK_VARIANT_SIZE = (4096, 16000), (1024, 8000)
VARIANTS = [(T, tail) for T in (1.0, 2.0) for tail in ("bucket", "renorm", "uniform")]
REFERENCE_MAX_ELEMENTS = 8192 * 16000
REPO = Path(__file__).resolve().parents[1]


# --- inputs and providers


def make_inputs(N: int, V: int, k: int = K, device: str = "cpu", seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(N, V, generator=g, device=device)
    labels = torch.randint(0, V, (N,), generator=g, device=device)
    stride = V // k  # k distinct ids per row, one in each of k equal slices of the vocabulary
    ids = torch.randint(0, stride, (N, k), generator=g, device=device) + torch.arange(k, device=device) * stride
    target_logp = torch.log_softmax(torch.randn(N, k, generator=g, device=device), 1) - 0.1  # r ~ 0.1
    return logits, labels, ids, target_logp


def linear_inputs(N: int, H: int, V: int, k: int = K):
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.05
    labels = torch.randint(0, V, (N,), generator=g)
    ids = torch.randint(0, V // k, (N, k), generator=g) + torch.arange(k) * (V // k)
    target_logp = torch.log_softmax(torch.randn(N, k, generator=g), 1) - 0.1
    return hidden, weight, labels, ids, target_logp


def provider_step(provider: str, logits, labels, ids, target_logp, temperature: float = 1.0, tail: str = "bucket"):
    """One forward+backward of a provider; returns nothing (gradients are dropped). ``temperature`` and ``tail``
    reach the fused paths (at T != 1 without c_T: the approximate temperature correction of the store-less case)."""
    from babydistill.kernels import losses, reference

    if provider == "clone":
        logits.clone()
        return
    z = logits.detach().requires_grad_()
    if provider == "cross_entropy":
        loss = F.cross_entropy(z, labels)
    elif provider == "reference":
        loss = reference.sparse_distill_loss(z, labels, ids, target_logp)[0]
    elif provider in ("fused", "triton"):
        loss = losses.sparse_distill_loss(z, labels, ids, target_logp, temperature=temperature, tail=tail)[0]
    elif provider == "fused_inplace":  # overwrites the caller's logits with the gradient
        loss = losses.sparse_distill_loss(z, labels, ids, target_logp, temperature=temperature, tail=tail,
                                           inplace=True)[0]
    else:
        raise ValueError(provider)
    loss.backward()


def linear_step(provider: str, hidden, weight, labels, ids, target_logp):
    from babydistill.kernels import losses

    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    if provider == "fused_linear":
        loss = losses.fused_linear_sparse_distill_loss(h, w, labels, ids, target_logp)[0]
    else:  # materialised: the full logits, then the fused loss on them
        loss = losses.sparse_distill_loss(h @ w.T, labels, ids, target_logp)[0]
    loss.backward()


def median_time(fn, runs: int, device: str = "cpu") -> float:
    return median_times({"fn": fn}, runs, device)["fn"]


def median_times(fns: dict, runs: int, device: str = "cpu") -> dict:
    """Median wall time of each function after one warm-up, the functions taking turns run by run so that
    a change in machine load hits all of them alike (the ratios come from the same runs)."""
    times = {name: [] for name in fns}
    for i in range(runs + 1):
        for name, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            if i > 0:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


# --- peak memory in a fresh process


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(kind: str, provider: str, sizes: list[int], temperature: float = 1.0, tail: str = "bucket") -> dict:
    """Run in a fresh process: peak RSS (MB) of one forward+backward above the resident inputs."""
    if kind == "cpu":
        N, V = sizes
        inputs = make_inputs(N, V)
        step = lambda: provider_step(provider, *inputs, temperature, tail)  # noqa: E731
    else:
        N, H, V = sizes
        inputs = linear_inputs(N, H, V)
        step = lambda: linear_step(provider, *inputs)  # noqa: E731
    step()  # warm-up: one-time allocations of torch itself are not the provider's memory
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark to the current RSS
    base = _rss_kb("VmRSS")
    step()
    peak = _rss_kb("VmHWM")
    return {"peak_extra_mb": (peak - base) / 1024}


def measure_memory(kind: str, provider: str, sizes: list[int], temperature: float = 1.0,
                   tail: str = "bucket") -> float | None:
    code = ("import json, sys; from babydistill.workflows.benchmarks.bench_kernels import memory_probe; "
            f"print('MEM ' + json.dumps(memory_probe({kind!r}, {provider!r}, {sizes!r}, {temperature!r}, {tail!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith("MEM "):
            return json.loads(line[4:])["peak_extra_mb"]
    print(f"  memory probe {kind}/{provider} {sizes} failed: {proc.stderr[-500:]}", file=sys.stderr)
    return None


# --- sections


def bench_cpu(sizes, runs: int) -> list[dict]:
    rows = []
    for N, V in sizes:
        inputs = make_inputs(N, V)
        logits_mb = N * V * 4 / 2**20
        row = {"N": N, "V": V, "k": K, "logits_mb": logits_mb}
        inplace_inputs = (inputs[0].clone(),) + inputs[1:]  # overwritten with gradients run after run
        fns = {p: (lambda p=p, a=(inplace_inputs if p == "fused_inplace" else inputs): provider_step(p, *a))
               for p in CPU_PROVIDERS if p != "reference"}
        times = median_times(fns, runs)
        if N * V <= REFERENCE_MAX_ELEMENTS:
            times["reference"] = median_time(lambda a=inputs: provider_step("reference", *a), 5)
        del inplace_inputs, fns
        for provider in CPU_PROVIDERS:
            if provider not in times:  # the dense reference at the largest size: ~8 GB of temporaries
                row[f"{provider}_s"] = row[f"{provider}_extra_mb"] = None
                continue
            row[f"{provider}_s"] = times[provider]
            if provider != "clone":
                row[f"{provider}_extra_mb"] = measure_memory("cpu", provider, [N, V])
            print(f"  cpu N={N} V={V} {provider}: {row[f'{provider}_s']:.3f} s, "
                  f"extra {row.get(f'{provider}_extra_mb') or 0:.0f} MB", flush=True)
        row["fused_vs_ce"] = row["fused_s"] / row["cross_entropy_s"]
        row["fused_vs_clone"] = row["fused_s"] / row["clone_s"]
        row["fused_inplace_vs_ce"] = row["fused_inplace_s"] / row["cross_entropy_s"]
        if row["fused_extra_mb"] is not None:
            row["fused_extra_beyond_grad_pct"] = 100 * (row["fused_extra_mb"] - logits_mb) / logits_mb
        if row["fused_inplace_extra_mb"] is not None:
            row["fused_inplace_extra_pct"] = 100 * row["fused_inplace_extra_mb"] / logits_mb
        rows.append(row)
        del inputs
    return rows


def bench_variants(size, runs: int) -> list[dict]:
    """The fused CPU path at each (temperature, tail), timed in turns with F.cross_entropy on the same logits."""
    N, V = size
    inputs = make_inputs(N, V)
    logits_mb = N * V * 4 / 2**20
    fns = {f"T{T:g}-{tail}": (lambda T=T, tail=tail: provider_step("fused", *inputs, T, tail)) for T, tail in VARIANTS}
    fns["cross_entropy"] = lambda: provider_step("cross_entropy", *inputs)
    times = median_times(fns, runs)
    rows = []
    for T, tail in VARIANTS:
        extra = measure_memory("cpu", "fused", [N, V], T, tail)
        row = {"N": N, "V": V, "k": K, "temperature": T, "tail": tail, "fused_s": times[f"T{T:g}-{tail}"],
               "cross_entropy_s": times["cross_entropy"], "fused_vs_ce": times[f"T{T:g}-{tail}"] / times["cross_entropy"],
               "fused_extra_mb": extra,
               "fused_extra_beyond_grad_pct": 100 * (extra - logits_mb) / logits_mb if extra is not None else None}
        print(f"  variant N={N} V={V} T={T:g} {tail}: {row['fused_s']:.3f} s ({row['fused_vs_ce']:.2f}x CE), "
              f"extra {extra or 0:.0f} MB", flush=True)
        rows.append(row)
    return rows


def bench_linear(size, runs: int) -> dict:
    N, H, V = size
    hidden, weight, labels, ids, target_logp = linear_inputs(N, H, V)
    row = {"N": N, "H": H, "V": V, "k": K}
    times = median_times({p: (lambda p=p: linear_step(p, hidden, weight, labels, ids, target_logp))
                          for p in ("fused_linear", "materialised")}, runs)
    for provider in ("fused_linear", "materialised"):
        row[f"{provider}_s"] = times[provider]
        row[f"{provider}_peak_mb"] = measure_memory("linear", provider, [N, H, V])
        print(f"  linear {provider}: {row[f'{provider}_s']:.3f} s, peak {row[f'{provider}_peak_mb'] or 0:.0f} MB",
              flush=True)
    row["time_ratio"] = row["fused_linear_s"] / row["materialised_s"]
    if row["fused_linear_peak_mb"] and row["materialised_peak_mb"]:
        row["memory_ratio"] = row["fused_linear_peak_mb"] / row["materialised_peak_mb"]
    return row


def bench_cuda(sizes, runs: int) -> list[dict]:
    rows = []
    for N, V in sizes:
        inputs = make_inputs(N, V, device="cuda")
        logits = inputs[0]
        nbytes = logits.numel() * logits.element_size()
        copy_s = median_time(lambda x=logits: x.clone(), runs, "cuda")
        row = {"N": N, "V": V, "k": K, "copy_gbps": 2 * nbytes / copy_s / 1e9, "copy_ms": copy_s * 1e3}
        for provider in ("triton", "reference", "cross_entropy"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t = median_time(lambda p=provider, a=inputs: provider_step(p, *a), runs, "cuda")
            row[f"{provider}_ms"] = t * 1e3
            # fused fwd+bwd moves about 3 passes of the logits (read, read, write the gradient)
            row[f"{provider}_gbps"] = 3 * nbytes / t / 1e9
            row[f"{provider}_max_alloc_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        rows.append(row)
    return rows


# --- report


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Kernel benchmark ({m['cpu_model']}, {m['logical_cores']} logical cores, {result['threads']} threads, "
             f"torch {m['versions']['torch']})", "",
             f"{m['date_utc']}, commit {m['commit'][:12] if m['commit'] else 'unknown'}"
             f"{' (dirty tree)' if m['dirty'] else ''}, load average {m['load_average_start']} at the start and "
             f"{m['load_average_end']} at the end; `{m['command']}`", ""]
    lines += ["## CPU, fp32, k = 32 (forward+backward, median seconds; extra = peak RSS above inputs)", "",
              "| N | V | logits MB | fused s | fused inplace s | reference s | F.cross_entropy s | clone s | "
              "fused / CE | fused / clone | fused extra MB | fused extra beyond grad | inplace extra | "
              "reference extra MB | CE extra MB |",
              "|" + "---|" * 15]
    for r in result["cpu"]:
        def pct(key, r=r):
            return f"{r[key]:.1f}%" if r.get(key) is not None else "n/a"

        def sec(key, r=r):
            return f"{r[key]:.3f}" if r.get(key) is not None else "skipped"

        def mb(key, r=r):
            return f"{r[key]:.0f}" if r.get(key) is not None else "n/a"

        lines.append(f"| {r['N']} | {r['V']} | {r['logits_mb']:.0f} | {r['fused_s']:.3f} | {r['fused_inplace_s']:.3f} "
                     f"| {sec('reference_s')} | {r['cross_entropy_s']:.3f} | {r['clone_s']:.3f} | "
                     f"{r['fused_vs_ce']:.2f}x | {r['fused_vs_clone']:.2f}x | {mb('fused_extra_mb')} | "
                     f"{pct('fused_extra_beyond_grad_pct')} | {pct('fused_inplace_extra_pct')} | "
                     f"{mb('reference_extra_mb')} | {mb('cross_entropy_extra_mb')} |")
    r = result["linear"]
    lines += ["", f"## Fused linear vs materialised logits (N={r['N']}, H={r['H']}, V={r['V']})", "",
              "| path | s | peak extra MB |", "|---|---|---|",
              f"| fused linear | {r['fused_linear_s']:.3f} | {r['fused_linear_peak_mb'] or 0:.0f} |",
              f"| materialised | {r['materialised_s']:.3f} | {r['materialised_peak_mb'] or 0:.0f} |",
              "", f"time ratio {r['time_ratio']:.2f}x, memory ratio {r.get('memory_ratio', float('nan')):.3f}x"]
    if result.get("variants"):
        v = result["variants"][0]
        lines += ["", f"## Temperatures and tails of the fused path (N={v['N']}, V={v['V']}, k = {v['k']})", "",
                  "| T | tail | fused s | fused / CE | fused extra MB | beyond grad |", "|---|---|---|---|---|---|"]
        for v in result["variants"]:
            beyond = v["fused_extra_beyond_grad_pct"]
            lines.append(f"| {v['temperature']:g} | {v['tail']} | {v['fused_s']:.3f} | {v['fused_vs_ce']:.2f}x | "
                         f"{v['fused_extra_mb'] or 0:.0f} | {f'{beyond:.1f}%' if beyond is not None else 'n/a'} |")
    if result.get("cuda"):
        lines += ["", f"## CUDA ({result['cuda_device']})", "",
                  "| N | V | copy GB/s | triton ms | triton GB/s | reference ms | CE ms | triton MB | reference MB | CE MB |",
                  "|" + "---|" * 10]
        for r in result["cuda"]:
            lines.append(f"| {r['N']} | {r['V']} | {r['copy_gbps']:.0f} | {r['triton_ms']:.2f} | {r['triton_gbps']:.0f} | "
                         f"{r['reference_ms']:.2f} | {r['cross_entropy_ms']:.2f} | {r['triton_max_alloc_mb']:.0f} | "
                         f"{r['reference_max_alloc_mb']:.0f} | {r['cross_entropy_max_alloc_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def bench_kernels(out: Path | None = None, quick: bool = False) -> dict:
    """Run the kernel benchmark; write JSON to ``out`` and a Markdown table beside it (``out`` with .md)."""
    runs = 5 if quick else 7
    started = machine.start()
    result = {"threads": torch.get_num_threads(), "quick": quick}
    print(f"bench kernels: {result['threads']} threads, load average {started['load_average_start']}", flush=True)
    result["cpu"] = bench_cpu(QUICK_SIZES if quick else CPU_SIZES, runs)
    result["linear"] = bench_linear(QUICK_LINEAR_SIZE if quick else LINEAR_SIZE, runs)
    result["variants"] = bench_variants(QUICK_VARIANT_SIZE if quick else VARIANT_SIZE, runs)
    if torch.cuda.is_available():
        result["cuda_device"] = torch.cuda.get_device_name()
        result["cuda"] = bench_cuda([(4096, 16000), (8192, 32000)] if not quick else [(1024, 16000)], runs)
    result["machine"] = machine.finish(started)
    table = markdown(result)
    print(table)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(table)
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="benchmark the distillation-loss kernels")
    parser.add_argument("--out", help="JSON file to write; a .md table goes beside it (default: print only)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (default: off)")
    args = parser.parse_args(argv)
    bench_kernels(Path(args.out) if args.out else None, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
