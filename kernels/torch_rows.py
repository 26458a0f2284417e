"""The chunked torch row kernel of the sparse-distillation loss (see `kernels.reference` for the spec): impl
"torch" (alias "cpu", its name before). Device-agnostic PyTorch: the path on the CPU, and on a GPU without triton.

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

import torch

from babydistill.kernels.targets import RowProblem

CHUNK_BYTES = 1 << 21  # fp32 bytes of logits per chunk (per thread; about 32 rows at V = 16000)


def _chunk_loss_and_grad(x, idx, p_K, l_K, pad_K, y, wc, wk, r, nt, G, T: float, uniform: bool,
                         bucket_tail: bool, buffers, a_K=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of rows of `loss_and_grad`: per-row CE and KL, and the gradient written into ``G`` [n, V].

    ``x`` [n, V] fp32 logits, ``idx`` / ``p_K`` / ``l_K`` / ``pad_K`` [n, k] the target, ``y`` [n, 1] labels,
    ``wc`` and ``wk`` (= w_kl / T) [n] weights, ``r`` / ``nt`` [n] the tail mass and token count; ``buffers`` three fp32
    [C, V] scratch buffers (the last two None at T = 1); ``a_K`` [n, k] control-variate coefficients or None.
    """
    n = x.shape[0]
    buf1, buf2, buf3 = buffers
    # One max; softmax at T = 1 and at T (each subtracts the row max: the max of z/T is m/T).
    # The log-normaliser is read back from the largest probability: max q = exp(0) / S.
    m = x.amax(1)
    q1 = torch.ops.aten._softmax.out(x, 1, False, out=buf1[:n])
    lse1 = m - q1.amax(1).log()
    if T != 1.0:
        qT = torch.ops.aten._softmax.out(torch.mul(x, 1.0 / T, out=buf2[:n]), 1, False, out=buf3[:n])
        lseT = m / T - qT.amax(1).log()
    else:
        qT, lseT = q1, lse1
    z_K = x.gather(1, idx)
    z_y = x.gather(1, y)[:, 0]
    logq_K = z_K / T - lseT[:, None]
    ce = lse1 - z_y
    kl = torch.where(p_K > 0, p_K * (l_K - logq_K), 0).sum(1)

    # Tail term: tail_fac multiplies softmax(z/T) on tail tokens, shift is added to them.
    tail_fac = None
    shift = None
    deep_shift = None
    if uniform:
        u = torch.where(nt > 0, r / nt.clamp_min(1), 0)
        sum_tail_s = (x.sum(1) - torch.where(pad_K, 0, z_K).sum(1)) / T
        kl = kl + torch.where(u > 0, nt * torch.xlogy(u, u) - u * (sum_tail_s - nt * lseT), 0)
        shift = (-wk * u)[:, None]
    elif bucket_tail:
        # The student's tail mass exactly (zero K, then sum) rather than 1 - sum_K: no cancellation
        # when K holds nearly all of it. K positions are overwritten below, so zeroing is free.
        Q = qT.scatter_(1, idx, 0.0).sum(1)
        logQ = Q.clamp_min(1e-38).log()
        tail_fac = 1 - r / Q.clamp_min(1e-38)
        # Rows whose tail mass nears fp32's range (a confidence gap above ~45 T nats) in log space:
        # logQ = LSE_tail(z/T) - LSE(z/T), and the tail's gradient w (Q - r) softmax_tail(z/T)
        # (= w softmax(z/T) (1 - r / Q)) from the tail's own softmax, which does not underflow.
        deep = ((r > 0) & (Q < 1e-20)).nonzero()[:, 0]
        if len(deep):
            s_tail = (x[deep] / T).scatter_(1, idx[deep], float("-inf"))
            lse_tail = torch.logsumexp(s_tail, 1)
            logQ[deep] = lse_tail - lseT[deep]
            tail_fac[deep] = 0.0
            fac = wk[deep] * (logQ[deep].exp() - r[deep])
            deep_shift = fac[:, None] * (s_tail - lse_tail[:, None]).exp()  # 0 on K
        kl = kl + torch.where(r > 0, r * (r.clamp_min(1e-38).log() - logQ), 0)

    # Gradient, formed whole in fp32 (dense part, then K entries and the label overwritten /
    # corrected) and rounded once into a low-precision gradient: rounding the K entries' two
    # near-equal terms apart would leave their difference mostly rounding error.
    out = G if G.dtype == torch.float32 else q1
    kT = wk if tail_fac is None else wk * tail_fac
    qT_K = logq_K.exp()
    if a_K is not None:
        # Control variate: + wk (a * qT_K - U qT), U = sum_K a qT: the dense coefficient and the K entries.
        U = torch.where(pad_K, 0, a_K * qT_K).sum(1)
        kT = kT - wk * U
    if qT is q1:
        torch.mul(q1, (wc + kT)[:, None], out=out)
    else:
        torch.mul(q1, wc[:, None], out=out).addcmul_(qT, kT[:, None])
    if shift is not None:
        out.add_(shift)
    if deep_shift is not None:
        out[deep] += deep_shift
    q_part = wc[:, None] * (z_K - lse1[:, None]).exp() + wk[:, None] * qT_K
    if a_K is not None:
        q_part += wk[:, None] * (a_K - U[:, None]) * qT_K
    out.scatter_(1, idx, q_part)
    out.scatter_add_(1, idx, -wk[:, None] * p_K)
    out.scatter_add_(1, y, -wc[:, None])
    if out is not G:
        G.copy_(out)
    return ce, kl


def loss_and_grad(logits, problem: RowProblem, grad, chunk_rows: int | None = None):
    """Per-row CE and KL (fp32, 0 for ignored rows) and the weighted gradient written into ``grad``.

    ``grad`` may be ``logits`` itself (each chunk is read before it is written).
    """
    labels, ids, logp_K, r_T, num_tail = problem.labels, problem.ids, problem.logp_K, problem.r_T, problem.num_tail
    w_ce, w_kl, control, uniform = problem.w_ce, problem.w_kl, problem.control, problem.uniform
    ignore_index = problem.ignore_index
    N, V = logits.shape
    T = problem.temperature
    if chunk_rows is None:
        chunk_bytes = CHUNK_BYTES if logits.device.type == "cpu" else 1 << 28  # torch fallback on a GPU
        chunk_rows = max(1, min(N, chunk_bytes // (4 * V)))
    dev = logits.device
    ce_row = torch.empty(N, dtype=torch.float32, device=dev)
    kl_row = torch.empty(N, dtype=torch.float32, device=dev)
    C = min(chunk_rows, N)
    pad_K = logp_K == float("-inf")
    p_K_all = logp_K.exp()                                           # 0 for padding
    safe_labels = torch.where(labels == ignore_index, 0, labels)
    bucket_tail = (not uniform) and bool((r_T > 0).any())

    chunk_starts = iter(range(0, N, C))
    lock = threading.Lock()

    def next_chunk():
        with lock:
            return next(chunk_starts, None)

    @torch.no_grad()  # grad mode is per thread: the pool's threads do not inherit the caller's no_grad
    def work() -> None:
        buf1 = torch.empty(C, V, dtype=torch.float32, device=dev)
        buf2 = torch.empty(C, V, dtype=torch.float32, device=dev) if T != 1.0 else None
        buf3 = torch.empty(C, V, dtype=torch.float32, device=dev) if T != 1.0 else None
        bufx = torch.empty(C, V, dtype=torch.float32, device=dev) if logits.dtype != torch.float32 else None
        while (a := next_chunk()) is not None:
            b = min(a + C, N)
            n = b - a
            x = logits[a:b]
            if bufx is not None:
                x = bufx[:n].copy_(x)
            ce_row[a:b], kl_row[a:b] = _chunk_loss_and_grad(
                x, ids[a:b], p_K_all[a:b], logp_K[a:b], pad_K[a:b], safe_labels[a:b, None], w_ce[a:b], w_kl[a:b] / T,
                r_T[a:b], num_tail[a:b], grad[a:b], T, uniform, bucket_tail, (buf1, buf2, buf3),
                None if control is None else control[a:b])

    # Threads take chunks one at a time and run single-threaded ops on them: many small ops with an
    # OpenMP barrier each are slow (and erratic on a busy machine); this has no barrier, and a thread
    # that gets descheduled holds up one chunk, not half the rows.
    num_workers = min(torch.get_num_threads(), N // (2 * C)) if dev.type == "cpu" else 1
    if num_workers > 1:
        num_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(num_workers) as pool:
                for f in [pool.submit(work) for _ in range(num_workers)]:
                    f.result()
        finally:
            torch.set_num_threads(num_threads)
    else:
        work()
    valid = labels != ignore_index
    return torch.where(valid, ce_row, 0), torch.where(valid, kl_row, 0)
