"""The loop's data: where windows come from, which ones an optimizer step reads, how they reach the device.

Global batch (DDP): one optimizer step consumes ``G = batch_size x grad_accum x world_size``
windows, positions ``[step_in_epoch * G, (step_in_epoch + 1) * G)`` of the epoch's order.
Micro-step ``m`` of rank ``r`` reads the ``batch_size`` positions starting at
``step_in_epoch * G + (m * world_size + r) * batch_size``. The step's gradient is the mean over
all G windows, so N processes with batch_size B match one process with batch_size N x B (or
grad_accum N x A) up to float summation order. The last partial global batch of an epoch is
dropped. The data position is a pure function of (seed, epoch, step_in_epoch), so a resume needs
no more state than the step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from babydistill.stores.tokens import TokenStore

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class BatchSource(Protocol):
    """Where the loop's windows come from. Stateless addressing makes resume exact:
    the data position is (epoch, positions), nothing else."""

    num_windows: int
    """Windows in one epoch."""

    def batch(self, epoch: int, positions: np.ndarray) -> Batch:
        """The windows at ``positions`` of epoch ``epoch``'s order, as CPU tensors.

        Must hold ``input_ids`` [B, T] (used for validation shape and token counts); anything
        else (``labels``, teacher targets, ...) is for the loss function.
        """
        ...


def epoch_order(seed: int, epoch: int, num_windows: int) -> np.ndarray:
    """The permutation of window ids for one epoch, fixed by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_windows)


class TokenWindows:
    """Windows of one split of tokens.zarr, reshuffled every epoch from (seed, epoch).

    ``random_offset`` shifts every window by an offset in [0, seq_len) drawn per (seed, epoch,
    window), like the paper's dataset.
    """

    def __init__(self, tokens: TokenStore, split: str = "train", *, seed: int, random_offset: bool = False):
        self.tokens, self.split, self.seed, self.random_offset = tokens, split, seed, random_offset
        self.num_windows = tokens.num_windows(split)
        self._epoch: int | None = None

    def _epoch_tables(self, epoch: int) -> None:
        if self._epoch != epoch:
            self._order = epoch_order(self.seed, epoch, self.num_windows)
            self._offsets = (np.random.default_rng([self.seed, epoch, 1]).integers(0, self.tokens.seq_len,
                                                                                 self.num_windows)
                             if self.random_offset else None)
            self._epoch = epoch

    def batch(self, epoch: int, positions: np.ndarray) -> Batch:
        self._epoch_tables(epoch)
        ids = self._order[positions]
        offsets = self._offsets[ids] if self._offsets is not None else None
        windows_BT1 = torch.from_numpy(self.tokens.windows(self.split, ids, offsets))
        return {"input_ids": windows_BT1[:, :-1].contiguous(), "labels": windows_BT1[:, 1:].contiguous()}


def ce_loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean next-token cross-entropy over the batch's tokens (computed in fp32): TokenWindows' loss."""
    logits_BTV = model(input_ids=batch["input_ids"]).logits
    loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), batch["labels"].flatten())
    return loss, {"ce": loss.detach()}


def micro_batches(batches: BatchSource, epoch: int, step_in_epoch: int, *, batch_size: int, grad_accum: int,
                  rank: int, world_size: int) -> list[Batch]:
    """This rank's micro-batches of one optimizer step (the layout in the module docstring)."""
    base = step_in_epoch * batch_size * grad_accum * world_size
    starts = (base + (m * world_size + rank) * batch_size for m in range(grad_accum))
    return [batches.batch(epoch, np.arange(start, start + batch_size)) for start in starts]


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch on ``device``; on CUDA through pinned host memory, so the copies do not wait for the GPU."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
