"""The sparse teacher target at temperature T, from the stored T = 1 log-probabilities: the first step of
both row kernels (the chunked torch path in `kernels.torch_rows` and the Triton kernel), computed on [N, k]
only; and `RowProblem`, all that a row kernel gets besides the logits."""

from __future__ import annotations

import dataclasses

import torch

from babydistill.kernels.reference import PAD_BELOW, RESIDUAL_EPS, ids_as_int64


def tempered_slot_logp(target_logp, slot_logp, temperature: float, c_T):
    """Sampled targets at temperature T, unbiased: each slot's log-weight log w + (1/T - 1) log p - c_T [N, k].

    ``target_logp`` the stored log-weights w (exact p_i on a hybrid store's head; log(r count_j / S) on a tail
    draw j, drawn from the T = 1 tail p_j / r), ``slot_logp`` each slot's exact T = 1 log-probability p (the head's
    own values, ``tail_logp`` on the draws), ``c_T`` [N]. E[w_j] = p_j, so E[w_j p_j^(1/T - 1) e^-c_T] =
    p_j^(1/T) e^-c_T = p_T,j; on the head it is p_i^(1/T) e^-c_T exactly. The weights sum to 1 in expectation
    only: they are not renormalised (that would bias them). Padding (weights below PAD_LOGP / 2 = -5e3, or -inf)
    keeps its value, so its weight stays 0 at every T.
    """
    T = float(temperature)
    w = target_logp.to(torch.promote_types(target_logp.dtype, torch.float32))
    tempered = w + (1.0 / T - 1.0) * slot_logp.to(w.dtype) - c_T.to(w.dtype)[:, None]
    return torch.where(w > PAD_BELOW, tempered, w)


def prepare_targets(target_ids, target_logp, vocab_size: int, temperature: float, tail: str, c_T=None,
                    slot_logp=None):
    """The teacher on K at temperature T, from the stored T = 1 log-probabilities ([N, k] work only).

    Returns ids [N, k] int64, logp_K [N, k] fp32 (-inf for padding), r_T [N] fp32 (tail mass; 0 for
    renorm) and num_tail [N] fp32 (V minus the number of real entries). Sampled targets (tail "renorm") with
    ``slot_logp`` at T != 1: the importance-tempered weights of `tempered_slot_logp`, not renormalised.
    """
    T = float(temperature)
    if tail == "renorm" and slot_logp is not None and T != 1.0:
        target_logp = tempered_slot_logp(target_logp, slot_logp, T, c_T)
    l1 = target_logp.to(torch.float32)
    real = l1 > float("-inf")
    ids = ids_as_int64(target_ids)
    # Padding entries point at the row's first real id, so that they never touch another column.
    first_real = ids.gather(1, real.to(torch.uint8).argmax(1, keepdim=True))
    ids = torch.where(real, ids, first_real)
    num_tail = (vocab_size - real.sum(1)).to(torch.float32)
    if tail == "renorm" and slot_logp is not None and T != 1.0:
        return ids, l1, torch.zeros_like(num_tail), num_tail
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


def prepare_control(control, target_logp):
    """Control-variate coefficients [N, k] fp32 for the row kernels (see `kernels.reference`), or None.

    Padding entries take the coefficient of the entry their id points at (`prepare_targets` points them
    at the row's first real id), so that the torch kernel's K columns, written once per entry, agree; the
    kernels leave padding out of the sum of a * q.
    """
    if control is None:
        return None
    a = control.to(torch.float32)
    real = target_logp > float("-inf")
    first_real = a.gather(1, real.to(torch.uint8).argmax(1, keepdim=True))
    return torch.where(real, a, first_real).contiguous()


PER_ROW = ("labels", "ids", "logp_K", "r_T", "num_tail", "w_ce", "w_kl", "control")


@dataclasses.dataclass(frozen=True)
class RowProblem:
    """What a row kernel gets besides the logits: the targets of each row, its loss weights and the options.

    Built once by `kernels.losses`, passed as it is through the autograd Function (and the fused LM head's
    row chunks, `rows`) to the row kernel (`kernels.torch_rows.loss_and_grad`,
    `kernels.triton_kernel.loss_and_grad`, whose launch unpacks it into the Triton kernel's arguments).
    """

    labels: torch.Tensor    # [N] int64; rows equal to ignore_index count in neither CE nor KL
    ids: torch.Tensor       # [N, k] int64 teacher ids (padding points at the row's first real id)
    logp_K: torch.Tensor    # [N, k] fp32 teacher log-probabilities at T on K (-inf: padding)
    r_T: torch.Tensor       # [N] fp32 teacher tail mass at T (0 for renorm)
    num_tail: torch.Tensor  # [N] fp32 tail tokens: V minus the real entries of K
    w_ce: torch.Tensor      # [N] fp32 CE weight: alpha * CE normaliser (0 for ignored rows)
    w_kl: torch.Tensor      # [N] fp32 KL weight: (1 - alpha) T^2 * KL normaliser (0 for ignored rows)
    control: torch.Tensor | None  # [N, k] fp32 control-variate coefficients (`prepare_control`) or None
    temperature: float
    uniform: bool           # the uniform tail; otherwise the bucket tail (renorm: a bucket with r_T = 0)
    ignore_index: int

    def rows(self, start: int, stop: int) -> RowProblem:
        """The problem of rows start..stop-1 (views of the same tensors)."""
        return dataclasses.replace(self, **{name: getattr(self, name)[start:stop] for name in PER_ROW
                                            if getattr(self, name) is not None})
