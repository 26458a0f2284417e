"""Fault injection over a whole finished run: every file of both stores, the models, their checkpoints and the
stage markers, each flipped, truncated, deleted and (JSON) edited; then `babydistill run` either repairs it,
refuses it in one line, or the file is shown harmless (read again only by a path that checks it). No traceback,
no silent acceptance, nothing of value deleted. The counts are printed (`pytest -s`)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from conftest import write_config, write_corpus

from babydistill.pipeline.config import load_config
from babydistill.pipeline.training.checkpoint import COMPLETE, ChecksumError, checked_meta
from babydistill.workflows.cli import main

FAULTS = ("flip", "truncate", "delete", "edit json")
# Files whose loss is loss of work: their bytes must survive every case somewhere under the run (moved aside
# counts), unless the case damaged that very file.
VALUABLE = ("model.safetensors", "model.pt", "optimizer.pt", "rng-rank0.safetensors")


def _walked_files(run: Path) -> list[Path]:
    """Every file of the run except logs and prepare's text (read by nothing once tokenized); of each store
    array, the first chunk (the others are the same kind of file)."""
    files = []
    for path in sorted(p for p in run.rglob("*") if p.is_file()):
        rel = path.relative_to(run)
        if rel.parts[0] in ("logs",) or (rel.parts[0] == "data" and path.suffix == ".txt"):
            continue
        if rel.parts[0] == "logits.zarr" and "c" in rel.parts and rel.parts[rel.parts.index("c") + 1] != "0":
            continue
        if rel.parts[0] == "logits.zarr" and rel.parts[1] == "_done" and rel.parts[2] not in ("000000", "zarr.json"):
            continue
        files.append(rel)
    return files


def _inject(path: Path, fault: str) -> bool:
    """Apply ``fault`` to ``path``; False when it does not apply (JSON edit of a non-JSON file)."""
    data = path.read_bytes()
    if fault == "flip":
        buf = bytearray(data)
        buf[len(buf) // 2] ^= 0x04
        path.write_bytes(bytes(buf))
    elif fault == "truncate":
        path.write_bytes(data[:len(data) // 2])
    elif fault == "delete":
        path.unlink()
    else:
        try:
            record = json.loads(data)
        except ValueError:
            return False
        path.write_text(json.dumps(_edited(record)))
    return True


# What an edit changes first, where the file has it: the values that carry meaning (a marker's "seconds" or
# "finished" are for people; editing them is harmless and proves nothing).
_MEANINGFUL = ("fingerprint", "crc32", "data_type", "shape", "step", "meta_crc32", "format_version", "tokens_hash",
               "vocab_size", "hidden_size", "bytes", "num_windows", "model_type", "test")


def _edited(record):
    """The JSON with one meaningful value changed (see _MEANINGFUL), else its first number or string."""
    path = _find(record, lambda key, value: key in _MEANINGFUL) or _find(
        record, lambda key, value: isinstance(value, (int, float, str)) and not isinstance(value, bool))
    if path is None:
        return {"edited": True} if isinstance(record, dict) else record
    container = record
    for step in path[:-1]:
        container = container[step]
    value = container[path[-1]]
    container[path[-1]] = (value + 7 if isinstance(value, (int, float)) and not isinstance(value, bool) else
                           value + "x" if isinstance(value, str) else
                           [v + 1 if isinstance(v, int) else v for v in value] if isinstance(value, list) else
                           {"edited": True})
    return record


def _find(value, wanted, key=None):
    """The path (keys / indices) to the first value, depth first, for which wanted(key, value) holds."""
    if key is not None and wanted(key, value):
        return []
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for child_key, child in children:
        found = _find(child, wanted, child_key)
        if found is not None:
            return [child_key, *found]
    return None


def _digests(run: Path) -> Counter:
    return Counter(hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*")
                   if p.is_file() and p.name in VALUABLE)


def _checkpoint_rejects(path: Path) -> bool:
    """A resume's check of the checkpoint folder holding ``path`` refuses it (or it is incomplete)."""
    folder = path.parent
    if not (folder / COMPLETE).is_file():
        return True
    try:
        checked_meta(folder)
    except (ChecksumError, ValueError, OSError):
        return True
    return False


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("walk")
    write_corpus(root / "corpus", num_files=3, paragraphs=60)
    write_config(root, {"train": {"max_steps": 4, "save_every": 4, "log_every": 4}, "teachers": {"count": 1},
                        "cache": {"mode": "hybrid", "k": 4, "samples": 6, "temperatures": [1.0],
                                  "chunk_windows": 64},
                        "distill": {"students": 1}, "eval": {"max_pairs_per_paradigm": 2, "max_windows": 4}})
    assert main(["run", str(root / "tiny.yaml")]) == 0
    return root


def _case(pristine: Path, work: Path, rel: Path, fault: str, capsys) -> str | None:
    """Run one case; its outcome (repaired | refused | harmless), None when the fault does not apply."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(pristine, work, symlinks=True)
    config = work / "tiny.yaml"
    config.write_text(config.read_text().replace(str(pristine), str(work)))
    run = load_config(config).run_path
    before = _digests(run)
    target = run / rel
    if not _inject(target, fault):
        return None
    faulted = target.read_bytes() if target.exists() else None
    damaged_digest = hashlib.sha256((pristine / "run" / rel).read_bytes()).hexdigest()
    capsys.readouterr()
    code = main(["run", str(config)])
    out, err = capsys.readouterr()
    where = f"{rel} ({fault})"
    assert "Traceback" not in err and code in (0, 2), f"{where}: exit {code}\n{err[-2000:]}"
    after = _digests(run)
    lost = [d for d, n in before.items() if d != damaged_digest and after[d] < n]
    assert not lost, f"{where}: {len(lost)} valuable file(s) deleted"
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("babydistill: error: "), f"{where}: {err}"
        return "refused"
    assert main(["status", str(config)]) == 0
    states = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    if "trainer_state" in rel.parts:
        assert _checkpoint_rejects(target), f"{where}: accepted by a resume's checks"
        return "harmless"
    assert set(states) == {"done"}, f"{where}: run exited 0 but status says {states}"
    now = target.read_bytes() if target.exists() else None
    assert now != faulted or faulted is None and now is not None, f"{where}: silently accepted"
    return "repaired"


@pytest.mark.slow
def test_every_fault_in_a_finished_run_is_repaired_refused_or_harmless(pristine, tmp_path, capsys):
    outcomes: Counter = Counter()
    run = pristine / "run"
    for rel in _walked_files(run):
        for fault in FAULTS:
            outcome = _case(pristine, tmp_path / "case", rel, fault, capsys)
            if outcome:
                outcomes[outcome] += 1
    with capsys.disabled():
        print(f"\nfault walk: {sum(outcomes.values())} cases: {dict(outcomes)}")
    assert sum(outcomes.values()) >= 200
