"""A study's numbers: every finished model's evaluation, store and step time, and the paired comparisons;
read from the runs, never written.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from babydistill.workflows.experiments.study_spec import Arm, Study
from babydistill.workflows.experiments.study_stats import describe, paired_ci
from babydistill.workflows.experiments.study_units import STALE_IN_STUDY, Unit, arm_units, teacher_units
from babydistill.workflows.markers import read_marker
from babydistill.workflows.runner import capture_stage
from babydistill.workflows.stage import stage_status


def _read_eval(path: Path) -> dict:
    e = json.loads(path.read_text(encoding="utf-8"))
    return {"val_ce": e["loss"]["validation"]["ce"], "test_ce": e["loss"]["test"]["ce"],
            "blimp": e["blimp"]["overall"], "eval_json": str(path),
            "eval_settings": {"validation_windows": e["loss"]["validation"]["num_windows"],
                              "test_windows": e["loss"]["test"]["num_windows"], "blimp_pairs": e["blimp"]["num_pairs"],
                              "max_pairs_per_paradigm": e["blimp"].get("max_pairs_per_paradigm")}}


def _model_cell(unit: Unit) -> dict:
    """A finished model's numbers, or why there are none (never a number from a stale or missing stage)."""
    cell = {"model": str(unit.model_dir), "val_ce": None, "test_ce": None, "blimp": None}
    if unit.arm is not None:
        state, why = stage_status(unit.student())
        if state == "stale":
            why = f"it {STALE_IN_STUDY}; move it away to redo it"
        if state != "done":
            return {**cell, "status": f"student {state}: {why}"}
    evaluation = unit.evaluation()
    state, why = stage_status(evaluation)
    if state != "done":
        return {**cell, "status": f"evaluation {state}: {why}"}
    return {**cell, "status": "done", **_read_eval(evaluation.out)}


def step_seconds(model_dir: Path) -> float | None:
    """Median seconds per optimizer step over the logged windows of ``metrics.jsonl``.

    Uses a ``dt`` field when the training loop logs one; otherwise global batch x seq_len / tokens_per_second
    (what the loop logs today, averaged over each ``log_every`` window).
    """
    path = model_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = [r for r in records if r.get("kind") == "train"]
    if not records:
        return None
    if all("dt" in r for r in records):
        return float(np.median([r["dt"] for r in records]))
    summary = json.loads((model_dir / "train_summary.json").read_text(encoding="utf-8"))
    run_config = json.loads((model_dir / "run_config.json").read_text(encoding="utf-8"))
    tokens_per_step = summary["global_batch"] * run_config["data"]["seq_len"]
    return float(np.median([tokens_per_step / r["tokens_per_second"] for r in records if r["tokens_per_second"] > 0]))


def cache_label(arm: Arm) -> str:
    if arm.online:
        return "online (teachers every step)"
    cache = arm.config.cache
    parts = [cache.mode]
    if cache.mode in ("topk", "hybrid"):
        parts.append(f"k={cache.k}")
    if cache.mode in ("sample", "hybrid"):
        parts.append(f"S={cache.samples}" + (f" x {cache.draw_sets} sets" if cache.draw_sets > 1 else ""))
    if cache.tail_logp:
        parts.append("tail_logp")
    parts.append(f"{cache.order} order")
    return " ".join(parts)


def _store(arm: Arm) -> dict | None:
    from babydistill.stores.logits import store_info

    if arm.online:
        return None
    stage = capture_stage(arm.config)
    state, why = stage_status(stage)
    empty = {"path": str(stage.out), "bytes_per_token": None, "disk_bytes": None, "num_tokens": None,
             "capture_seconds": None}
    if state != "done":
        return {**empty, "status": f"cache {state}: {why}"}
    info = store_info(stage.out)
    return {**empty, "status": "done", "bytes_per_token": info["bytes_per_token"], "disk_bytes": info["disk_bytes"],
            "num_tokens": info["num_tokens"], "capture_seconds": (read_marker(stage.marker) or {}).get("seconds"),
            "fingerprint": stage.fingerprint}


def collect_results(study: Study) -> dict:
    """Every per-seed number of every arm and teacher that is finished; reads, never writes."""
    teachers = []
    for unit in teacher_units(study):
        teachers.append({"name": unit.label.split()[-1], **_model_cell(unit)})
    done_teachers = [t for t in teachers if t["status"] == "done"]
    best = min(done_teachers, key=lambda t: t["test_ce"]) if done_teachers else None

    arms = []
    for arm in study.arms:
        per_seed = {}
        for unit in arm_units(arm, study.seeds):
            cell = _model_cell(unit)
            cell["step_seconds"] = step_seconds(unit.model_dir) if cell["status"] == "done" else None
            per_seed[unit.seed] = cell
        finished = {s: c for s, c in per_seed.items() if c["status"] == "done"}
        cache = arm.config.cache
        arms.append({
            "name": arm.name, "online": arm.online, "set": arm.set, "run_dir": str(arm.run_path),
            "cache": None if arm.online else {"mode": cache.mode, "k": cache.k, "samples": cache.samples,
                                              "tail_logp": cache.tail_logp, "draw_sets": cache.draw_sets,
                                              "order": cache.order},
            "cache_label": cache_label(arm),
            "config": arm.config.to_dict(),
            "per_seed": per_seed, "seeds_finished": sorted(finished),
            **{m: describe([finished[s][m] for s in sorted(finished)]) for m in ("val_ce", "test_ce", "blimp")},
            "step_seconds": (float(np.median([x["step_seconds"] for x in finished.values()]))
                             if finished and all(x["step_seconds"] is not None for x in finished.values()) else None),
            "store": _store(arm),
            "vs_best_teacher": (paired_ci({s: x["test_ce"] for s, x in finished.items()},
                                          {s: best["test_ce"] for s in finished}) if best else None),
        })
    reference = next(a for a in arms if a["name"] == study.reference)
    for a in arms:
        a["vs_reference"] = {m: paired_ci({s: c[m] for s, c in a["per_seed"].items() if c["status"] == "done"},
                                          {s: c[m] for s, c in reference["per_seed"].items() if c["status"] == "done"})
                             for m in ("test_ce", "val_ce", "blimp")}
    by_name = {a["name"]: a for a in arms}

    def done(arm: dict, metric: str) -> dict[int, float]:
        return {s: c[metric] for s, c in arm["per_seed"].items() if c["status"] == "done"}

    contrasts = [{"arm": a, "minus": b, **{m: paired_ci(done(by_name[a], m), done(by_name[b], m))
                                           for m in ("test_ce", "val_ce")}} for a, b in study.contrasts]
    for a in arms:
        a["per_seed"] = {str(s): c for s, c in a["per_seed"].items()}  # JSON keys
    return {"study": str(study.path), "base_config": str(study.base_path), "base_run_dir": str(study.base.run_path),
            "seeds": study.seeds, "reference": study.reference, "set": study.set,
            "eval_config": study.shared.to_dict()["eval"],
            "generated": datetime.now(UTC).isoformat(timespec="seconds"),
            "teachers": teachers, "best_teacher": best["name"] if best else None, "arms": arms,
            "contrasts": contrasts}
