"""Stage `capture` (CLI verb `capture`, alias `cache`; config section `cache`): run the teacher ensemble once
over every training window into the logit store, ``logits.zarr``.

Each chunk of ``cache.chunk_windows`` windows is one task: read the windows from tokens.zarr,
run every teacher (batches of ``cache.batch_size``, aligned to the chunk), combine them into the
ensemble, keep a sparse target per position (top-k or sampled), the temperature corrections
``c_T``, write the chunk and then its done marker. Tasks run in-process (``workers == 1``, dask's
synchronous scheduler), on a ``LocalCluster`` (``workers > 1``) or on an existing dask cluster
(``scheduler=ADDRESS``); each worker process loads the teachers once. A re-run skips the chunks
marked done whose files are intact. The store schema is documented in ``stores/logits.py``; one task's work
is ``pipeline/capture_chunk.py``, the targets it keeps ``pipeline/capture_targets.py``, the fidelity report
``pipeline/fidelity.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from babydistill.pipeline import devices
from babydistill.pipeline.capture_chunk import CaptureTask, capture_chunk, flush_writes
from babydistill.pipeline.config import CacheConfig, earlier_value, identity
from babydistill.pipeline.fidelity import fidelity_positions, fidelity_report, format_fidelity
from babydistill.pipeline.tokenizer import tokenizer_hash
from babydistill.stores.files import file_sha256
from babydistill.stores.header import LogitStoreHeader, logits_format_version
from babydistill.stores.logits import (
    REBUILD_STORE,
    acquire_lock,
    chunk_problem,
    chunk_ranges,
    create_store,
    header_problem,
    migrate_markers,
    read_header,
    read_marker,
    remove_marker,
    repair_metadata,
    update_header,
)
from babydistill.stores.quant import QUANT_STEP
from babydistill.stores.tokens import TokenStore, tokenizer_file_hash

# --- inputs -------------------------------------------------------------------------------


def check_teachers(teacher_dirs: list[Path], tokens: TokenStore) -> list[str]:
    """Problems with the teacher folders: not a checkpoint, vocab or tokenizer differing (naming both)."""
    problems, seen = [], []
    for folder in map(Path, teacher_dirs):
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            problems.append(f"{folder} is not a model checkpoint (needs config.json and model.safetensors); "
                            f"train it with `babydistill teacher CONFIG`")
            continue
        vocab = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("vocab_size")
        tok_hash = tokenizer_file_hash(folder)
        for other, other_vocab, other_hash in seen[:1]:
            if vocab != other_vocab:
                problems.append(f"teachers {other} and {folder} have different vocab sizes ({other_vocab} vs {vocab})")
            elif tok_hash and other_hash and tok_hash != other_hash:
                problems.append(f"teachers {other} and {folder} use different tokenizers (tokenizer.json differs)")
        if not seen and vocab != tokens.vocab_size:
            problems.append(f"teacher {folder} has vocab size {vocab} but {tokens.path} has {tokens.vocab_size}")
        if not seen and tok_hash and tok_hash != tokens.tokenizer_hash:
            problems.append(f"teacher {folder} was trained with another tokenizer than {tokens.path}")
        seen.append((folder, vocab, tok_hash))
    return problems


def store_identity(cfg: CacheConfig, tokens: TokenStore, teachers: list[dict]) -> dict:
    """The attributes that fix the store's content, so a resume must match all of them: every identity
    field of the cache section (``pipeline.config.identity``; the cache stage's fingerprint hashes the
    same fields) and the inputs."""
    vocab = tokens.vocab_size
    return {
        **target_identity(cfg),
        "format_version": logits_format_version(cfg.logp_dtype),
        **({"logp_step": QUANT_STEP} if cfg.logp_dtype == "uint8" else {}),
        "slots": {"topk": cfg.k, "sample": min(cfg.samples, vocab),
                  "hybrid": cfg.k + cfg.draw_sets * min(cfg.samples, vocab - cfg.k)}[cfg.mode],
        "vocab_size": vocab,
        "seq_len": tokens.seq_len,
        "num_windows": tokens.num_windows("train"),
        "teachers": teachers,
        "tokenizer_hash": tokens.tokenizer_hash,
        "tokens_hash": tokens.tokens_hash,
        "windows_hash": tokens.windows_hash,
    }


def target_identity(cfg: CacheConfig) -> dict:
    """The store attributes that the cache section alone fixes (part of `store_identity`)."""
    return {
        **identity(cfg),
        # k and samples are recorded where the mode uses them only, so that an unused one does not differ
        "k": cfg.k if cfg.mode in ("topk", "hybrid") else None,
        "samples": cfg.samples if cfg.mode in ("sample", "hybrid") else None,
        "temperatures": [float(t) for t in cfg.temperatures],
    }


def _key_differences(old: dict, new: dict) -> list[str]:
    keys = [k for k in new if k != "teachers" and old.get(k) != new.get(k)]
    # Keys left out of an identity at their earlier value (pipeline.config.earlier_value) are missing from one
    # side when they differ: an absent key has that value.
    for f in dataclasses.fields(CacheConfig):
        earlier = earlier_value(f)
        if earlier is not dataclasses.MISSING and f.name not in keys and old.get(f.name, earlier) != new.get(f.name, earlier):
            keys.append(f.name)
    return keys


def _differences(old: dict, new: dict) -> list[str]:
    keys = _key_differences(old, new)
    if [t["sha256"] for t in old.get("teachers", [])] != [t["sha256"] for t in new["teachers"]]:
        keys.append("teachers")
    return keys


def target_differences(header: LogitStoreHeader, cfg: CacheConfig) -> list[str]:
    """'cache.k 8, not 32'-style lines for the cache keys on which a store (its header) differs from what
    ``cfg`` captures; empty when it holds those targets."""
    recorded = header.identity
    wanted = target_identity(cfg)
    # a key absent from an older store had its earlier value; any other absent key shows as None
    earlier = {f.name: value for f in dataclasses.fields(CacheConfig)
               if (value := earlier_value(f)) is not dataclasses.MISSING}
    return [f"cache.{key} {recorded.get(key, earlier.get(key))!r}, not {wanted.get(key, earlier.get(key))!r}"
            for key in _key_differences(recorded, wanted)]


REBUILD = "rerun `babydistill capture CONFIG --force` to rebuild it"


# --- the stage ------------------------------------------------------------------------------


def _run_tasks(spec: CaptureTask, todo: list[tuple[int, int, int, list]], workers: int, scheduler: str | None,
               seq_len: int, gpus: list[str] | None = None) -> list[dict]:
    """Run the chunk tasks with a progress bar over chunks (tokens/s, ETA); returns their timings, the last
    pending write's as ``{"write_s": ...}`` entries. ``gpus``: a local cluster of one worker per GPU."""
    import dask
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="chunk", desc="capture", mininterval=1.0, leave=False)  # transient: a summary follows
    started, num_tokens, timings = time.time(), 0, []

    def advance(start: int, stop: int) -> None:
        nonlocal num_tokens
        num_tokens += (stop - start) * seq_len
        bar.set_postfix_str(f"{num_tokens / max(1e-9, time.time() - started):,.0f} tok/s", refresh=False)
        bar.update(1)

    try:
        if scheduler is None and workers == 1:
            try:
                for chunk, start, stop, rows in todo:
                    timings.append(dask.delayed(capture_chunk)(spec, chunk, start, stop, rows)
                                   .compute(scheduler="synchronous"))
                    advance(start, stop)
            except BaseException:
                # The chunk before the failed one is whole: let its write finish while the store is still locked.
                with contextlib.suppress(Exception):
                    flush_writes()
                raise
            timings.append({"write_s": flush_writes()})
            return timings
        from dask.distributed import Client, LocalCluster, as_completed

        cluster = None
        if gpus:
            cluster = devices.gpu_cluster(gpus)
        elif scheduler is None:
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, silence_logs=40)
        client = Client(scheduler or cluster)
        try:
            futures = {client.submit(capture_chunk, spec, *task, pure=False): task for task in todo}
            for future in as_completed(futures):
                timings.append(future.result())  # re-raises a task's error here
                advance(*futures[future][1:3])
            timings += [{"write_s": seconds} for seconds in client.run(flush_writes).values()]
            return timings
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    finally:
        bar.close()


def _device_problems(cfg: CacheConfig, workers: int, scheduler: str | None) -> list[str]:
    """A device or precision this host lacks, or more workers than GPUs. With ``scheduler``, each worker
    resolves ``cache.device`` itself, on the GPU its process was given."""
    if scheduler is not None:
        return []
    try:
        device = devices.resolve_device(cfg.device, "cache.device")
        devices.resolve_precision(cfg.precision, device, "cache.precision", without_bf16=None)
        if device.type == "cuda" and workers > 1:
            devices.check_gpu_workers(workers)
    except ValueError as exc:
        return [str(exc)]
    return []


def _input_problems(cfg: CacheConfig, tokens: TokenStore, tokenizer_dir: Path, teacher_dirs: list[Path],
                    workers: int, scheduler: str | None = None) -> list[str]:
    """Everything wrong with a capture's inputs, so that one error lists it all."""
    problems = [] if teacher_dirs else ["no teachers given"]
    problems += check_teachers(teacher_dirs, tokens)
    if tokenizer_hash(tokenizer_dir) != tokens.tokenizer_hash:
        problems.append(f"{tokenizer_dir} is another tokenizer than the one of {tokens.path}")
    vocab = tokens.vocab_size
    if cfg.mode == "topk" and cfg.k > vocab:
        problems.append(f"cache.k = {cfg.k} is larger than the vocab size {vocab}")
    if cfg.mode == "hybrid" and cfg.k >= vocab:
        problems.append(f"cache.k = {cfg.k} leaves no tail to sample at vocab size {vocab} (mode hybrid)")
    if cfg.mode in ("sample", "hybrid") and not cfg.samples <= vocab:
        problems.append(f"cache.samples = {cfg.samples} must be in 1..{vocab} (the vocab size)")
    if workers < 1:
        problems.append(f"workers must be >= 1, got {workers}")
    problems += _device_problems(cfg, workers, scheduler)
    if tokens.num_windows("train") == 0:
        problems.append(f"{tokens.path} has no training windows")
    return problems


def _local_gpus(cfg: CacheConfig, workers: int, scheduler: str | None) -> list[str] | None:
    """The GPUs of a local multi-worker capture on CUDA (one worker each), else None."""
    if scheduler is not None or workers == 1:
        return None
    device = devices.resolve_device(cfg.device, "cache.device")
    return devices.check_gpu_workers(workers) if device.type == "cuda" else None


def capture_record(out: Path, num_chunks: int) -> dict:
    """Which device kinds and teacher precisions the store's chunks were captured with (a store resumed
    elsewhere may mix them; its identity does not depend on them: see ``CacheConfig.precision``)."""
    markers = [read_marker(out, i) or {} for i in range(num_chunks)]
    record = {"devices": sorted({m.get("device", "cpu") for m in markers if m}),
              "precisions": sorted({m.get("precision", "fp32") for m in markers if m})}
    clipped = [m["clipped"] for m in markers if "clipped" in m]
    if clipped:  # logp_dtype uint8: real entries below the codes' range, read back as its bottom
        record["clipped"] = {key: sum(c.get(key, 0) for c in clipped) for key in clipped[0]}
    return record


def _chunks_to_do(out: Path, ranges: list[tuple[int, int]], positions: np.ndarray) -> list[tuple[int, int, int, list]]:
    """(chunk, start, stop, fidelity rows) of every chunk not done and intact; their stale markers are removed."""
    todo = []
    for i, (start, stop) in enumerate(ranges):
        # Every done chunk's files are checked against their sizes and crc32, so a changed byte is redone.
        why = chunk_problem(out, i, checksum=True)
        if why is None:
            continue
        if why != "not marked done":
            print(f"capture: rewriting chunk {i} (rows {start}-{stop - 1}): {why}", flush=True)
        remove_marker(out, i)
        rows = positions[(positions[:, 0] >= start) & (positions[:, 0] < stop)]
        todo.append((i, start, stop, [(int(w), int(s)) for w, s in rows]))
    return todo


def _open_for_capture(out: Path, store_id: dict) -> None:
    """Create the store at ``out``, or check that the one there holds these targets (and repair its array
    metadata from its header: the chunk files are untouched, their checksums say the rest)."""
    if problem := header_problem(out):
        raise ValueError(f"{problem}; {REBUILD_STORE}")
    if not (out / "zarr.json").is_file():
        create_store(out, store_id)
        return
    header = read_header(out)
    if header is None:
        raise ValueError(f"{out} was made from other inputs (not a logit store); {REBUILD}")
    if diff := _differences(header.identity, store_id):
        raise ValueError(f"{out} was made from other inputs ({', '.join(diff)}); {REBUILD}")
    for repaired in repair_metadata(out, header):
        print(f"capture: rewrote {out / repaired.split(':')[0].split(' ')[0]} from the store's header "
              f"({repaired})", flush=True)


def _capture_task(cfg: CacheConfig, store_id: dict, teachers: list[dict], out: Path, tokens_path: Path,
                  remote: bool) -> CaptureTask:
    """The spec every chunk task of this capture gets (plain values: it is sent to dask workers)."""
    return CaptureTask(
        teachers=[(t["path"], t["sha256"]) for t in teachers], mode=cfg.mode, k=cfg.k, samples=cfg.samples,
        slots=store_id["slots"], temperatures=store_id["temperatures"], ensemble=cfg.ensemble,
        logp_dtype=cfg.logp_dtype, batch_size=cfg.batch_size, seed=cfg.seed,
        threads=1 if remote else max(1, torch.get_num_threads()), tail_logp=cfg.tail_logp,
        draw_sets=cfg.draw_sets, device=cfg.device, precision=cfg.precision,
        out=str(out.resolve()), tokens=str(tokens_path.resolve()), order=cfg.order,
        num_windows=store_id["num_windows"])


def _summary(out: Path, cfg: CacheConfig, store_id: dict, ranges: list, todo: list, timings: list[dict],
             seconds: float, seq_len: int, execution: dict) -> dict:
    """Seal the fidelity report and the capture record into the store's header; the stage's summary."""
    report = fidelity_report(out, len(ranges), cfg.mode)
    capture = capture_record(out, len(ranges))
    update_header(zarr.open_group(store=str(out), mode="r+"), {"fidelity": report, "capture": capture})
    print(format_fidelity(report), flush=True)
    if capture.get("clipped"):
        print(f"capture: uint8 log-probabilities, entries below the range that clipped: {capture['clipped']}",
              flush=True)
    computed = sum(stop - start for _, start, stop, _ in todo) * seq_len
    return {
        "out": str(out), "mode": cfg.mode, "slots": store_id["slots"], "num_windows": store_id["num_windows"],
        "num_chunks": len(ranges), "chunks_computed": len(todo), "chunks_skipped": len(ranges) - len(todo),
        "seconds": round(seconds, 3), "tokens_per_s": computed / seconds if computed else None,
        **{f"task_{key}": sum(t.get(key, 0.0) for t in timings)
           for key in ("compute_s", "compute_cpu_s", "write_cpu_s", "write_s", "forward_s", "write_wait_s")},
        **execution, "capture": capture, "fidelity": report,
    }


def capture_logits(cfg: CacheConfig, tokens_path: Path, tokenizer_dir: Path, teacher_dirs: list[Path], out: Path,
                   *, scheduler: str | None = None) -> dict:
    """Capture the ensemble's sparse targets for every training window into ``out`` (resumable in place).

    Returns the summary, including the fidelity report (also saved in the store's header).

    Examples
    --------
    >>> summary = capture_logits(CacheConfig(), Path("runs/demo/tokens.zarr"), Path("runs/demo/tokenizer"),
    ...                          [Path("runs/demo/teachers/t1"), Path("runs/demo/teachers/t2")],
    ...                          Path("runs/demo/logits.zarr"))  # doctest: +SKIP
    """
    workers = cfg.workers
    tokens_path, tokenizer_dir, out = Path(tokens_path), Path(tokenizer_dir), Path(out)
    teacher_dirs = [Path(d) for d in teacher_dirs]
    tokens = TokenStore(tokens_path)
    if problems := _input_problems(cfg, tokens, tokenizer_dir, teacher_dirs, workers, scheduler):
        raise ValueError("; ".join(problems))
    teachers = [{"path": str(d.resolve()), "sha256": file_sha256(d / "model.safetensors")} for d in teacher_dirs]
    store_id = store_identity(cfg, tokens, teachers)
    out.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(out)
    try:
        _open_for_capture(out, store_id)
        for leftover in out.rglob("*.partial"):  # half-written files of a killed capture
            leftover.unlink()
        ranges = chunk_ranges(store_id["num_windows"], cfg.chunk_windows)
        migrate_markers(out, len(ranges))
        positions = fidelity_positions(store_id["num_windows"], tokens.seq_len, cfg.fidelity_positions, cfg.seed)
        todo = _chunks_to_do(out, ranges, positions)
        spec = _capture_task(cfg, store_id, teachers, out, tokens_path, remote=scheduler is not None or workers > 1)
        started = time.time()
        print(f"capture: {len(ranges)} chunks of {cfg.chunk_windows} windows, {len(ranges) - len(todo)} already "
              f"done, {len(teachers)} teacher(s), mode {cfg.mode}, "
              + (f"scheduler {scheduler}" if scheduler else f"{workers} worker(s)"), flush=True)
        gpus = _local_gpus(cfg, workers, scheduler)
        timings = _run_tasks(spec, todo, workers, scheduler, tokens.seq_len, gpus) if todo else []
        return _summary(out, cfg, store_id, ranges, todo, timings, time.time() - started, tokens.seq_len,
                        {"workers": workers, "scheduler": scheduler, "gpus": gpus})
    finally:
        lock.unlink(missing_ok=True)
