"""Fused LM head + sparse-distillation loss: logits = hidden @ W^T in row chunks, never N x V at once.

For each chunk of rows: logits_c = h_c @ W^T, the row kernel (torch path or Triton) writes its gradient g_c
over logits_c, then grad_h_c = g_c @ W and grad_W += g_c^T h_c (accumulated in fp32). Extra memory: one
logits chunk, grad_h [N, H] and an fp32 grad_W [V, H].
"""

from __future__ import annotations

import torch

from babydistill.kernels.autograd import row_kernel, rows_loss, saved_gradients
from babydistill.kernels.targets import RowProblem

# fp32 bytes of one logits chunk (64 MB on the CPU: GEMMs stay efficient)
CHUNK_BYTES = {"cpu": 1 << 26, "cuda": 1 << 28}


class FusedLinearSparseDistill(torch.autograd.Function):
    """loss = sum_rows w_ce * CE + w_kl * KL of hidden @ W^T; gradients for hidden and W formed in forward.

    Returns (loss, ce_row, kl_row); backward scales the saved gradients by grad_output (once).
    """

    @staticmethod
    def forward(ctx, hidden, weight, problem: RowProblem, impl: str, chunk_rows: int | None):
        N, H = hidden.shape
        V = weight.shape[0]
        row_fn = row_kernel(impl)
        if chunk_rows is None:
            chunk_rows = max(1, CHUNK_BYTES.get(hidden.device.type, 1 << 25) // (4 * V))
        C = max(1, min(N, chunk_rows))
        grad_h = torch.empty(N, H, dtype=hidden.dtype, device=hidden.device)
        grad_W = torch.zeros(V, H, dtype=torch.float32, device=weight.device)
        ce_row = torch.empty(N, dtype=torch.float32, device=hidden.device)
        kl_row = torch.empty(N, dtype=torch.float32, device=hidden.device)
        with torch.no_grad():
            h_all, W = hidden.detach(), weight.detach()
            logits_buf = torch.empty(C, V, dtype=torch.promote_types(hidden.dtype, weight.dtype),
                                     device=hidden.device)  # one buffer: fresh pages per chunk cost time
            for a in range(0, N, C):
                b = min(a + C, N)
                h = h_all[a:b]
                logits = torch.matmul(h, W.T, out=logits_buf[: b - a])  # [C, V], becomes its own gradient
                ce_row[a:b], kl_row[a:b] = row_fn(logits, problem.rows(a, b), logits)
                torch.matmul(logits, W, out=grad_h[a:b])
                if logits.dtype == torch.float32 and h.dtype == torch.float32:
                    grad_W.addmm_(logits.T, h)
                else:
                    grad_W += (logits.T @ h).float()
        ctx.weight_dtype = weight.dtype
        return rows_loss(ctx, problem, ce_row, kl_row, grad_h, grad_W)

    @staticmethod
    def backward(ctx, grad_loss, _ce, _kl):
        grad_h, grad_W = saved_gradients(ctx, "fused_linear_sparse_distill_loss: backward may run only once")
        grad_h.mul_(grad_loss.to(grad_h.dtype))
        grad_W = (grad_W * grad_loss).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_W, None, None, None
