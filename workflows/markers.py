"""What a stage leaves on disk about itself: the marker of a finished output and the record of a partial one.

A finished folder output holds ``stage.json`` (a Zarr store: ``_stage/zarr.json``, a group node holding the
record as its attributes, so that plain zarr sees a clean hierarchy; a file output: ``<file>.stage.json`` beside
it). The record is sealed (``stores.checksum``): a marker edited by hand reads as no marker. It holds the
stage's fingerprint and the size and crc32 of every file the stage wrote, so that a later change to them shows.
A partial folder holds ``stage.partial.json``: the fingerprint and recipe it is being made from.
"""

from __future__ import annotations

import json
from pathlib import Path

from babydistill.stores.checksum import changed_files, sealed, unsealed

MARKER = "stage.json"
STORE_MARKER = "_stage/zarr.json"
PARTIAL_MARKER = "stage.partial.json"


def file_marker(out: Path) -> Path:
    """The marker of a file output: ``<file>.stage.json`` beside it."""
    return out.with_name(out.name + ".stage.json")


def marker_in(out: Path) -> Path:
    """The marker of a finished folder output: ``_stage/zarr.json`` in a Zarr store (``stage.json`` in
    stores written before), ``stage.json`` elsewhere."""
    is_store = (out / STORE_MARKER).is_file() or ((out / "zarr.json").is_file() and not (out / MARKER).is_file())
    return out / STORE_MARKER if is_store else out / MARKER


def read_marker(path: Path) -> dict | None:
    """A stage marker's record; None when there is none, or it was changed after it was written (its seal)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return unsealed(record.get("attributes") if path.name == "zarr.json" else record)
    except (OSError, ValueError, AttributeError):
        return None


def write_marker(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = sealed(record)
    if path.name == "zarr.json":
        from babydistill.stores.logits import node_json

        path.write_text(node_json(record) + "\n", encoding="utf-8")
    else:
        path.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")


def output_fingerprint(out: Path, is_file: bool = False) -> str | None:
    """The fingerprint of a finished stage output, or None when it is not finished."""
    record = read_marker(file_marker(out) if is_file else marker_in(out))
    return record.get("fingerprint") if record else None


def write_partial_marker(work: Path, fingerprint: str | None, recipe: dict | None) -> None:
    record = {"fingerprint": fingerprint, "recipe": recipe}
    (work / PARTIAL_MARKER).write_text(json.dumps(record, default=str), encoding="utf-8")


# Not part of a stage's recorded files: markers, what other stages write into the folder, checkpoints (their own
# checksums), logs. The logit store keeps per-chunk checksums of its own and records none here.
_UNRECORDED = {MARKER, PARTIAL_MARKER, "eval.json", "eval.json.stage.json"}
_UNRECORDED_DIRS = {"trainer_state", "_stage", "logs"}


def output_files(root: Path) -> list[str]:
    """The files of a finished folder output that its stage marker records (size and crc32)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name not in _UNRECORDED
                  and not _UNRECORDED_DIRS & set(p.relative_to(root).parts[:-1]))


def changed_outputs(out: Path, is_file: bool, record: dict) -> str | None:
    """Why a finished output's files differ from what its marker recorded, or None."""
    changed = changed_files(out.parent if is_file else out, record.get("files") or {})
    if not changed and not is_file and record.get("files") is not None:
        added = set(output_files(out)) - set(record["files"])
        changed = [f"{name} (not written by the stage)" for name in sorted(added)]
    if not changed:
        return None
    more = f" and {len(changed) - 2} more" if len(changed) > 2 else ""
    return f"{', '.join(changed[:2])}{more} changed after the stage finished"
