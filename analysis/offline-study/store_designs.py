"""Could another store design of about 60 bytes/token carry a less noisy tail than 8 exact ids + 12 draws with their
probabilities? Exact noise (no simulation) of the tail estimate with the trainer's control variate (beta q_tail,
the batch's best beta), at the trained online-seq student o1, on 256 validation positions of the cpu-experiment
teachers; root-mean-square noise over the dense gradient's norm, as control_variate.py. Designs:

- proposal: draws from pi proportional to p_tail^g instead of p_tail (g < 1: flatter, "defensive");
- head size: the noise of one draw for k = 4 .. 32 exact ids (what an id costs: "bytes", below);
- without replacement: n distinct tail ids with inclusion probabilities min(1, c p_j) (Poisson sampling with
  Horvitz-Thompson weights; conditional Poisson / Pareto sampling are close to it), against S draws with
  replacement at the same mean number of distinct ids;
- the label's exact probability (the student knows the next token; one more value, no id) beside 12 draws;
- Neyman allocation: the same 12 draws per position on average, spread over positions in proportion to each
  position's noise (an oracle that knows it) or to the tail mass r (what a capture knows);
- a low-rank teacher control: the teachers' log-probabilities projected on their top r principal directions
  (fitted on 4096 training positions), whose r coefficients per position the store would keep (2r bytes in
  float16), used as the control instead of, or beside, the student's tail;
- the measured sequence-normalisation arms whose draws keep their probabilities (results.json): their gap to
  online-seq against this noise, a straight-line fit, and what the other arms' line predicted for 32 + 64.

    .venv/bin/python analysis/offline-study/store_designs.py   (from the repo root, after the online-seq arm)

Writes store_designs.json beside this file; the README of the offline study quotes it.
"""
import json
from pathlib import Path

import numpy as np
import torch
from validation_positions import RUN, logp_of, teacher_positions

from babydistill.pipeline.model import load_model
from babydistill.stores.logits import store_info
from babydistill.stores.tokens import TokenStore

# the study's per-seed numbers (its --report-only output) stay with its report in docs/
STUDY_RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results" / "offline-study" / "results.json"

torch.set_num_threads(2)
windows, picked, p = teacher_positions(256)
teachers = [load_model(RUN / "teachers" / t).eval() for t in ("t1", "t2")]
lq = logp_of([load_model(RUN / "study/online-seq/students/o1").eval()], windows)[picked]
q = lq.exp()
q = q / q.sum(1, keepdim=True)
signal2 = ((q - p) ** 2).sum(1).mean()
zero = torch.zeros_like(p)


def split(k: int):
    head = torch.zeros_like(p, dtype=torch.bool).scatter_(1, p.topk(k, dim=1).indices, True)
    p_tail, q_tail = p.masked_fill(head, 0.0), q.masked_fill(head, 0.0)
    return head, p_tail, q_tail, p_tail.sum(1, keepdim=True)


def over(x: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    return torch.where(pi > 0, x / pi.clamp_min(1e-300), zero)


def variance(p_tail, control, pi) -> torch.Tensor:
    """Per position, S = 1: E||(p_j - c_j) / pi_j e_j - (p_tail - c)||^2 for one draw j ~ pi."""
    d = p_tail - control
    return over(d ** 2, pi).sum(1) - (d ** 2).sum(1)


def best_betas(p_tail, controls, pi) -> list[float]:
    """The coefficients of sum_i beta_i c_i that minimise the summed variance (a least-squares solve)."""
    def inner(x, y):
        return float((over(x * y, pi).sum(1) - (x * y).sum(1)).sum())
    gram = torch.tensor([[inner(a, b) for b in controls] for a in controls], dtype=torch.float64)
    rhs = torch.tensor([inner(p_tail, a) for a in controls], dtype=torch.float64)
    return [float(b) for b in torch.linalg.solve(gram, rhs)]


def ratio(v: torch.Tensor) -> float:
    return round(float((v.mean() / signal2).sqrt()), 3)


result = {"positions": int(p.shape[0]), "student": "online-seq o1 (trained)",
          "note": "noise over signal; S draws divide the variance by S, so the noise by sqrt(S)"}

# proposal distributions and head sizes, one draw
head, p_tail, q_tail, r = split(8)
pi_p = p_tail / r
beta = best_betas(p_tail, [q_tail], pi_p)[0]
result["trainer_beta"] = round(beta, 3)
result["proposal_k8_one_draw"] = {}
for g in (1.0, 0.9, 0.8, 0.7, 0.5):
    w = p_tail ** g
    pi = w / w.sum(1, keepdim=True)
    b = best_betas(p_tail, [q_tail], pi)[0]
    result["proposal_k8_one_draw"][f"p^{g}"] = ratio(variance(p_tail, b * q_tail, pi))
d = (p_tail - beta * q_tail).abs()
result["proposal_k8_one_draw"]["oracle |p - beta q| (needs the student)"] = ratio(
    variance(p_tail, beta * q_tail, d / d.sum(1, keepdim=True)))
result["head_size_one_draw"] = {}
for k in (4, 8, 12, 16, 24, 32, 64, 128, 256, 512):
    _, pt, qt, rk = split(k)
    pik = pt / rk
    b = best_betas(pt, [qt], pik)[0]
    result["head_size_one_draw"][f"k={k}"] = {"tail_mass": round(float(rk.mean()), 3),
                                              "noise": ratio(variance(pt, b * qt, pik))}

# without replacement (Poisson sampling, Horvitz-Thompson) vs draws with replacement, same distinct ids
def inclusion(n: float, weight: torch.Tensor) -> torch.Tensor:
    lo, hi = torch.full_like(r, -60.0), torch.full_like(r, 60.0)
    for _ in range(100):
        mid = (lo + hi) / 2
        low = (mid.exp() * weight).clamp(max=1).sum(1, keepdim=True) < n
        lo, hi = torch.where(low, mid, lo), torch.where(low, hi, mid)
    return (lo.exp() * weight).clamp(max=1)


d = p_tail - beta * q_tail
result["with_vs_without_replacement"] = {}
for S in (12, 24, 48):
    distinct = float((1 - (1 - pi_p) ** S).sum(1).mean())
    pi_n = inclusion(distinct, p_tail)
    ht = torch.where(pi_n > 0, d ** 2 * (1 - pi_n) / pi_n.clamp_min(1e-300), zero).sum(1)
    result["with_vs_without_replacement"][f"S={S}"] = {
        "distinct_ids": round(distinct, 1), "with_replacement": ratio(variance(p_tail, beta * q_tail, pi_p) / S),
        "without_replacement_same_distinct": ratio(ht)}

# the label's exact probability: the student knows the next token, so one more value (no id) would make its
# tail entry exact; the draws' estimate then leaves it out (still unbiased: each id's term is its own)
next_token = windows[picked // windows.shape[1], (picked % windows.shape[1] + 1).clamp(max=windows.shape[1] - 1)]
has_label = (picked % windows.shape[1]) < windows.shape[1] - 1
label = torch.zeros_like(head).scatter_(1, next_token[:, None], True) & has_label[:, None] & ~head
d_label = (p_tail - beta * q_tail).masked_fill(label, 0.0)
result["label_exact_12_draws"] = {
    "label_in_tail": round(float(label.any(1).float().mean()), 3),
    "default": ratio(variance(p_tail, beta * q_tail, pi_p) / 12),
    "label_exact": ratio((over(d_label ** 2, pi_p).sum(1) - (d_label ** 2).sum(1)) / 12)}

# Neyman allocation of 12 draws per position on average
v = variance(p_tail, beta * q_tail, pi_p)
result["allocation_12_draws_mean"] = {"uniform": ratio(v / 12)}
for label, w in (("oracle sqrt(noise)", v.sqrt()), ("tail mass r", r[:, 0])):
    result["allocation_12_draws_mean"][label] = ratio(v / (12 * w / w.mean()))

# a low-rank teacher control
tokens = TokenStore(RUN / "tokens.zarr")
stream, starts = tokens.stream("train"), tokens.starts("train")
chosen = starts[np.random.default_rng(1).choice(len(starts), 32, replace=False)]
train_lp = logp_of(teachers, torch.from_numpy(np.stack([stream[s:s + 128] for s in chosen]).astype(np.int64)))
mean = train_lp.mean(0)
directions = torch.linalg.svd(train_lp - mean, full_matrices=False).Vh
p_logp = p.log()
result["low_rank_teacher_control_one_draw"] = {}
for rank in (8, 16, 32, 64):
    basis = directions[:rank]
    approx = torch.softmax(mean + ((p_logp - mean) @ basis.T) @ basis, dim=1).masked_fill(head, 0.0)
    approx = approx * (r / approx.sum(1, keepdim=True))    # its tail rescaled to the stored tail mass
    alone = best_betas(p_tail, [approx], pi_p)
    both = best_betas(p_tail, [q_tail, approx], pi_p)
    result["low_rank_teacher_control_one_draw"][f"rank {rank} ({2 * rank} B/token in float16)"] = {
        "instead_of_student": ratio(variance(p_tail, alone[0] * approx, pi_p)),
        "beside_student": ratio(variance(p_tail, both[0] * q_tail + both[1] * approx, pi_p))}
result["low_rank_teacher_control_one_draw"]["student only (the trainer's)"] = ratio(variance(p_tail, beta * q_tail, pi_p))

# what an entry costs on disk: per-array bytes per token of the study's stores (`babydistill store info`)
def array_bytes(arm: str) -> dict[str, float]:
    return {k: v["bytes_per_token"] for k, v in store_info(RUN / "study" / arm / "logits.zarr")["arrays"].items()}


few, many, top32 = array_bytes("hybrid8-12-cv-seq"), array_bytes("hybrid8-48-cv-seq"), array_bytes("topk32")
per_draw = {name: (many[name] - few[name]) / 36 for name in ("ids", "tail_logp", "logp")}
result["bytes"] = {
    "extra_draw_8+12_to_8+48": {name: round(value, 2) for name, value in per_draw.items()},
    "head_entry_top32": {name: round(top32[name] / 32, 2) for name in ("ids", "logp")},
    "draws_of_the_8+12_store": round(12 * sum(per_draw.values()), 1)}
# the measured sequence-normalisation arms with their probabilities: gap to online-seq against the computed noise
study = json.loads(STUDY_RESULTS.read_text())
arms = {arm["name"]: arm["per_seed"] for arm in study["arms"]}


def gap(arm: str, split: str) -> float:
    """Mean over seeds of (arm - online-seq), paired by seed."""
    return float(np.mean([arms[arm][seed][split] - arms["online-seq"][seed][split] for seed in arms["online-seq"]]))


measured = {"hybrid8-12-cv-seq": (8, 12), "hybrid8-24-cv-seq": (8, 24), "hybrid8-48-cv-seq": (8, 48),
            "hybrid32-64-cv-seq": (32, 64), "dense-seq": None}
points = {}
for arm, design in measured.items():
    noise = 0.0 if design is None else result["head_size_one_draw"][f"k={design[0]}"]["noise"] / design[1] ** 0.5
    points[arm] = {"noise": round(noise, 3), "val_gap": round(gap(arm, "val_ce"), 4),
                   "test_gap": round(gap(arm, "test_ce"), 4)}


def line(names: list[str], split: str) -> tuple[float, float]:
    """Least-squares gap = a + b * noise over these arms."""
    b, a = np.polyfit([points[n]["noise"] for n in names], [points[n][split] for n in names], 1)
    return float(a), float(b)


result["sequence_gap_vs_noise"] = {"arms": points}
earlier = [n for n in measured if n != "hybrid32-64-cv-seq"]  # what was known before the 32+64 arm ran
for split in ("val_gap", "test_gap"):
    a, b = line(list(measured), split)
    a_before, b_before = line(earlier, split)
    result["sequence_gap_vs_noise"][split] = {
        "fit_all": {"intercept": round(a, 4), "slope": round(b, 4)},
        "32+64_predicted_from_the_others": round(a_before + b_before * points["hybrid32-64-cv-seq"]["noise"], 4)}
print(json.dumps(result, indent=1))
out = Path(__file__).with_name("store_designs.json")
out.write_text(json.dumps(result, indent=2) + "\n")
print("wrote", out)
