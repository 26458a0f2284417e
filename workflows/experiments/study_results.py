"""A study's numbers: every finished model's evaluation, store and step time, and the paired comparisons;
read from the runs, never written.
"""

from __future__ import annotations

import functools
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from babydistill.stores.files import file_sha256
from babydistill.workflows.experiments.study_carry import Carried, carried_cell
from babydistill.workflows.experiments.study_protocol import cell_name, read_record
from babydistill.workflows.experiments.study_spec import Arm, Study
from babydistill.workflows.experiments.study_stats import describe, paired_ci
from babydistill.workflows.experiments.study_units import (
    STALE_IN_STUDY,
    Unit,
    arm_units,
    ensemble_name,
    ensemble_stage,
    teacher_units,
)
from babydistill.workflows.experiments.study_verdicts import claim_results
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


def weights_sha256(model_dir: Path) -> str | None:
    """The digest of a model's weights (``model.safetensors``): teachers retrained from the same settings have
    the same fingerprint, and this says whether they are bit-identical too."""
    path = model_dir / "model.safetensors"
    if not path.is_file():
        return None
    stat = path.stat()
    return _digest(path.resolve(), stat.st_size, stat.st_mtime_ns)


def trained_teacher_weights(model_dir: Path) -> dict[str, str] | None:
    """The digests of the teachers a student learned from, as its training recorded them (an online student's
    ``teacher_weights``, an offline one's ``store_teachers``: hashed when the store was captured), by teacher
    name; None for a student trained before students recorded them."""
    path = model_dir / "train_summary.json"
    summary = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    recorded = summary.get("teacher_weights") or summary.get("store_teachers")
    return {Path(t["path"]).name: t["sha256"] for t in recorded} if recorded else None


@functools.cache
def _digest(path: Path, size: int, mtime_ns: int) -> str:  # every student cell names its teachers: hashed once
    return file_sha256(path)


def cache_label(arm: Arm) -> str:
    if arm.online:
        return "online (teachers every step)"
    if arm.ce_only:
        return "CE only (alpha = 1: no store, no teacher)"
    cache = arm.config.cache
    parts = [cache.mode]
    if cache.mode in ("topk", "hybrid"):
        parts.append(f"k={cache.k}")
    if cache.mode in ("sample", "hybrid"):
        parts.append(f"S={cache.samples}" + (f" x {cache.draw_sets} sets" if cache.draw_sets > 1 else ""))
    if cache.tail_logp:
        parts.append("tail_logp")
    parts.append(f"{cache.order} order")
    if arm.capture == "per_seed":
        parts.append("(a store per seed)")
    return " ".join(parts)


def _store(config) -> dict:
    from babydistill.stores.logits import store_info

    stage = capture_stage(config)
    state, why = stage_status(stage)
    empty = {"path": str(stage.out), "bytes_per_token": None, "disk_bytes": None, "num_tokens": None,
             "capture_seconds": None}
    if state != "done":
        return {**empty, "status": f"cache {state}: {why}"}
    info = store_info(stage.out)
    return {**empty, "status": "done", "bytes_per_token": info["bytes_per_token"], "disk_bytes": info["disk_bytes"],
            "num_tokens": info["num_tokens"], "capture_seconds": (read_marker(stage.marker) or {}).get("seconds"),
            "fingerprint": stage.fingerprint}


def _arm_store(arm: Arm) -> dict | None:
    """The arm's store; under per_seed captures the mean over its finished stores, with each in ``stores``."""
    configs = arm.store_configs()
    if not configs:
        return None
    if arm.capture != "per_seed":
        return _store(configs[0])
    stores = {str(c.cache.seed): _store(c) for c in configs}
    done = [x for x in stores.values() if x["status"] == "done"]
    mean = {k: (float(np.mean([x[k] for x in done])) if done and all(x[k] is not None for x in done) else None)
            for k in ("bytes_per_token", "disk_bytes", "capture_seconds")}
    return {"path": str(arm.run_path / "seed*" / "logits.zarr"), **mean,
            "num_tokens": done[0]["num_tokens"] if done else None,
            "status": f"{len(done)}/{len(stores)} stores done (one per seed; figures are their mean)",
            "stores": stores}


def _teachers(study: Study) -> tuple[list[dict], list[dict]]:
    """Every teacher's cell and every pair's ensemble (validation and test CE), each with its protocol record."""
    teachers = []
    for unit in teacher_units(study):
        cell = {"name": unit.model_dir.name, **_model_cell(unit)}
        teachers.append({**cell, "protocol_sha256": _recorded(study, cell_name(None, None, unit.model_dir.name)),
                         "weights_sha256": weights_sha256(study.base.teacher_path(cell["name"]))})
    ensembles = []
    for names in study.teacher_pairs:
        stage = ensemble_stage(study, names)
        state, why = stage_status(stage)
        cell = {"name": ensemble_name(names), "teachers": list(names), "val_ce": None, "test_ce": None,
                "status": "done" if state == "done" else f"evaluation {state}: {why}",
                "protocol_sha256": _recorded(study, ensemble_name(names))}
        if state == "done":
            loss = json.loads(stage.out.read_text(encoding="utf-8"))["loss"]
            cell.update(val_ce=loss["validation"]["ce"], test_ce=loss["test"]["ce"])
        ensembles.append(cell)
    return teachers, ensembles


def _recorded(study: Study, cell: str) -> str | None:
    record = read_record(study, cell)
    return record and record.get("sha256")


def _best_teacher(teachers: list[dict], names: list[str]) -> dict | None:
    """The best finished teacher among ``names``, chosen on validation CE (never on test)."""
    done = [t for t in teachers if t["status"] == "done" and t["name"] in names]
    return min(done, key=lambda t: t["val_ce"]) if done else None


def _done(per_seed: dict, metric: str) -> dict[int, float]:
    return {int(s): c[metric] for s, c in per_seed.items() if c["status"] == "done"}


def _seed_cell(study: Study, unit: Unit, carried: Carried) -> dict:
    """A student's cell: finished here, else carried (``--carry``, the same student fingerprint), else missing."""
    cell = _model_cell(unit) if (unit.config.run_path / "teachers").exists() else {
        # an arm the study has not run yet has no links to the base run, so its stages would name missing inputs
        "model": str(unit.model_dir), "val_ce": None, "test_ce": None, "blimp": None,
        "status": f"not started: the study has not run this arm yet (`--arms {unit.arm.name}`)"}
    if cell["status"] == "done":
        record = read_record(study, cell_name(unit.arm.name, unit.seed, "")) or {}
        return {**cell, "step_seconds": step_seconds(unit.model_dir),
                "protocol_sha256": record.get("sha256"), "protocol_margins": record.get("margins"),
                "student_fingerprint": unit.student().fingerprint,
                "teacher_weights_sha256": trained_teacher_weights(unit.model_dir) or {  # else: as they are now
                    n: weights_sha256(study.base.teacher_path(n)) for n in unit.arm.teacher_names}}
    from_file = carried_cell(carried, unit)
    if from_file is not None:  # its numbers, protocol record and fingerprint as the file holds them
        return dict(from_file)
    return {**cell, "step_seconds": None, "protocol_sha256": _recorded(study, cell_name(unit.arm.name, unit.seed, ""))}


def _arm_result(study: Study, arm: Arm, teachers: list[dict], carried: Carried) -> dict:
    per_seed = {unit.seed: _seed_cell(study, unit, carried) for unit in arm_units(arm)}
    finished = {s: c for s, c in per_seed.items() if c["status"] == "done"}
    cache = arm.config.cache
    best = _best_teacher(teachers, arm.teacher_names)
    return {
        "name": arm.name, "online": arm.online, "ce_only": arm.ce_only, "set": arm.set, "run_dir": str(arm.run_path),
        "seeds": arm.seeds, "teachers": arm.teacher_names, "capture": arm.capture,
        "cache": None if not arm.needs_store else {"mode": cache.mode, "k": cache.k, "samples": cache.samples,
                                                   "tail_logp": cache.tail_logp, "draw_sets": cache.draw_sets,
                                                   "order": cache.order},
        "cache_label": cache_label(arm),
        "config": arm.config.to_dict(),
        "per_seed": {str(s): c for s, c in per_seed.items()}, "seeds_finished": sorted(finished),
        **{m: describe([finished[s][m] for s in sorted(finished)]) for m in ("val_ce", "test_ce", "blimp")},
        "step_seconds": (float(np.median([x["step_seconds"] for x in finished.values()]))
                         if finished and all(x["step_seconds"] is not None for x in finished.values()) else None),
        "store": _arm_store(arm),
        "best_teacher": best and best["name"],
        "vs_best_teacher": None if best is None else {
            m: paired_ci({s: x[m] for s, x in finished.items()}, {s: best[m] for s in finished})
            for m in ("val_ce", "test_ce")},
    }


def collect_results(study: Study, carried: Carried | None = None) -> dict:
    """Every per-seed number of every arm and teacher that is finished, here or in ``carried``; reads, never
    writes."""
    teachers, ensembles = _teachers(study)
    best = _best_teacher(teachers, [t["name"] for t in teachers])
    arms = [_arm_result(study, arm, teachers, carried or {}) for arm in study.arms]
    by_name = {a["name"]: a for a in arms}
    reference = by_name[study.reference]
    for a in arms:
        a["vs_reference"] = {m: paired_ci(_done(a["per_seed"], m), _done(reference["per_seed"], m))
                             for m in ("test_ce", "val_ce", "blimp")}
        if study.control is not None:
            a["vs_control"] = {m: paired_ci(_done(a["per_seed"], m), _done(by_name[study.control]["per_seed"], m))
                               for m in ("val_ce", "test_ce")}
    contrasts = [{"arm": a, "minus": b, **{m: paired_ci(_done(by_name[a]["per_seed"], m), _done(by_name[b]["per_seed"], m))
                                           for m in ("test_ce", "val_ce")}} for a, b in study.contrasts]
    return {"study": str(study.path), "base_config": str(study.base_path), "base_run_dir": str(study.base.run_path),
            "seeds": study.seeds, "reference": study.reference, "set": study.set,
            "eval_config": study.shared.to_dict()["eval"],
            "generated": datetime.now(UTC).isoformat(timespec="seconds"),
            "teachers": teachers, "ensembles": ensembles, "best_teacher": best["name"] if best else None,
            "best_teacher_chosen_on": "validation", "arms": arms, "contrasts": contrasts,
            "claim": claim_results(study, arms, teachers + ensembles)}
