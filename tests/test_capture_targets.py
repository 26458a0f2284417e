"""`sample_targets` ranks the draws without a pass over the vocabulary: the same ids, order and log-probabilities as
the dense ranking it replaced (``bench_capture_targets.dense_reference``), draw for draw, in every mode and corner."""

from __future__ import annotations

import pytest
import torch

from babydistill.pipeline.capture_targets import sample_targets
from babydistill.workflows.benchmarks.bench_capture_targets import dense_reference


@pytest.mark.parametrize("vocab, k, samples, sharpness", [
    (16_000, 32, 64, 3.0), (6_000, 8, 12, 1.0), (300, 8, 12, 6.0), (40, 8, 24, 0.5), (50, 0, 12, 2.0),
    (16_000, 0, 64, 8.0), (30, 0, 40, 0.2)])
def test_sparse_ranking_equals_the_dense_one(vocab, k, samples, sharpness):
    rows = 96
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(vocab + k)) * sharpness
    logits[:3, :] = -1e4  # rows whose every id outside the head underflows: drawn uniformly, weights padding
    logits[:3, :k] = 10.0
    logp = torch.log_softmax(logits, dim=-1)
    head = logp.topk(k, dim=-1).indices if k else None
    slots = k + min(samples, vocab - k)
    rounded = logp.half().float()  # draws from the teacher as stored, as a capture with tail_logp does
    for draw_logp in (None, rounded):
        got = sample_targets(logp, samples, slots, torch.Generator().manual_seed(7), head, draw_logp)
        want = dense_reference(logp, samples, slots, torch.Generator().manual_seed(7), head, draw_logp)
        assert torch.equal(got[0], want[0])
        assert torch.equal(got[1], want[1])


def test_a_drawn_head_id_never_takes_a_tail_slot():
    """The dense ranking masked head ids out of the tail; so does the sparse one, should a sampler ever return an
    id of probability 0 (a head id)."""
    from babydistill.pipeline.capture_targets import _ranked_draws

    ids, counts = _ranked_draws(torch.tensor([[0, 0, 5]]), torch.tensor([[0]]), 10, 3)
    assert ids.tolist() == [[5, 1, 2]] and counts.tolist() == [[1, 0, 0]]
