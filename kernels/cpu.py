"""Chunked CPU path of the sparse-distillation loss (see `kernels.reference` for the spec).

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

from kernels.reference import RESIDUAL_EPS, ids_as_int64

CHUNK_BYTES = 1 << 21  # fp32 bytes of logits per chunk (per thread; about 32 rows at V = 16000)


def prepare_targets(target_ids, target_logp, vocab_size: int, temperature: float, tail: str, c_T=None):
    """The teacher on K at temperature T, from the stored T = 1 log-probabilities ([N, k] work only).

    Returns ids [N, k] int64, logp_K [N, k] fp32 (-inf for padding), r_T [N] fp32 (tail mass; 0 for
    renorm) and num_tail [N] fp32 (V minus the number of real entries).
    """
    T = float(temperature)
    l1 = target_logp.to(torch.float32)
    real = l1 > float("-inf")
    ids = ids_as_int64(target_ids)
    # Padding entries point at the row's first real id, so that they never touch another column.
    first_real = ids.gather(1, real.to(torch.uint8).argmax(1, keepdim=True))
    ids = torch.where(real, ids, first_real)
    num_tail = (vocab_size - real.sum(1)).to(torch.float32)
    if tail == "renorm":
        logp = torch.log_softmax(l1 / T, dim=1)
        return ids, logp, torch.zeros_like(num_tail), num_tail
    if c_T is not None:
        c = c_T.to(torch.float32)
    elif T == 1.0:
        c = torch.zeros_like(num_tail)  # exact: the stored values are the T = 1 probabilities
    else:
        # Approximation: the T = 1 residual r spread evenly over the num_tail other tokens, tempered
        # with them: c_T = log(sum_K exp(l1/T) + num_tail * (r / num_tail)^(1/T)). The first
        # RESIDUAL_EPS of r is taken as rounding, continuously (r - eps, not a cut-off).
        r1 = (1 - l1.exp().sum(1) - RESIDUAL_EPS).clamp(0, 1)
        has_tail = (r1 > 0) & (num_tail > 0)
        n = num_tail.clamp_min(1)
        log_tail = torch.where(has_tail, n.log() + (r1.clamp_min(1e-38).log() - n.log()) / T, float("-inf"))
        c = torch.logaddexp(torch.logsumexp(l1 / T, dim=1), log_tail)
    logp = l1 / T - c[:, None]
    r_T = (1 - logp.exp().sum(1)).clamp(0, 1)
    r_T = torch.where(num_tail > 0, r_T, 0)
    return ids, logp, r_T, num_tail


def loss_and_grad(logits, labels, ids, logp_K, r_T, num_tail, w_ce, w_kl, temperature: float, uniform: bool,
                  grad, ignore_index: int = -100, chunk_rows: int | None = None):
    """Per-row CE and KL (fp32, 0 for ignored rows) and the weighted gradient written into ``grad``.

    ``grad`` may be ``logits`` itself (each chunk is read before it is written). w_ce / w_kl are [N]
    fp32 loss weights (0 for ignored rows).
    """
    N, V = logits.shape
    T = float(temperature)
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
            idx, p_K, l_K = ids[a:b], p_K_all[a:b], logp_K[a:b]
            y = safe_labels[a:b, None]
            wc, wk = w_ce[a:b], w_kl[a:b] / T

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
            r = r_T[a:b]
            if uniform:
                nt = num_tail[a:b]
                u = torch.where(nt > 0, r / nt.clamp_min(1), 0)
                sum_tail_s = (x.sum(1) - torch.where(pad_K[a:b], 0, z_K).sum(1)) / T
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
            G = grad[a:b]
            out = G if G.dtype == torch.float32 else q1
            kT = wk if tail_fac is None else wk * tail_fac
            if qT is q1:
                torch.mul(q1, (wc + kT)[:, None], out=out)
            else:
                torch.mul(q1, wc[:, None], out=out).addcmul_(qT, kT[:, None])
            if shift is not None:
                out.add_(shift)
            if deep_shift is not None:
                out[deep] += deep_shift
            q_part = wc[:, None] * (z_K - lse1[:, None]).exp() + wk[:, None] * logq_K.exp()
            out.scatter_(1, idx, q_part)
            out.scatter_add_(1, idx, -wk[:, None] * p_K)
            out.scatter_add_(1, y, -wc[:, None])
            if out is not G:
                G.copy_(out)
            ce_row[a:b] = ce
            kl_row[a:b] = kl

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


def row_kernel(impl: str):
    """The per-row ``loss_and_grad`` of an implementation: this module's, or the Triton kernel's."""
    if impl == "triton":
        from kernels import triton_kernel
        return triton_kernel.loss_and_grad
    return loss_and_grad


class SparseDistillRows(torch.autograd.Function):
    """loss = sum_rows w_ce * CE + w_kl * KL, gradient computed in forward by ``row_fn`` (this module's
    `loss_and_grad` or the Triton kernel's, which share one contract).

    Returns (loss, ce_row, kl_row); the per-row terms are not differentiable. With ``inplace`` the
    gradient overwrites the logits buffer: safe only when nothing else saved the logits for backward
    (e.g. they come straight out of a matmul whose backward does not need its output), and backward
    may run only once.
    """

    @staticmethod
    def forward(ctx, logits, labels, ids, logp_K, r_T, num_tail, w_ce, w_kl, temperature, uniform, inplace,
                ignore_index, row_fn):
        grad = logits.detach() if inplace else torch.empty_like(logits)
        with torch.no_grad():
            ce_row, kl_row = row_fn(logits.detach(), labels, ids, logp_K, r_T, num_tail, w_ce, w_kl,
                                    temperature, uniform, grad, ignore_index)
        loss = (w_ce * ce_row).sum() + (w_kl * kl_row).sum()
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce_row, kl_row)
        ctx.used = False
        return loss, ce_row, kl_row

    @staticmethod
    def backward(ctx, grad_loss, _ce, _kl):
        if ctx.used:
            raise RuntimeError("sparse_distill_loss: backward may run only once (the gradient is scaled in place)")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        # On the CPU, skip a full pass over the gradient when grad_output is 1; on a GPU, the
        # multiply is cheaper than the host sync that the test would cost.
        if grad.device.type != "cpu" or float(grad_loss) != 1.0:
            grad.mul_(grad_loss.to(grad.dtype))
        return grad, None, None, None, None, None, None, None, None, None, None, None, None


class DenseDistill(torch.autograd.Function):
    """Full-vocabulary CE + KL(softmax(t/T) || softmax(z/T)) in row chunks, gradient formed in forward.

    Device-agnostic PyTorch (the online-distillation baseline); returns (loss, ce_row, kl_row) like
    `SparseDistillRows`, with w_ce / w_kl the per-row loss weights.
    """

    @staticmethod
    def forward(ctx, logits, labels, teacher_logits, w_ce, w_kl, temperature, ignore_index):
        N, V = logits.shape
        T = float(temperature)
        chunk_bytes = CHUNK_BYTES if logits.device.type == "cpu" else 1 << 27
        C = max(1, min(N, chunk_bytes // (4 * V)))
        grad = torch.empty_like(logits)
        ce_row = torch.empty(N, dtype=torch.float32, device=logits.device)
        kl_row = torch.empty(N, dtype=torch.float32, device=logits.device)
        safe_labels = torch.where(labels == ignore_index, 0, labels)[:, None]
        with torch.no_grad():
            for a in range(0, N, C):
                b = min(a + C, N)
                x = logits[a:b].float()
                logq1 = torch.log_softmax(x, dim=1)
                logqT = torch.log_softmax(x / T, dim=1)
                logpT = torch.log_softmax(teacher_logits[a:b].float() / T, dim=1)
                pT = logpT.exp()
                y = safe_labels[a:b]
                ce_row[a:b] = -logq1.gather(1, y)[:, 0]
                kl_row[a:b] = torch.where(pT > 0, pT * (logpT - logqT), 0).sum(1)
                wc, wk = w_ce[a:b, None], w_kl[a:b, None] / T
                g = wc * logq1.exp_() + wk * (logqT.exp_() - pT)
                g.scatter_add_(1, y, -wc)
                grad[a:b] = g
        valid = labels != ignore_index
        ce_row = torch.where(valid, ce_row, 0)
        kl_row = torch.where(valid, kl_row, 0)
        loss = (w_ce * ce_row).sum() + (w_kl * kl_row).sum()
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce_row, kl_row)
        return loss, ce_row, kl_row

    @staticmethod
    def backward(ctx, grad_loss, _ce, _kl):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None, None
