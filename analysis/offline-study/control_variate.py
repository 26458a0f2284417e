"""Would a control-variate tail fix the sequence-normalisation gap? The tail-noise of hybrid targets,
computed exactly (no simulation), at the students that matter, on 256 validation positions of the
cpu-experiment teachers.

    .venv/bin/python analysis/offline-study/control_variate.py    (from the repo root, after the study's online-seq arm)

A hybrid store's tail is S draws j_s from pi = p_tail / r; the target's tail estimate is
(r/S) sum_s e_{j_s}. Its noise (the gradient's, since the student gradient is q - target) has
E||.||^2 = r^2 (1 - ||pi||^2) / S. The control variate that the stop note of 2026-11-27 proposed uses the
student's own tail: target_tail = q_tail + (1/S) sum_s (p_j - q_j) / pi_j e_j (unbiased, needs the drawn
ids' exact teacher probabilities), whose noise has E||.||^2 = (r sum_tail (p_j - q_j)^2 / p_j - ||p_t - q_t||^2) / S.
Both are reported relative to the dense gradient's norm ||q - p|| (signal), as a root-mean-square ratio.
Writes control_variate.json beside this file; the README of the offline study quotes it.
"""
import json
from pathlib import Path

import torch
from validation_positions import RUN, logp_of, teacher_positions

from babydistill.pipeline.model import load_model

torch.set_num_threads(2)
windows, picked, p = teacher_positions(256)
vocab = p.shape[1]
students = {"uniform (step 0)": torch.full_like(p, 1.0 / vocab)}
for name, path in [("online-seq student o1 (trained)", RUN / "study/online-seq/students/o1"),
                   ("hybrid8-24-seq student s1 (trained)", RUN / "study/hybrid8-24-seq/students/s1"),
                   ("hybrid8-24-cv-seq student s1 (trained)", RUN / "study/hybrid8-24-cv-seq/students/s1")]:
    if path.is_dir():
        students[name] = logp_of([load_model(path).eval()], windows)[picked].exp()

k = 8
head = torch.zeros_like(p, dtype=torch.bool).scatter_(1, p.topk(k, dim=1).indices, True)
p_tail = p.masked_fill(head, 0.0)
r = p_tail.sum(1)
pi = p_tail / r[:, None]
result = {"positions": int(p.shape[0]), "k": k, "tail_mass_r_mean": float(r.mean()), "students": {}}
for name, q in students.items():
    q = q / q.sum(1, keepdim=True)
    signal2 = ((q - p) ** 2).sum(1)
    q_tail = q.masked_fill(head, 0.0)
    plain2 = r ** 2 * (1 - (pi ** 2).sum(1))                                  # times 1/S
    ratio = torch.where(p_tail > 0, (p_tail - q_tail) ** 2 / p_tail.clamp_min(1e-300), torch.zeros_like(p))
    cv2 = r * ratio.sum(1) - ((p_tail - q_tail) ** 2).sum(1)                     # times 1/S
    # The best coefficient beta per position (target_tail = beta q_tail + (1/S) sum_s (p_j - beta q_j) / pi_j e_j,
    # unbiased for any beta fixed before the draws), clipped to [0, 1]: an oracle, since it needs p on the whole
    # tail; a trainer could only estimate one beta per step from other positions' draws.
    q_over_p = torch.where(p_tail > 0, q_tail ** 2 / p_tail.clamp_min(1e-300), torch.zeros_like(p))
    beta = ((r * q_tail.sum(1) - (p_tail * q_tail).sum(1))
            / (r * q_over_p.sum(1) - (q_tail ** 2).sum(1))).clamp(0, 1)
    ratio_beta = torch.where(p_tail > 0, (p_tail - beta[:, None] * q_tail) ** 2 / p_tail.clamp_min(1e-300),
                             torch.zeros_like(p))
    cv_beta2 = r * ratio_beta.sum(1) - ((p_tail - beta[:, None] * q_tail) ** 2).sum(1)
    # One beta for all positions, the minimiser of the summed noise (what the trainer estimates per batch,
    # `pipeline.distill.control_beta`, from other positions' draws).
    B = r * q_tail.sum(1) - (p_tail * q_tail).sum(1)
    C = r * q_over_p.sum(1) - (q_tail ** 2).sum(1)
    batch_beta = float((B.sum() / C.sum()).clamp(0, 1))
    ratio_batch = torch.where(p_tail > 0, (p_tail - batch_beta * q_tail) ** 2 / p_tail.clamp_min(1e-300),
                              torch.zeros_like(p))
    cv_batch2 = r * ratio_batch.sum(1) - ((p_tail - batch_beta * q_tail) ** 2).sum(1)
    row = {"signal_norm_mean": float(signal2.sqrt().mean()),
           "student_tail_mass_on_teacher_tail_mean": float(q_tail.sum(1).mean())}
    row["batch_beta"] = batch_beta
    for draws in (8, 12, 24, 64):
        row[f"plain_S{draws}_noise_over_signal"] = float(((plain2 / draws).mean() / signal2.mean()).sqrt())
        row[f"cv_S{draws}_noise_over_signal"] = float(((cv2 / draws).mean() / signal2.mean()).sqrt())
        row[f"cv_best_beta_S{draws}_noise_over_signal"] = float(((cv_beta2 / draws).mean() / signal2.mean()).sqrt())
        row[f"cv_batch_beta_S{draws}_noise_over_signal"] = float(((cv_batch2 / draws).mean() / signal2.mean()).sqrt())
    row["best_beta_mean"] = float(beta.mean())
    row["cv_over_plain_noise"] = float((cv2.mean() / plain2.mean()).sqrt())
    row["cv_worse_than_plain_positions"] = float((cv2 > plain2).double().mean())
    result["students"][name] = row
    print(name, json.dumps(row, indent=1))
out = Path(__file__).with_name("control_variate.json")
out.write_text(json.dumps(result, indent=2) + "\n")
print("wrote", out)
