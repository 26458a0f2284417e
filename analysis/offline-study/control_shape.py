"""Could a better-shaped control variate than the student's own tail cut the tail noise further? Exact noise
(no simulation) of a hybrid 8+12 store's tail estimate with control c (target_tail = c + (1/S) sum_s (p_j - c_j)
/ pi_j e_j, unbiased for any c fixed before the draws), at trained students, on 256 validation positions of
the cpu-experiment teachers. Controls: none (plain draws); beta q_tail (what the trainer uses, one beta per
batch); beta q^gamma (a tempered student); a per-row power law fitted on the exact head (log p = a + g log q over
the 8 head ids, extrapolated to the tail); q_tail rescaled per row to the stored tail mass r. Each with its
best batch beta. Reported as root-mean-square noise over the dense gradient's norm, as control_variate.py.

    .venv/bin/python analysis/offline-study/control_shape.py    (from the repo root, after the study's seq arms)

Writes control_shape.json beside this file; the README of the offline study quotes it.
"""
import json
from pathlib import Path

import torch
from validation_positions import RUN, logp_of, teacher_positions

from babydistill.pipeline.model import load_model

torch.set_num_threads(2)
windows, picked, p = teacher_positions(256)
S, k = 12, 8
head = torch.zeros_like(p, dtype=torch.bool).scatter_(1, p.topk(k, dim=1).indices, True)
p_tail = p.masked_fill(head, 0.0)
r = p_tail.sum(1)


def over_p(x: torch.Tensor) -> torch.Tensor:
    return torch.where(p_tail > 0, x / p_tail.clamp_min(1e-300), torch.zeros_like(p))


def noise(c: torch.Tensor, signal2: torch.Tensor) -> float:
    """RMS noise of the tail estimate with control c over S multinomial draws from p_tail / r, over the signal."""
    d = (p_tail - c).masked_fill(head, 0.0)
    variance = r * over_p(d ** 2).sum(1) - (d ** 2).sum(1)
    return float(((variance / S).mean() / signal2).sqrt())


def best_beta(c: torch.Tensor) -> float:
    """The beta minimising the summed noise of control beta * c (as `pipeline.distill.control_beta` estimates)."""
    return float((r * c.sum(1) - (p_tail * c).sum(1)).sum() / (r * over_p(c ** 2).sum(1) - (c ** 2).sum(1)).sum())


result = {"positions": int(p.shape[0]), "k": k, "samples": S, "students": {}}
for name, path in [("online-seq student o1 (trained)", RUN / "study/online-seq/students/o1"),
                   ("hybrid8-12-cv-seq student s1 (trained)", RUN / "study/hybrid8-12-cv-seq/students/s1")]:
    lq = logp_of([load_model(path).eval()], windows)[picked]
    q = lq.exp()
    q = q / q.sum(1, keepdim=True)
    q_tail = q.masked_fill(head, 0.0)
    signal2 = ((q - p) ** 2).sum(1).mean()
    controls = {"none (plain draws)": torch.zeros_like(p), "beta q_tail (the trainer's)": q_tail}
    for gamma in (0.8, 0.9, 1.1, 1.2):
        controls[f"beta q^{gamma}"] = (lq * gamma).exp().masked_fill(head, 0.0)
    lp_head, lq_head = p.log()[head].view(-1, k), lq[head].view(-1, k)
    x_mean, y_mean = lq_head.mean(1, keepdim=True), lp_head.mean(1, keepdim=True)
    slope = (((lq_head - x_mean) * (lp_head - y_mean)).sum(1, keepdim=True)
             / ((lq_head - x_mean) ** 2).sum(1, keepdim=True)).clamp(0.3, 2.0)
    controls["beta exp(a + g log q), a and g fitted on the head per row"] = (
        (y_mean - slope * x_mean + slope * lq).exp().masked_fill(head, 0.0))
    controls["beta q_tail * r / q_tail.sum (rescaled to the stored tail mass)"] = q_tail * (r / q_tail.sum(1))[:, None]
    row = {}
    for label, c in controls.items():
        beta = best_beta(c) if c.abs().sum() > 0 else 0.0
        row[label] = {"beta": beta, "noise_over_signal": noise(beta * c, signal2)}
    result["students"][name] = row
    print(name, json.dumps(row, indent=1))
out = Path(__file__).with_name("control_shape.json")
out.write_text(json.dumps(result, indent=2) + "\n")
print("wrote", out)
