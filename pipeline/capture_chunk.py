"""One capture task: a chunk of windows through every teacher, into sparse targets, written with its done
marker. Runs in-process or in a dask worker (each process loads the teachers once)."""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from babydistill.pipeline import devices
from babydistill.pipeline.capture_targets import sample_targets
from babydistill.pipeline.fidelity import fidelity_row, gradient_fidelity
from babydistill.pipeline.model import autocast_context, ensemble_logits, load_teachers
from babydistill.stores import quant
from babydistill.stores.logits import (
    PAD_LOGP,
    draw_set_slots,
    window_order,
    write_chunk,
)
from babydistill.stores.tokens import TokenStore


@functools.lru_cache(maxsize=2)
def _load_teachers(teachers: tuple[tuple[str, str], ...], device: str = "cpu") -> list[torch.nn.Module]:
    """Teachers of this process on ``device``, loaded once (keyed by path, weight hash and device)."""
    return load_teachers([Path(path) for path, _ in teachers], device=torch.device(device))


@functools.lru_cache(maxsize=2)
def _token_store(path: str) -> TokenStore:
    return TokenStore(path)


@dataclass(frozen=True)
class ChunkSpec:
    """What computing a chunk's targets needs (sent to every dask task, so plain values only)."""
    teachers: list[tuple[str, str]]
    """(path, sha256 of the weights) per teacher: the weights hash keys the per-process teacher cache."""
    mode: str
    k: int
    samples: int
    slots: int
    """Ids stored per position (see stores/logits.py)."""
    temperatures: list[float]
    ensemble: str
    logp_dtype: str
    batch_size: int
    """Windows per teacher forward pass."""
    seed: int
    threads: int
    """torch threads of the task (1 when several tasks share the machine)."""
    tail_logp: bool = field(default=False, kw_only=True)
    """Mode hybrid: also the tail draws' exact log-probabilities (array ``tail_logp``)."""
    draw_sets: int = field(default=1, kw_only=True)
    """Mode hybrid: independent tail draw sets, one after the other in the slots (see stores/logits.py)."""
    device: str = field(default="cpu", kw_only=True)
    """``cache.device``, resolved in the process that runs the task (a dask worker sees its own GPU as cuda:0)."""
    precision: str = field(default="fp32", kw_only=True)
    """``cache.precision`` of the teachers' forward (resolved with the device)."""


@dataclass(frozen=True)
class CaptureTask(ChunkSpec):
    """A capture task's spec: the chunk's computation and where its windows come from and go to."""
    out: str
    tokens: str
    order: str
    num_windows: int


def chunk_device(spec: ChunkSpec) -> tuple[torch.device, torch.dtype | None]:
    """This process's device and teacher autocast dtype for ``spec`` (in a dask worker: its own GPU, cuda:0)."""
    device = devices.resolve_device(spec.device, "cache.device")
    return device, devices.resolve_precision(spec.precision, device, "cache.precision", without_bf16=None)


class _ForwardClock:
    """GPU (CUDA events, no host sync until read) or wall time spent in the teachers' forward passes."""

    def __init__(self, device: torch.device):
        self.cuda, self.pairs, self.seconds = device.type == "cuda", [], 0.0

    @contextlib.contextmanager
    def measure(self):
        if not self.cuda:
            started = time.perf_counter()
            yield
            self.seconds += time.perf_counter() - started
            return
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        yield
        end.record()
        self.pairs.append((begin, end))

    def total(self) -> float:
        return self.seconds + sum(b.elapsed_time(e) for b, e in self.pairs) / 1000.0


def _generators(spec: ChunkSpec, chunk: int, device: torch.device) -> tuple[torch.Generator, torch.Generator, list]:
    """The chunk's draw stream, the fidelity redraws' own stream (on the host: those rows are few) and one
    stream per extra draw set, so the stored targets do not depend on where the fidelity rows fall and set 0
    is what a one-set store holds, bit for bit."""
    def seeded(*key, where=device):
        return torch.Generator(device=where).manual_seed(int(np.random.SeedSequence([spec.seed, chunk, *key])
                                                             .generate_state(1)[0]))

    generator = seeded()
    return generator, seeded(1, where="cpu"), [generator] + [seeded(2, s) for s in range(1, spec.draw_sets)]


def _batch_targets(spec: ChunkSpec, teachers, x_BS: torch.Tensor, amp_dtype, clock: _ForwardClock,
                   set_generators: list, set_slots: int) -> dict[str, torch.Tensor]:
    """One teacher batch on its device: the ensemble (fp32) and its sparse targets, c_T, the dense rows' LSE."""
    with torch.inference_mode():
        with clock.measure(), autocast_context(x_BS.device, amp_dtype):
            logits = [teacher(input_ids=x_BS).logits for teacher in teachers]
        logits = [z.float() for z in logits]
        # The dense log-softmax is never materialised in topk mode: logp = zbar - LSE(zbar) on the k ids.
        zbar_BSV = ensemble_logits(logits, spec.ensemble)
        lse_BS = torch.logsumexp(zbar_BSV, dim=-1)
        c_T = torch.stack([torch.logsumexp(zbar_BSV / t, dim=-1) - lse_BS / t if t != 1.0
                           else lse_BS.new_zeros(lse_BS.shape) for t in spec.temperatures], dim=-1)
        zbar_NV = zbar_BSV.reshape(-1, zbar_BSV.shape[-1])
        out = {"zbar": zbar_BSV, "lse": lse_BS, "c_T": c_T}
        if spec.mode == "topk":
            top_NK, out["ids"] = zbar_NV.topk(spec.slots, dim=-1, sorted=True)
            out["logp"] = top_NK - lse_BS.reshape(-1, 1)
            return out
        logp_NV = zbar_NV - lse_BS.reshape(-1, 1)
        # With tail_logp, draw from the teacher as stored (rounded to logp_dtype), so that the stored probability
        # of each draw is the one it was drawn with (the control variate divides by it); the head and the tail's
        # mass r come from the unrounded values all the same.
        draw_logp = _as_stored(logp_NV, spec.logp_dtype) if spec.tail_logp else None
        head = zbar_NV.topk(spec.k, dim=-1, sorted=True).indices if spec.mode == "hybrid" else None
        sets = [sample_targets(logp_NV, spec.samples, set_slots, set_generator, head, draw_logp)
                for set_generator in set_generators]
        out["ids"] = torch.cat([sets[0][0]] + [set_ids[:, spec.k:] for set_ids, _ in sets[1:]], dim=1)
        out["logp"] = torch.cat([sets[0][1]] + [set_logp[:, spec.k:] for _, set_logp in sets[1:]], dim=1)
        if spec.tail_logp:
            tail_ids = out["ids"][:, spec.k:]
            out["tail_logp"] = torch.where(out["logp"][:, spec.k:] > PAD_LOGP / 2,
                                           draw_logp.gather(1, tail_ids).double(), PAD_LOGP)
    return out


def _as_stored(logp_NV: torch.Tensor, logp_dtype: str) -> torch.Tensor:
    """Log-probabilities rounded as the store keeps them (float32)."""
    if logp_dtype == "uint8":
        return quant.snap_torch(logp_NV, quant.QUANT_STEP)
    return logp_NV.to(getattr(torch, logp_dtype)).float()


def _quantise(arrays: dict[str, np.ndarray], head: int) -> dict[str, int]:
    """Round ``logp`` (and ``tail_logp``) in place to what a uint8 store reads back; the entries that clipped,
    by kind. A head entry that would clip is refused (``stores.quant.clip_problem``)."""
    clipped = {}
    for name in ("logp", "tail_logp"):
        if name in arrays:
            codes, mask = quant.quantize(arrays[name], quant.QUANT_STEP)
            arrays[name] = quant.dequantize(codes, quant.QUANT_STEP)
            if name == "logp":
                clipped["head"], clipped["tail"] = int(mask[..., :head].sum()), int(mask[..., head:].sum())
            else:
                clipped["tail_logp"] = int(mask.sum())
    if problem := quant.clip_problem("capture", clipped["head"], clipped["tail"] + clipped.get("tail_logp", 0)):
        raise ValueError(problem)
    return clipped


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A device tensor's copy on the host, started without waiting (pinned memory on CUDA): it runs while
    the next batch's forward does; read it only after ``torch.cuda.synchronize``."""
    return tensor.to("cpu", non_blocking=True) if tensor.device.type == "cuda" else tensor


def compute_chunk(spec: ChunkSpec | dict, chunk: int, windows: np.ndarray, fidelity_rows: list[tuple[int, int]],
                  stats: dict | None = None):
    """Sparse targets of one chunk of windows [n, seq_len + 1]: (arrays, fidelity per sampled position).

    ``spec`` may also be a dict of ChunkSpec's fields (as the tests build it). ``stats``, when given, gets the
    device, the precision and the seconds of the teachers' forward passes (GPU time on CUDA)."""
    if isinstance(spec, dict):
        spec = ChunkSpec(**spec)
    device, amp_dtype = chunk_device(spec)
    if device.type == "cpu":
        torch.set_num_threads(spec.threads)
    teachers = _load_teachers(tuple(map(tuple, spec.teachers)), str(device))
    generator, fidelity_generator, set_generators = _generators(spec, chunk, device)
    inputs = torch.from_numpy(windows[:, :-1])
    set_slots = draw_set_slots(spec.k, spec.slots, spec.draw_sets)
    names = ["ids", "logp", "c_T"] + (["tail_logp"] if spec.tail_logp else [])
    host: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    dense_rows, clock = [], _ForwardClock(device)
    for b in range(0, len(inputs), spec.batch_size):
        x_BS = inputs[b:b + spec.batch_size]
        x_BS = x_BS.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x_BS
        out = _batch_targets(spec, teachers, x_BS, amp_dtype, clock, set_generators, set_slots)
        for name in names:
            host[name].append(_to_host(out[name]))
        for w, s in fidelity_rows:
            if b <= w < b + len(x_BS):
                dense_rows.append((w, s, (out["zbar"][w - b, s] - out["lse"][w - b, s]).cpu()))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seq_len, np_dtype = inputs.shape[1], np.dtype("float32" if spec.logp_dtype == "uint8" else spec.logp_dtype)
    arrays = {"ids": torch.cat(host["ids"]).numpy().astype(np.uint16).reshape(-1, seq_len, spec.slots),
              "logp": torch.cat(host["logp"]).numpy().astype(np_dtype).reshape(-1, seq_len, spec.slots),
              "c_T": torch.cat(host["c_T"]).numpy().astype(np.float32)}
    if spec.tail_logp:
        arrays["tail_logp"] = torch.cat(host["tail_logp"]).numpy().astype(np_dtype).reshape(-1, seq_len,
                                                                                             spec.slots - spec.k)
    if spec.logp_dtype == "uint8":
        clipped = _quantise(arrays, spec.k if spec.mode == "hybrid" else spec.slots if spec.mode == "topk" else 0)
        if stats is not None:
            stats["clipped"] = clipped
    fidelity = []
    for w, s, dense in dense_rows:
        # Fidelity of what one epoch reads: the head and the first draw set.
        row_ids, row_logp = arrays["ids"][w, s, :set_slots].astype(np.int64), arrays["logp"][w, s, :set_slots]
        row = fidelity_row(dense.numpy(), row_ids, row_logp, spec.mode)
        grad = gradient_fidelity(dense, row_ids, row_logp, spec.mode, spec.k, spec.samples, fidelity_generator)
        fidelity.append([w, s, *row, *grad])
    arrays["tokens"] = windows.astype(np.uint16)
    if stats is not None:
        stats.update({"device": device.type, "precision": devices.precision_name(amp_dtype),
                      "forward_s": clock.total()})
    return arrays, fidelity


class _ChunkWriter:
    """Writes this process's chunks on a thread of its own, one at a time: a task hands its chunk over and
    returns, so the chunk's compression and write run while the next task's teachers run. A task waits for
    the write before it (at most one chunk waits in memory); the stage waits for the last (`flush_writes`).
    A chunk is marked done only once written, so a process killed with a write pending redoes that chunk."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.pool, self.pending = ThreadPoolExecutor(1, thread_name_prefix="cache-write"), None

    def submit(self, fn, *args) -> float:
        """Start ``fn(*args)`` after the previous write; returns the previous write's seconds (0 if none)."""
        previous = self.wait()
        self.pending = self.pool.submit(fn, *args)
        return previous

    def wait(self) -> float:
        """Wait for the pending write (re-raising its error); its seconds, or 0."""
        pending, self.pending = self.pending, None
        return pending.result() if pending is not None else 0.0


@functools.lru_cache(maxsize=1)
def _chunk_writer() -> _ChunkWriter:
    return _ChunkWriter()


def flush_writes() -> float:
    """Wait for this process's pending chunk write; returns its seconds (dask: ``client.run(flush_writes)``)."""
    return _chunk_writer().wait()


def _write(out: str, chunk: int, start: int, arrays: dict, marker: dict) -> float:
    import zarr

    started = time.perf_counter()
    group = zarr.open_group(store=out, mode="r+")
    write_chunk(Path(out), group, chunk, start, arrays, marker)
    return time.perf_counter() - started


def capture_chunk(spec: CaptureTask, chunk: int, start: int, stop: int, fidelity_rows: list[tuple[int, int]]) -> dict:
    """One task: compute chunk ``chunk`` (store rows start..stop-1) and hand it to this process's writer, which
    writes it, then its done marker, while the next task computes (`_ChunkWriter`).

    Returns the seconds spent computing (teachers, ensemble, sparse targets), in the teachers' forward passes
    (GPU time on CUDA), waiting for the previous write and that write's own seconds.
    """
    import zarr

    zarr.config.set({"async.concurrency": 4})  # many dask workers share one file system
    started, started_cpu = time.perf_counter(), time.process_time()
    window_ids = window_order(spec.num_windows, spec.order, spec.seed)[start:stop]
    windows = _token_store(spec.tokens).windows("train", window_ids)
    stats: dict = {}
    arrays, fidelity = compute_chunk(spec, chunk, windows, [(w - start, s) for w, s in fidelity_rows], stats)
    arrays["window_ids"] = window_ids.astype(np.uint32)
    computed, computed_cpu = time.perf_counter(), time.process_time()
    marker = {"fidelity": fidelity, "device": stats["device"], "precision": stats["precision"],
              **({"clipped": stats["clipped"]} if "clipped" in stats else {})}
    previous_write_s = _chunk_writer().submit(_write, spec.out, chunk, start, arrays, marker)
    return {"chunk": chunk, "compute_s": computed - started, "forward_s": stats["forward_s"],
            "write_wait_s": time.perf_counter() - computed, "write_s": previous_write_s,
            "compute_cpu_s": computed_cpu - started_cpu, "write_cpu_s": time.process_time() - computed_cpu}
