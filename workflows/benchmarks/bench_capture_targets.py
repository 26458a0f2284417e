"""The capture's target ranking against the dense one it replaced (`sample_targets` vs `dense_reference`), side by
side in one run: seconds per call on rows of random teacher log-probabilities at a vocabulary, one thread.

    python -m babydistill.workflows.benchmarks.bench_capture_targets --vocab 16000
        --out docs/benchmarks/capture_targets.json      (one line)

The two give the same ids, order and log-probabilities draw for draw (tests/test_capture_targets.py); the dense one
counts over all V ids and ranks them with one top-k over V, the sparse one ranks the draws and the few ids that
can win, so its cost no longer grows with V beyond the draws themselves. Beside them, a uint8 capture's snapping of
the teacher to the store's grid (``quant.snap_torch``, in place on a float64 copy of each block of 1,024 rows)
against the out-of-place formula it replaced (``snap_reference``): the same values (tests/test_quant_store.py).
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from pathlib import Path

import torch

from babydistill.pipeline.capture_targets import sample_targets
from babydistill.stores import quant
from babydistill.stores.logits import PAD_LOGP
from babydistill.workflows.benchmarks import machine
from babydistill.workflows.benchmarks.bench_precision import publish

DEFAULTS = {"token": (8, 12), "sequence": (32, 64)}


def dense_reference(logp_NV, samples, slots, generator, head_ids=None, draw_logp=None):
    """The ranking as it was until 2026-12-05: counts over all V ids, key = count (V + 1) + (V - id), top slots."""
    num_rows, vocab = logp_NV.shape
    probs = (logp_NV if draw_logp is None else draw_logp).exp()
    head = None
    if head_ids is not None:
        head = torch.zeros(num_rows, vocab, dtype=torch.bool).scatter_(1, head_ids, True)
        probs = probs.masked_fill(head, 0.0)
        probs = torch.where(probs.sum(1, keepdim=True) > 0, probs, (~head).to(probs.dtype))
    draws = torch.multinomial(probs, samples, replacement=True, generator=generator)
    counts = torch.zeros(num_rows, vocab, dtype=torch.int32).scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.int32))
    key = counts * (vocab + 1) + (vocab - torch.arange(vocab, dtype=torch.int32))
    if head is None:
        ids = key.topk(slots, dim=-1).indices
        picked = counts.gather(1, ids).double()
        return ids, torch.where(picked > 0, torch.log(picked / samples), torch.full_like(picked, PAD_LOGP))
    key = key.masked_fill(head, -1)
    tail_ids = key.topk(slots - head_ids.shape[1], dim=-1).indices
    picked = counts.gather(1, tail_ids).double()
    head_logp = logp_NV.gather(1, head_ids).double()
    log_r = torch.logsumexp(logp_NV.masked_fill(head, -math.inf), dim=1, keepdim=True).double()
    tail_logp = log_r + torch.log(picked / samples)
    tail_logp = torch.where((picked > 0) & (log_r > -math.inf), tail_logp, torch.full_like(tail_logp, PAD_LOGP))
    return torch.cat([head_ids, tail_ids], dim=1), torch.cat([head_logp, tail_logp], dim=1)


def snap_reference(logp: torch.Tensor, step: float) -> torch.Tensor:
    """``quant.snap_torch`` as it was until 2026-12-05: the same operations, each into a new [N, V] tensor."""
    codes = (torch.round(logp.double() / step) + 255).clamp(1, 255)
    return (codes * step + quant.offset(step)).float()


def _seconds(fn, repeats: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def bench_capture_targets(vocab: int, rows: int = 4096, repeats: int = 3, out: Path | None = None) -> dict:
    """Seconds per call of both rankings, each default store's k + samples, alternated so load hits both alike."""
    started = machine.start()
    torch.set_num_threads(1)
    logp = torch.log_softmax(torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 3, dim=-1)
    results = {}
    for name, (k, samples) in DEFAULTS.items():
        head = logp.topk(k, dim=-1).indices
        timed = {"dense": [], "sparse": []}
        for _ in range(2):
            for method, fn in (("dense", dense_reference), ("sparse", sample_targets)):
                call = functools.partial(fn, logp, samples, k + samples, torch.Generator().manual_seed(1), head, logp)
                timed[method].append(_seconds(call, repeats))
        dense, sparse = min(timed["dense"]), min(timed["sparse"])
        results[name] = {"k": k, "samples": samples, "dense_s": dense, "sparse_s": sparse, "speedup": dense / sparse}
    timed = {"out_of_place": [], "in_place": []}
    for _ in range(2):
        for method, fn in (("out_of_place", snap_reference), ("in_place", quant.snap_torch)):
            timed[method].append(_seconds(functools.partial(fn, logp, quant.QUANT_STEP), repeats))
    before, after = min(timed["out_of_place"]), min(timed["in_place"])
    results["uint8_snap"] = {"out_of_place_s": before, "in_place_s": after, "speedup": before / after}
    report = {"command": f"python -m babydistill.workflows.benchmarks.bench_capture_targets --vocab {vocab} --rows {rows}"
                         + (f" --out {out}" if out else ""),
              "vocab_size": vocab, "rows": rows, "threads": 1, "results": results, "machine": machine.finish(started)}
    snap = results["uint8_snap"]
    text = "\n".join([*(f"{name} default ({r['k']} + {r['samples']}), V = {vocab}, {rows} rows: dense {r['dense_s']:.2f} s, "
                         f"sparse {r['sparse_s']:.2f} s, {r['speedup']:.1f}x" for name, r in results.items() if "k" in r),
                       f"uint8 snapping, {rows} x {vocab}: out of place {snap['out_of_place_s']:.2f} s, in place "
                       f"{snap['in_place_s']:.2f} s, {snap['speedup']:.1f}x"])
    return publish(report, out, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m babydistill.workflows.benchmarks.bench_capture_targets",
                                description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=16_000, help="vocabulary size (default: 16000, the paper's)")
    p.add_argument("--rows", type=int, default=4096, help="positions per call (default: 4096)")
    p.add_argument("--out", help="JSON file to write (default: print only)")
    args = p.parse_args(argv)
    bench_capture_targets(args.vocab, args.rows, out=Path(args.out) if args.out else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
