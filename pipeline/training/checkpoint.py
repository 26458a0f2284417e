"""Checkpoints and RNG state: what a resume needs, written so that a cut or a changed bit is never loaded.

``out_dir/trainer_state/step-000123/`` holds the weights, optimizer, grad scaler
(``*.pt``, loaded with ``weights_only=True``), the RNG states of every rank (safetensors + JSON:
nothing is unpickled) and ``meta.json`` (step, loop state, metrics.jsonl length, resolved
config, and the size and crc32 of every other file); ``COMPLETE`` is written last (with meta.json's crc32)
and the folder is renamed from ``*.tmp`` into place. A checkpoint is loaded all or nothing, after its
checksums; one that cannot be read or whose bytes changed is moved to ``trainer_state/unreadable/`` (never
deleted) and the previous one is tried; when none can be read, training refuses to start over until
``--force``. Folders without ``COMPLETE`` (a save cut short) are moved to ``trainer_state/incomplete/``.
The exported model records its files' checksums in ``checksums.json``, which ``load_model`` checks.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from babydistill.pipeline.training.optimizer import head_lr_scale
from babydistill.pipeline.training.runtime import Dist, TrainingError, barrier
from babydistill.stores.checksum import changed_files, crc32, file_records

STATE_DIR = "trainer_state"
COMPLETE = "COMPLETE"
UNREADABLE = "unreadable"
INCOMPLETE = "incomplete"
CHECKSUMS = "checksums.json"


class ChecksumError(Exception):
    """A checkpoint file's bytes differ from what was written (a flipped bit, a truncation): unreadable."""


# --- finding checkpoints ------------------------------------------------------------------


def _step_dir(state_dir: Path, step: int) -> Path:
    return state_dir / f"step-{step:06d}"


def complete_checkpoints(state_dir: Path) -> list[Path]:
    """Complete checkpoint folders (with their marker), oldest first."""
    if not state_dir.is_dir():
        return []
    found = [p for p in state_dir.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
             and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: p.name)


def incomplete_checkpoints(state_dir: Path) -> list[Path]:
    if not state_dir.is_dir():
        return []
    return sorted(p for p in state_dir.glob("step-*") if p.is_dir() and not (p / COMPLETE).is_file())


# --- RNG state ------------------------------------------------------------------------


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(legacy=False), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_rng(path: Path) -> None:
    """Every RNG state as tensors (safetensors) and JSON (its metadata): a resume unpickles nothing, so a
    checkpoint folder from someone else cannot run code."""
    state = _rng_state()
    version, python_key, python_gauss = state["python"]
    tensors = {"python": torch.tensor(python_key, dtype=torch.int64),
               "numpy": torch.from_numpy(state["numpy"]["state"]["key"].astype(np.int64)),
               "torch": state["torch"]}
    for i, cuda in enumerate(state["cuda"] or []):
        tensors[f"cuda{i}"] = cuda
    meta = {"python_version": version, "python_gauss": python_gauss, "numpy_pos": state["numpy"]["state"]["pos"],
            "numpy_has_gauss": state["numpy"]["has_gauss"], "numpy_gauss": state["numpy"]["gauss"],
            "num_cuda": len(state["cuda"] or [])}
    save_file(tensors, str(path), metadata={"rng": json.dumps(meta)})


def _load_rng(path: Path) -> dict:
    """The RNG state saved by ``_save_rng`` (checked for shape, not applied)."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["rng"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    python_key, numpy_key = tensors["python"].tolist(), tensors["numpy"].numpy()
    if len(python_key) != 625 or numpy_key.shape != (624,) or tensors["torch"].dtype != torch.uint8:
        raise ValueError(f"{path}: not an RNG state")
    return {"python": (meta["python_version"], tuple(python_key), meta["python_gauss"]),
            "numpy": {"bit_generator": "MT19937", "state": {"key": numpy_key.astype(np.uint32), "pos": meta["numpy_pos"]},
                      "has_gauss": meta["numpy_has_gauss"], "gauss": meta["numpy_gauss"]},
            "torch": tensors["torch"],
            "cuda": [tensors[f"cuda{i}"] for i in range(meta["num_cuda"])] if meta["num_cuda"] else None}


# --- writing and reading --------------------------------------------------------------


def save_checkpoint(state_dir: Path, step: int, raw_model: torch.nn.Module, optimizer, scaler, meta: dict,
                    ddp: Dist) -> Path:
    """Write step-N.tmp/ (every rank its RNG state; rank 0 the rest), mark it complete, rename."""
    final = _step_dir(state_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if ddp.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(ddp)
    try:
        _save_rng(tmp / f"rng-rank{ddp.rank}.safetensors")
        barrier(ddp)
        if ddp.main:
            torch.save(raw_model.state_dict(), tmp / "model.pt")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            if scaler is not None:
                torch.save(scaler.state_dict(), tmp / "scaler.pt")
            files = sorted(p.name for p in tmp.iterdir() if p.suffix in (".pt", ".safetensors"))
            meta_text = json.dumps({**meta, "files": file_records(tmp, files)}, indent=2, sort_keys=True) + "\n"
            (tmp / "meta.json").write_text(meta_text, encoding="utf-8")
            complete = {"step": step, "meta_crc32": f"{crc32(meta_text.encode()):08x}"}
            (tmp / COMPLETE).write_text(json.dumps(complete) + "\n", encoding="utf-8")  # last: the folder is whole
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except (OSError, RuntimeError) as exc:  # disk full or an I/O error (torch.save reports it as RuntimeError)
        shutil.rmtree(tmp, ignore_errors=True)
        why = " ".join(str(exc).split())[:300]
        raise TrainingError(f"{final}: writing the checkpoint failed ({why}); the previous checkpoints are kept: "
                            f"free space and resume with --resume") from exc
    barrier(ddp)
    return final


def load_checkpoint(folder: Path, fingerprint: dict, raw_model, optimizer, scaler, ddp: Dist) -> dict:
    """Load a checkpoint all or nothing: every file is read first (tensors with ``weights_only=True`` or
    safetensors, the rest JSON: nothing is unpickled), then applied; if applying fails, the model,
    optimizer, scaler and RNG states are put back as they were."""
    meta = checked_meta(folder)
    if meta["fingerprint"] != fingerprint:
        raise TrainingError(f"{folder} was written for another model, data or global batch "
                            f"({meta['fingerprint']} vs {fingerprint}); use --force to start over")
    model_state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    optimizer_state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    saved_scale, scale = head_lr_scale(optimizer_state["param_groups"]), head_lr_scale(optimizer.param_groups)
    if (saved_scale == 1.0) != (scale == 1.0):  # the output layer moved between groups: its state cannot follow
        raise TrainingError(f"{folder} was written with train.head_lr_scale = {saved_scale:g}, this run has "
                            f"{scale:g}; resume with {saved_scale:g}, or use --force to start over")
    rng_file = folder / f"rng-rank{ddp.rank}.safetensors"
    # a checkpoint written by fewer processes has no RNG state for this rank: keep the seeded one
    rng = _load_rng(rng_file) if rng_file.is_file() else None
    if rng is None and (folder / f"rng-rank{ddp.rank}.pt").is_file():
        warnings.warn(f"{folder}: RNG state pickled by an older babydistill, not loaded (pickle can run code); "
                      f"random draws after the resume differ from an uninterrupted run", stacklevel=3)
    scaler_state = (torch.load(folder / "scaler.pt", weights_only=True)
                    if scaler is not None and (folder / "scaler.pt").is_file() else None)
    before = ({k: v.detach().to("cpu", copy=True) for k, v in raw_model.state_dict().items()},
              copy.deepcopy(optimizer.state_dict()), scaler.state_dict() if scaler is not None else None,
              _rng_state())
    try:
        raw_model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        for group in optimizer.param_groups:  # the config's scale, like its lr, not the checkpoint's
            if "lr_scale" in group:
                group["lr_scale"] = scale
        if scaler_state is not None:
            scaler.load_state_dict(scaler_state)
        if rng is not None:
            _set_rng_state(rng)
    except Exception:
        raw_model.load_state_dict(before[0])
        optimizer.load_state_dict(before[1])
        if scaler is not None:
            scaler.load_state_dict(before[2])
        _set_rng_state(before[3])
        raise
    return meta


def checked_meta(folder: Path) -> dict:
    """A checkpoint's meta.json, after checking it and every file it lists against the checksums written with
    them (checkpoints written before checksums have none to check). Raises ChecksumError on a change."""
    meta_bytes = (folder / "meta.json").read_bytes()
    complete = (folder / COMPLETE).read_text(encoding="utf-8", errors="replace").strip()
    if not complete.isdigit():  # a bare step number: written before checksums, nothing to check
        try:
            sealed_by = json.loads(complete)
            recorded, step = sealed_by["meta_crc32"], sealed_by["step"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ChecksumError(f"{COMPLETE} changed after it was written ({type(exc).__name__})") from None
        if f"{crc32(meta_bytes):08x}" != recorded:
            raise ChecksumError(f"meta.json changed after it was written (crc32 {crc32(meta_bytes):08x}, "
                                f"{recorded} written)")
        if json.loads(meta_bytes).get("step") != step:
            raise ChecksumError(f"{COMPLETE} names step {step}, meta.json another")
    meta = json.loads(meta_bytes)
    changed = changed_files(folder, meta.get("files", {}))
    if changed:
        raise ChecksumError(f"files changed after they were written: {', '.join(changed)}")
    return meta


# --- keeping and setting aside ----------------------------------------------------------


def move_to_free_name(path: Path, target: Path) -> Path:
    """Move ``path`` to ``target``, or ``target-1``, ``target-2`` ... when taken (never over anything); returns
    where it went."""
    free = target
    for n in range(1, 1000):
        if not free.exists():
            break
        free = target.with_name(f"{target.name}-{n}")
    free.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, free)
    return free


def move_into(folder: Path, aside: Path) -> Path:
    """Move ``folder`` into ``aside/`` under its own name; never deleted."""
    return move_to_free_name(folder, aside / folder.name)


def prune_checkpoints(state_dir: Path, keep: int, best_step: int | None) -> None:
    """Keep the newest ``keep`` complete checkpoints and the best-weights files they refer to."""
    complete = complete_checkpoints(state_dir)
    kept, dropped = complete[-keep:], complete[:-keep]
    newest = kept[-1].name if kept else ""
    for folder in dropped:  # complete and superseded: keep_checkpoints says how many stay
        shutil.rmtree(folder, ignore_errors=True)
    for folder in [p for p in incomplete_checkpoints(state_dir) if p.name < newest]:
        move_into(folder, state_dir / INCOMPLETE)
    referenced = {best_step}
    for folder in kept:
        referenced.add(json.loads((folder / "meta.json").read_text(encoding="utf-8")).get("best_step"))
    for path in state_dir.glob("best-step-*.pt"):
        if int(path.stem.split("-")[-1]) not in referenced:
            path.unlink()


def _best_path(state_dir: Path, step: int) -> Path:
    return state_dir / f"best-step-{step:06d}.pt"


def save_best(state_dir: Path, step: int, raw_model) -> None:
    """The weights of the best validation so far (``train.keep_best``), which the export takes."""
    path = _best_path(state_dir, step)
    torch.save(raw_model.state_dict(), path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def no_readable_checkpoint(state_dir: Path) -> TrainingError:
    """The refusal to start over on top of checkpoints that could not be read: the user decides that."""
    aside = state_dir / UNREADABLE
    return TrainingError(f"no readable checkpoint in {state_dir} (unreadable ones are in {aside}); "
                         f"pass --force to start over, which discards them")


def resume_candidates(resume, state_dir: Path, out_dir: Path) -> list[Path]:
    """Checkpoint folders to try, newest first; [] = start fresh. Raises on a mode it cannot honour."""
    if resume not in (False, True, "auto"):
        folder = Path(resume)
        if not (folder / COMPLETE).is_file():
            raise TrainingError(f"{folder}: not a complete checkpoint folder (no {COMPLETE} marker)")
        return [folder]
    for folder in incomplete_checkpoints(state_dir):
        if not folder.name.endswith(".tmp"):
            warnings.warn(f"{folder}: incomplete checkpoint (no {COMPLETE} marker), skipped", stacklevel=3)
    complete = complete_checkpoints(state_dir)[::-1]
    if resume is False and complete:
        raise TrainingError(f"{out_dir} already has checkpoints (newest {complete[0].name}); "
                            f"pass --resume to continue or --force to start over")
    aside = state_dir / UNREADABLE
    if resume is True and not complete and aside.is_dir() and any(aside.iterdir()):
        raise no_readable_checkpoint(state_dir)
    if resume is True and not complete:
        raise TrainingError(f"no checkpoint in {state_dir}; use --resume auto to start fresh")
    return complete


# --- the exported model -----------------------------------------------------------------


def write_model_checksums(out_dir: Path, names: list[str]) -> None:
    """``checksums.json`` beside an exported model: size and crc32 of each file of the model (``names``)."""
    (Path(out_dir) / CHECKSUMS).write_text(json.dumps(file_records(out_dir, sorted(names)), indent=2) + "\n",
                                           encoding="utf-8")


def export_hf(model: torch.nn.Module, out_dir: Path, tokenizer_dir: Path) -> list[str]:
    """A plain Hugging Face checkpoint: config.json, model.safetensors and the run's tokenizer files.
    Returns the names of the files it wrote."""
    model.save_pretrained(out_dir)
    written = [p.name for p in Path(out_dir).iterdir() if p.is_file() and (
        p.suffix == ".safetensors" or p.name in ("config.json", "generation_config.json", "model.safetensors.index.json"))]
    for path in Path(tokenizer_dir).iterdir():
        if path.is_file() and not path.name.startswith("stage."):  # the tokenizer stage's marker is not the model's
            shutil.copy2(path, out_dir / path.name)
            written.append(path.name)
    return sorted(set(written))


def export_model(model: torch.nn.Module, out_dir: Path, tokenizer_dir: Path, best_step: int | None) -> None:
    """The run's Hugging Face checkpoint and its ``checksums.json``: the weights saved at ``best_step``
    (``train.keep_best``), or ``model`` as it is when None."""
    if best_step is not None:
        model.load_state_dict(torch.load(_best_path(out_dir / STATE_DIR, best_step), map_location="cpu",
                                         weights_only=True))
    write_model_checksums(out_dir, export_hf(model, out_dir, tokenizer_dir))
