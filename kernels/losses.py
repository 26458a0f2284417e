"""The distillation loss: `sparse_distill_loss`, `fused_linear_sparse_distill_loss`, `dense_distill_loss`.

Dispatch: the Triton kernel for CUDA tensors, the chunked torch path otherwise (also the fallback on a GPU
without triton: it is device-agnostic PyTorch); ``impl=`` forces one
("triton" on CPU tensors runs the kernel through the interpreter when TRITON_INTERPRET=1 was set before
triton was imported), and the module-level ``_override_impl`` lets tests force a path everywhere.
``kernels.reference.sparse_distill_loss`` is the dense spec (same signature), never the production path.

Files: ``targets.py`` (the teacher target at T, shared by both row kernels), ``torch_rows.py`` (the chunked
torch row kernel), ``triton_kernel.py`` (the Triton row kernel), ``autograd.py`` (the autograd Function both
plug into, and the pick between them), ``fused_linear.py`` (LM head + loss in row chunks), ``dense.py``
(the full-vocabulary loss of online distillation), ``reference.py`` (the spec).
"""

from __future__ import annotations

import torch

from babydistill.kernels import autograd, dense, reference
from babydistill.kernels.targets import RowProblem, prepare_control, prepare_targets

__all__ = ["sparse_distill_loss", "fused_linear_sparse_distill_loss", "dense_distill_loss"]

IMPLS = ("triton", "torch", "reference")
# Other names ``impl=`` accepts: "cpu" is what the torch path was called before it was known to serve GPUs too
# (the DESIGN contract's ``impl="cpu"``).
IMPL_ALIASES = {"cpu": "torch"}
_override_impl: str | None = None  # tests set this to force a path; an explicit impl= still wins


def _have_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:  # the chunked torch path runs on any device
        return False
    return True


def _resolve_impl(impl: str | None, device: torch.device) -> str:
    if impl is None:
        impl = _override_impl
    if impl is None:
        impl = "triton" if device.type == "cuda" and _have_triton() else "torch"
    impl = IMPL_ALIASES.get(impl, impl)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} (or {', '.join(IMPL_ALIASES)}) or None, got {impl!r}")
    return impl


def _weights(labels, alpha, temperature, normalization, num_sequences, ignore_index):
    """Per-row loss weights w_ce, w_kl ([N] fp32, 0 for ignored rows) and the CE / KL normalisers."""
    valid, ce_scale, kl_scale = reference.loss_scales(labels, normalization, num_sequences, ignore_index)
    T = float(temperature)
    w_ce = valid.to(torch.float32) * (alpha * ce_scale)
    w_kl = valid.to(torch.float32) * ((1 - alpha) * T * T * kl_scale)
    return w_ce, w_kl, ce_scale, kl_scale


def _row_problem(labels, target_ids, target_logp, vocab_size, *, alpha, temperature, tail, normalization, c_T,
                 num_sequences, ignore_index, control,
                 slot_logp=None) -> tuple[RowProblem, torch.Tensor, torch.Tensor]:
    """The row kernels' problem of a call (checked arguments), and the CE and KL normalisers."""
    ids, logp_K, r_T, num_tail = prepare_targets(target_ids, target_logp, vocab_size, temperature, tail, c_T,
                                                 slot_logp)
    w_ce, w_kl, ce_scale, kl_scale = _weights(labels, alpha, temperature, normalization, num_sequences,
                                              ignore_index)
    problem = RowProblem(labels=labels.to(torch.int64), ids=ids, logp_K=logp_K, r_T=r_T, num_tail=num_tail,
                         w_ce=w_ce, w_kl=w_kl, control=prepare_control(control, target_logp),
                         temperature=float(temperature), uniform=tail == "uniform", ignore_index=ignore_index)
    return problem, ce_scale, kl_scale


def sparse_distill_loss(logits, labels, target_ids, target_logp, *, alpha=0.5, temperature=1.0, tail="bucket",
                        normalization="token", c_T=None, num_sequences=None, ignore_index=-100, impl=None,
                        inplace=False, control=None, slot_logp=None):
    """alpha * CE(y, softmax(z)) + (1 - alpha) * T^2 * KL(p_T || softmax(z / T)) from a sparse teacher.

    Parameters
    ----------
    logits : [N, V] student logits, any float dtype.
    labels : [N] int64; rows equal to ``ignore_index`` count in neither CE nor KL.
    target_ids : [N, k] int (uint16 accepted), distinct per row; 1 <= k <= V.
    target_logp : [N, k] teacher log-probabilities at T = 1; -inf marks padding (no effect).
    alpha, temperature : loss mix and distillation temperature.
    tail : "bucket" | "renorm" | "uniform" — what the teacher puts outside K (see `kernels.reference`).
    normalization : "token" | "sequence" (KL / num_sequences, CE per token) | "sum".
    c_T : [N] per-row correction LSE(zbar/T) - LSE(zbar)/T, or None: then the T = 1 residual is taken
        as spread evenly over the V - k other tokens (approximate at T != 1 unless the residual is 0).
    impl : None (auto), "triton", "torch" (alias "cpu") or "reference".
    control : [N, k] control-variate coefficients (>= 0; 0 on padding) or None: the KL's gradient gains
        (a * q_K - (sum_K a q) q) / T; the loss value does not change (see `kernels.reference`).
    slot_logp : [N, k] each slot's exact teacher log-probability at T = 1 (sampled targets: the head's stored
        values, then the draws' ``tail_logp``) or None. With tail "renorm" at T != 1 (needs ``c_T``), the
        weights become the unbiased tempered target w p^(1/T - 1) e^-c_T, not renormalised (`kernels.reference`).
    inplace : write the gradient over the logits buffer (saves N x V memory). Safe only when nothing
        else saved these logits for backward; backward may then run once. Not for impl="reference".

    Returns
    -------
    (loss, ce, kl): loss is a 0-d fp32 tensor (logits' dtype for the reference); ce and kl are the
    normalised, detached CE and KL (KL without T^2), so loss = alpha * ce + (1 - alpha) * T^2 * kl.

    Examples
    --------
    >>> z = torch.randn(4, 10, requires_grad=True)
    >>> ids = torch.randint(0, 10, (4, 1))
    >>> loss, ce, kl = sparse_distill_loss(z, torch.tensor([1, 2, -100, 3]), ids, torch.zeros(4, 1))
    >>> loss.backward()
    """
    reference.check_args(logits, labels, target_ids, target_logp, alpha=alpha, temperature=temperature,
                         tail=tail, normalization=normalization, c_T=c_T, num_sequences=num_sequences,
                         ignore_index=ignore_index, control=control, slot_logp=slot_logp)
    impl = _resolve_impl(impl, logits.device)
    if impl == "reference":
        return reference.sparse_distill_loss(
            logits, labels, target_ids, target_logp, alpha=alpha, temperature=temperature, tail=tail,
            normalization=normalization, c_T=c_T, num_sequences=num_sequences, ignore_index=ignore_index,
            control=control, slot_logp=slot_logp)
    problem, ce_scale, kl_scale = _row_problem(
        labels, target_ids, target_logp, logits.shape[1], alpha=alpha, temperature=temperature, tail=tail,
        normalization=normalization, c_T=c_T, num_sequences=num_sequences, ignore_index=ignore_index,
        control=control, slot_logp=slot_logp)
    loss, ce_row, kl_row = autograd.SparseDistillRows.apply(logits.contiguous(), problem, inplace,
                                                            autograd.row_kernel(impl))
    return loss, ce_row.sum() * ce_scale, kl_row.sum() * kl_scale


def fused_linear_sparse_distill_loss(hidden, lm_head_weight, labels, target_ids, target_logp, *, alpha=0.5,
                                     temperature=1.0, tail="bucket", normalization="token", c_T=None,
                                     num_sequences=None, ignore_index=-100, impl=None, chunk_rows=None,
                                     control=None, slot_logp=None):
    """`sparse_distill_loss` of ``hidden @ lm_head_weight.T`` without materialising the N x V logits.

    hidden [N, H], lm_head_weight [V, H]; gradients flow to both (grad_W accumulated in fp32). Rows go
    through in chunks of ``chunk_rows`` (default: about 64 MB of fp32 logits on CPU, 256 MB on CUDA).
    impl="reference" materialises the logits and calls the reference.
    """
    from babydistill.kernels import fused_linear

    logits_shape_check = torch.empty(hidden.shape[0], lm_head_weight.shape[0], device="meta")
    reference.check_args(logits_shape_check, labels, target_ids, target_logp, alpha=alpha,
                         temperature=temperature, tail=tail, normalization=normalization, c_T=c_T,
                         num_sequences=num_sequences, ignore_index=ignore_index, control=control,
                         slot_logp=slot_logp)
    if hidden.dim() != 2 or lm_head_weight.dim() != 2 or hidden.shape[1] != lm_head_weight.shape[1]:
        raise ValueError(f"hidden [N, H] and lm_head_weight [V, H] must share H, got {tuple(hidden.shape)} "
                         f"and {tuple(lm_head_weight.shape)}")
    impl = _resolve_impl(impl, hidden.device)
    if impl == "reference":
        return reference.sparse_distill_loss(
            hidden @ lm_head_weight.T, labels, target_ids, target_logp, alpha=alpha, temperature=temperature,
            tail=tail, normalization=normalization, c_T=c_T, num_sequences=num_sequences,
            ignore_index=ignore_index, control=control, slot_logp=slot_logp)
    problem, ce_scale, kl_scale = _row_problem(
        labels, target_ids, target_logp, lm_head_weight.shape[0], alpha=alpha, temperature=temperature,
        tail=tail, normalization=normalization, c_T=c_T, num_sequences=num_sequences,
        ignore_index=ignore_index, control=control, slot_logp=slot_logp)
    loss, ce_row, kl_row = fused_linear.FusedLinearSparseDistill.apply(hidden, lm_head_weight, problem, impl,
                                                                       chunk_rows)
    return loss, ce_row.sum() * ce_scale, kl_row.sum() * kl_scale


def dense_distill_loss(logits, labels, teacher_logits, *, alpha=0.5, temperature=1.0, normalization="token",
                       num_sequences=None, ignore_index=-100):
    """Full-vocabulary alpha * CE + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(z/T)) (online baseline).

    logits, teacher_logits [N, V] (the teacher gets no gradient); same normalisations and return value
    (loss, ce, kl) as `sparse_distill_loss`. Rows go through in chunks with the gradient formed directly,
    so the extra memory is the gradient plus a few chunk-sized temporaries.
    """
    if teacher_logits.shape != logits.shape or logits.dim() != 2:
        raise ValueError(f"logits and teacher_logits must both be [N, V], got {tuple(logits.shape)} and "
                         f"{tuple(teacher_logits.shape)}")
    N, V = logits.shape
    dummy = torch.zeros(N, 1, dtype=torch.int64, device=logits.device)
    reference.check_args(logits, labels, dummy, dummy.float(), alpha=alpha, temperature=temperature,
                         tail="bucket", normalization=normalization, c_T=None, num_sequences=num_sequences,
                         ignore_index=ignore_index)
    w_ce, w_kl, ce_scale, kl_scale = _weights(labels, alpha, temperature, normalization, num_sequences,
                                              ignore_index)
    loss, ce_row, kl_row = dense.DenseDistill.apply(logits.contiguous(), labels.to(torch.int64),
                                                    teacher_logits.detach(), w_ce, w_kl, float(temperature),
                                                    ignore_index)
    return loss, ce_row.sum() * ce_scale, kl_row.sum() * kl_scale
