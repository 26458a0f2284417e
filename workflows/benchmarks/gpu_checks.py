"""Correctness of the compiled Triton kernel on a device, against the float64 reference (`bench gpu`'s first part).

The grid: every tail mode x target mode (top-k with exact c_T; sampled; hybrid with the control variate) x
dtype (fp32, bf16, fp16) x temperature (1, 2) x alpha (0, 0.5, 1) x normalisation (token, sequence), and the
fused-linear path per dtype and target mode. The tolerances are the CPU tests' (tests/test_kernels.py):
fp32 within atol 1e-5 / rtol 1e-4 of float64 for loss, CE, KL and every gradient entry; bf16 and fp16 no worse
than the dense reference computed in that dtype, plus atol (1e-2 bf16, 1e-3 fp16) times the value's scale.
On the CPU (the plan test) the same grid runs through the Triton interpreter at tiny sizes.
"""

from __future__ import annotations

import itertools

import torch

from babydistill.kernels import losses

TAILS = ("bucket", "renorm", "uniform")
TARGETS = ("topk", "sample", "hybrid_cv")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEMPERATURES = (1.0, 2.0)
ALPHAS = (0.0, 0.5, 1.0)
NORMALIZATIONS = ("token", "sequence")
# atol, rtol of tests/test_kernels.py (_DTYPE_PARAMS)
TOLERANCES = {"fp32": (1e-5, 1e-4), "bf16": (1e-2, 5e-2), "fp16": (1e-3, 1e-2)}


def make_case(N: int, V: int, k: int, target: str, T: float, seed: int = 0):
    """Student logits (float64) near a random teacher, labels (one ignored), sparse targets of ``target`` mode
    (float64 logp), c_T (top-k only) and control coefficients (hybrid_cv only)."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    z = teacher + torch.randn(N, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[N // 2] = -100
    teacher_logp = torch.log_softmax(teacher, 1)
    c_T, control = None, None
    if target == "topk":
        ids = teacher_logp.topk(k, 1).indices
        logp = teacher_logp.gather(1, ids)
        c_T = torch.logsumexp(teacher / T, 1) - torch.logsumexp(teacher, 1) / T
    elif target == "sample":  # k distinct ids drawn from the teacher, weights summing to 1
        ids = torch.multinomial(teacher_logp.exp(), k, replacement=False, generator=g)
        weights = torch.rand(N, k, generator=g, dtype=torch.float64) + 0.1
        logp = (weights / weights.sum(1, keepdim=True)).log()
    else:  # hybrid: the top half exactly, draws from the rest carrying the tail's mass, a control variate
        head = k // 2
        top = teacher_logp.topk(head, 1).indices
        tail = torch.multinomial(teacher_logp.exp().scatter(1, top, 0.0), k - head, replacement=False, generator=g)
        r = 1 - teacher_logp.gather(1, top).exp().sum(1, keepdim=True)
        weights = torch.rand(N, k - head, generator=g, dtype=torch.float64) + 0.1
        ids = torch.cat([top, tail], 1)
        logp = torch.cat([teacher_logp.gather(1, top), (r * weights / weights.sum(1, keepdim=True)).log()], 1)
        control = torch.rand(ids.shape, generator=g, dtype=torch.float64) * 3
    return z, labels, ids, logp, c_T, control


def _run(z, labels, ids, logp, c_T, control, impl, dtype, **kw):
    """(loss, ce, kl, grad) of one implementation in ``dtype`` (float64 for the exact reference)."""
    def cast(x):
        if x is None:
            return None
        return x.to(z.device) if dtype == torch.float64 else x.to(z.device, torch.float32)
    z = z.to(dtype).detach().clone().requires_grad_()
    loss, ce, kl = losses.sparse_distill_loss(z, labels.to(z.device), ids.to(z.device), cast(logp), c_T=cast(c_T),
                                              control=cast(control), impl=impl, **kw)
    loss.backward()
    return [loss.detach().double().cpu(), ce.double().cpu(), kl.double().cpu(), z.grad.double().cpu()]


def _compare(actual, exact, dense, dtype_name: str) -> float:
    """The worst excess over the tolerance (<= 0: within it); ``dense`` is the reference in the low precision."""
    atol, rtol = TOLERANCES[dtype_name]
    worst = float("-inf")
    for i, (a, e) in enumerate(zip(actual, exact)):
        if not torch.isfinite(a).all():
            return float("inf")
        if dense is None:  # fp32: allclose per entry
            excess = ((a - e).abs() - (atol + rtol * e.abs())).max().item()
        else:
            err, dense_err = (a - e).abs().max().item(), (dense[i] - e).abs().max().item()
            excess = err - (dense_err + atol * max(1.0, e.abs().max().item()))
        worst = max(worst, excess)
    return worst


def check_case(device: str, N: int, V: int, k: int, target: str, dtype_name: str, T: float, alpha: float,
               tail: str, normalization: str) -> dict:
    """One grid point: the Triton kernel on ``device`` against float64 (and the dense low-precision reference)."""
    z, labels, ids, logp, c_T, control = make_case(N, V, k, target, T)
    kw = dict(alpha=alpha, temperature=T, tail=tail, normalization=normalization,
              num_sequences=2 if normalization == "sequence" else None)
    dtype = DTYPES[dtype_name]
    exact = _run(z, labels, ids, logp, c_T, control, "reference", torch.float64, **kw)
    actual = _run(z.to(device), labels, ids, logp, c_T, control, "triton", dtype, **kw)
    dense = None if dtype_name == "fp32" else _run(z.to(device), labels, ids, logp, c_T, control, "reference",
                                                   dtype, **kw)
    excess = _compare(actual, exact, dense, dtype_name)
    return {"target": target, "dtype": dtype_name, "T": T, "alpha": alpha, "tail": tail,
            "normalization": normalization, "excess": excess, "ok": excess <= 0}


def check_fused_linear(device: str, N: int, H: int, V: int, k: int, target: str, dtype_name: str) -> dict:
    """The fused-linear path (hidden @ W^T never materialised) on ``device`` against the float64 reference."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
    _, labels, ids, logp, _, control = make_case(N, V, k, target, 1.0, seed=4)
    dtype = DTYPES[dtype_name]
    results = []
    for impl, where, dt in (("reference", "cpu", torch.float64), ("triton", device, dtype),
                            ("reference", device, dtype)):
        h = hidden.to(where, dt).clone().requires_grad_()
        w = weight.to(where, dt).clone().requires_grad_()
        lp = logp.to(where, torch.float64 if dt == torch.float64 else torch.float32)
        c = None if control is None else control.to(where, lp.dtype)
        loss, ce, kl = losses.fused_linear_sparse_distill_loss(
            h, w, labels.to(where), ids.to(where), lp, tail="renorm" if target != "topk" else "bucket",
            impl=impl, control=c, **({"chunk_rows": max(1, N // 3)} if impl == "triton" else {}))
        loss.backward()
        results.append([x.detach().double().cpu() for x in (loss, ce, kl, h.grad, w.grad)])
    exact, actual, dense = results
    excess = _compare(actual, exact, None if dtype_name == "fp32" else dense, dtype_name)
    return {"path": "fused_linear", "target": target, "dtype": dtype_name, "excess": excess, "ok": excess <= 0}


def run_checks(device: str, N: int, V: int, k: int, H: int, progress=None) -> dict:
    """Every grid point and the fused-linear cases; ``progress(n)`` is called after each."""
    grid = list(itertools.product(TARGETS, DTYPES, TEMPERATURES, ALPHAS, TAILS, NORMALIZATIONS))
    rows = []
    for target, dtype_name, T, alpha, tail, normalization in grid:
        rows.append(check_case(device, N, V, k, target, dtype_name, T, alpha, tail, normalization))
        if progress:
            progress(1)
    for target, dtype_name in itertools.product(TARGETS, DTYPES):
        rows.append(check_fused_linear(device, N, H, V, k, target, dtype_name))
        if progress:
            progress(1)
    failed = [r for r in rows if not r["ok"]]
    return {"cases": len(rows), "failed": len(failed), "failures": failed[:20],
            "worst_excess": max(r["excess"] for r in rows), "shape": {"N": N, "V": V, "k": k, "H": H}}


def num_checks() -> int:
    return (len(TARGETS) * len(DTYPES) * len(TEMPERATURES) * len(ALPHAS) * len(TAILS) * len(NORMALIZATIONS)
            + len(TARGETS) * len(DTYPES))
