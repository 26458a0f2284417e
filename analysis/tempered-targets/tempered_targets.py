"""Tempered targets from a store, computed exactly (no simulation) on real teacher distributions: the demo run's
ensemble (teachers t1, t2) and its trained student s1, at 256 positions of 8 seeded validation windows.

1. tail_noise: how the noise of the default hybrid stores' tail (token default 8 ids + 12 draws, sequence default
   32 + 64, each draw with its probability; `kernels.targets.tempered_slot_logp`) grows with T in {0.5, 1, 2, 4}.
   Per position, one draw j from the T = 1 tail pi_j = p_j / r carries (p_T,j - beta q_T,j) / pi_j: variance
   sum_tail (p_T - beta q_T)^2 / pi - ||p_T,tail - beta q_T,tail||^2, divided by S draws (the noise measure of
   analysis/offline-study/store_designs.py, at T: q_T = softmax(z / T), beta the batch's best, 0 = no control).
   Reported as root-mean-square noise over the dense gradient's norm ||q_T - p_T|| (scale-free: the loss's T^2
   and the gradient's 1 / T cancel), and as the absolute rms noise of d(T^2 KL)/dz = T (q_T - t). Also 20 draws
   from the whole distribution with their probabilities (a sample store that kept them, k = 0), for the decision
   that sample stores stay at T = 1.
2. retempering: a top-k store asked for an uncaptured T approximates c_T with a uniform tail
   (`kernels.targets.prepare_targets` without c_T); against a recapture at T (exact c_T), the KL of the targets
   the loss sees (K entries and one tail bucket, distill.tail bucket) and of the dense targets (tail spread
   evenly), and the bias of the loss gradient (`kernels.reference`, float64) over the norms of the recaptured
   store's gradient and of the dense one, for top-8 and top-32 at T = 2 and 4 (and 0.5).

    .venv/bin/python analysis/tempered-targets/tempered_targets.py [--run runs/demo]

Writes docs/results/tempered-targets/tempered_targets.json; docs/loss.md quotes it.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from babydistill.kernels import reference
from babydistill.pipeline.capture_targets import ensemble_logp
from babydistill.pipeline.model import load_model
from babydistill.stores.tokens import TokenStore

OUT = Path(__file__).resolve().parents[2] / "docs" / "results" / "tempered-targets" / "tempered_targets.json"
TEMPERATURES = (0.5, 1.0, 2.0, 4.0)
DESIGNS = {"token default 8 + 12": (8, 12), "sequence default 32 + 64": (32, 64), "sample, 20 draws (k = 0)": (0, 20)}


def positions(run: Path, count: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """log p of the ensemble and log q of the student s1 at ``count`` seeded validation positions ([count, V]
    float64 each, renormalised)."""
    tokens = TokenStore(run / "tokens.zarr")
    rng = np.random.default_rng(0)
    stream, starts = tokens.stream("validation"), tokens.starts("validation")
    windows = torch.from_numpy(np.stack([stream[s:s + 128] for s in starts[rng.choice(len(starts), 8, replace=False)]])
                               .astype(np.int64))
    with torch.no_grad():
        teachers = [load_model(run / "teachers" / t).eval()(windows).logits.float() for t in ("t1", "t2")]
        student = load_model(run / "students" / "s1").eval()(windows).logits.float()
    picked = torch.from_numpy(rng.choice(windows.numel(), count, replace=False))
    logp = ensemble_logp(teachers, "logits").reshape(-1, teachers[0].shape[-1]).double()[picked]
    logq = torch.log_softmax(student.reshape(-1, student.shape[-1]).double()[picked], 1)
    return torch.log_softmax(logp, 1), logq


def _inner(x: torch.Tensor, y: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """sum over positions of the one-draw covariance of the estimates of x and y (draws from pi)."""
    return (torch.where(pi > 0, x * y / pi.clamp_min(1e-300), 0.0).sum(1) - (x * y).sum(1)).sum()


def tail_noise(logp: torch.Tensor, logq: torch.Tensor) -> dict:
    out = {}
    for T in TEMPERATURES:
        p_T, q_T = torch.softmax(logp / T, 1), torch.softmax(logq / T, 1)
        signal2 = ((q_T - p_T) ** 2).sum(1).mean()
        row = {"dense_gradient_rms_norm": round(float(T * signal2.sqrt()), 5)}
        for name, (k, S) in DESIGNS.items():
            head = torch.zeros_like(logp, dtype=torch.bool)
            if k:
                head.scatter_(1, logp.topk(k, 1).indices, True)
            p = logp.exp().masked_fill(head, 0.0)
            pi = p / p.sum(1, keepdim=True)
            pt, qt = p_T.masked_fill(head, 0.0), q_T.masked_fill(head, 0.0)
            beta = float((_inner(pt, qt, pi) / _inner(qt, qt, pi)).clamp(0, 1))
            cell = {"tempered_tail_mass": round(float(pt.sum(1).mean()), 4), "beta": round(beta, 3)}
            for label, b in (("plain", 0.0), ("control", beta)):
                d = pt - b * qt
                var = (torch.where(pi > 0, d ** 2 / pi.clamp_min(1e-300), 0.0).sum(1) - (d ** 2).sum(1)) / S
                cell[f"noise_over_signal_{label}"] = round(float((var.mean() / signal2).sqrt()), 4)
                cell[f"gradient_rms_noise_{label}"] = round(float(T * var.mean().sqrt()), 5)
            row[name] = cell
        out[f"T={T:g}"] = row
    return out


def _bucket_kl(a_K, a_r, b_K, b_r) -> torch.Tensor:
    """KL(a || b) of targets on K plus one tail bucket, per row."""
    kl = torch.where(a_K > 0, a_K * (a_K.log() - b_K.log()), 0.0).sum(1)
    return kl + torch.where(a_r > 0, a_r * (a_r.log() - b_r.clamp_min(1e-300).log()), 0.0)


def retempering(logp: torch.Tensor, logq: torch.Tensor) -> dict:
    """Top-k at an uncaptured T (uniform-tail c_T) against a recapture at T (exact c_T)."""
    N, V = logp.shape
    out = {}
    z = logq.clone()   # the student's logits (up to a constant per row)
    labels = torch.zeros(N, dtype=torch.int64)
    for k in (8, 32):
        ids = logp.topk(k, 1).indices
        stored = logp.gather(1, ids)
        for T in (0.5, 2.0, 4.0):
            c_exact = torch.logsumexp(logp / T, 1)      # LSE(zbar / T) - LSE(zbar) / T with zbar = log p
            grads, targets = {}, {}
            for name, c in (("approximate", None), ("recaptured", c_exact)):
                logits = z.clone().requires_grad_(True)
                loss, _, _ = reference.sparse_distill_loss(logits, labels, ids, stored, alpha=0.0, temperature=T,
                                                           tail="bucket", normalization="sum", c_T=c)
                loss.backward()
                grads[name] = logits.grad
                in_K, num_tail, p_T_dense, r_T = reference._dense_teacher(logits, ids, stored, stored > -1e30, T, c)
                targets[name] = (p_T_dense.gather(1, ids), r_T, num_tail)
            dense = T * (torch.softmax(z / T, 1) - torch.softmax(logp / T, 1))
            (a_K, a_r, nt), (b_K, b_r, _) = targets["recaptured"], targets["approximate"]
            bias = (grads["approximate"] - grads["recaptured"]).norm(dim=1)
            p_T = torch.softmax(logp / T, 1)
            approx_dense = (b_r / nt)[:, None].expand(N, V).clone().scatter_(1, ids, b_K)
            out[f"top-{k} T={T:g}"] = {
                "kl_targets_bucket": float(_bucket_kl(a_K, a_r, b_K, b_r).mean()),
                "kl_dense_tempered_vs_uniform_tail": float((p_T * (p_T.log() - approx_dense.log())).sum(1).mean()),
                "tail_mass_exact": round(float(a_r.mean()), 4), "tail_mass_approximate": round(float(b_r.mean()), 4),
                "grad_bias_over_recaptured_grad": round(float(bias.mean() / grads["recaptured"].norm(dim=1).mean()), 4),
                "grad_bias_over_dense_grad": round(float(bias.mean() / dense.norm(dim=1).mean()), 4),
                "recaptured_grad_bias_over_dense_grad": round(float(
                    (grads["recaptured"] - dense).norm(dim=1).mean() / dense.norm(dim=1).mean()), 4)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    logp, logq = positions(args.run)
    result = {"command": "python analysis/tempered-targets/tempered_targets.py --run " + str(args.run),
              "run": str(args.run), "positions": int(logp.shape[0]), "vocab": int(logp.shape[1]),
              "student": "s1 (offline, hybrid 8 + 12, T = 1)",
              "tail_noise": tail_noise(logp, logq), "retempering": retempering(logp, logq)}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout, indent=1)
    print("\nwrote", OUT)


if __name__ == "__main__":
    main()
