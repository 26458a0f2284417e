"""A claim study's protocol: the sha256 of the pre-registered protocol file, recorded with every result (one record
per cell, ``study/protocol/<cell>.json``, written when the study finds the cell finished), and whether the report
may print a verdict: only when the file is there and every finished cell was recorded under its present hash.
The records also keep the margins the study file gave its primary comparisons (``registered_margins``): the study
file is not hashed, so a margin changed after results would otherwise go unseen.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from babydistill.stores.files import atomic_write_json, file_sha256
from babydistill.workflows.experiments.study_spec import Study
from babydistill.workflows.stage import Stage


def protocol_sha256(study: Study) -> str | None:
    """The protocol file's sha256 now, or None (no ``protocol:`` key, or the file is missing)."""
    return file_sha256(study.protocol) if study.protocol is not None and study.protocol.is_file() else None


def registered_margins(study: Study) -> dict:
    """The study's margin and each primary comparison's, as the study file gives them now."""
    return {"margin": study.margin,
            "primary": {f"{a} − {b}": study.primary_margin(a, b) for a, b in study.primary}}


def cell_name(arm: str | None, seed: int | None, model: str) -> str:
    """A cell's record name: ``<arm>-seed<s>``, or the model's (teacher, ensemble) folder name."""
    return model if arm is None else f"{arm}-seed{seed}"


def record_path(study: Study, cell: str) -> Path:
    return study.root / "protocol" / f"{cell}.json"


def read_record(study: Study, cell: str) -> dict | None:
    path = record_path(study, cell)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def record_cell(study: Study, cell: str, evaluation: Stage) -> None:
    """Record the protocol's hash with a finished cell (its evaluation stage), once per evaluation: a record made
    under another evaluation (the cell was redone) is replaced, one made for this evaluation is kept as it is."""
    if study.protocol is None:
        return
    old = read_record(study, cell)
    if old is not None and old.get("evaluation") == evaluation.fingerprint:
        return
    record_path(study, cell).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record_path(study, cell), {
        "protocol": str(study.protocol), "sha256": protocol_sha256(study), "margins": registered_margins(study),
        "evaluation": evaluation.fingerprint, "recorded": datetime.now(UTC).isoformat(timespec="seconds")})


def verdict_refusal(study: Study, recorded: list[str | None], margins: list[dict | None] = ()) -> str | None:
    """Why the report may print no verdict (one line), or None. ``recorded``: the hashes of the finished cells;
    ``margins``: their recorded margins (None for a record from before margins were kept)."""
    if study.protocol is None:
        return "the study file names no protocol (`protocol:`), so nothing was pre-registered"
    if not study.protocol.is_file():
        return f"the protocol file {study.protocol} is missing"
    now = protocol_sha256(study)
    if any(h is None for h in recorded):
        return f"some results carry no protocol record (made outside `babydistill study` under {study.protocol})"
    changed = sorted({h for h in recorded if h != now})
    if changed:
        return (f"the protocol file {study.protocol} changed after results were recorded (sha256 now {now[:12]}, "
                f"results under {', '.join(h[:12] for h in changed)})")
    now_margins = registered_margins(study)
    if any(m is not None and m != now_margins for m in margins):
        return (f"the study file {study.path} changed its margins after results were recorded (now "
                f"{json.dumps(now_margins, ensure_ascii=False)}): a margin is fixed before the first result")
    return None
