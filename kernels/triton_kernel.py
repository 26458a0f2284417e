"""Triton kernel of the sparse-distillation loss (see `kernels.reference` for the spec).

One program per row, one launch:

1. online log-sum-exp pass over the vocabulary: row maximum m, S1 = sum exp(z - m) and
   ST = sum exp((z - m) / T) from that one maximum (plus sum z for the uniform tail);
2. a pass over the k teacher entries: the KL on K, and the final gradient of each K entry, stashed in
   a small [N, k] fp32 buffer (so the kernel may write its gradient over the logits);
3. the tail term; for the bucket tail, when K holds nearly all the student's mass (ST - sum_K is a
   cancellation), the tail sum is recomputed exactly by testing each column against K, as a log-sum-exp
   from the tail's own maximum, and a tail mass below fp32's range gets its loss and gradient in log space;
4. the gradient pass, dL/dz = w_ce (softmax(z) - e_y) + (w_kl / T) (softmax(z/T) - target), formed in
   fp32 and rounded once to the logits' dtype, then the K entries overwritten from the stash.

Offsets are int64 (rows x vocab may exceed 2^31); any V; k from 1 to V.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from babydistill.kernels.targets import RowProblem

BLOCK_V = 2048
BLOCK_K = 64
BLOCK_F = 64      # columns per step of the exact-tail fallback (a BLOCK_F x BLOCK_K compare tile)
NUM_WARPS = 8
# The floor under a logarithm: fp32's smallest normal. A literal below it (1e-38 is subnormal) is an fp64
# constant to triton <= 3.7, which turned the row's tail terms into fp64: no compile for a GPU, and bf16
# gradients of 0 through the 3.7 interpreter.
FLT_MIN = tl.constexpr(1.1754943508222875e-38)
EXACT_TAIL_BELOW = 1.0 / 16  # recompute the bucket tail sum exactly when it is below this share of ST


@triton.jit
def sparse_distill_kernel(
    logits_ptr,   # [N, V] student logits (fp32 / bf16 / fp16), row stride stride_l
    grad_ptr,     # [N, V] gradient, logits' dtype, row stride stride_g; may alias logits_ptr
    labels_ptr,   # [N] int64 labels, ignore_index for rows that do not count
    ids_ptr,      # [N, K] int64 teacher ids (contiguous)
    logp_ptr,     # [N, K] fp32 teacher log-probs on K at T (-inf = padding entry)
    stash_ptr,    # [N, K] fp32 scratch: the final gradient of each K entry
    control_ptr,  # [N, K] fp32 control-variate coefficients a (read only when HAS_CONTROL)
    r_ptr,        # [N] fp32 teacher tail mass r_T (0 for renorm)
    ntail_ptr,    # [N] fp32 number of tail tokens, V - (real entries of K)
    wce_ptr,      # [N] fp32 CE loss weight (alpha * normaliser; 0 for ignored rows)
    wkl_ptr,      # [N] fp32 KL loss weight ((1 - alpha) T^2 * normaliser; 0 for ignored rows)
    ce_ptr,       # [N] fp32 out: per-row CE (0 for ignored rows)
    kl_ptr,       # [N] fp32 out: per-row KL (0 for ignored rows)
    V, K, stride_l, stride_g,
    inv_T,        # fp32 1 / T
    ignore_index,
    exact_tail_below,
    UNIFORM: tl.constexpr,   # uniform tail; otherwise bucket (renorm = bucket with r_T = 0)
    BUCKET: tl.constexpr,    # some row may have r_T > 0 in bucket mode
    HAS_CONTROL: tl.constexpr,  # control variate: + w_kT (a * q_K - U q), U = sum_K a q (see kernels.reference)
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    l_row = logits_ptr + row * stride_l
    g_row = grad_ptr + row * stride_g
    k_off = row * K
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    safe_label = tl.where(valid, label, 0)
    w_ce = tl.load(wce_ptr + row)
    w_kT = tl.load(wkl_ptr + row) * inv_T

    # 1. online log-sum-exp at T = 1 and T from one running maximum.
    zero = tl.sum(tl.zeros([BLOCK_K], tl.float32), axis=0)
    m = zero - float("inf")
    s1 = zero
    sT = zero
    sx = zero
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(l_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s1 = s1 * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        sT = sT * tl.exp((m - m_new) * inv_T) + tl.sum(tl.exp((x - m_new) * inv_T), axis=0)
        if UNIFORM:
            sx += tl.sum(tl.where(mask, x, 0.0), axis=0)
        m = m_new
    lse1 = m + tl.log(s1)
    lseT = m * inv_T + tl.log(sT)

    # 2. the K entries: KL on K, and their final gradient into the stash (with a control variate, first
    # U = sum_K a q, which every entry's gradient needs).
    U = zero
    if HAS_CONTROL:
        for ks in range(0, K, BLOCK_K):
            kk = ks + tl.arange(0, BLOCK_K)
            kmask = kk < K
            idk = tl.load(ids_ptr + k_off + kk, mask=kmask, other=0)
            lp = tl.load(logp_ptr + k_off + kk, mask=kmask, other=float("-inf"))
            a = tl.load(control_ptr + k_off + kk, mask=kmask, other=0.0)
            zk = tl.load(l_row + idk, mask=kmask, other=0.0).to(tl.float32)
            U += tl.sum(tl.where(lp > float("-inf"), a * tl.exp(zk * inv_T - lseT), 0.0), axis=0)
    kl = zero
    sum_zK = zero
    sum_eK = zero
    for ks in range(0, K, BLOCK_K):
        kk = ks + tl.arange(0, BLOCK_K)
        kmask = kk < K
        idk = tl.load(ids_ptr + k_off + kk, mask=kmask, other=0)
        lp = tl.load(logp_ptr + k_off + kk, mask=kmask, other=float("-inf"))
        zk = tl.load(l_row + idk, mask=kmask, other=0.0).to(tl.float32)
        real = lp > float("-inf")
        p = tl.exp(lp)
        logq = zk * inv_T - lseT
        kl += tl.sum(tl.where(real, p * (lp - logq), 0.0), axis=0)
        if UNIFORM:
            sum_zK += tl.sum(tl.where(real, zk, 0.0), axis=0)
        if BUCKET:
            sum_eK += tl.sum(tl.where(real, tl.exp((zk - m) * inv_T), 0.0), axis=0)
        g = w_ce * tl.exp(zk - lse1) + w_kT * (tl.exp(logq) - p) - tl.where(idk == safe_label, w_ce, 0.0)
        if HAS_CONTROL:
            a = tl.load(control_ptr + k_off + kk, mask=kmask, other=0.0)
            g += w_kT * (a - U) * tl.exp(logq)
        tl.store(stash_ptr + k_off + kk, g, mask=kmask)
    x_y = tl.load(l_row + safe_label).to(tl.float32)
    ce = lse1 - x_y

    # 3. tail term: tail tokens get exp(z/T - tail_off) * tail_fac + shift (tail_off = LSE(z/T) but for a
    # bucket tail below fp32's range, see below).
    shift = zero
    tail_fac = zero + 1.0
    tail_off = lseT
    r = tl.load(r_ptr + row)
    if UNIFORM:
        nt = tl.load(ntail_ptr + row)
        u = tl.where(nt > 0, r / tl.maximum(nt, 1.0), 0.0)
        sum_tail_s = (sx - sum_zK) * inv_T
        kl += tl.where(u > 0, nt * u * tl.log(tl.maximum(u, FLT_MIN)) - u * (sum_tail_s - nt * lseT), 0.0)
        shift = -w_kT * u
    # log_tail = log sum_tail exp((z - m) / T), the student's tail mass relative to its row maximum.
    log_tail = zero
    if BUCKET:
        log_tail = tl.log(tl.maximum(sT - sum_eK, FLT_MIN))
        if r > 0:
            if sT - sum_eK < exact_tail_below * sT:
                # K holds nearly all the mass: sum the tail exactly, testing each column against K, as an
                # online log-sum-exp from the tail's own maximum (a tail below fp32's range stays exact).
                mt = zero - float("inf")
                st = zero
                for start in range(0, V, BLOCK_F):
                    cols = start + tl.arange(0, BLOCK_F)
                    mask = cols < V
                    x = tl.load(l_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
                    hits = tl.zeros([BLOCK_F], tl.int32)
                    for ks in range(0, K, BLOCK_K):
                        kk = ks + tl.arange(0, BLOCK_K)
                        idk = tl.load(ids_ptr + k_off + kk, mask=kk < K, other=-1)
                        hits += tl.sum((cols[:, None] == idk[None, :]).to(tl.int32), axis=1)
                    xt = tl.where(mask & (hits == 0), x, float("-inf"))
                    mt_new = tl.maximum(mt, tl.max(xt, axis=0))
                    if mt_new > float("-inf"):
                        st = st * tl.exp((mt - mt_new) * inv_T) + tl.sum(
                            tl.where(xt > float("-inf"), tl.exp((xt - mt_new) * inv_T), 0.0), axis=0)
                        mt = mt_new
                if st > 0:
                    log_tail = (mt - m) * inv_T + tl.log(st)
        log_Q = log_tail - tl.log(sT)
        kl += tl.where(r > 0, r * (tl.log(tl.maximum(r, FLT_MIN)) - log_Q), 0.0)
        # Tail tokens: softmax(z/T) (1 - r / Q); when Q nears fp32's range, the same as
        # softmax_tail(z/T) (Q - r) = exp((z - m) / T - log_tail) (Q - r), which does not underflow.
        if (r > 0) & (log_Q < -40.0):
            tail_off = m * inv_T + log_tail
            tail_fac = tl.exp(log_Q) - r
        else:
            tail_fac = 1.0 - r * tl.exp(-tl.maximum(log_Q, -40.0))  # finite: r = 0 (renorm) gives 1

    if HAS_CONTROL:
        # - U softmax(z/T) on every token, in the tail's own offset: exp(x/T - lseT) = exp(x/T - tail_off) Q'
        tail_fac -= U * tl.exp(tail_off - lseT)

    tl.store(ce_ptr + row, tl.where(valid, ce, 0.0))
    tl.store(kl_ptr + row, tl.where(valid, kl, 0.0))

    # 4. gradient pass, then the K entries from the stash.
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(l_row + cols, mask=mask, other=0.0).to(tl.float32)
        # (the exponent is <= 0 on every tail token; K entries, where it may not be, are overwritten below)
        g = w_ce * tl.exp(x - lse1) + w_kT * tl.exp(tl.minimum(x * inv_T - tail_off, 0.0)) * tail_fac + shift
        g = g - tl.where(cols == safe_label, w_ce, 0.0)
        tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)
    tl.debug_barrier()
    for ks in range(0, K, BLOCK_K):
        kk = ks + tl.arange(0, BLOCK_K)
        kmask = kk < K
        idk = tl.load(ids_ptr + k_off + kk, mask=kmask, other=0)
        lp = tl.load(logp_ptr + k_off + kk, mask=kmask, other=float("-inf"))
        g = tl.load(stash_ptr + k_off + kk, mask=kmask, other=0.0)
        tl.store(g_row + idk, g.to(grad_ptr.dtype.element_ty), mask=kmask & (lp > float("-inf")))


def loss_and_grad(logits, problem: RowProblem, grad):
    """Same contract as `kernels.torch_rows.loss_and_grad`: per-row CE and KL, the gradient written into
    ``grad``; ``problem`` unpacked into the kernel's arguments."""
    N, V = logits.shape
    K = problem.ids.shape[1]
    assert logits.stride(1) == 1 and grad.stride(1) == 1
    ce_row = torch.empty(N, dtype=torch.float32, device=logits.device)
    kl_row = torch.empty(N, dtype=torch.float32, device=logits.device)
    stash = torch.empty(N, K, dtype=torch.float32, device=logits.device)
    if N == 0:
        return ce_row, kl_row
    p = problem
    sparse_distill_kernel[(N,)](
        logits, grad, p.labels.contiguous(), p.ids.contiguous(), p.logp_K.contiguous(), stash,
        stash if p.control is None else p.control.contiguous(),  # (not read without a control variate)
        p.r_T.contiguous(), p.num_tail.contiguous(), p.w_ce.contiguous(), p.w_kl.contiguous(), ce_row, kl_row,
        V, K, logits.stride(0), grad.stride(0), 1.0 / p.temperature, p.ignore_index, EXACT_TAIL_BELOW,
        UNIFORM=p.uniform, BUCKET=not p.uniform, HAS_CONTROL=p.control is not None, BLOCK_V=BLOCK_V,
        BLOCK_K=BLOCK_K, BLOCK_F=BLOCK_F, num_warps=NUM_WARPS,
    )
    return ce_row, kl_row
