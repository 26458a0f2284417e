"""Hybrid targets at every captured temperature are unbiased: over many capture seeds (one row each, drawn by the
capture's own `sample_targets`), the mean tempered target and the mean loss gradient converge to the dense tempered
ones at T in {0.5, 1, 2, 4}, in every loss path (reference in float64, the torch rows, Triton through the
interpreter, the fused LM head), with and without the student's control variate. Tolerance: 5 standard errors of
the mean, from the per-seed spread (plus the float32 paths' rounding)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest  # noqa: E402
import torch  # noqa: E402

from babydistill.kernels import losses, targets  # noqa: E402
from babydistill.pipeline.capture_targets import sample_targets  # noqa: E402
from babydistill.pipeline.distill import control_coefficients  # noqa: E402
from babydistill.stores.logits import PAD_LOGP  # noqa: E402

try:
    import triton  # noqa: F401, E402
    HAVE_TRITON = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
except ImportError:
    HAVE_TRITON = False

V, K_HEAD, SAMPLES, HIDDEN = 64, 8, 12, 12
TEMPERATURES = (0.5, 1.0, 2.0, 4.0)
BETA = 0.6  # a control-variate coefficient fixed before the draws: any such keeps the target unbiased


def _teacher() -> torch.Tensor:
    """A teacher log-distribution [V] (float64) with a clear head and a tail every id of which is drawn often
    enough over the seeds for the per-seed spread to measure the standard error."""
    g = torch.Generator().manual_seed(3)
    z = 0.6 * torch.randn(V, generator=g, dtype=torch.float64)
    z[:K_HEAD] += torch.linspace(4.0, 1.5, K_HEAD, dtype=torch.float64)
    return torch.log_softmax(z, 0)


def _captured(seeds: int):
    """``seeds`` independent hybrid captures of the teacher (k exact ids + S draws from the tail, each with its
    exact log-probability ``tail_logp``), one per row: (ids, stored log-weights, tail_logp, teacher logp)."""
    logp = _teacher()
    rows = logp.expand(seeds, V).contiguous()
    head = logp.topk(K_HEAD).indices.expand(seeds, K_HEAD).contiguous()
    ids, stored = sample_targets(rows, SAMPLES, K_HEAD + SAMPLES, torch.Generator().manual_seed(11), head)
    real = stored[:, K_HEAD:] > PAD_LOGP / 2
    tail_logp = torch.where(real, rows.gather(1, ids[:, K_HEAD:]), PAD_LOGP)
    return ids, stored, tail_logp, logp


def _c_T(logp: torch.Tensor, T: float, seeds: int) -> torch.Tensor:
    """The capture's c_T = LSE(zbar / T) - LSE(zbar) / T (zbar = logp here), per row."""
    return (torch.logsumexp(logp / T, 0) - torch.logsumexp(logp, 0) / T).expand(seeds).clone()


def _student() -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [HIDDEN] and LM head [V, HIDDEN]: the student's logits are weight @ hidden (float64)."""
    g = torch.Generator().manual_seed(5)
    return torch.randn(HIDDEN, generator=g, dtype=torch.float64), torch.randn(V, HIDDEN, generator=g,
                                                                               dtype=torch.float64) * 0.5


def _fixed_control(stored: torch.Tensor, tail_logp: torch.Tensor) -> torch.Tensor:
    """a = beta on the head, beta w_j / p_j on the draws, 0 on padding (`pipeline.distill.control_coefficients`
    with a fixed beta)."""
    w, p = stored.exp(), tail_logp.exp()
    tail = torch.where(p > 0, w[:, K_HEAD:] / p.clamp_min(1e-300), 0.0)
    return BETA * torch.cat([torch.ones_like(w[:, :K_HEAD]), tail], 1)


def _assert_unbiased(per_seed: torch.Tensor, dense: torch.Tensor, rounding: float, what: str) -> None:
    """The mean over seeds (rows) within 5 standard errors (per-seed spread) + ``rounding`` of ``dense``."""
    mean = per_seed.mean(0)
    se = per_seed.std(0) / per_seed.shape[0] ** 0.5
    excess = (mean - dense).abs() - (5 * se + rounding)
    worst = int(excess.argmax())
    assert excess.max() <= 0, (f"{what}: entry {worst} mean {float(mean[worst]):.6g} vs dense "
                               f"{float(dense[worst]):.6g} (se {float(se[worst]):.3g})")


@pytest.mark.parametrize("T", TEMPERATURES)
def test_the_stored_tempered_target_is_unbiased(T):
    ids, stored, tail_logp, logp = _captured(4000)
    slot_logp = torch.cat([stored[:, :K_HEAD], tail_logp], 1)
    t = targets.tempered_slot_logp(stored, slot_logp, T, _c_T(logp, T, len(ids))).exp()
    per_seed = torch.zeros(len(ids), V, dtype=torch.float64).scatter_add_(1, ids, t)
    _assert_unbiased(per_seed, torch.softmax(logp / T, 0), 1e-12, f"target at T = {T}")
    head = per_seed[:, ids[0, :K_HEAD]]
    assert torch.allclose(head, torch.softmax(logp / T, 0)[ids[0, :K_HEAD]].expand_as(head), rtol=1e-12)


IMPLS = ["reference", "torch", pytest.param("triton", marks=pytest.mark.skipif(
    not HAVE_TRITON, reason="needs triton with TRITON_INTERPRET=1 (CPU) or a GPU"))]


@pytest.mark.parametrize("controlled", [False, True])
@pytest.mark.parametrize("T", TEMPERATURES)
@pytest.mark.parametrize("impl", IMPLS)
def test_the_loss_gradient_is_unbiased_in_every_row_path(impl, T, controlled):
    """Per seed, d(T^2 KL)/dz of one row; its mean over seeds against the dense T (softmax(z/T) - p_T)."""
    seeds = 250 if impl == "triton" else 3000   # the interpreter runs a program per row
    ids, stored, tail_logp, logp = _captured(seeds)
    hidden, weight = _student()
    dtype = torch.float64 if impl == "reference" else torch.float32
    z = (weight @ hidden).expand(seeds, V).to(dtype).clone().requires_grad_(True)
    loss, _, _ = losses.sparse_distill_loss(
        z, torch.zeros(seeds, dtype=torch.int64), ids, stored.to(dtype), alpha=0.0, temperature=T, tail="renorm",
        normalization="sum", c_T=_c_T(logp, T, seeds).to(dtype), impl=impl,
        slot_logp=torch.cat([stored[:, :K_HEAD], tail_logp], 1).to(dtype),
        control=_fixed_control(stored, tail_logp).to(dtype) if controlled else None)
    loss.backward()
    dense = T * (torch.softmax(weight @ hidden / T, 0) - torch.softmax(logp / T, 0))
    _assert_unbiased(z.grad.double(), dense, 1e-12 if impl == "reference" else 3e-6, f"{impl} gradient at T = {T}")


@pytest.mark.parametrize("T", TEMPERATURES)
def test_the_fused_linear_gradient_is_unbiased_with_the_trainers_control_variate(T):
    """The fused LM head with the trainer's own coefficients (`control_coefficients` at T: beta estimated on the
    other half's rows): the mean hidden-state gradient against the dense T (softmax(Wh/T) - p_T) @ W."""
    seeds = 3000
    ids, stored, tail_logp, logp = _captured(seeds)
    hidden, weight = _student()
    h = hidden.float().expand(seeds, HIDDEN).clone().requires_grad_(True)
    W = weight.float().requires_grad_(True)
    c_T = _c_T(logp, T, seeds).float()
    control, beta = control_coefficients(h.detach(), W.detach(), ids, stored.float(), tail_logp.float(), K_HEAD,
                                         temperature=T, c_T=c_T)
    assert 0 < float(beta) <= 1
    loss, _, _ = losses.fused_linear_sparse_distill_loss(
        h, W, torch.zeros(seeds, dtype=torch.int64), ids, stored.float(), alpha=0.0, temperature=T, tail="renorm",
        normalization="sum", c_T=c_T, slot_logp=torch.cat([stored[:, :K_HEAD], tail_logp], 1).float(),
        control=control, impl="torch", chunk_rows=512)
    loss.backward()
    dense = T * (torch.softmax(weight @ hidden / T, 0) - torch.softmax(logp / T, 0)) @ weight
    _assert_unbiased(h.grad.double(), dense, 3e-6, f"fused-linear hidden gradient at T = {T}")


def test_a_tempered_sampled_target_needs_c_T_and_the_renorm_tail():
    ids, stored, tail_logp, _ = _captured(4)
    z = torch.zeros(4, V)
    with pytest.raises(ValueError, match="slot_logp .* needs tail='renorm' and the exact c_T"):
        losses.sparse_distill_loss(z, torch.zeros(4, dtype=torch.int64), ids, stored.float(), temperature=2.0,
                                   tail="renorm", slot_logp=torch.cat([stored[:, :K_HEAD], tail_logp], 1).float())
