"""Full-vocabulary distillation (the online baseline: teachers run every step, dense logits), in row
chunks."""

from __future__ import annotations

import torch

from babydistill.kernels import torch_rows


class DenseDistill(torch.autograd.Function):
    """Full-vocabulary CE + KL(softmax(t/T) || softmax(z/T)) in row chunks, gradient formed in forward.

    Device-agnostic PyTorch (the online-distillation baseline); returns (loss, ce_row, kl_row) like
    `SparseDistillRows`, with w_ce / w_kl the per-row loss weights.
    """

    @staticmethod
    def forward(ctx, logits, labels, teacher_logits, w_ce, w_kl, temperature, ignore_index):
        N, V = logits.shape
        T = float(temperature)
        chunk_bytes = torch_rows.CHUNK_BYTES if logits.device.type == "cpu" else 1 << 27
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
