"""What the tail noise does to the optimizer: the draws inflate Adam's second moment on the output rows of rare tokens.

For every finished arm of the study, the AdamW second moment v of lm_head at the students' last checkpoint
(step 400 of 402), averaged over each row's 160 entries, divided row by row by the online student's of the
same seed, normalisation and optimizer settings (arms without such an online arm are left out); reported as the 10th / 50th / 90th percentile over the 6000 rows (mean over
seeds), next to the arm's test CE minus that online arm's (mean over seeds). The backbone's matrices are
reported the same way (one ratio per matrix, the median over matrices), to show that the inflation is the
output layer's.

    .venv/bin/python analysis/offline-study/adam_second_moment.py   (from the repo root, after the study)

Writes adam_second_moment.json beside this file; the README of the offline study quotes it.
"""
import json
from pathlib import Path

import torch

# the study's per-seed numbers (its --report-only output) stay with its report in docs/
STUDY_RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results" / "offline-study" / "results.json"

STUDY = Path("runs/cpu-experiment/study")
RESULTS = json.loads(STUDY_RESULTS.read_text())
SEEDS = (1, 2, 3)


def second_moments(model_dir: Path) -> dict[str, torch.Tensor]:
    """lm_head's per-row v and every other matrix's mean v at the newest complete checkpoint, by name."""
    state_dir = model_dir / "trainer_state"
    step = max(p for p in state_dir.glob("step-*") if (p / "COMPLETE").exists() and (p / "optimizer.pt").exists())
    names = [n for n, w in torch.load(step / "model.pt", map_location="cpu", weights_only=True).items()
             if w.dim() == 2]
    optimizer = torch.load(step / "optimizer.pt", map_location="cpu", weights_only=True)
    groups = optimizer["param_groups"]
    # The matrices' group lists them in the model's order; with train.head_lr_scale, lm_head has a group of its own.
    indices = list(groups[0]["params"]) + (list(groups[2]["params"]) if len(groups) > 2 else [])
    out = {}
    for name, index in zip(names, indices):
        v = optimizer["state"][index]["exp_avg_sq"].double()
        out[name] = v.mean(1) if name == "lm_head.weight" else v.mean()
    return out


def test_ce(arm: str, seed: int) -> float | None:
    row = next((a for a in RESULTS["arms"] if a["name"] == arm), None)
    cell = (row or {}).get("per_seed", {}).get(str(seed), {})
    return cell.get("test_ce")


def recipe(arm: dict) -> tuple:
    """What an offline arm must share with its online reference: the loss normalisation and the optimizer."""
    train, distill = arm["config"]["train"], arm["config"]["distill"]
    head = distill.get("head_lr_scale") or train.get("head_lr_scale", 1.0)  # the students' own, when set
    return (distill["normalization"], head, train["min_lr_ratio"])


quantiles = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
online = {recipe(a): a["name"] for a in RESULTS["arms"] if a["online"]}
result = {"checkpoint": "newest complete (step 400 of 402)",
          "reference": "the online arm with the same normalisation and optimizer settings", "arms": {}}
for arm in RESULTS["arms"]:
    name = arm["name"]
    normalization = arm["config"]["distill"]["normalization"]
    reference = online.get(recipe(arm))
    if arm["online"] or reference is None:
        continue
    rows, backbone, gaps = [], [], []
    for seed in SEEDS:
        mine = STUDY / name / "students" / f"s{seed}"
        theirs = STUDY / reference / "students" / f"o{seed}"
        if not (mine / "trainer_state").is_dir() or not (theirs / "trainer_state").is_dir():
            continue
        a, b = second_moments(mine), second_moments(theirs)
        rows.append(torch.quantile(a["lm_head.weight"] / b["lm_head.weight"], quantiles))
        backbone.append(torch.stack([a[n] / b[n] for n in a if n not in ("lm_head.weight", "model.embed_tokens.weight")]).median())
        if test_ce(name, seed) is not None and test_ce(reference, seed) is not None:
            gaps.append(test_ce(name, seed) - test_ce(reference, seed))
    if not rows:
        continue
    q = torch.stack(rows).mean(0)
    result["arms"][name] = {
        "normalization": normalization, "online_reference": reference, "seeds": len(rows),
        "lm_head_row_v_over_online_q10_q50_q90": [round(float(x), 2) for x in q],
        "backbone_matrix_v_over_online_median": round(float(torch.stack(backbone).mean()), 2),
        "test_ce_minus_online": round(sum(gaps) / len(gaps), 4) if gaps else None,
    }
    print(f"{name:28s} {normalization:8s} lm_head row v / online q10/50/90: "
          + " ".join(f"{float(x):6.2f}" for x in q)
          + f"   backbone {result['arms'][name]['backbone_matrix_v_over_online_median']:.2f}"
          + f"   test CE - online {result['arms'][name]['test_ce_minus_online']}")


def ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    for rank, i in enumerate(order):
        out[i] = float(rank)
    return out


# Does the inflation rank the sampled stores' students as their gaps do (sequence normalisation)?
sampled = [(a["lm_head_row_v_over_online_q10_q50_q90"][1], a["test_ce_minus_online"])
           for name, a in result["arms"].items()
           if a["normalization"] == "sequence" and a["test_ce_minus_online"] is not None
           and next(x for x in RESULTS["arms"] if x["name"] == name)["config"]["cache"]["mode"] != "topk"]
rv, rg = ranks([s[0] for s in sampled]), ranks([s[1] for s in sampled])
mean = (len(sampled) - 1) / 2
spearman = (sum((a - mean) * (b - mean) for a, b in zip(rv, rg))
            / (sum((a - mean) ** 2 for a in rv) * sum((b - mean) ** 2 for b in rg)) ** 0.5)
result["sampled_sequence_arms_rank_correlation"] = {"arms": len(sampled), "spearman": round(spearman, 2)}
print("rank correlation of inflation and gap, sampled stores under sequence normalisation:",
      result["sampled_sequence_arms_rank_correlation"])


def validation_curve(arm: str, seed: int) -> dict[int, float]:
    lines = (STUDY / arm / "students" / f"{'o' if arm.startswith('online') else 's'}{seed}" / "metrics.jsonl")
    records = [json.loads(line) for line in lines.read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in records if r["kind"] == "val"}


# Does the default store's distance to the dense one grow as the step size shrinks (a noise floor) or not?
curves = {arm: [validation_curve(arm, s) for s in SEEDS] for arm in ("hybrid8-12-cv-seq", "dense-seq")}
steps = [s for s in sorted(curves["dense-seq"][0]) if s % 65 == 0]
result["default_minus_dense_validation_during_training"] = {
    "note": "validation loss on the training loop's 128 windows, mean over seeds, at steps 65, 130, ...",
    **{str(s): round(sum(c[s] - d[s] for c, d in zip(curves["hybrid8-12-cv-seq"], curves["dense-seq"])) / len(SEEDS), 4)
       for s in steps}}
print("default minus dense, validation during training:", result["default_minus_dense_validation_during_training"])
out = Path(__file__).with_name("adam_second_moment.json")
out.write_text(json.dumps(result, indent=2) + "\n")
print("wrote", out)
