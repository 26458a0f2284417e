"""Stage `cache`: run the teacher ensemble once over every training window into ``logits.zarr``.

Each chunk of ``cache.chunk_windows`` windows is one task: read the windows from tokens.zarr,
run every teacher (batches of ``cache.batch_size``, aligned to the chunk), combine them into the
ensemble, keep a sparse target per position (top-k or sampled), the temperature corrections
``c_T``, write the chunk and then its done marker. Tasks run in-process (``workers == 1``, dask's
synchronous scheduler), on a ``LocalCluster`` (``workers > 1``) or on an existing dask cluster
(``scheduler=ADDRESS``); each worker process loads the teachers once. A re-run skips the chunks
marked done whose files are intact. The store schema is documented in ``stores/logits.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from babydistill.pipeline import devices
from babydistill.pipeline.config import CacheConfig, earlier_value, identity
from babydistill.pipeline.model import autocast_context, ensemble_logits, load_teachers
from babydistill.pipeline.tokenizer import tokenizer_hash
from babydistill.stores.logits import (
    FORMAT,
    FORMAT_VERSION,
    PAD_LOGP,
    acquire_lock,
    chunk_problem,
    chunk_ranges,
    create_store,
    draw_set_slots,
    header_problem,
    migrate_markers,
    read_attrs,
    read_marker,
    remove_marker,
    repair_metadata,
    update_header,
    window_order,
    write_chunk,
)
from babydistill.stores.tokens import TokenStore, file_sha256, tokenizer_file_hash

TAIL_MODES = ("bucket", "renorm", "uniform")


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
        "format_version": FORMAT_VERSION,
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


def target_differences(attrs: dict, cfg: CacheConfig) -> list[str]:
    """'cache.k 8, not 32'-style lines for the cache keys on which a store (its ``attrs``) differs from what
    ``cfg`` captures; empty when it holds those targets."""
    wanted = target_identity(cfg)
    # a key absent from an older store had its earlier value; any other absent key shows as None
    earlier = {f.name: value for f in dataclasses.fields(CacheConfig)
               if (value := earlier_value(f)) is not dataclasses.MISSING}
    return [f"cache.{key} {attrs.get(key, earlier.get(key))!r}, not {wanted.get(key, earlier.get(key))!r}"
            for key in _key_differences(attrs, wanted)]


# --- one chunk (runs in a dask worker or in-process) ----------------------------------------


@functools.lru_cache(maxsize=2)
def _load_teachers(teachers: tuple[tuple[str, str], ...], device: str = "cpu") -> list[torch.nn.Module]:
    """Teachers of this process on ``device``, loaded once (keyed by path, weight hash and device)."""
    return load_teachers([Path(path) for path, _ in teachers], device=torch.device(device))


@functools.lru_cache(maxsize=2)
def _token_store(path: str) -> TokenStore:
    return TokenStore(path)


def ensemble_logp(logits: list[torch.Tensor], rule: str) -> torch.Tensor:
    """log-softmax of the ensemble (see ``ensemble_logits``)."""
    return torch.log_softmax(ensemble_logits(logits, rule), dim=-1)


def sample_targets(logp_NV: torch.Tensor, samples: int, slots: int, generator: torch.Generator,
                   head_ids: torch.Tensor | None = None, draw_logp: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled sparse targets per row: (ids [N, slots] int64, logp [N, slots] float64).

    Mode sample (``head_ids`` None): ``samples`` draws from each row's distribution; the distinct ids
    by decreasing count (ties: smaller id first), ``logp = log(count / samples)``.
    Mode hybrid (``head_ids`` [N, k]): those ids first with their exact log-probabilities, then
    ``samples`` draws from the rest of the distribution renormalised, ``logp = log(r * count / samples)``
    with r the mass outside the head: E[weight of a tail id j] = p_j, so the target is unbiased.
    r is the sum of the tail's own probabilities (a log-sum-exp over the tail of the unrounded ``logp_NV``),
    never 1 - the head's: that difference cancels, and from float16-rounded head values it put the head's
    rounding error into the tail (34x the true tail mass of a confident row).
    ``draw_logp`` (default ``logp_NV``): the distribution the draws come from, e.g. the teacher as stored
    (rounded) when the store keeps each draw's probability; the head and r always come from ``logp_NV``.
    Free slots get the smallest ids used nowhere else in the row and ``PAD_LOGP`` (see stores/logits.py).
    """
    num_rows, vocab = logp_NV.shape
    probs = (logp_NV if draw_logp is None else draw_logp).exp()
    head = None
    if head_ids is not None:
        head = torch.zeros(num_rows, vocab, dtype=torch.bool, device=logp_NV.device).scatter_(1, head_ids, True)
        probs = probs.masked_fill(head, 0.0)
        # A row whose tail underflowed to 0 draws uniformly; its weights are 0 (r = 0) and become padding.
        probs = torch.where(probs.sum(1, keepdim=True) > 0, probs, (~head).to(probs.dtype))
    draws = torch.multinomial(probs, samples, replacement=True, generator=generator)
    counts = torch.zeros(num_rows, vocab, dtype=torch.int32, device=logp_NV.device).scatter_add_(
        1, draws, torch.ones_like(draws, dtype=torch.int32))
    key = counts * (vocab + 1) + (vocab - torch.arange(vocab, dtype=torch.int32, device=logp_NV.device))
    if head is None:
        ids = key.topk(slots, dim=-1).indices
        picked = counts.gather(1, ids).double()
        return ids, torch.where(picked > 0, torch.log(picked / samples), torch.full_like(picked, PAD_LOGP))
    key = key.masked_fill(head, -1)  # head ids are taken already, never again as tail or padding
    tail_ids = key.topk(slots - head_ids.shape[1], dim=-1).indices
    picked = counts.gather(1, tail_ids).double()
    head_logp = logp_NV.gather(1, head_ids).double()
    log_r = torch.logsumexp(logp_NV.masked_fill(head, -math.inf), dim=1, keepdim=True).double()
    tail_logp = log_r + torch.log(picked / samples)
    tail_logp = torch.where((picked > 0) & (log_r > -math.inf), tail_logp, torch.full_like(tail_logp, PAD_LOGP))
    return torch.cat([head_ids, tail_ids], dim=1), torch.cat([head_logp, tail_logp], dim=1)


def stored_target(ids: np.ndarray, stored: np.ndarray, vocab: int, mode: str) -> np.ndarray:
    """The dense target [V] a student at the uniform reference point is pulled towards (float64).

    At a uniform student the gradient of the KL w.r.t. its logits is ``1/V - target``: bucket and uniform
    tails then both put the residual evenly on the tail; sample and hybrid weights are renormalised
    (their float16 rounding is all the residual they have), as the student stage does.
    """
    real = stored > PAD_LOGP / 2
    ids, q = ids[real], np.exp(stored[real].astype(np.float64))
    target = np.zeros(vocab)
    if mode == "topk":
        target[:] = max(1.0 - q.sum(), 0.0) / max(1, vocab - len(ids))
        target[ids] = q
    else:
        target[ids] = q / q.sum()
    return target


FIDELITY_REDRAWS = 32
"""Fresh captures of each fidelity position that estimate E[target] for sampled modes."""


def gradient_fidelity(logp_V: torch.Tensor, ids: np.ndarray, stored: np.ndarray, mode: str, k: int, samples: int,
                      generator: torch.Generator, redraws: int = FIDELITY_REDRAWS) -> tuple[float, float, float]:
    """(bias, spread, norm) of the distillation gradient w.r.t. the student logits from the stored target,
    at a uniform student, against the dense teacher's gradient ``norm = ||1/V - p||_2``.

    bias = ||E[target] - p||_2: what no number of steps averages away (top-k: the tail's shape).
    spread = sqrt(E ||target - E[target]||^2): sampling noise, which averages out over steps.
    For sampled modes E is estimated from ``redraws`` fresh captures of this position, and the squared
    bias is corrected for the estimate's own noise (||mean - p||^2 - spread^2 / (redraws - 1), which is
    unbiased; clamped at 0); top-k targets are deterministic.
    """
    vocab = logp_V.shape[0]
    p = logp_V.double().exp().numpy()
    p /= p.sum()
    norm = float(np.linalg.norm(1.0 / vocab - p))
    if mode == "topk":
        return float(np.linalg.norm(stored_target(ids, stored, vocab, mode) - p)), 0.0, norm
    rows = logp_V.expand(redraws, vocab).contiguous()
    slots = len(ids)
    head = rows.topk(k, dim=-1).indices if mode == "hybrid" else None
    draw_ids, draw_logp = sample_targets(rows, samples, slots, generator, head)
    targets = np.stack([stored_target(draw_ids[i].numpy(), draw_logp[i].numpy(), vocab, mode)
                        for i in range(redraws)])
    mean = targets.mean(0)
    spread_sq = float(((targets - mean) ** 2).sum(1).mean())
    bias_sq = float(((mean - p) ** 2).sum()) - spread_sq / (redraws - 1)
    return math.sqrt(max(bias_sq, 0.0)), math.sqrt(spread_sq), norm


def fidelity_row(logp_V: np.ndarray, ids: np.ndarray, stored: np.ndarray, mode: str) -> tuple[float, ...]:
    """(kl_bucket, kl_renorm, kl_uniform, residual) of one position; float64, from the stored values.

    topk: bucket = KL(dense || stored) over the coarsening K + one tail bucket; uniform = KL(dense ||
    stored, tail spread evenly); renorm = KL(renormalised stored || dense), the reverse direction,
    because the forward one is infinite whenever the tail has mass. sample: the tail is empty and
    every mode is KL(sampled weights || dense).
    """
    p = np.exp(logp_V.astype(np.float64))
    real = stored > PAD_LOGP / 2
    ids, q = ids[real], np.exp(stored[real].astype(np.float64))
    p_k = p[ids]
    residual = 1.0 - q.sum()
    if mode in ("sample", "hybrid"):
        kl = float(np.sum(q * (np.log(q) - np.log(p_k))))
        return kl, kl, kl, residual
    r, r_hat = max(1.0 - p_k.sum(), 0.0), max(residual, 1e-30)
    head = float(np.sum(p_k * (np.log(p_k) - np.log(q))))
    bucket = head + (r * math.log(r / r_hat) if r > 0 else 0.0)
    tail = np.delete(p, ids)
    tail = tail[tail > 0]
    uniform = head + float(np.sum(tail * (np.log(tail) - math.log(r_hat / max(1, len(p) - len(ids))))))
    q_renorm = q / q.sum()
    renorm = float(np.sum(q_renorm * (np.log(q_renorm) - np.log(p_k))))
    return bucket, renorm, uniform, residual


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
        draw_logp = logp_NV.to(getattr(torch, spec.logp_dtype)).float() if spec.tail_logp else None
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
    seq_len, np_dtype = inputs.shape[1], np.dtype(spec.logp_dtype)
    arrays = {"ids": torch.cat(host["ids"]).numpy().astype(np.uint16).reshape(-1, seq_len, spec.slots),
              "logp": torch.cat(host["logp"]).numpy().astype(np_dtype).reshape(-1, seq_len, spec.slots),
              "c_T": torch.cat(host["c_T"]).numpy().astype(np.float32)}
    if spec.tail_logp:
        arrays["tail_logp"] = torch.cat(host["tail_logp"]).numpy().astype(np_dtype).reshape(-1, seq_len,
                                                                                             spec.slots - spec.k)
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
    marker = {"fidelity": fidelity, "device": stats["device"], "precision": stats["precision"]}
    previous_write_s = _chunk_writer().submit(_write, spec.out, chunk, start, arrays, marker)
    return {"chunk": chunk, "compute_s": computed - started, "forward_s": stats["forward_s"],
            "write_wait_s": time.perf_counter() - computed, "write_s": previous_write_s,
            "compute_cpu_s": computed_cpu - started_cpu, "write_cpu_s": time.process_time() - computed_cpu}


# --- fidelity report ------------------------------------------------------------------------


def fidelity_positions(num_windows: int, seq_len: int, count: int, seed: int) -> np.ndarray:
    """``count`` distinct (window, position) pairs, fixed by the seed: int64 [count, 2], sorted."""
    total = num_windows * seq_len
    flat = np.sort(np.random.default_rng([seed, 1]).choice(total, size=min(count, total), replace=False))
    return np.stack([flat // seq_len, flat % seq_len], axis=1)


def _stats(values: np.ndarray) -> dict:
    return {"mean": float(values.mean()), "p50": float(np.percentile(values, 50)),
            "p90": float(np.percentile(values, 90)), "max": float(values.max())}


def fidelity_report(out: Path, num_chunks: int, mode: str) -> dict:
    rows = [row for i in range(num_chunks) for row in (read_marker(out, i) or {}).get("fidelity", [])]
    if not rows:
        return {"positions": 0}
    table = np.asarray(rows, dtype=np.float64)
    report = {
        "positions": len(rows),
        "kl_nats": {name: _stats(table[:, 2 + j]) for j, name in enumerate(TAIL_MODES)},
        "residual_mass": _stats(table[:, 5]),
        "note": ("storage precision: bucket and uniform: KL(dense || stored reconstruction) on the coarsened "
                 "space; renorm: KL(renormalised || dense), the forward KL being infinite when the tail has mass. "
                 "It does not measure what top-k leaves out: see gradient" if mode == "topk" else
                 "sampled targets: no tail, every mode is KL(sampled weights || dense), sampling noise"),
    }
    if table.shape[1] > 6:
        norm = table[:, 8]
        bias, floor = table[:, 6] / norm, table[:, 7] / norm / math.sqrt(FIDELITY_REDRAWS)
        report["gradient"] = {
            "bias_rel": _stats(bias), "spread_rel": _stats(table[:, 7] / norm),
            # The bias of sampled targets is estimated from FIDELITY_REDRAWS captures: its own noise is about
            # spread / sqrt(redraws); a bias below that floor cannot be told from 0 (the true one may well be 0).
            "noise_floor_rel": _stats(floor),
            "bias_above_floor": float(np.mean(bias > 2 * floor)) if mode != "topk" else float(np.mean(bias > 0)),
            "note": ("distillation gradient w.r.t. the student logits at a uniform student, from the stored "
                     "target vs the dense teacher, relative to the dense gradient's L2 norm: bias does not "
                     "average out over steps, spread (sampling noise) does" + (
                         "" if mode == "topk" else f"; bias estimated from {FIDELITY_REDRAWS} redraws per position: "
                         "below its noise floor it cannot be told from 0")),
        }
    return report


def format_fidelity(report: dict) -> str:
    if not report.get("positions"):
        return "fidelity: no positions sampled"
    lines = [f"fidelity on {report['positions']} positions ({report['note']}):"]
    rows = {f"KL {name}": v for name, v in report["kl_nats"].items()}
    rows["residual mass"] = report["residual_mass"]
    gradient = report.get("gradient", {})
    if gradient:
        rows.update({"grad bias/norm": gradient["bias_rel"], "grad spread/norm": gradient["spread_rel"]})
        if "noise_floor_rel" in gradient:
            rows["bias noise floor"] = gradient["noise_floor_rel"]
    for name, s in rows.items():
        lines.append(f"  {name:<17} mean {s['mean']:.3e}  p50 {s['p50']:.3e}  p90 {s['p90']:.3e}  max {s['max']:.3e}")
    if "bias_above_floor" in gradient:
        lines.append(f"  gradient bias above twice its noise floor at {gradient['bias_above_floor']:.0%} of positions"
                     + (" (sampled targets are unbiased by construction: what is left is the estimate's noise)"
                        if gradient["bias_above_floor"] < 0.1 and "redraws" in gradient["note"] else ""))
    return "\n".join(lines)


# --- the stage ------------------------------------------------------------------------------


def _run_tasks(spec: CaptureTask, todo: list[tuple[int, int, int, list]], workers: int, scheduler: str | None,
               seq_len: int, gpus: list[str] | None = None) -> list[dict]:
    """Run the chunk tasks with a progress bar over chunks (tokens/s, ETA); returns their timings, the last
    pending write's as ``{"write_s": ...}`` entries. ``gpus``: a local cluster of one worker per GPU."""
    import dask
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="chunk", desc="cache", mininterval=1.0, leave=False)  # transient: a summary follows
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
    return {"devices": sorted({m.get("device", "cpu") for m in markers if m}),
            "precisions": sorted({m.get("precision", "fp32") for m in markers if m})}


def _chunks_to_do(out: Path, ranges: list[tuple[int, int]], positions: np.ndarray) -> list[tuple[int, int, int, list]]:
    """(chunk, start, stop, fidelity rows) of every chunk not done and intact; their stale markers are removed."""
    todo = []
    for i, (start, stop) in enumerate(ranges):
        # Every done chunk's files are checked against their sizes and crc32, so a changed byte is redone.
        why = chunk_problem(out, i, checksum=True)
        if why is None:
            continue
        if why != "not marked done":
            print(f"cache: rewriting chunk {i} (rows {start}-{stop - 1}): {why}", flush=True)
        remove_marker(out, i)
        rows = positions[(positions[:, 0] >= start) & (positions[:, 0] < stop)]
        todo.append((i, start, stop, [(int(w), int(s)) for w, s in rows]))
    return todo


def capture_logits(cfg: CacheConfig, tokens_path: Path, tokenizer_dir: Path, teacher_dirs: list[Path], out: Path,
                   *, workers: int | None = None, scheduler: str | None = None, k: int | None = None) -> dict:
    """Capture the ensemble's sparse targets for every training window into ``out`` (resumable in place).

    Returns the summary, including the fidelity report (also saved in the store's attributes).

    Examples
    --------
    >>> summary = capture_logits(CacheConfig(), Path("runs/demo/tokens.zarr"), Path("runs/demo/tokenizer"),
    ...                          [Path("runs/demo/teachers/t1"), Path("runs/demo/teachers/t2")],
    ...                          Path("runs/demo/logits.zarr"))  # doctest: +SKIP
    """
    # --- check the inputs
    if k is not None:
        cfg = dataclasses.replace(cfg, k=k)
    workers = cfg.workers if workers is None else workers
    tokens_path, tokenizer_dir, out = Path(tokens_path), Path(tokenizer_dir), Path(out)
    teacher_dirs = [Path(d) for d in teacher_dirs]
    tokens = TokenStore(tokens_path)
    problems = _input_problems(cfg, tokens, tokenizer_dir, teacher_dirs, workers, scheduler)
    if problems:
        raise ValueError("; ".join(problems))

    # --- set up the store (or check the one being resumed)
    teachers = [{"path": str(d.resolve()), "sha256": file_sha256(d / "model.safetensors")} for d in teacher_dirs]
    store_id = store_identity(cfg, tokens, teachers)
    out.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(out)
    try:
        if problem := header_problem(out):
            raise ValueError(f"{problem}; rebuild the store with `babydistill cache CONFIG --force` (the old one is "
                             f"moved aside)")
        existing = read_attrs(out)
        if existing is None:
            create_store(out, store_id)
        elif existing.get("format") != FORMAT or (diff := _differences(existing, store_id)):
            what = ", ".join(diff) if existing.get("format") == FORMAT else "not a logit store"
            raise ValueError(f"{out} was made from other inputs ({what}); rerun `babydistill cache CONFIG --force` "
                             f"to rebuild it")
        else:
            for repaired in repair_metadata(out, existing):  # chunk files untouched: their checksums say the rest
                print(f"cache: rewrote {out / repaired.split(':')[0].split(' ')[0]} from the store's header "
                      f"({repaired})", flush=True)
        for leftover in out.rglob("*.partial"):  # half-written files of a killed capture
            leftover.unlink()
        ranges = chunk_ranges(store_id["num_windows"], cfg.chunk_windows)
        migrate_markers(out, len(ranges))
        positions = fidelity_positions(store_id["num_windows"], tokens.seq_len, cfg.fidelity_positions, cfg.seed)
        todo = _chunks_to_do(out, ranges, positions)
        remote = scheduler is not None or workers > 1
        spec = CaptureTask(
            teachers=[(t["path"], t["sha256"]) for t in teachers], mode=cfg.mode, k=cfg.k, samples=cfg.samples,
            slots=store_id["slots"], temperatures=store_id["temperatures"], ensemble=cfg.ensemble,
            logp_dtype=cfg.logp_dtype, batch_size=cfg.batch_size, seed=cfg.seed,
            threads=1 if remote else max(1, torch.get_num_threads()), tail_logp=cfg.tail_logp,
            draw_sets=cfg.draw_sets, device=cfg.device, precision=cfg.precision,
            out=str(out.resolve()), tokens=str(tokens_path.resolve()), order=cfg.order,
            num_windows=store_id["num_windows"])

        # --- run the chunk tasks
        started = time.time()
        print(f"cache: {len(ranges)} chunks of {cfg.chunk_windows} windows, {len(ranges) - len(todo)} already done, "
              f"{len(teachers)} teacher(s), mode {cfg.mode}, "
              + (f"scheduler {scheduler}" if scheduler else f"{workers} worker(s)"), flush=True)
        gpus = _local_gpus(cfg, workers, scheduler)
        timings = _run_tasks(spec, todo, workers, scheduler, tokens.seq_len, gpus) if todo else []
        seconds = time.time() - started

        # --- summary
        report = fidelity_report(out, len(ranges), cfg.mode)
        import zarr

        capture = capture_record(out, len(ranges))
        update_header(zarr.open_group(store=str(out), mode="r+"), {"fidelity": report, "capture": capture})
        print(format_fidelity(report), flush=True)
        computed = sum(stop - start for _, start, stop, _ in todo) * tokens.seq_len
        return {
            "out": str(out), "mode": cfg.mode, "slots": store_id["slots"], "num_windows": store_id["num_windows"],
            "num_chunks": len(ranges), "chunks_computed": len(todo), "chunks_skipped": len(ranges) - len(todo),
            "seconds": round(seconds, 3), "tokens_per_s": computed / seconds if computed else None,
            **{f"task_{key}": sum(t.get(key, 0.0) for t in timings)
               for key in ("compute_s", "compute_cpu_s", "write_cpu_s")},
            "task_write_s": sum(t.get("write_s", 0.0) for t in timings),
            "task_forward_s": sum(t.get("forward_s", 0.0) for t in timings),
            "task_write_wait_s": sum(t.get("write_wait_s", 0.0) for t in timings),
            "workers": workers, "scheduler": scheduler, "gpus": gpus, "capture": capture, "fidelity": report,
        }
    finally:
        lock.unlink(missing_ok=True)
