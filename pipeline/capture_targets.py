"""What the store keeps of one position: the ensemble's log-probabilities and the sparse target drawn from
them (top k, draws, or the head plus tail draws; see stores/logits.py for the schema)."""

from __future__ import annotations

import math

import numpy as np
import torch

from babydistill.pipeline.model import ensemble_logits
from babydistill.stores.logits import (
    PAD_LOGP,
)


def ensemble_logp(logits: list[torch.Tensor], rule: str) -> torch.Tensor:
    """log-softmax of the ensemble (see ``ensemble_logits``)."""
    return torch.log_softmax(ensemble_logits(logits, rule), dim=-1)


def sample_targets(logp_NV: torch.Tensor, samples: int, slots: int, generator: torch.Generator,
                   head_ids: torch.Tensor | None = None, draw_logp: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled sparse targets per row: (ids [N, slots] int64, logp [N, slots] float64).

    Mode sample (``head_ids`` None): ``samples`` draws from each row's distribution; the distinct ids
    by decreasing count (ties: smaller id first), ``logp = log(count / samples)``.
    Mode hybrid (``head_ids`` [N, k]): those ids first with their exact log-probabilities, then
    ``samples`` draws from the rest of the distribution renormalised, ``logp = log(r * count / samples)``
    with r the mass outside the head: E[weight of a tail id j] = p_j, so the target is unbiased.
    r is the sum of the tail's own probabilities (a log-sum-exp over the tail of the unrounded ``logp_NV``),
    never 1 - the head's: that difference cancels, and from float16-rounded head values it put the head's
    rounding error into the tail (34x the true tail mass of a confident row).
    ``draw_logp`` (default ``logp_NV``): the distribution the draws come from, e.g. the teacher as stored
    (rounded) when the store keeps each draw's probability; the head and r always come from ``logp_NV``.
    Free slots get the smallest ids used nowhere else in the row and ``PAD_LOGP`` (see stores/logits.py).
    """
    num_rows, vocab = logp_NV.shape
    probs = (logp_NV if draw_logp is None else draw_logp).exp()
    head = None
    if head_ids is not None:
        head = torch.zeros(num_rows, vocab, dtype=torch.bool, device=logp_NV.device).scatter_(1, head_ids, True)
        probs = probs.masked_fill(head, 0.0)
        # A row whose tail underflowed to 0 draws uniformly; its weights are 0 (r = 0) and become padding.
        empty = probs.sum(1) == 0
        if probs.device.type != "cpu":  # no host sync per batch on a GPU, where a pass over the rows is cheap
            probs = torch.where(empty[:, None], (~head).to(probs.dtype), probs)
        elif empty.any():
            probs[empty] = (~head[empty]).to(probs.dtype)
    draws = torch.multinomial(probs, samples, replacement=True, generator=generator)
    free = slots - (0 if head_ids is None else head_ids.shape[1])
    ids, counts = _ranked_draws(draws, head_ids, vocab, free)
    picked = counts.double()
    if head is None:
        return ids, torch.where(picked > 0, torch.log(picked / samples), torch.full_like(picked, PAD_LOGP))
    head_logp = logp_NV.gather(1, head_ids).double()
    log_r = torch.logsumexp(logp_NV.masked_fill(head, -math.inf), dim=1, keepdim=True).double()
    tail_logp = log_r + torch.log(picked / samples)
    tail_logp = torch.where((picked > 0) & (log_r > -math.inf), tail_logp, torch.full_like(tail_logp, PAD_LOGP))
    return torch.cat([head_ids, ids], dim=1), torch.cat([head_logp, tail_logp], dim=1)


def _ranked_draws(draws: torch.Tensor, head_ids: torch.Tensor | None, vocab: int, free: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``free`` slots of each row: its distinct drawn ids by decreasing count (ties: smaller id first), then the
    smallest ids neither drawn nor in the head, with their counts (0 for those): (ids int64, counts int64).

    The rank key is count * (V + 1) + (V - id), as over the whole vocabulary, but only over what can win: the
    distinct draws and the ``free + k + samples`` smallest ids (at least ``free`` of them unused). So no pass
    over V: at V = 16,000 the dense ranking was most of a capture's CPU time."""
    num_rows, samples = draws.shape
    k = 0 if head_ids is None else head_ids.shape[1]
    ranked = draws.sort(dim=1).values
    first = torch.ones_like(ranked, dtype=torch.bool)
    first[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
    counts = torch.searchsorted(ranked, ranked, right=True) - torch.searchsorted(ranked, ranked)
    if head_ids is not None:  # a head id is never a tail slot, even if a zero-probability id were ever drawn
        first &= ~(ranked[:, :, None] == head_ids[:, None, :]).any(-1)
    drawn_key = torch.where(first, counts * (vocab + 1) + (vocab - ranked), torch.full_like(ranked, -2))
    smallest = min(vocab, free + k + samples)
    used = torch.zeros(num_rows, smallest + 1, dtype=torch.bool, device=draws.device)
    used.scatter_(1, ranked.clamp(max=smallest), True)
    if head_ids is not None:
        used.scatter_(1, head_ids.clamp(max=smallest), True)
    candidates = torch.arange(smallest, device=draws.device).expand(num_rows, smallest)
    spare_key = torch.where(used[:, :smallest], torch.full_like(candidates, -1), vocab - candidates)
    order = torch.cat([drawn_key, spare_key], dim=1).topk(free, dim=1).indices
    ids = torch.cat([ranked, candidates], dim=1).gather(1, order)
    return ids, torch.cat([counts, torch.zeros_like(candidates)], dim=1).gather(1, order)


def stored_target(ids: np.ndarray, stored: np.ndarray, vocab: int, mode: str) -> np.ndarray:
    """The dense target [V] a student at the uniform reference point is pulled towards (float64).

    At a uniform student the gradient of the KL w.r.t. its logits is ``1/V - target``: bucket and uniform
    tails then both put the residual evenly on the tail; sample and hybrid weights are renormalised
    (their float16 rounding is all the residual they have), as the student stage does.
    """
    real = stored > PAD_LOGP / 2
    ids, q = ids[real], np.exp(stored[real].astype(np.float64))
    target = np.zeros(vocab)
    if mode == "topk":
        target[:] = max(1.0 - q.sum(), 0.0) / max(1, vocab - len(ids))
        target[ids] = q
    else:
        target[ids] = q / q.sum()
    return target
