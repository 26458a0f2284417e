"""The chunked torch row kernel of the sparse-distillation loss (see `kernels.reference` for the spec):
impl "torch" (alias "cpu", its name before). Device-agnostic PyTorch: the path on the CPU, and on a GPU
without triton.

Rows go through in chunks of about 2 MB of fp32 logits (cache-sized). For each chunk: one row maximum m;
softmax(z) and softmax(z/T) (each subtracts that same maximum, the max of z/T being m/T), the two
log-normalisers read back from the largest probability (max q = exp(0) / S); CE and the KL on K from
gathered logits; the tail term; then the gradient

    dL/dz = w_ce (softmax(z) - e_y) + (w_kl / T) (softmax(z/T) - target)

written straight into the gradient buffer, where w_ce = alpha * (CE normaliser) and
w_kl = (1 - alpha) T^2 (KL normaliser) for counted rows (0 otherwise), and "target" is p_T on K plus the
tail term of the mode (bucket: softmax(z/T)_j r_T / Q_T on tail tokens, Q_T summed exactly over the
tail; uniform: r_T / (V - k); renorm: nothing, p renormalised over K). No dense teacher tensor is built;
the extra memory is two or three fp32 chunks per thread (plus the gradient itself, unless ``inplace``).

Threads (torch.get_num_threads() of them) take chunks one at a time and run single-threaded ops; the
gradient is computed in the forward pass (the logits are hot in cache there) and scaled by grad_output
in backward.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch

from babydistill.kernels.targets import RowProblem

CHUNK_BYTES = 1 << 21  # fp32 bytes of logits per chunk (per thread; about 32 rows at V = 16000)
GPU_CHUNK_BYTES = 1 << 28  # the same on a GPU (the fallback without triton): few, large launches


class _Student(NamedTuple):
    """softmax(z) and softmax(z / T) of a chunk (one tensor at T = 1) and their log-normalisers [n]."""

    q1: torch.Tensor
    lse1: torch.Tensor
    qT: torch.Tensor
    lseT: torch.Tensor


class _OnK(NamedTuple):
    """A chunk's K entries [n, k]: the student's logits and log-probabilities at T, the teacher's
    probabilities at T (0 on padding) and the padding mask."""

    z: torch.Tensor
    logq: torch.Tensor
    p: torch.Tensor
    pad: torch.Tensor


class _Tail(NamedTuple):
    """A chunk's tail term: its KL [n] (None: no tail), and its gradient on the tail tokens,
    w_kl / T (fac * softmax(z/T)) + shift (fac None: 1; shift None: 0), with ``deep_grad`` added on the rows
    ``deep`` whose tail mass is below fp32's range (their fac is 0)."""

    kl: torch.Tensor | None = None
    fac: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    deep: torch.Tensor | None = None
    deep_grad: torch.Tensor | None = None


def _student(x, T: float, buffers) -> _Student:
    """One max; softmax at T = 1 and at T (each subtracts the row max: the max of z/T is m/T). The
    log-normaliser is read back from the largest probability: max q = exp(0) / S."""
    n = x.shape[0]
    buf1, buf2, buf3 = buffers
    m = x.amax(1)
    q1 = torch.ops.aten._softmax.out(x, 1, False, out=buf1[:n])
    lse1 = m - q1.amax(1).log()
    if T == 1.0:
        return _Student(q1, lse1, q1, lse1)
    qT = torch.ops.aten._softmax.out(torch.mul(x, 1.0 / T, out=buf2[:n]), 1, False, out=buf3[:n])
    return _Student(q1, lse1, qT, m / T - qT.amax(1).log())


def _uniform_tail(x, on_K: _OnK, rows: RowProblem, wk, lseT) -> _Tail:
    """r_T spread evenly over the tail tokens: u = r_T / num_tail each, the gradient shifted by
    -w_kl / T * u."""
    r, nt = rows.r_T, rows.num_tail
    u = torch.where(nt > 0, r / nt.clamp_min(1), 0)
    sum_tail_s = (x.sum(1) - torch.where(on_K.pad, 0, on_K.z).sum(1)) / rows.temperature
    kl = torch.where(u > 0, nt * torch.xlogy(u, u) - u * (sum_tail_s - nt * lseT), 0)
    return _Tail(kl=kl, shift=(-wk * u)[:, None])


def _bucket_tail(x, qT, rows: RowProblem, wk, lseT) -> _Tail:
    """The tail as one bucket of mass r_T against the student's tail mass Q: softmax(z/T) (1 - r_T / Q) on the
    tail tokens. Zeroes ``qT`` on K (the gradient overwrites those columns)."""
    T, r, idx = rows.temperature, rows.r_T, rows.ids
    # The student's tail mass exactly (zero K, then sum) rather than 1 - sum_K: no cancellation
    # when K holds nearly all of it. K positions are overwritten later, so zeroing is free.
    Q = qT.scatter_(1, idx, 0.0).sum(1)
    logQ = Q.clamp_min(1e-38).log()
    fac = 1 - r / Q.clamp_min(1e-38)
    # Rows whose tail mass nears fp32's range (a confidence gap above ~45 T nats) in log space:
    # logQ = LSE_tail(z/T) - LSE(z/T), and the tail's gradient w (Q - r) softmax_tail(z/T)
    # (= w softmax(z/T) (1 - r / Q)) from the tail's own softmax, which does not underflow.
    deep = ((r > 0) & (Q < 1e-20)).nonzero()[:, 0]
    if not len(deep):
        return _Tail(kl=torch.where(r > 0, r * (r.clamp_min(1e-38).log() - logQ), 0), fac=fac)
    s_tail = (x[deep] / T).scatter_(1, idx[deep], float("-inf"))
    lse_tail = torch.logsumexp(s_tail, 1)
    logQ[deep] = lse_tail - lseT[deep]
    fac[deep] = 0.0
    deep_fac = wk[deep] * (logQ[deep].exp() - r[deep])
    deep_grad = deep_fac[:, None] * (s_tail - lse_tail[:, None]).exp()  # 0 on K
    return _Tail(kl=torch.where(r > 0, r * (r.clamp_min(1e-38).log() - logQ), 0), fac=fac, deep=deep,
                 deep_grad=deep_grad)


def _write_gradient(G, student: _Student, on_K: _OnK, y, wk, rows: RowProblem, tail: _Tail) -> None:
    """dL/dz = w_ce (softmax(z) - e_y) + (w_kl / T) (softmax(z/T) - target) of a chunk, into ``G``.

    Formed whole in fp32 (dense part, then K entries and the label overwritten / corrected) and rounded once
    into a low-precision gradient: rounding the K entries' two near-equal terms apart would leave their
    difference mostly rounding error.
    """
    q1, qT, wc, idx, a_K = student.q1, student.qT, rows.w_ce, rows.ids, rows.control
    out = G if G.dtype == torch.float32 else q1
    kT = wk if tail.fac is None else wk * tail.fac
    qT_K = on_K.logq.exp()
    if a_K is not None:
        # Control variate: + wk (a * qT_K - U qT), U = sum_K a qT: the dense coefficient and the K entries.
        U = torch.where(on_K.pad, 0, a_K * qT_K).sum(1)
        kT = kT - wk * U
    if qT is q1:
        torch.mul(q1, (wc + kT)[:, None], out=out)
    else:
        torch.mul(q1, wc[:, None], out=out).addcmul_(qT, kT[:, None])
    if tail.shift is not None:
        out.add_(tail.shift)
    if tail.deep_grad is not None:
        out[tail.deep] += tail.deep_grad
    q_part = wc[:, None] * (on_K.z - student.lse1[:, None]).exp() + wk[:, None] * qT_K
    if a_K is not None:
        q_part += wk[:, None] * (a_K - U[:, None]) * qT_K
    out.scatter_(1, idx, q_part)
    out.scatter_add_(1, idx, -wk[:, None] * on_K.p)
    out.scatter_add_(1, y, -wc[:, None])
    if out is not G:
        G.copy_(out)


def _chunk_loss_and_grad(x, rows: RowProblem, G, bucket_tail: bool,
                         buffers) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of rows of `loss_and_grad`: per-row CE and KL, and the gradient written into ``G`` [n, V].

    ``x`` [n, V] fp32 logits, ``rows`` the chunk's problem; ``bucket_tail``: some row of the whole problem has
    a bucket tail mass; ``buffers`` three fp32 [C, V] scratch buffers (the last two None at T = 1).
    """
    T = rows.temperature
    student = _student(x, T, buffers)
    y = torch.where(rows.labels == rows.ignore_index, 0, rows.labels)[:, None]
    z_K = x.gather(1, rows.ids)
    on_K = _OnK(z=z_K, logq=z_K / T - student.lseT[:, None], p=rows.logp_K.exp(),
                pad=rows.logp_K == float("-inf"))
    ce = student.lse1 - x.gather(1, y)[:, 0]
    kl = torch.where(on_K.p > 0, on_K.p * (rows.logp_K - on_K.logq), 0).sum(1)
    wk = rows.w_kl / T
    if rows.uniform:
        tail = _uniform_tail(x, on_K, rows, wk, student.lseT)
    elif bucket_tail:
        tail = _bucket_tail(x, student.qT, rows, wk, student.lseT)
    else:  # renorm, or no tail mass in any row
        tail = _Tail()
    if tail.kl is not None:
        kl = kl + tail.kl
    _write_gradient(G, student, on_K, y, wk, rows, tail)
    return ce, kl


class _Chunks:
    """The start rows of the chunks, handed out one at a time to whichever thread asks next."""

    def __init__(self, num_rows: int, size: int):
        self.size = size
        self._starts = iter(range(0, num_rows, size))
        self._lock = threading.Lock()

    def next(self) -> int | None:
        with self._lock:
            return next(self._starts, None)


def _chunk_size(logits, chunk_rows: int | None) -> int:
    """Rows per chunk: ``chunk_rows``, or about CHUNK_BYTES (GPU_CHUNK_BYTES) of fp32 logits; 1 to N."""
    N, V = logits.shape
    if chunk_rows is None:
        chunk_rows = (CHUNK_BYTES if logits.device.type == "cpu" else GPU_CHUNK_BYTES) // (4 * V)
    return max(1, min(chunk_rows, N))


def _scratch(logits, rows: int, T: float) -> tuple[tuple, torch.Tensor | None]:
    """One thread's fp32 [rows, V] buffers: for softmax(z), z / T and softmax(z / T) (the last two at T != 1
    only), and for an fp32 copy of the logits (when they are not fp32)."""
    V, device = logits.shape[1], logits.device

    def buffer() -> torch.Tensor:
        return torch.empty(rows, V, dtype=torch.float32, device=device)

    tempered = T != 1.0
    softmaxes = (buffer(), buffer() if tempered else None, buffer() if tempered else None)
    return softmaxes, buffer() if logits.dtype != torch.float32 else None


def _run_in_threads(work, num_workers: int) -> None:
    """``work`` in ``num_workers`` threads, each with single-threaded torch ops (or once, here, for 1).

    Threads take chunks one at a time and run single-threaded ops on them: many small ops with an OpenMP
    barrier each are slow (and erratic on a busy machine); this has no barrier, and a thread that gets
    descheduled holds up one chunk, not half the rows.
    """
    if num_workers <= 1:
        work()
        return
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(num_workers) as pool:
            for f in [pool.submit(work) for _ in range(num_workers)]:
                f.result()
    finally:
        torch.set_num_threads(num_threads)


def loss_and_grad(logits, problem: RowProblem, grad, chunk_rows: int | None = None):
    """Per-row CE and KL (fp32, 0 for ignored rows) and the weighted gradient written into ``grad``.

    ``grad`` may be ``logits`` itself (each chunk is read before it is written).
    """
    N = logits.shape[0]
    ce_row = torch.empty(N, dtype=torch.float32, device=logits.device)
    kl_row = torch.empty(N, dtype=torch.float32, device=logits.device)
    chunks = _Chunks(N, _chunk_size(logits, chunk_rows))
    bucket_tail = (not problem.uniform) and bool((problem.r_T > 0).any())

    @torch.no_grad()  # grad mode is per thread: the pool's threads do not inherit the caller's no_grad
    def work() -> None:
        buffers, logits_fp32 = _scratch(logits, chunks.size, problem.temperature)
        while (a := chunks.next()) is not None:
            b = min(a + chunks.size, N)
            x = logits[a:b] if logits_fp32 is None else logits_fp32[: b - a].copy_(logits[a:b])
            ce_row[a:b], kl_row[a:b] = _chunk_loss_and_grad(x, problem.rows(a, b), grad[a:b], bucket_tail,
                                                            buffers)

    on_cpu = logits.device.type == "cpu"
    _run_in_threads(work, min(torch.get_num_threads(), N // (2 * chunks.size)) if on_cpu else 1)
    valid = problem.labels != problem.ignore_index
    return torch.where(valid, ce_row, 0), torch.where(valid, kl_row, 0)
