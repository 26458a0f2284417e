"""The sparse-distillation loss kernels against the float64 dense reference (CPU path, and the Triton
kernel through the interpreter at small sizes)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from babydistill.kernels import losses, reference, targets, torch_rows  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
try:
    import triton  # noqa: F401, E402
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

# (N, V): an odd shape (V not a multiple of any block), and a small one for k = V through the interpreter.
_SHAPE_PARAMS = [(41, 1271), (9, 300)]
# dtype, atol, rtol (against the float64 reference; bf16 is judged against the dense bf16 error instead)
_DTYPE_PARAMS = [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 1e-2, 5e-2), (torch.float16, 1e-3, 1e-2)]
# dtype, atol, rtol per gradient entry against float64 on the same (rounded) inputs: one rounding of an
# fp32 result (unit roundoff 2^-8 for bf16, 2^-11 for fp16) and a little; atol covers fp16 subnormals.
_ENTRY_PARAMS = [(torch.bfloat16, 1e-30, 1e-2), (torch.float16, 1e-7, 2e-3)]
_IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not HAVE_TRITON or (not INTERPRETED and not torch.cuda.is_available()),
    reason="needs triton with TRITON_INTERPRET=1 (CPU) or a GPU"))]


@pytest.fixture(autouse=True)
def _small_triton_blocks(monkeypatch):
    """Several vocabulary blocks per row and a partial last one, at test sizes."""
    if HAVE_TRITON:
        from babydistill.kernels import triton_kernel
        monkeypatch.setattr(triton_kernel, "BLOCK_V", 512)
        monkeypatch.setattr(triton_kernel, "BLOCK_K", 16)
    warnings.filterwarnings("ignore", message="invalid value encountered", category=RuntimeWarning)
    # Tiny tensors: one thread avoids OpenMP spin-waits when the machine is busy.
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


def assert_verbose_allclose(actual, expected, atol, rtol, name="tensor", max_print=5):
    """assert_close that reports how many elements mismatch, the worst ones, and NaN / inf mismatches."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    problems = []
    nan_mismatch = torch.isnan(actual) != torch.isnan(expected)
    if nan_mismatch.any():
        problems.append(f"{int(nan_mismatch.sum())} NaN mismatches")
    inf_mismatch = torch.isinf(actual) != torch.isinf(expected)
    if inf_mismatch.any():
        problems.append(f"{int(inf_mismatch.sum())} inf mismatches")
    finite = torch.isfinite(actual) & torch.isfinite(expected)
    diff = torch.where(finite, (actual - expected).abs(), 0)
    bad = finite & (diff > atol + rtol * expected.abs())
    if bad.any():
        excess = torch.where(bad, diff - rtol * expected.abs(), float("-inf")).flatten()
        worst = excess.topk(min(max_print, int(bad.sum()))).indices
        lines = [f"  at {tuple(int(i) for i in torch.unravel_index(w, actual.shape))}: "
                 f"actual {actual.flatten()[w].item():.8g}, expected {expected.flatten()[w].item():.8g}"
                 for w in worst]
        problems.append(f"{int(bad.sum())} / {actual.numel()} elements differ beyond atol={atol} rtol={rtol} "
                        f"(max abs diff {diff.max().item():.3g}); worst:\n" + "\n".join(lines))
    assert not problems, f"{name}: " + "; ".join(problems)


def make_inputs(N, V, k, *, seed=0, dtype=torch.float32, T=1.0, ignored=(3,), confident=False, sampled=False,
                hybrid=False):
    """Student logits, labels, a top-k teacher target (ids, T = 1 log-probs) and the exact c_T."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (N,), generator=g)
    for i in ignored:
        if i < N:
            labels[i] = -100
    teacher_logp = torch.log_softmax(teacher, 1)
    ids = teacher_logp.topk(k, dim=1).indices
    if confident:  # the student is sure of one token: in K on even rows, outside K on odd rows
        for i in range(N):
            j = int(ids[i, 0]) if i % 2 == 0 else int(teacher_logp[i].argsort()[0])
            z[i, j] += 40.0
    logp = teacher_logp.gather(1, ids)
    c_T = torch.logsumexp(teacher / T, 1) - torch.logsumexp(teacher, 1) / T
    if hybrid:  # the top k // 2 exact, then k - k // 2 distinct tail ids sharing the tail mass r
        head = k // 2
        tail_p = teacher_logp.exp().scatter(1, ids[:, :head], 0.0)
        tail_ids = torch.multinomial(tail_p, k - head, replacement=False, generator=g)
        r = 1 - teacher_logp.gather(1, ids[:, :head]).exp().sum(1, keepdim=True)
        weights = torch.rand(N, k - head, generator=g, dtype=torch.float64) + 0.1
        ids = torch.cat([ids[:, :head], tail_ids], 1)
        logp = torch.cat([logp[:, :head], (r * weights / weights.sum(1, keepdim=True)).log()], 1)
        c_T = None
    if sampled:  # k distinct ids drawn from the teacher, with weights summing to 1
        ids = torch.multinomial(teacher_logp.exp(), k, replacement=False, generator=g)
        weights = torch.rand(N, k, generator=g, dtype=torch.float64) + 0.1
        logp = (weights / weights.sum(1, keepdim=True)).log()
        c_T = None
    return z.to(dtype), labels, ids, logp, c_T


def run(impl, z, labels, ids, logp, grad_scale=1.0, **kw):
    """Loss, ce, kl and the logits gradient of one implementation ("reference" runs in z's dtype)."""
    z = z.detach().clone().requires_grad_()
    loss, ce, kl = losses.sparse_distill_loss(z, labels, ids, logp, impl=impl, **kw)
    (loss * grad_scale).backward()
    return loss.detach(), ce, kl, z.grad


def check_against_reference(impl, z, labels, ids, logp, atol=1e-5, rtol=1e-4, **kw):
    c_T = kw.get("c_T")
    kw64 = dict(kw, c_T=None if c_T is None else c_T.double())
    kw32 = dict(kw, c_T=None if c_T is None else c_T.float())
    expected = run("reference", z.double(), labels, ids, logp.double(), **kw64)
    actual = run(impl, z, labels, ids, logp.float(), **kw32)
    for name, a, e in zip(["loss", "ce", "kl", "grad"], actual, expected):
        assert_verbose_allclose(a, e, atol, rtol, name=f"{impl} {name}")
    return actual, expected


# --- against the reference: k, tail, temperature, c_T


def _core_cases():
    cases = []
    for impl in ["torch", "triton"]:
        for tail in reference.TAILS:
            for k in ["1", "8", "V"]:
                for T in [1.0, 2.0, 4.0]:
                    for with_cT in [False, True]:
                        if impl == "triton" and (T == 4.0 or (k == "V" and (with_cT or T != 2.0))):
                            continue  # the interpreter is slow: T = 4 and k = V are covered on the CPU path
                        cases.append((impl, tail, k, T, with_cT))
    return cases


@pytest.mark.parametrize("impl,tail,k,T,with_cT", [
    pytest.param(*c, marks=_IMPLS[1].marks if c[0] == "triton" else ()) for c in _core_cases()])
def test_against_reference(impl, tail, k, T, with_cT):
    N, V = _SHAPE_PARAMS[1] if k == "V" else _SHAPE_PARAMS[0]
    k = V if k == "V" else int(k)
    z, labels, ids, logp, c_T = make_inputs(N, V, k, T=T)
    check_against_reference(impl, z, labels, ids, logp, alpha=0.5, temperature=T, tail=tail,
                            c_T=c_T if with_cT else None)


@pytest.mark.parametrize("impl", _IMPLS)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("normalization", reference.NORMALIZATIONS)
def test_alpha_and_normalization(impl, alpha, normalization):
    z, labels, ids, logp, c_T = make_inputs(*_SHAPE_PARAMS[0], 8, T=2.0, ignored=(0, 5, 6))
    check_against_reference(impl, z, labels, ids, logp, alpha=alpha, temperature=2.0, tail="bucket", c_T=c_T,
                            normalization=normalization, num_sequences=3)


def test_normalization_definitions():
    z, labels, ids, logp, _ = make_inputs(12, 50, 4, ignored=(1, 2))
    _, ce_t, kl_t = losses.sparse_distill_loss(z, labels, ids, logp, impl="torch")
    _, ce_s, kl_s = losses.sparse_distill_loss(z, labels, ids, logp, impl="torch", normalization="sequence",
                                                num_sequences=3)
    _, ce_u, kl_u = losses.sparse_distill_loss(z, labels, ids, logp, impl="torch", normalization="sum")
    torch.testing.assert_close(ce_s, ce_t)                 # CE per token in both
    torch.testing.assert_close(kl_s, kl_u / 3)             # KL summed / num_sequences
    torch.testing.assert_close(kl_t, kl_u / 10)            # 10 counted rows
    torch.testing.assert_close(ce_t, ce_u / 10)


# --- edge cases


@pytest.mark.parametrize("impl", _IMPLS)
def test_ignored_rows_have_no_effect(impl):
    z, labels, ids, logp, _ = make_inputs(16, 200, 8, ignored=(2, 7, 8))
    loss, ce, kl, grad = run(impl, z, labels, ids, logp)
    assert grad[[2, 7, 8]].abs().max() == 0
    keep = [i for i in range(16) if i not in (2, 7, 8)]
    loss2, ce2, kl2, _ = run(impl, z[keep], labels[keep], ids[keep], logp[keep])
    torch.testing.assert_close(loss, loss2)
    check_against_reference(impl, z, labels, ids, logp, temperature=2.0, tail="uniform")


@pytest.mark.parametrize("impl", _IMPLS)
@pytest.mark.parametrize("normalization", reference.NORMALIZATIONS)
def test_all_ignored_batch(impl, normalization):
    z, labels, ids, logp, _ = make_inputs(6, 100, 4)
    labels[:] = -100
    loss, ce, kl, grad = run(impl, z, labels, ids, logp, normalization=normalization, num_sequences=2)
    assert loss.item() == 0 and ce.item() == 0 and kl.item() == 0
    assert torch.isfinite(grad).all() and grad.abs().max() == 0


@pytest.mark.parametrize("impl", _IMPLS)
def test_grad_output_not_one(impl):
    """Not the last op of the graph: the gradient is scaled by grad_output."""
    z, labels, ids, logp, c_T = make_inputs(*_SHAPE_PARAMS[0], 8, T=2.0)
    kw = dict(alpha=0.3, temperature=2.0, tail="bucket")
    expected = run("reference", z.double(), labels, ids, logp, grad_scale=-2.5, c_T=c_T, **kw)
    actual = run(impl, z, labels, ids, logp.float(), grad_scale=-2.5, c_T=c_T.float(), **kw)
    assert_verbose_allclose(actual[3], expected[3], 1e-5, 1e-4, name="grad")


@pytest.mark.parametrize("impl", _IMPLS)
@pytest.mark.parametrize("tail", reference.TAILS)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_confident_rows(impl, tail, T):
    """One logit 40 above the rest (in K or not): the student's tail mass is tiny, no cancellation."""
    z, labels, ids, logp, c_T = make_inputs(*_SHAPE_PARAMS[0], 8, T=T, confident=True)
    check_against_reference(impl, z, labels, ids, logp, temperature=T, tail=tail, c_T=c_T)


@pytest.mark.parametrize("impl", _IMPLS)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_sampled_targets_all_tails_coincide(impl, T):
    z, labels, ids, logp, _ = make_inputs(*_SHAPE_PARAMS[0], 8, sampled=True)
    results = [check_against_reference(impl, z, labels, ids, logp, temperature=T, tail=tail)[0]
               for tail in reference.TAILS]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", _IMPLS)
@pytest.mark.parametrize("tail", reference.TAILS)
def test_hybrid_targets_against_reference(impl, tail):
    """Exact head plus weighted tail draws: a complete distribution, the same in every path and tail mode."""
    z, labels, ids, logp, _ = make_inputs(*_SHAPE_PARAMS[0], 8, hybrid=True)
    actual, _ = check_against_reference(impl, z, labels, ids, logp, alpha=0.3, tail=tail)
    renorm, _ = check_against_reference(impl, z, labels, ids, logp, alpha=0.3, tail="renorm")
    for a, b in zip(actual, renorm):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("T", [0.5, 2.0, 3.0])
def test_tail_without_c_T_is_continuous_in_the_residual(T):
    """Without c_T the first RESIDUAL_EPS of the residual is rounding, removed continuously: no jump."""
    V, k = 16000, 4
    ids = torch.arange(k)[None, :]
    tails = []
    # 2.01e-5 is what a cut-off at RESIDUAL_EPS made of 1.01e-5 (0.072 at T = 2, a jump from 0 at 0.99e-5).
    for residual in (reference.RESIDUAL_EPS * 0.99, reference.RESIDUAL_EPS * 1.01, 2.01e-5, 1e-4):
        logp = torch.full((1, k), (1 - residual) / k, dtype=torch.float64).log()
        _, _, r_T, _ = targets.prepare_targets(ids, logp, V, T, "bucket")
        tails.append(r_T.item())
    assert tails[0] == 0.0 and tails == sorted(tails), tails  # more residual, more tail
    if T == 2.0:  # r^(1/T) is steep near 0, but it starts from 0 instead of jumping
        assert tails[1] < tails[2] / 2, tails


@pytest.mark.parametrize("impl", _IMPLS)
def test_padding_entries_have_no_effect(impl):
    """Entries with target_logp = -inf (repeating an id of the row) change nothing."""
    z, labels, ids, logp, c_T = make_inputs(20, 150, 6, T=2.0)
    ids_pad = torch.cat([ids, ids[:, :2]], 1)
    logp_pad = torch.cat([logp, torch.full((20, 2), float("-inf"), dtype=logp.dtype)], 1)
    for tail in reference.TAILS:
        kw = dict(temperature=2.0, tail=tail)
        expected = run(impl, z, labels, ids, logp.float(), **kw)
        actual = run(impl, z, labels, ids_pad, logp_pad.float(), **kw)
        for name, a, e in zip(["loss", "ce", "kl", "grad"], actual, expected):
            assert_verbose_allclose(a, e, 1e-6, 1e-5, name=f"padded {tail} {name}")
        check_against_reference(impl, z, labels, ids_pad, logp_pad, **kw)


@pytest.mark.parametrize("impl", _IMPLS)
@pytest.mark.parametrize("dtype,atol,rtol", _DTYPE_PARAMS)
def test_dtypes(impl, dtype, atol, rtol):
    """fp32 against the float64 reference; bf16 no worse than the dense bf16 computation (plus a little)."""
    z, labels, ids, logp, c_T = make_inputs(*_SHAPE_PARAMS[0], 8, T=2.0, dtype=dtype)
    kw = dict(alpha=0.5, temperature=2.0, tail="bucket")
    exact = run("reference", z.double(), labels, ids, logp.double(), c_T=c_T, **kw)
    actual = run(impl, z, labels, ids, logp.float(), c_T=c_T.float(), **kw)
    assert actual[3].dtype == dtype
    if dtype == torch.float32:
        for name, a, e in zip(["loss", "ce", "kl", "grad"], actual, exact):
            assert_verbose_allclose(a, e, atol, rtol, name=name)
        return
    dense = run("reference", z, labels, ids, logp.to(dtype), c_T=c_T.to(dtype), **kw)
    for name, a, d, e in zip(["loss", "ce", "kl", "grad"], actual, dense, exact):
        err = (a.double() - e).abs().max().item()
        dense_err = (d.double() - e).abs().max().item()
        assert err <= dense_err + atol * max(1.0, e.abs().max().item()), \
            f"bf16 {name}: error {err:.3g} > dense bf16 error {dense_err:.3g} + tolerance"


@pytest.mark.parametrize("impl", _IMPLS)
@pytest.mark.parametrize("dtype,atol,rtol", _ENTRY_PARAMS)
@pytest.mark.parametrize("alpha,T", [(0.0, 1.0), (0.0, 2.0), (0.5, 1.0)])
def test_low_precision_gradient_entries_are_rounded_once(impl, dtype, atol, rtol, alpha, T):
    """Student near the teacher: the stored ids' entries are small differences of near-equal terms; each
    gradient entry must be the float64 value on the same inputs, rounded once (per-entry tolerance)."""
    N, V, k = _SHAPE_PARAMS[0][0], _SHAPE_PARAMS[0][1], 8
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    z = (teacher + 0.05 * torch.randn(N, V, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[3] = -100
    teacher_logp = torch.log_softmax(teacher, 1)
    ids = teacher_logp.topk(k, dim=1).indices
    logp = teacher_logp.gather(1, ids).float()
    c_T = (torch.logsumexp(teacher / T, 1) - torch.logsumexp(teacher, 1) / T).float()
    kw = dict(alpha=alpha, temperature=T, tail="bucket")
    exact = run("reference", z.double(), labels, ids, logp.double(), c_T=c_T.double(), **kw)
    actual = run(impl, z, labels, ids, logp, c_T=c_T, **kw)
    assert actual[3].dtype == dtype
    assert_verbose_allclose(actual[0], exact[0], 1e-6, 1e-5, name="loss")  # fp32 sums of terms of size ~1
    assert_verbose_allclose(actual[3], exact[3], atol, rtol, name=f"{dtype} grad")


@pytest.mark.parametrize("impl", _IMPLS + ["reference"])
def test_out_of_range_labels_and_ids_are_refused_naming_the_value(impl):
    z, labels, ids, logp, _ = make_inputs(10, 120, 5)
    bad_labels = labels.clone()
    bad_labels[4] = 120
    with pytest.raises(ValueError, match=r"labels\[4\] = 120 is outside \[0, V = 120\) and is not "
                                         r"ignore_index = -100") as err:
        losses.sparse_distill_loss(z, bad_labels, ids, logp.float(), impl=impl)
    assert "\n" not in str(err.value)
    bad_labels[4] = -1
    with pytest.raises(ValueError, match=r"labels\[4\] = -1 is outside"):
        losses.sparse_distill_loss(z, bad_labels, ids, logp.float(), impl=impl)
    bad_ids = ids.clone()
    bad_ids[7, 2] = 5000
    with pytest.raises(ValueError, match=r"target_ids\[7, 2\] = 5000 is outside \[0, V = 120\)"):
        losses.sparse_distill_loss(z, labels, bad_ids, logp.float(), impl=impl)
    with pytest.raises(ValueError, match=r"target_ids\[7, 2\] = 5000 is outside"):
        losses.fused_linear_sparse_distill_loss(torch.randn(10, 16), torch.randn(120, 16), labels, bad_ids,
                                                 logp.float(), impl=impl)
    with pytest.raises(ValueError, match=r"labels\[4\] = -1 is outside"):
        losses.dense_distill_loss(z, bad_labels, torch.randn(10, 120))


@pytest.mark.parametrize("impl", _IMPLS)
def test_uint16_ids_and_int32_ids(impl):
    z, labels, ids, logp, _ = make_inputs(10, 120, 5)
    expected = run(impl, z, labels, ids, logp.float())
    for dtype in (torch.uint16, torch.int32):
        actual = run(impl, z, labels, ids.to(dtype), logp.float())
        torch.testing.assert_close(actual[0], expected[0])
        torch.testing.assert_close(actual[3], expected[3])


def test_inplace_writes_gradient_over_logits():
    z, labels, ids, logp, c_T = make_inputs(*_SHAPE_PARAMS[0], 8, T=2.0)
    expected = run("torch", z, labels, ids, logp.float(), temperature=2.0, c_T=c_T.float())
    leaf = z.detach().clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf whose producer (mul by a constant) saved nothing of its output
    loss, _, _ = losses.sparse_distill_loss(logits, labels, ids, logp.float(), temperature=2.0, c_T=c_T.float(),
                                             impl="torch", inplace=True)
    loss.backward()
    torch.testing.assert_close(leaf.grad, expected[3])
    torch.testing.assert_close(logits.detach(), expected[3])  # the logits buffer now holds the gradient


@pytest.mark.parametrize("tail", reference.TAILS)
def test_small_torch_chunks_on_two_threads(monkeypatch, tail):
    """Chunk boundaries that do not divide N, rows split between two worker threads."""
    monkeypatch.setattr(torch_rows, "CHUNK_BYTES", 3 * 4 * 1271)
    torch.set_num_threads(2)  # the autouse fixture restores it
    z, labels, ids, logp, c_T = make_inputs(*_SHAPE_PARAMS[0], 8, T=2.0, confident=True)
    check_against_reference("torch", z, labels, ids, logp, temperature=2.0, tail=tail, c_T=c_T)
    check_against_reference("torch", z, labels, ids, logp, temperature=1.0, tail=tail)


# --- fused linear, dense helper, dispatch


@pytest.mark.parametrize("impl", _IMPLS)
@pytest.mark.parametrize("tail", ["bucket", "uniform"])
def test_fused_linear(impl, tail):
    g = torch.Generator().manual_seed(1)
    N, H, V, k = 37, 24, 301, 8
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
    _, labels, ids, logp, c_T = make_inputs(N, V, k, T=2.0, ignored=(4,))
    kw = dict(alpha=0.4, temperature=2.0, tail=tail, normalization="sequence", num_sequences=5)

    def grads(impl, h, w, lp, c, **extra):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, ce, kl = losses.fused_linear_sparse_distill_loss(h, w, labels, ids, lp, c_T=c, impl=impl,
                                                                **kw, **extra)
        (loss * 0.7).backward()
        return loss.detach(), ce, kl, h.grad, w.grad

    expected = grads("reference", hidden, weight, logp, c_T)
    actual = grads(impl, hidden.float(), weight.float(), logp.float(), c_T.float(), chunk_rows=10)
    for name, a, e in zip(["loss", "ce", "kl", "grad_h", "grad_W"], actual, expected):
        assert_verbose_allclose(a, e, 1e-5, 1e-4, name=f"fused-linear {name}")


def _control(ids, logp, seed=5):
    """Control-variate coefficients: positive on real entries, 0 on padding (-inf)."""
    a = torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
    return torch.where(logp > float("-inf"), a, 0.0)


@pytest.mark.parametrize("impl", _IMPLS)
@pytest.mark.parametrize("tail", reference.TAILS)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_control_variate_against_reference(impl, tail, T):
    """The control variate adds (a q_K - (sum a q) q) / T to the KL's gradient and leaves the loss value alone,
    in every path and tail mode, with padding entries in the rows."""
    z, labels, ids, logp, _ = make_inputs(*_SHAPE_PARAMS[0], 8, hybrid=True, T=T)
    ids = torch.cat([ids, ids[:, :2]], 1)
    logp = torch.cat([logp, torch.full((len(ids), 2), float("-inf"), dtype=logp.dtype)], 1)
    a = _control(ids, logp)
    kw = dict(alpha=0.3, temperature=T, tail=tail, normalization="sequence", num_sequences=3)
    expected = run("reference", z.double(), labels, ids, logp, control=a, **kw)
    actual = run(impl, z, labels, ids, logp.float(), control=a.float(), **kw)
    for name, x, e in zip(["loss", "ce", "kl", "grad"], actual, expected):
        assert_verbose_allclose(x, e, 1e-5, 1e-4, name=f"{impl} control {name}")
    plain = run("reference", z.double(), labels, ids, logp, **kw)
    assert plain[0].item() == pytest.approx(expected[0].item(), rel=1e-12)  # the value is the plain one
    # The added gradient, from its formula (ignored rows add nothing).
    q = torch.softmax(z.double() / T, 1)
    U = (a * q.gather(1, ids)).sum(1, keepdim=True)
    added = torch.zeros_like(q).scatter_add(1, ids, a * q.gather(1, ids)) - U * q
    added *= (1 - 0.3) * T / 3 * (labels != -100).double()[:, None]  # w_kl / T, KL / num_sequences
    torch.testing.assert_close(expected[3] - plain[3], added, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("impl", _IMPLS)
@pytest.mark.parametrize("with_control", [False, True])
def test_fused_linear_with_hybrid_targets(impl, with_control):
    g = torch.Generator().manual_seed(3)
    N, H, V, k = 37, 24, 301, 8
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
    _, labels, ids, logp, _ = make_inputs(N, V, k, hybrid=True, ignored=(4,))
    a = _control(ids, logp) if with_control else None
    results = []
    for name, h, w, lp, c in [("reference", hidden, weight, logp, a),
                              (impl, hidden.float(), weight.float(), logp.float(), a if a is None else a.float())]:
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, ce, kl = losses.fused_linear_sparse_distill_loss(h, w, labels, ids, lp, tail="renorm", impl=name,
                                                                control=c,
                                                                **({} if name == "reference" else {"chunk_rows": 10}))
        loss.backward()
        results.append((loss.detach(), ce, kl, h.grad, w.grad))
    for name, x, e in zip(["loss", "ce", "kl", "grad_h", "grad_W"], results[1], results[0]):
        assert_verbose_allclose(x, e, 1e-5, 1e-4, name=f"fused-linear hybrid control={with_control} {name}")


def test_control_of_the_wrong_shape_is_refused():
    z, labels, ids, logp, _ = make_inputs(6, 40, 4)
    with pytest.raises(ValueError, match=r"control \(6, 3\) must match target_ids \(6, 4\)"):
        losses.sparse_distill_loss(z, labels, ids, logp.float(), control=torch.ones(6, 3))


def test_dense_distill_loss_matches_sparse_with_full_k():
    """k = V with exact teacher log-probs is the dense loss (c_T is exact then, even without it)."""
    g = torch.Generator().manual_seed(2)
    N, V = 21, 97
    z = torch.randn(N, V, generator=g, dtype=torch.float64)
    teacher = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (N,), generator=g)
    labels[5] = -100
    ids = torch.arange(V).expand(N, V).contiguous()
    for T, norm in [(1.0, "token"), (3.0, "sequence")]:
        kw = dict(alpha=0.3, temperature=T, normalization=norm, num_sequences=4)
        expected = run("reference", z, labels, ids, torch.log_softmax(teacher, 1), **kw)
        zz = z.float().requires_grad_()
        loss, ce, kl = losses.dense_distill_loss(zz, labels, teacher.float(), **kw)
        (loss * 2).backward()
        for name, a, e in zip(["loss", "ce", "kl", "grad"], (loss, ce, kl, zz.grad / 2), expected):
            assert_verbose_allclose(a, e, 1e-5, 1e-4, name=f"dense {name}")


def test_dispatch_and_override(monkeypatch):
    z, labels, ids, logp, _ = make_inputs(8, 40, 4)
    assert losses._resolve_impl(None, z.device) == "torch"
    monkeypatch.setattr(losses, "_override_impl", "reference")
    assert losses._resolve_impl(None, z.device) == "reference"
    assert losses._resolve_impl("torch", z.device) == "torch"  # an explicit impl wins
    assert losses._resolve_impl("cpu", z.device) == "torch"  # the torch path's name before
    loss, _, _ = losses.sparse_distill_loss(z.double(), labels, ids, logp)
    assert loss.dtype == torch.float64  # the reference computes in the logits' dtype
    with pytest.raises(ValueError, match="impl"):
        losses.sparse_distill_loss(z, labels, ids, logp, impl="cuda")


def test_cpu_is_the_torch_path_under_its_former_name():
    """impl="cpu" (the DESIGN contract's name) is the torch path: the same numbers, bit for bit."""
    z, labels, ids, logp, c_T = make_inputs(16, 90, 6, T=2.0)
    kw = dict(alpha=0.3, temperature=2.0, c_T=c_T.float())
    for a, b in zip(run("cpu", z, labels, ids, logp.float(), **kw), run("torch", z, labels, ids, logp.float(), **kw)):
        assert torch.equal(a, b)
    hidden = torch.randn(16, 12, generator=torch.Generator().manual_seed(1))
    weight = torch.randn(90, 12, generator=torch.Generator().manual_seed(2))
    fused = [losses.fused_linear_sparse_distill_loss(hidden, weight, labels, ids, logp.float(), impl=impl, **kw)[0]
             for impl in ("cpu", "torch")]
    assert torch.equal(fused[0], fused[1])


def test_bad_arguments_are_listed():
    z, labels, ids, logp, _ = make_inputs(8, 40, 4)
    with pytest.raises(ValueError) as err:
        losses.sparse_distill_loss(z, labels[:5], ids, logp, alpha=2.0, tail="gauss", normalization="sequence")
    message = str(err.value)
    for word in ("labels", "alpha", "tail", "num_sequences"):
        assert word in message


@pytest.mark.parametrize("impl", _IMPLS)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_a_student_tail_mass_below_fp32_range_keeps_loss_and_gradient(impl, T):
    """A confidence gap above 87 T nats: the student's tail mass underflows fp32; the bucket term is formed
    in log space, so loss and gradient still match float64 (they used to lose the tail's gradient)."""
    z, labels, ids, logp, c_T = make_inputs(12, 300, 6, T=T, ignored=())
    for i in range(0, 12, 2):
        z[i, ids[i, 0]] += 100.0 * T + 30.0  # the student is (far too) sure of the teacher's top token
    kw = dict(alpha=0.3, temperature=T, tail="bucket", c_T=c_T.float())
    exact = run("reference", z.double(), labels, ids, logp.float().double(), **dict(kw, c_T=c_T.float().double()))
    actual = run(impl, z, labels, ids, logp.float(), **kw)
    assert_verbose_allclose(actual[0], exact[0], 0.0, 1e-5, name="loss")
    assert_verbose_allclose(actual[3], exact[3], 1e-9, 1e-4, name="grad")
