"""Is the control variate's beta, estimated from the draws (`pipeline.distill.control_beta`), the one that
minimises the tail noise? Exact optimum vs estimates over 60 redraws of 24 tail draws, on 512 validation
positions of the cpu-experiment teachers, for a trained student and for early checkpoints.

    .venv/bin/python analysis/offline-study/control_beta.py [CHECKPOINT_DIR ...]   (from the repo root)

A CHECKPOINT_DIR is a training checkpoint (``<student>.partial/trainer_state/step-NNNNNN``, holding
``model.pt``); a run keeps its two newest there until it finishes. The figures in the offline-study README
used step-000050 and step-000067 of `hybrid8-24-cv`'s seed 2, copied while it trained.
Writes control_beta.json beside this file.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from validation_positions import RUN, logp_of, validation_windows

from babydistill.pipeline.capture_targets import sample_targets
from babydistill.pipeline.distill import control_beta
from babydistill.pipeline.model import load_model

K, SAMPLES, REDRAWS = 8, 24, 60
torch.set_num_threads(2)
rng = np.random.default_rng(0)
tokens, windows = validation_windows(rng)
teacher = logp_of([load_model(RUN / "teachers" / t).eval() for t in ("t1", "t2")], windows)


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(windows).logits.double().reshape(-1, tokens.vocab_size)


picked = torch.from_numpy(rng.choice(teacher.shape[0], 512, replace=False))
lp = teacher[picked] - torch.logsumexp(teacher[picked], 1, keepdim=True)
p = lp.exp()
model = load_model(RUN / "study/online-seq/students/o1").eval()
students = {"online-seq o1 (trained)": logits_of(model)[picked]}
for folder in sys.argv[1:]:
    model.load_state_dict(torch.load(Path(folder) / "model.pt", map_location="cpu"))
    students[Path(folder).name] = logits_of(model)[picked]

head_ids = p.topk(K, 1).indices
head = torch.zeros_like(p, dtype=torch.bool).scatter_(1, head_ids, True)
p_tail = p.masked_fill(head, 0)
r = p_tail.sum(1)
result = {"positions": 512, "k": K, "samples": SAMPLES, "redraws": REDRAWS, "students": {}}
for name, z in students.items():
    q_tail = torch.softmax(z, 1).masked_fill(head, 0)
    A = r * p_tail.sum(1) - (p_tail ** 2).sum(1)
    B = r * q_tail.sum(1) - (p_tail * q_tail).sum(1)
    C = r * torch.where(p_tail > 0, q_tail ** 2 / p_tail.clamp_min(1e-300), 0).sum(1) - (q_tail ** 2).sum(1)
    exact = float((B.sum() / C.sum()).clamp(0, 1))

    def noise(beta: float, A=A, B=B, C=C) -> float:  # noqa: N803  (this student's A, B, C)
        return float((A - 2 * beta * B + beta ** 2 * C).sum())

    generator = torch.Generator().manual_seed(0)
    estimates = []
    for redraw in range(REDRAWS):
        ids, weights = sample_targets(lp.float(), SAMPLES, K + SAMPLES, generator, head_ids)
        tail_logp = torch.where(weights[:, K:] > -1e3, lp.gather(1, ids[:, K:]), -1e4)
        half = torch.arange(256) + 256 * (redraw % 2)  # a batch half, as the trainer estimates it
        estimates.append(control_beta(z[half], ids[half], weights[half], tail_logp[half], K))
    estimates = np.array(estimates)
    row = {"exact_beta": exact, "estimated_beta_mean": float(estimates.mean()),
           "estimated_beta_p10": float(np.quantile(estimates, 0.1)),
           "estimated_beta_p90": float(np.quantile(estimates, 0.9)),
           "noise_ratio_vs_plain_at_exact_beta": (noise(exact) / noise(0.0)) ** 0.5,
           "noise_ratio_vs_plain_at_estimates": float(np.mean([(noise(b) / noise(0.0)) ** 0.5 for b in estimates])),
           "max_q_over_p_on_tail": float(torch.where(p_tail > 0, q_tail / p_tail.clamp_min(1e-300), 0).max())}
    result["students"][name] = row
    print(name, json.dumps(row, indent=1))
out = Path(__file__).with_name("control_beta.json")
out.write_text(json.dumps(result, indent=2) + "\n")
print("wrote", out)
