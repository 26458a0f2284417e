"""The capture-time fidelity report: how far the stored targets are from the dense ensemble, and their
gradient's noise, on a fixed sample of positions (recorded in the store's header)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from babydistill.pipeline.capture_targets import sample_targets, stored_target
from babydistill.stores.logits import (
    PAD_LOGP,
    read_marker,
)

TAIL_MODES = ("bucket", "renorm", "uniform")

FIDELITY_REDRAWS = 32


def gradient_fidelity(logp_V: torch.Tensor, ids: np.ndarray, stored: np.ndarray, mode: str, k: int, samples: int,
                      generator: torch.Generator, redraws: int = FIDELITY_REDRAWS) -> tuple[float, float, float]:
    """(bias, spread, norm) of the distillation gradient w.r.t. the student logits from the stored target,
    at a uniform student, against the dense teacher's gradient ``norm = ||1/V - p||_2``.

    bias = ||E[target] - p||_2: what no number of steps averages away (top-k: the tail's shape).
    spread = sqrt(E ||target - E[target]||^2): sampling noise, which averages out over steps.
    For sampled modes E is estimated from ``redraws`` fresh captures of this position, and the squared
    bias is corrected for the estimate's own noise (||mean - p||^2 - spread^2 / (redraws - 1), which is
    unbiased; clamped at 0); top-k targets are deterministic.
    """
    vocab = logp_V.shape[0]
    p = logp_V.double().exp().numpy()
    p /= p.sum()
    norm = float(np.linalg.norm(1.0 / vocab - p))
    if mode == "topk":
        return float(np.linalg.norm(stored_target(ids, stored, vocab, mode) - p)), 0.0, norm
    rows = logp_V.expand(redraws, vocab).contiguous()
    slots = len(ids)
    head = rows.topk(k, dim=-1).indices if mode == "hybrid" else None
    draw_ids, draw_logp = sample_targets(rows, samples, slots, generator, head)
    targets = np.stack([stored_target(draw_ids[i].numpy(), draw_logp[i].numpy(), vocab, mode)
                        for i in range(redraws)])
    mean = targets.mean(0)
    spread_sq = float(((targets - mean) ** 2).sum(1).mean())
    bias_sq = float(((mean - p) ** 2).sum()) - spread_sq / (redraws - 1)
    return math.sqrt(max(bias_sq, 0.0)), math.sqrt(spread_sq), norm


def fidelity_row(logp_V: np.ndarray, ids: np.ndarray, stored: np.ndarray, mode: str) -> tuple[float, ...]:
    """(kl_bucket, kl_renorm, kl_uniform, residual) of one position; float64, from the stored values.

    topk: bucket = KL(dense || stored) over the coarsening K + one tail bucket; uniform = KL(dense ||
    stored, tail spread evenly); renorm = KL(renormalised stored || dense), the reverse direction,
    because the forward one is infinite whenever the tail has mass. sample: the tail is empty and
    every mode is KL(sampled weights || dense).
    """
    p = np.exp(logp_V.astype(np.float64))
    real = stored > PAD_LOGP / 2
    ids, q = ids[real], np.exp(stored[real].astype(np.float64))
    p_k = p[ids]
    residual = 1.0 - q.sum()
    if mode in ("sample", "hybrid"):
        kl = float(np.sum(q * (np.log(q) - np.log(p_k))))
        return kl, kl, kl, residual
    r, r_hat = max(1.0 - p_k.sum(), 0.0), max(residual, 1e-30)
    head = float(np.sum(p_k * (np.log(p_k) - np.log(q))))
    bucket = head + (r * math.log(r / r_hat) if r > 0 else 0.0)
    tail = np.delete(p, ids)
    tail = tail[tail > 0]
    uniform = head + float(np.sum(tail * (np.log(tail) - math.log(r_hat / max(1, len(p) - len(ids))))))
    q_renorm = q / q.sum()
    renorm = float(np.sum(q_renorm * (np.log(q_renorm) - np.log(p_k))))
    return bucket, renorm, uniform, residual


def fidelity_positions(num_windows: int, seq_len: int, count: int, seed: int) -> np.ndarray:
    """``count`` distinct (window, position) pairs, fixed by the seed: int64 [count, 2], sorted."""
    total = num_windows * seq_len
    flat = np.sort(np.random.default_rng([seed, 1]).choice(total, size=min(count, total), replace=False))
    return np.stack([flat // seq_len, flat % seq_len], axis=1)


def _stats(values: np.ndarray) -> dict:
    return {"mean": float(values.mean()), "p50": float(np.percentile(values, 50)),
            "p90": float(np.percentile(values, 90)), "max": float(values.max())}


def fidelity_report(out: Path, num_chunks: int, mode: str) -> dict:
    rows = [row for i in range(num_chunks) for row in (read_marker(out, i) or {}).get("fidelity", [])]
    if not rows:
        return {"positions": 0}
    table = np.asarray(rows, dtype=np.float64)
    report = {
        "positions": len(rows),
        "kl_nats": {name: _stats(table[:, 2 + j]) for j, name in enumerate(TAIL_MODES)},
        "residual_mass": _stats(table[:, 5]),
        "note": ("storage precision: bucket and uniform: KL(dense || stored reconstruction) on the coarsened "
                 "space; renorm: KL(renormalised || dense), the forward KL being infinite when the tail has mass. "
                 "It does not measure what top-k leaves out: see gradient" if mode == "topk" else
                 "sampled targets: no tail, every mode is KL(sampled weights || dense), sampling noise"),
    }
    if table.shape[1] > 6:
        norm = table[:, 8]
        bias, floor = table[:, 6] / norm, table[:, 7] / norm / math.sqrt(FIDELITY_REDRAWS)
        report["gradient"] = {
            "bias_rel": _stats(bias), "spread_rel": _stats(table[:, 7] / norm),
            # The bias of sampled targets is estimated from FIDELITY_REDRAWS captures: its own noise is about
            # spread / sqrt(redraws); a bias below that floor cannot be told from 0 (the true one may well be 0).
            "noise_floor_rel": _stats(floor),
            "bias_above_floor": float(np.mean(bias > 2 * floor)) if mode != "topk" else float(np.mean(bias > 0)),
            "note": ("distillation gradient w.r.t. the student logits at a uniform student, from the stored "
                     "target vs the dense teacher, relative to the dense gradient's L2 norm: bias does not "
                     "average out over steps, spread (sampling noise) does" + (
                         "" if mode == "topk" else f"; bias estimated from {FIDELITY_REDRAWS} redraws per position: "
                         "below its noise floor it cannot be told from 0")),
        }
    return report


def format_fidelity(report: dict) -> str:
    if not report.get("positions"):
        return "fidelity: no positions sampled"
    lines = [f"fidelity on {report['positions']} positions ({report['note']}):"]
    rows = {f"KL {name}": v for name, v in report["kl_nats"].items()}
    rows["residual mass"] = report["residual_mass"]
    gradient = report.get("gradient", {})
    if gradient:
        rows.update({"grad bias/norm": gradient["bias_rel"], "grad spread/norm": gradient["spread_rel"]})
        if "noise_floor_rel" in gradient:
            rows["bias noise floor"] = gradient["noise_floor_rel"]
    for name, s in rows.items():
        lines.append(f"  {name:<17} mean {s['mean']:.3e}  p50 {s['p50']:.3e}  p90 {s['p90']:.3e}  max {s['max']:.3e}")
    if "bias_above_floor" in gradient:
        lines.append(f"  gradient bias above twice its noise floor at {gradient['bias_above_floor']:.0%} of positions"
                     + (" (sampled targets are unbiased by construction: what is left is the estimate's noise)"
                        if gradient["bias_above_floor"] < 0.1 and "redraws" in gradient["note"] else ""))
    return "\n".join(lines)
