"""Cells carried from a study's ``results.json``: `babydistill study STUDY.yaml --carry RESULTS.json`.

A claim study runs longer than one machine lives (docs/results/claim/PROTOCOL.md: ~12.7 model-hours). Its
report's ``results.json`` holds every finished cell with its numbers, its protocol record and its student
fingerprint. A fingerprint hashes the settings and the inputs' fingerprints, never a path or a machine, so a
later run, on another machine, computes the same one for the same cell, before training it: the data, tokenizer
and teachers (retrained from the same settings) and even a store not yet captured (the capture stage's
fingerprint). A cell the file holds with that fingerprint is not trained again; the report takes its numbers
from the file, marked as carried. A carried cell made from other settings is not used: it is trained here, and
the run says so. Cells finished here win over carried ones.

Teachers are always trained here (every cell not yet finished needs them). Retrained teachers have the same
fingerprint but need not be bit-identical (thread counts change the order of floating-point sums), so the
teachers' weight digests are recorded in ``results.json`` and the report says when carried cells were made with
other teacher weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from babydistill.workflows.experiments.study_spec import Study, StudyError
from babydistill.workflows.experiments.study_units import Unit, unit_done
from babydistill.workflows.runner import capture_stage, student_stage

Carried = dict[tuple[str, int], dict]
"""(arm name, seed) -> the cell as ``results.json`` holds it, with ``carried_from``."""


def load_carried(path: str | Path, study: Study) -> Carried:
    """The finished student cells of a study report's ``results.json`` (one line of StudyError when unreadable)."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"--carry: {path} not found: give the results.json a study report wrote "
                         "(`babydistill study STUDY.yaml --report-only --out DIR` writes DIR/results.json)")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StudyError(f"--carry: {path} is not valid JSON ({exc}); restore it from git or write it again with "
                         "`babydistill study STUDY.yaml --report-only --out DIR`") from None
    if not isinstance(results, dict) or not isinstance(results.get("arms"), list):
        raise StudyError(f"--carry: {path} is not a study's results.json (it has no list of arms)")
    names = {a.name for a in study.arms}
    carried: Carried = {}
    for arm in results["arms"]:
        if not isinstance(arm, dict) or arm.get("name") not in names:
            continue
        for seed, cell in (arm.get("per_seed") or {}).items():
            if isinstance(cell, dict) and cell.get("status") == "done" and cell.get("student_fingerprint"):
                carried[(arm["name"], int(seed))] = {**cell, "carried_from": cell.get("carried_from") or str(path)}
    return carried


def planned_fingerprint(unit: Unit) -> str | None:
    """The fingerprint the unit's student has, or will have once its store is captured (None while the teachers
    or the tokens it depends on are not made)."""
    stage = unit.student()
    if stage.fingerprint is not None or unit.arm.online or unit.arm.ce_only:
        return stage.fingerprint
    store = capture_stage(unit.config, unit.arm.teacher_names).fingerprint
    if store is None:
        return None
    return student_stage(unit.config, unit.seed, unit.arm.student_name(unit.seed), online=False,
                         store_fingerprint=store).fingerprint


def carried_cell(carried: Carried, unit: Unit) -> dict | None:
    """The carried cell standing for ``unit``: only when the unit is not finished here and the cell was made from
    the same settings and inputs (the same student fingerprint)."""
    cell = carried.get((unit.arm.name, unit.seed)) if unit.arm is not None else None
    if cell is None or unit_done(unit):
        return None
    return cell if cell["student_fingerprint"] == planned_fingerprint(unit) else None


def carry_mismatches(carried: Carried, units: list[Unit]) -> list[str]:
    """One line per carried cell that the study cannot use because it was made from other settings."""
    return [f"{u.label}: the carried cell ({carried[(u.arm.name, u.seed)]['carried_from']}) was made from other "
            "settings or inputs (its student fingerprint differs); it is trained here"
            for u in units if u.arm is not None and (u.arm.name, u.seed) in carried and not unit_done(u)
            and carried_cell(carried, u) is None]
