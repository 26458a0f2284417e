"""The autograd Function both row kernels plug into, and the choice between them.

A row kernel (``kernels.torch_rows.loss_and_grad`` or ``kernels.triton_kernel.loss_and_grad``, one
contract: ``loss_and_grad(logits, problem: RowProblem, grad) -> (ce_row, kl_row)``) computes per-row CE and
KL and writes the weighted gradient into ``grad`` in the forward pass; `SparseDistillRows`
turns that into a differentiable loss whose backward only scales the saved gradient.
"""

from __future__ import annotations

import torch

from babydistill.kernels import torch_rows
from babydistill.kernels.targets import RowProblem


def row_kernel(impl: str):
    """The per-row ``loss_and_grad`` of an implementation ("triton", "torch"): the Triton kernel's
    (imported on first use: triton is optional) or the chunked torch path's."""
    if impl == "triton":
        from babydistill.kernels import triton_kernel
        return triton_kernel.loss_and_grad
    return torch_rows.loss_and_grad


def rows_loss(ctx, problem: RowProblem, ce_row, kl_row, *gradients):
    """The end of a forward that formed its input gradients itself: (loss, ce_row, kl_row), the loss over
    rows weighted by ``problem``'s w_ce and w_kl, with ``gradients`` saved for a backward that may run once
    (it scales them in place)."""
    ctx.save_for_backward(*gradients)
    ctx.mark_non_differentiable(ce_row, kl_row)
    ctx.used = False
    return (problem.w_ce * ce_row).sum() + (problem.w_kl * kl_row).sum(), ce_row, kl_row


def saved_gradients(ctx, refusal: str) -> tuple:
    """The gradients ``rows_loss`` saved, handed out once (``refusal`` is the error of a second backward)."""
    if ctx.used:
        raise RuntimeError(refusal)
    ctx.used = True
    return ctx.saved_tensors


class SparseDistillRows(torch.autograd.Function):
    """loss = sum_rows w_ce * CE + w_kl * KL, gradient computed in forward by ``row_fn``
    (`kernels.torch_rows.loss_and_grad` or the Triton kernel's, which share one contract).

    Returns (loss, ce_row, kl_row); the per-row terms are not differentiable. With ``inplace`` the
    gradient overwrites the logits buffer: safe only when nothing else saved the logits for backward
    (e.g. they come straight out of a matmul whose backward does not need its output), and backward
    may run only once.
    """

    @staticmethod
    def forward(ctx, logits, problem: RowProblem, inplace: bool, row_fn):
        grad = logits.detach() if inplace else torch.empty_like(logits)
        with torch.no_grad():
            ce_row, kl_row = row_fn(logits.detach(), problem, grad)
        return rows_loss(ctx, problem, ce_row, kl_row, grad)

    @staticmethod
    def backward(ctx, grad_loss, _ce, _kl):
        (grad,) = saved_gradients(ctx, "sparse_distill_loss: backward may run only once "
                                       "(the gradient is scaled in place)")
        # On the CPU, skip a full pass over the gradient when grad_output is 1; on a GPU, the
        # multiply is cheaper than the host sync that the test would cost.
        if grad.device.type != "cpu" or float(grad_loss) != 1.0:
            grad.mul_(grad_loss.to(grad.dtype))
        return grad, None, None, None
