"""The sparse-distillation loss as plain, dense PyTorch: the spec every kernel is tested against.

Per row (token position) with student logits z (V), label y, teacher ids K (k of them) and teacher
log-probabilities l_i at T = 1:

    loss = alpha * CE(y, softmax(z)) + (1 - alpha) * T^2 * KL(p_T || softmax(z / T))

The teacher at temperature T is known on K: log p_T,i = l_i / T - c_T, with c_T = LSE(zbar/T) - LSE(zbar)/T
the per-row correction the logit store keeps; its tail mass is r_T = 1 - sum_K p_T,i. Without c_T the
T = 1 residual r = 1 - sum_K exp(l_i) is taken as spread evenly over the V - k other tokens and tempered
with them (an approximation; exact at T = 1 and whenever r = 0; the first RESIDUAL_EPS of the residual
is taken as rounding and subtracted, so the tail is continuous in r). Sampled targets (weights summing
to 1, up to storage rounding) are complete distributions: pass tail="renorm" for them.

Tail modes (what the teacher puts outside K):
    bucket   the tail is one bucket of mass r_T, compared with the student's tail mass Q_T
    renorm   the tail is dropped and p_T renormalised over K (student: the full softmax)
    uniform  r_T spread evenly over the V - k tail tokens

Conventions shared by every implementation:
    - ids within a row are distinct; an entry whose target_logp is -inf is padding and has no effect
      (it may repeat an id of the row);
    - rows whose label is ignore_index count in neither CE nor KL;
    - normalisation "token": CE and KL averaged over counted rows; "sequence": CE averaged over counted
      rows, KL summed over them and divided by num_sequences (KLDivLoss(reduction="batchmean") on
      [B, S, V]); "sum": both summed. An all-ignored batch gives 0 and zero gradients;
    - the returned ce and kl are the normalised, detached CE and KL (KL without T^2), so that
      loss = alpha * ce + (1 - alpha) * T^2 * kl.

Control variate (``control``, [N, k] coefficients a >= 0, 0 on padding; default none): the KL's gradient
w.r.t. z gains (a * q_K - (sum_K a q) q) / T, q = softmax(z / T), the gradient of sum_K a_j q_j with a
held fixed; the loss value does not change. With a = beta on the exact head and beta * w_j / p_j on the
tail draws (w_j their stored weight, p_j the teacher's exact probability), this turns the sampled tail
estimate (r/S) sum_s e_j into beta q_tail + (1/S) sum_s (p_j - beta q_j) / pi_j e_j: still unbiased for the
teacher's tail (for any beta fixed before the draws), and far less noisy once the student is near the
teacher (see `pipeline.distill.control_coefficients`).

Sampled targets at T != 1 (``slot_logp``, [N, k], with tail "renorm" and ``c_T``): the stored weights w estimate
p at T = 1 (a hybrid store: the head exactly, tail draws j from p_j / r with w_j = r count_j / S); given each
slot's exact T = 1 log-probability p (``slot_logp``: the head's own values, the draws' ``tail_logp``) the target
at T is t = w p^(1/T - 1) e^-c_T per slot, E[t_j] = p_j^(1/T) e^-c_T = p_T,j: unbiased, and not renormalised
(its sum is 1 in expectation only; renormalising would bias it). Its KL is sum_K t log(t / q) and its gradient
(1/T) (q - t), the full softmax minus the target: the expected gradient is the dense tempered one.

This module builds the full teacher distribution densely and lets autograd differentiate; it runs in the
logits' dtype (float64 in tests). It is never the production path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TAILS = ("bucket", "renorm", "uniform")
# Without c_T at T != 1, this much of the T = 1 residual is rounding (weights that sum to 1 stored in fp32),
# not mass: tempering would blow it up, since the tail then carries num_tail^(1 - 1/T) * r^(1/T).
RESIDUAL_EPS = 1e-5
NORMALIZATIONS = ("token", "sequence", "sum")
# Stored padding slots hold PAD_LOGP = -1e4 (stores/logits.py): a weight below this is padding at every T.
PAD_BELOW = -5.0e3


def check_args(logits, labels, target_ids, target_logp, *, alpha, temperature, tail, normalization,
               c_T, num_sequences, ignore_index=-100, control=None, slot_logp=None) -> None:
    """Raise one ValueError listing every problem with the arguments of a sparse_distill_loss call.

    Labels (other than ``ignore_index``) and target ids must lie in [0, V): the kernels index with them
    unchecked, so an out-of-range value would read and write outside the row. One host sync.
    """
    problems = []
    if logits.dim() != 2:
        problems.append(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    else:
        N, V = logits.shape
        if labels.shape != (N,):
            problems.append(f"labels must be [N] = [{N}], got {tuple(labels.shape)}")
        if target_ids.dim() != 2 or target_ids.shape[0] != N or not 1 <= target_ids.shape[1] <= V:
            problems.append(f"target_ids must be [N, k] with N = {N} and 1 <= k <= V = {V}, "
                            f"got {tuple(target_ids.shape)}")
        if target_logp.shape != target_ids.shape:
            problems.append(f"target_logp {tuple(target_logp.shape)} must match target_ids "
                            f"{tuple(target_ids.shape)}")
        if c_T is not None and c_T.shape != (N,):
            problems.append(f"c_T must be [N] = [{N}], got {tuple(c_T.shape)}")
        if slot_logp is not None and slot_logp.shape != target_ids.shape:
            problems.append(f"slot_logp {tuple(slot_logp.shape)} must match target_ids {tuple(target_ids.shape)}")
        if slot_logp is not None and temperature != 1.0 and (tail != "renorm" or c_T is None):
            problems.append("slot_logp (sampled targets at T != 1) needs tail='renorm' and the exact c_T")
        if control is not None and control.shape != target_ids.shape:
            problems.append(f"control {tuple(control.shape)} must match target_ids {tuple(target_ids.shape)}")
        if not problems and not target_ids.is_floating_point() and not labels.is_floating_point():
            problems += _out_of_range(labels, ids_as_int64(target_ids), V, ignore_index)
    if not logits.is_floating_point():
        problems.append(f"logits must be floating point, got {logits.dtype}")
    if target_ids.is_floating_point():
        problems.append(f"target_ids must be an integer tensor, got {target_ids.dtype}")
    if not 0.0 <= alpha <= 1.0:
        problems.append(f"alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        problems.append(f"temperature must be > 0, got {temperature}")
    if tail not in TAILS:
        problems.append(f"tail must be one of {TAILS}, got {tail!r}")
    if normalization not in NORMALIZATIONS:
        problems.append(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if normalization == "sequence" and (num_sequences is None or num_sequences < 1):
        problems.append(f"normalization='sequence' needs num_sequences >= 1, got {num_sequences}")
    if problems:
        raise ValueError("sparse_distill_loss: " + "; ".join(problems))


def _out_of_range(labels, ids, V: int, ignore_index: int) -> list[str]:
    """The first label and the first target id outside [0, V), by row, or []."""
    bad_labels = ((labels < 0) | (labels >= V)) & (labels != ignore_index)
    bad_ids = (ids < 0) | (ids >= V)
    if not (bad_labels.any() | bad_ids.any()).item():
        return []
    problems = []
    if bad_labels.any():
        row = int(bad_labels.nonzero()[0, 0])
        problems.append(f"labels[{row}] = {int(labels[row])} is outside [0, V = {V}) and is not "
                        f"ignore_index = {ignore_index}")
    if bad_ids.any():
        row, col = (int(i) for i in bad_ids.nonzero()[0])
        problems.append(f"target_ids[{row}, {col}] = {int(ids[row, col])} is outside [0, V = {V})")
    return problems


def loss_scales(labels: torch.Tensor, normalization: str, num_sequences: int | None, ignore_index: int):
    """Per-row 0/1 mask of counted rows, and the CE and KL normalisers (tensors: no host sync on CUDA)."""
    valid = labels != ignore_index
    num_tokens = valid.sum().clamp_min(1).to(torch.float32)
    if normalization == "token":
        return valid, 1.0 / num_tokens, 1.0 / num_tokens
    if normalization == "sequence":
        return valid, 1.0 / num_tokens, torch.tensor(1.0 / num_sequences, device=labels.device)
    one = torch.ones((), device=labels.device)
    return valid, one, one


def ids_as_int64(target_ids: torch.Tensor) -> torch.Tensor:
    """Teacher ids as int64 (the store keeps uint16, which indexing does not accept)."""
    if target_ids.dtype == torch.uint16:
        return target_ids.to(torch.int32).to(torch.int64)
    return target_ids.to(torch.int64)


def _dense_teacher(logits, ids, l_K, real, T: float, c_T):
    """The teacher at temperature T, densely (``logits`` give the shape, dtype and device): membership of K
    [N, V], tail tokens per row [N], the probabilities on K [N, V] (0 elsewhere) and the tail mass r_T [N]."""
    N, V = logits.shape
    dtype = logits.dtype
    in_K = torch.zeros(N, V, dtype=torch.int32, device=logits.device).scatter_add(1, ids, real.int()) > 0
    num_tail = V - in_K.sum(1)                                     # [N]
    p1_dense = torch.zeros(N, V, dtype=dtype, device=logits.device).scatter_add(1, ids, l_K.exp())
    if c_T is not None or T == 1.0:
        c = c_T.to(dtype) if c_T is not None else torch.zeros(N, dtype=dtype, device=logits.device)
        logp_T_dense = torch.where(in_K, p1_dense.log() / T - c[:, None], float("-inf"))
        p_T_dense = logp_T_dense.exp()
        r_T = (1 - p_T_dense.sum(1)).clamp(0, 1)
    else:
        # T = 1 residual spread evenly over the tail, then the whole dense distribution tempered;
        # its first RESIDUAL_EPS is rounding, removed continuously.
        r1 = (1 - p1_dense.sum(1) - RESIDUAL_EPS).clamp(0, 1)
        tail_p1 = torch.where(num_tail > 0, r1 / num_tail.clamp_min(1), 0)
        full_p1 = torch.where(in_K, p1_dense, tail_p1[:, None])
        full_logp_T = torch.log_softmax(full_p1.log() / T, dim=1)  # log 0 = -inf tokens stay at 0
        p_T_dense = torch.where(in_K, full_logp_T.exp(), 0)
        r_T = (1 - p_T_dense.sum(1)).clamp(0, 1)
    return in_K, num_tail, p_T_dense, torch.where(num_tail > 0, r_T, 0)


def _kl(logq_T, in_K, num_tail, p_T_dense, r_T, tail: str):
    """Per-row KL(teacher || student) at T under the tail mode ``tail``, from the student's
    log-probabilities."""
    if tail == "renorm":
        p = p_T_dense / p_T_dense.sum(1, keepdim=True)
        kl = (torch.xlogy(p, p) - p * torch.where(p > 0, logq_T, 0)).sum(1)
    elif tail == "uniform":
        u = torch.where(num_tail > 0, r_T / num_tail.clamp_min(1), 0)
        p = torch.where(in_K, p_T_dense, u[:, None])
        kl = (torch.xlogy(p, p) - p * torch.where(p > 0, logq_T, 0)).sum(1)
    else:  # bucket: K entries plus one tail bucket, on both sides
        p = p_T_dense
        kl_K = (torch.xlogy(p, p) - p * torch.where(in_K, logq_T, 0)).sum(1)
        logQ_T = torch.logsumexp(logq_T.masked_fill(in_K, float("-inf")), dim=1)
        kl = kl_K + torch.where(r_T > 0, r_T * (r_T.log() - logQ_T), 0)
    return kl


def _sampled_kl(logits, logq_T, ids, w_K, s_K, T: float, c_T):
    """Per-row KL of sampled targets at T != 1 (the module's docstring): sum_K t log(t / q), t = w p^(1/T - 1)
    e^-c_T, with its gradient (1/T) (q - t): the gradient-only (1 - sum t) LSE(z / T) term makes up for the
    target's sum not being 1. Also the real-slot mask."""
    real = w_K > PAD_BELOW
    log_t = torch.where(real, w_K + (1 / T - 1) * s_K - c_T[:, None], float("-inf"))
    t = torch.zeros_like(logits).scatter_add(1, ids, log_t.exp())
    kl = (torch.xlogy(t, t) - t * torch.where(t > 0, logq_T, 0)).sum(1)
    lse = torch.logsumexp(logits / T, dim=1)
    return kl + (1 - t.sum(1)) * (lse - lse.detach()), real


def sparse_distill_loss(logits, labels, target_ids, target_logp, *, alpha=0.5, temperature=1.0, tail="bucket",
                        normalization="token", c_T=None, num_sequences=None, ignore_index=-100, impl=None,
                        control=None, slot_logp=None):
    """Dense reference of `kernels.losses.sparse_distill_loss` (``impl`` is accepted and ignored).

    Returns (loss, ce, kl); ce and kl are detached. Computes in ``logits.dtype``.
    """
    check_args(logits, labels, target_ids, target_logp, alpha=alpha, temperature=temperature, tail=tail,
               normalization=normalization, c_T=c_T, num_sequences=num_sequences, ignore_index=ignore_index,
               control=control, slot_logp=slot_logp)
    T = float(temperature)
    dtype = logits.dtype
    ids = ids_as_int64(target_ids)
    logq_T = torch.log_softmax(logits / T, dim=1)
    if slot_logp is not None and T != 1.0:
        kl, real = _sampled_kl(logits, logq_T, ids, target_logp.to(dtype), slot_logp.to(dtype), T, c_T.to(dtype))
    else:
        l_K = target_logp.to(dtype)
        real = l_K > float("-inf")                                     # padding entries have no effect
        in_K, num_tail, p_T_dense, r_T = _dense_teacher(logits, ids, l_K, real, T, c_T)
        kl = _kl(logq_T, in_K, num_tail, p_T_dense, r_T, tail)
    if control is not None:
        # Gradient only: sum_K a_j q_j has gradient (a * q_K - (sum_K a q) q) / T w.r.t. z; its value is taken
        # away again, so the KL reported is the plain estimate.
        a_q = (torch.where(real, control.to(dtype), 0) * logq_T.gather(1, ids).exp()).sum(1)
        kl = kl + (a_q - a_q.detach())

    ce = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    valid, ce_scale, kl_scale = loss_scales(labels, normalization, num_sequences, ignore_index)
    ce_sum = torch.where(valid, ce, 0).sum()
    kl_sum = torch.where(valid, kl, 0).sum()
    ce_norm = ce_sum * ce_scale.to(dtype)
    kl_norm = kl_sum * kl_scale.to(dtype)
    loss = alpha * ce_norm + (1 - alpha) * T * T * kl_norm
    return loss, ce_norm.detach(), kl_norm.detach()
