"""Stage `cache`: capture against a dense computation, resume after kill -9, workers, bad inputs."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from transformers import AutoModelForCausalLM

from babydistill.pipeline.capture import capture_logits
from babydistill.pipeline.capture_chunk import compute_chunk
from babydistill.pipeline.capture_targets import ensemble_logp, sample_targets
from babydistill.pipeline.config import CacheConfig, ConfigError, load_config
from babydistill.pipeline.fidelity import format_fidelity, gradient_fidelity
from babydistill.pipeline.model import build_model, load_model
from babydistill.stores.logits import (
    ARRAYS,
    PAD_LOGP,
    LogitStoreError,
    chunk_files,
    incomplete_reason,
    lock_path,
    read_header,
    store_info,
    verify_store,
    write_chunk,
)
from babydistill.stores.tokens import TokenStore

CFG = CacheConfig(mode="topk", k=8, chunk_windows=32, batch_size=16, temperatures=[1.0, 2.0], fidelity_positions=64)
NUM_CHUNKS = 14  # 442 training windows of the tiny run / 32


def make_teacher(config, folder: Path, seed: int, vocab_size: int | None = None) -> Path:
    """A tiny random-init Llama saved as a plain HF checkpoint with the run's tokenizer files."""
    model = build_model(config, TokenStore(config.tokens_path), seed)
    if vocab_size is not None:
        model.resize_token_embeddings(vocab_size)
    with torch.no_grad():  # sharper than random init, so top-k and sampling see a non-flat distribution
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(folder)
    for file in config.tokenizer_path.iterdir():
        shutil.copy(file, folder / file.name)
    return folder


@pytest.fixture(scope="session")
def teachers(tiny_run, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("teachers")
    return [make_teacher(tiny_run, root / f"t{seed}", seed) for seed in (1, 2)]


@pytest.fixture(scope="session")
def topk_store(tiny_run, teachers, tmp_path_factory) -> tuple[Path, dict]:
    """A finished top-k store (read-only for tests: copy it to modify)."""
    out = tmp_path_factory.mktemp("cache") / "logits.zarr"
    summary = capture_logits(CFG, tiny_run.tokens_path, tiny_run.tokenizer_path, teachers, out)
    return out, summary


def capture(run, teachers, out, cfg=CFG, **kwargs) -> dict:
    return capture_logits(cfg, run.tokens_path, run.tokenizer_path, teachers, out, **kwargs)


def assert_same_store(a: Path, b: Path) -> None:
    """Equal chunk by chunk: every chunk file byte-identical, and the decoded arrays equal."""
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    for chunk in range(NUM_CHUNKS):
        for rel in chunk_files(ga, chunk).values():
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"chunk {chunk}: {rel} differs"
    for name in ARRAYS:
        np.testing.assert_array_equal(ga[name][:], gb[name][:], err_msg=name)


# --- capture vs dense -----------------------------------------------------------------------


def test_capture_layout_and_attrs(topk_store, tiny_run, teachers):
    out, summary = topk_store
    assert sorted(p.name for p in out.iterdir()) == ["_done", "c_T", "ids", "logp", "tokens", "window_ids",
                                                       "zarr.json"]
    assert len(list((out / "_done").glob("*/zarr.json"))) == NUM_CHUNKS
    attrs = zarr.open_group(str(out), mode="r").attrs
    tokens = TokenStore(tiny_run.tokens_path)
    assert attrs["format"] == "babydistill.logits" and attrs["format_version"] == 2
    assert (attrs["mode"], attrs["k"], attrs["ensemble"], attrs["logp_dtype"]) == ("topk", 8, "logits", "float16")
    assert attrs["order"] == "shuffled"
    assert attrs["temperatures"] == [1.0, 2.0] and attrs["num_windows"] == 442 and attrs["seq_len"] == 32
    assert [t["path"] for t in attrs["teachers"]] == [str(t.resolve()) for t in teachers]
    assert all(len(t["sha256"]) == 64 for t in attrs["teachers"])
    for key in ("tokenizer_hash", "tokens_hash", "windows_hash"):
        assert attrs[key] == getattr(tokens.header, key)
    assert attrs["fidelity"]["positions"] == 64 and summary["fidelity"] == attrs["fidelity"]
    assert attrs["fidelity"]["kl_nats"]["bucket"]["max"] < 1e-4  # only float16 rounding
    assert summary["chunks_computed"] == NUM_CHUNKS and incomplete_reason(out) is None
    assert verify_store(out, tiny_run.tokens_path) == []


def test_topk_and_c_T_match_a_dense_computation(topk_store, tiny_run, teachers):
    out, _ = topk_store
    group = zarr.open_group(str(out), mode="r")
    rows = np.array([0, 1, 200, 441])
    windows = TokenStore(tiny_run.tokens_path).windows("train", group["window_ids"][rows])
    models = [AutoModelForCausalLM.from_pretrained(t, dtype=torch.float64).eval() for t in teachers]
    with torch.no_grad():
        zbar = torch.stack([m(input_ids=torch.from_numpy(windows[:, :-1])).logits for m in models]).mean(0)
    logp = torch.log_softmax(zbar, -1)
    values, ids = logp.topk(8, dim=-1)
    stored_ids = torch.from_numpy(group["ids"][rows].astype(np.int64))
    stored_logp = torch.from_numpy(group["logp"][rows].astype(np.float64))
    same = (stored_ids == ids).float().mean().item()
    assert same > 0.999, f"{same:.4f} of top-k ids agree"  # float32 vs float64 may swap near-ties
    torch.testing.assert_close(logp.gather(-1, stored_ids), stored_logp, atol=2e-3, rtol=1e-3)
    assert (stored_logp[..., :-1] >= stored_logp[..., 1:]).all(), "sorted by decreasing probability"
    for j, t in enumerate([1.0, 2.0]):
        c_T = torch.logsumexp(zbar / t, -1) - torch.logsumexp(zbar, -1) / t
        torch.testing.assert_close(torch.from_numpy(group["c_T"][rows, :, j]).double(), c_T, atol=1e-4, rtol=1e-5)
    np.testing.assert_array_equal(group["tokens"][rows], windows)


def _spec(teachers, **overrides) -> dict:
    spec = {"teachers": [(str(t), "") for t in teachers], "mode": "topk", "slots": 8, "samples": 64,
            "temperatures": [1.0, 2.0], "ensemble": "logits", "logp_dtype": "float16", "batch_size": 16,
            "seed": 0, "threads": 1, "k": 8}
    return {**spec, **overrides}


def test_probs_ensemble_is_the_log_of_mean_probabilities():
    z = [torch.randn(2, 3, 50, dtype=torch.float64) for _ in range(3)]
    expected = torch.log(torch.stack([torch.softmax(x, -1) for x in z]).mean(0))
    torch.testing.assert_close(ensemble_logp(z, "probs"), expected)
    torch.testing.assert_close(ensemble_logp(z, "logits"), torch.log_softmax(torch.stack(z).mean(0), -1))


def test_sampled_targets(tiny_run, teachers):
    windows = TokenStore(tiny_run.tokens_path).windows("train", np.arange(8))
    spec = _spec(teachers, mode="sample", slots=64, samples=64, logp_dtype="float32")
    arrays, _ = compute_chunk(spec, 3, windows, [])
    ids, logp = arrays["ids"].astype(np.int64), arrays["logp"]
    weights = np.exp(logp.astype(np.float64))
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
    counts = weights * 64
    real = logp > PAD_LOGP / 2
    np.testing.assert_allclose(counts[real], np.round(counts[real]), atol=1e-4)  # weights are count / S
    assert (logp[~real] == PAD_LOGP).all() and real[..., 0].all()
    assert (np.diff(np.sort(ids, -1), axis=-1) > 0).all(), "ids distinct per position (padding too)"
    assert (np.diff(counts.round(), axis=-1) <= 0).all(), "sorted by decreasing count"
    # Same chunk and seed -> same draws; another chunk -> other draws.
    again, _ = compute_chunk(spec, 3, windows, [])
    other, _ = compute_chunk(spec, 4, windows, [])
    np.testing.assert_array_equal(again["ids"], arrays["ids"])
    assert not np.array_equal(other["ids"], arrays["ids"])


def test_hybrid_targets_keep_the_top_k_exactly_and_sample_the_rest(tiny_run, teachers):
    windows = TokenStore(tiny_run.tokens_path).windows("train", np.arange(8))
    topk, _ = compute_chunk(_spec(teachers, logp_dtype="float32"), 3, windows, [])
    spec = _spec(teachers, mode="hybrid", k=8, samples=16, slots=24, logp_dtype="float32")
    arrays, _ = compute_chunk(spec, 3, windows, [])
    ids, logp = arrays["ids"].astype(np.int64), arrays["logp"].astype(np.float64)
    np.testing.assert_array_equal(ids[..., :8], topk["ids"])
    np.testing.assert_array_equal(logp[..., :8], topk["logp"])
    np.testing.assert_allclose(np.exp(logp).sum(-1), 1.0, atol=1e-5)  # head + r * counts / S
    tail_mass = 1 - np.exp(logp[..., :8]).sum(-1, keepdims=True)
    real = logp[..., 8:] > PAD_LOGP / 2
    counts = np.exp(logp[..., 8:]) / tail_mass * 16
    np.testing.assert_allclose(counts[real], np.round(counts[real]), atol=1e-3)
    assert (np.diff(np.sort(ids, -1), axis=-1) > 0).all(), "ids distinct per position (padding too)"


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_hybrid_tail_logp_holds_each_draws_stored_teacher_probability(tiny_run, teachers, dtype):
    """With cache.tail_logp each tail slot also keeps the teacher's log-probability of its id, rounded as the
    store rounds (the draws come from that rounded distribution), and padding slots PAD_LOGP."""
    windows = TokenStore(tiny_run.tokens_path).windows("train", np.arange(8))
    spec = _spec(teachers, mode="hybrid", k=8, samples=16, slots=24, logp_dtype=dtype)
    plain, _ = compute_chunk(spec, 3, windows, [])
    arrays, _ = compute_chunk({**spec, "tail_logp": True}, 3, windows, [])
    assert "tail_logp" not in plain and arrays["tail_logp"].shape == (8, windows.shape[1] - 1, 16)
    assert arrays["tail_logp"].dtype == np.dtype(dtype)
    models = [load_model(t) for t in teachers]
    with torch.no_grad():
        logits = [m(input_ids=torch.from_numpy(windows[:, :-1].astype(np.int64))).logits.float() for m in models]
    dense = ensemble_logp(logits, "logits").numpy().astype(dtype)
    real = arrays["logp"][..., 8:] > PAD_LOGP / 2
    expected = np.take_along_axis(dense, arrays["ids"][..., 8:].astype(np.int64), -1)
    np.testing.assert_allclose(arrays["tail_logp"][real], expected[real], rtol=2e-3 if dtype == "float16" else 1e-5)
    assert (arrays["tail_logp"][~real] == PAD_LOGP).all()
    np.testing.assert_array_equal(arrays["ids"][..., :8], plain["ids"][..., :8])  # the same exact head


def test_control_variate_target_is_unbiased_and_less_noisy_near_the_teacher():
    """The control-variate gradient (head + beta q_tail + the draws' correction, `kernels.reference` control),
    averaged over capture seeds, converges to the dense KD gradient for a beta fixed before the draws, within a
    tolerance set by the draws; near the teacher its spread is well below the plain draws'."""
    from babydistill.kernels import reference

    vocab, num_rows, samples, k, draws, beta = 60, 4, 8, 4, 400, 0.8
    gen = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(num_rows, vocab, generator=gen, dtype=torch.float64) * 2, -1)
    student = logp + 0.2 * torch.randn(num_rows, vocab, generator=gen, dtype=torch.float64)
    labels = torch.zeros(num_rows, dtype=torch.int64)

    def grad_of(ids, weights_logp, control=None):
        z = student.clone().requires_grad_(True)
        loss, _, _ = reference.sparse_distill_loss(z, labels, ids, weights_logp, alpha=0.0, tail="renorm",
                                                   control=control)
        loss.backward()
        return z.grad

    dense_grad = grad_of(torch.arange(vocab).expand(num_rows, vocab), logp)
    head = logp.topk(k, -1).indices
    plain, controlled = [], []
    for seed in range(draws):
        ids, weights = sample_targets(logp.float(), samples, k + samples, torch.Generator().manual_seed(seed), head)
        weights = torch.where(weights > PAD_LOGP / 2, weights, float("-inf"))
        w, p = weights.exp(), logp.gather(1, ids).exp()
        a = torch.cat([torch.full((num_rows, k), beta, dtype=torch.float64), beta * w[:, k:] / p[:, k:]], 1)
        plain.append(grad_of(ids, weights))
        controlled.append(grad_of(ids, weights, a))
    plain, controlled = torch.stack(plain), torch.stack(controlled)
    grad_tol = 5 * (logp.exp() / samples).sqrt() / num_rows / draws ** 0.5
    assert ((controlled.mean(0) - dense_grad).abs() <= grad_tol).all()
    spread = lambda g: float(((g - g.mean(0)) ** 2).sum((1, 2)).mean().sqrt())  # noqa: E731
    assert spread(controlled) < 0.5 * spread(plain), (spread(controlled), spread(plain))
    # And the test can fail: the student's head without the draws' correction on the tail is biased.
    wrong = []
    for seed in range(draws // 4):
        ids, weights = sample_targets(logp.float(), samples, k + samples, torch.Generator().manual_seed(seed), head)
        weights = torch.where(weights > PAD_LOGP / 2, weights, float("-inf"))
        w, p = weights.exp(), logp.gather(1, ids).exp()
        a = torch.cat([torch.full((num_rows, k), beta, dtype=torch.float64), 0 * w[:, k:] / p[:, k:]], 1)
        wrong.append(grad_of(ids, weights, a))
    assert ((torch.stack(wrong).mean(0) - dense_grad).abs() > 2 * grad_tol).any()


@pytest.mark.parametrize("mode", ["sample", "hybrid"])
def test_sampled_targets_are_unbiased_for_the_distillation_loss_and_gradient(mode):
    """Averaged over capture seeds, the sparse loss (up to the target's own entropy, which carries no
    gradient) and its gradient converge to the dense KD ones, within a tolerance set by the draws."""
    from babydistill.kernels import reference

    vocab, num_rows, samples, k, draws = 60, 4, 8, 4, 400
    gen = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(num_rows, vocab, generator=gen, dtype=torch.float64) * 2, -1)
    student = torch.randn(num_rows, vocab, generator=gen, dtype=torch.float64)
    labels = torch.zeros(num_rows, dtype=torch.int64)

    def loss_and_grad(ids, weights_logp):
        z = student.clone().requires_grad_(True)
        loss, _, kl = reference.sparse_distill_loss(z, labels, ids, weights_logp, alpha=0.0, tail="renorm")
        loss.backward()
        real = weights_logp > PAD_LOGP / 2
        w = torch.where(real, weights_logp.exp(), 0)
        entropy = -(w * torch.where(real, weights_logp, 0)).sum() / num_rows
        return (kl + entropy).item(), z.grad

    dense_ce, dense_grad = loss_and_grad(torch.arange(vocab).expand(num_rows, vocab), logp)
    head = logp.topk(k, -1).indices if mode == "hybrid" else None
    slots = samples + (k if mode == "hybrid" else 0)
    losses, grads = [], []
    for seed in range(draws):
        ids, weights = sample_targets(logp.float(), samples, slots, torch.Generator().manual_seed(seed), head)
        weights = torch.where(weights > PAD_LOGP / 2, weights, float("-inf"))
        value, grad = loss_and_grad(ids, weights)
        losses.append(value)
        grads.append(grad)
    grads = torch.stack(grads)
    # A draw's weight on token j has variance at most p_j / S (a binomial count / S; in hybrid, r * count / S
    # with count ~ Binomial(S, p_j / r)), so the mean over `draws` captures is within 5 standard errors.
    grad_tol = 5 * (logp.exp() / samples).sqrt() / num_rows / draws ** 0.5
    assert ((grads.mean(0) - dense_grad).abs() <= grad_tol).all()
    assert abs(np.mean(losses) - dense_ce) <= 5 * np.std(losses) / draws ** 0.5
    # And the test can fail: the top-k target (renormalised) is biased by far more than that tolerance.
    top_ids = logp.topk(k + samples, -1).indices
    _, biased = loss_and_grad(top_ids, logp.gather(1, top_ids))
    assert ((biased - dense_grad).abs() > grad_tol).any()


def test_gradient_fidelity_separates_bias_from_noise():
    """Top-k: deterministic and biased; sample and hybrid: noisy and unbiased (bias within the estimate's noise)."""
    gen = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(500, generator=gen, dtype=torch.float64) * 1.5, -1)
    ids = logp.topk(8).indices.numpy()
    bias, spread, norm = gradient_fidelity(logp, ids, logp.numpy()[ids], "topk", 8, 0, gen)
    assert spread == 0 and bias > 0.05 * norm
    results = {}
    for mode, slots in [("sample", 16), ("hybrid", 24)]:
        head = logp[None].topk(8, -1).indices if mode == "hybrid" else None
        stored_ids, stored = sample_targets(logp[None].float(), 16, slots, gen, head)
        results[mode] = gradient_fidelity(logp, stored_ids[0].numpy(), stored[0].numpy(), mode, 8, 16, gen,
                                          redraws=400)
        sample_bias, sample_spread, _ = results[mode]
        assert sample_spread > 0 and sample_bias < 3 * sample_spread / 400 ** 0.5, (mode, results[mode])
    assert results["hybrid"][1] < results["sample"][1], "an exact head leaves less noise"


def test_sample_store_verifies(tiny_run, teachers, tmp_path):
    cfg = dataclasses.replace(CFG, mode="sample", samples=16, chunk_windows=128)
    summary = capture(tiny_run, teachers, tmp_path / "s.zarr", cfg)
    assert summary["slots"] == 16 and verify_store(tmp_path / "s.zarr", tiny_run.tokens_path) == []
    assert summary["fidelity"]["residual_mass"]["max"] < 2e-3
    # The unbiased store's bias estimate is labelled with its noise floor and rarely clears it; top-k's always does.
    gradient = summary["fidelity"]["gradient"]
    assert gradient["noise_floor_rel"]["mean"] > 0 and gradient["bias_above_floor"] < 0.1
    assert "cannot be told from 0" in gradient["note"]
    text = format_fidelity(summary["fidelity"])
    assert "bias noise floor" in text and "unbiased by construction" in text
    topk = capture(tiny_run, teachers, tmp_path / "t.zarr", dataclasses.replace(CFG, chunk_windows=128))
    assert topk["fidelity"]["gradient"]["bias_above_floor"] > 0.9


# --- parallel and resumable -------------------------------------------------------------------


def test_two_worker_cluster_equals_synchronous(topk_store, tiny_run, teachers, tmp_path):
    summary = capture(tiny_run, teachers, tmp_path / "w2.zarr", dataclasses.replace(CFG, workers=2))
    assert summary["workers"] == 2 and summary["chunks_computed"] == NUM_CHUNKS
    assert_same_store(topk_store[0], tmp_path / "w2.zarr")


_KILLABLE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import babydistill.pipeline.capture as cache
    from babydistill.pipeline.config import CacheConfig
    run = cache.capture_chunk
    cache.capture_chunk = lambda *a: (time.sleep(0.4), run(*a))[1]  # slow, so the kill lands partway
    tokens, tokenizer, out, *teachers = map(Path, sys.argv[1:])
    cache.capture_logits(CacheConfig(mode="topk", k=8, chunk_windows=32, batch_size=16, temperatures=[1.0, 2.0],
                                     fidelity_positions=64),
                         tokens, tokenizer, teachers, out)
""")


def test_kill_9_then_rerun_equals_an_uninterrupted_capture(topk_store, tiny_run, teachers, tmp_path):
    out = tmp_path / "logits.zarr"
    args = [sys.executable, "-c", _KILLABLE, str(tiny_run.tokens_path), str(tiny_run.tokenizer_path), str(out),
            *map(str, teachers)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=Path(__file__).parents[1])
    deadline = time.time() + 120
    while len(list((out / "_done").glob("*/zarr.json"))) < 3 if (out / "_done").is_dir() else True:
        assert proc.poll() is None and time.time() < deadline, "capture ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list((out / "_done").glob("*/zarr.json")))
    assert 3 <= done < NUM_CHUNKS and lock_path(out).exists()  # the dead process's lock is left behind
    assert incomplete_reason(out) is not None
    summary = capture(tiny_run, teachers, out)  # takes over the stale lock, redoes the rest
    assert summary["chunks_skipped"] == done and summary["chunks_computed"] == NUM_CHUNKS - done
    assert_same_store(topk_store[0], out)
    assert not lock_path(out).exists() and incomplete_reason(out) is None


def test_a_second_capture_is_refused_while_one_runs(topk_store, tiny_run, teachers, tmp_path):
    out = tmp_path / "logits.zarr"
    shutil.copytree(topk_store[0], out)
    lock_path(out).write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename}))
    with pytest.raises(LogitStoreError, match="another capture is running") as err:
        capture(tiny_run, teachers, out)
    assert "\n" not in str(err.value) and lock_path(out).exists()


def test_truncated_or_deleted_chunk_is_named_by_verify_and_rewritten(topk_store, tiny_run, teachers, tmp_path):
    out = tmp_path / "logits.zarr"
    shutil.copytree(topk_store[0], out)
    files = chunk_files(zarr.open_group(str(out), mode="r"), 2)
    ids_file = out / files["ids"]
    ids_file.write_bytes(ids_file.read_bytes()[:-7])
    (out / chunk_files(zarr.open_group(str(out), mode="r"), 5)["logp"]).unlink()
    problems = verify_store(out, tiny_run.tokens_path)
    assert len(problems) == 2 and problems[0].startswith("chunk 2 ") and files["ids"] in problems[0]
    assert problems[1].startswith("chunk 5 ")
    assert "chunk 2" in incomplete_reason(out)
    summary = capture(tiny_run, teachers, out)
    assert summary["chunks_computed"] == 2
    assert_same_store(topk_store[0], out)
    assert verify_store(out, tiny_run.tokens_path) == []


def flip_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x40
    file.write_bytes(bytes(data))


def test_a_changed_byte_is_named_by_verify_and_rewritten_by_cache_and_run(topk_store, tiny_run, teachers, tmp_path,
                                                                         capsys):
    from babydistill.workflows.markers import STORE_MARKER, write_marker
    from babydistill.workflows.stage import Stage, run_stage, stage_status

    out = tmp_path / "logits.zarr"
    shutil.copytree(topk_store[0], out)
    group = zarr.open_group(str(out), mode="r")
    bad = {name: chunk for chunk, name in zip((1, 3, 6, 8, 10), ARRAYS)}  # one chunk of each array
    for name, chunk in bad.items():
        flip_byte(out / chunk_files(group, chunk)[name])
    problems = verify_store(out, tiny_run.tokens_path)
    assert [p.split(" ")[1] for p in problems] == [str(c) for c in sorted(bad.values())]
    assert all("changed since it was written (crc32)" in p for p in problems)
    assert "5 of 14 chunks" in incomplete_reason(out) and incomplete_reason(out, checksum=False) is None
    # `run` and `cache` go through run_stage: a finished stage with a changed byte is not up to date.
    write_marker(out / STORE_MARKER, {"fingerprint": "fp"})
    stage = Stage("cache", out, "fp", lambda work: capture(tiny_run, teachers, work), "babydistill capture CONFIG",
                  in_place=True, incomplete=incomplete_reason, store=True)
    assert stage_status(stage)[0] == "incomplete"
    capsys.readouterr()
    assert run_stage(stage)
    printed = capsys.readouterr().out
    for name, chunk in bad.items():
        assert f"rewriting chunk {chunk} " in printed and chunk_files(group, chunk)[name] in printed
    assert_same_store(topk_store[0], out)
    assert verify_store(out, tiny_run.tokens_path) == [] and stage_status(stage)[0] == "done"
    assert_plain_zarr_sees_a_clean_hierarchy(out)


def assert_plain_zarr_sees_a_clean_hierarchy(store: Path) -> None:
    """The README's snippet runs as written, and walking every node of the store warns about nothing."""
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    snippet = readme.split("Open it without babydistill", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "runs/demo/logits.zarr" in snippet
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        namespace: dict = {}
        exec(snippet.replace("runs/demo/logits.zarr", str(store)), namespace)
        assert float(namespace["p"][:2].sum().compute()) > 0
        group = zarr.open_group(str(store), mode="r")
        names = [name for name, _ in group.members(max_depth=None)]
        group.tree()
    assert set(ARRAYS) <= set(names)


def test_plain_zarr_walks_a_store_of_the_layout_before_marker_nodes_after_a_cache_rerun(topk_store, tiny_run,
                                                                                      teachers, tmp_path):
    out = tmp_path / "logits.zarr"
    shutil.copytree(topk_store[0], out)
    for chunk in range(NUM_CHUNKS):  # the layout before: _done/N.json, _done not a zarr group
        marker = out / "_done" / f"{chunk:06d}" / "zarr.json"
        (out / "_done" / f"{chunk:06d}.json").write_text(json.dumps(json.loads(marker.read_text())["attributes"]))
        shutil.rmtree(marker.parent)
    (out / "_done" / "zarr.json").unlink()
    assert incomplete_reason(out) is None and verify_store(out) == []  # still read
    assert capture(tiny_run, teachers, out)["chunks_computed"] == 0
    assert not list((out / "_done").glob("0*.json")) and verify_store(out) == []
    assert_plain_zarr_sees_a_clean_hierarchy(out)


def test_a_chunk_write_that_fails_is_not_marked_done_and_the_next_run_finishes(topk_store, tiny_run, teachers,
                                                                              tmp_path, monkeypatch):
    import errno

    import zarr.storage._local as local

    out = tmp_path / "logits.zarr"
    shutil.copytree(topk_store[0], out)
    group = zarr.open_group(str(out), mode="r")
    flip_byte(out / chunk_files(group, 5)["ids"])  # chunk 5 is rewritten: the disk fills up during it
    put = local._put

    def disk_full(path, value, exclusive=False):
        if "/logp/" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return put(path, value, exclusive)

    monkeypatch.setattr(local, "_put", disk_full)
    with pytest.raises(LogitStoreError, match=r"logits.zarr: writing chunk 5 failed \(No space left on device: "
                                              r".*logp.*\); it is not marked done: free space and re-run "
                                              r"`babydistill capture CONFIG`") as err:
        capture(tiny_run, teachers, out)
    assert "\n" not in str(err.value) and not lock_path(out).exists()
    assert [p.split(":")[0] for p in verify_store(out)] == ["chunk 5 (rows 160-191)"]
    assert not list(out.rglob("*.partial"))
    monkeypatch.setattr(local, "_put", put)
    assert capture(tiny_run, teachers, out)["chunks_computed"] == 1
    assert_same_store(topk_store[0], out)


def test_verify_names_bad_content_even_with_a_consistent_marker(topk_store, tmp_path):
    out = tmp_path / "logits.zarr"
    shutil.copytree(topk_store[0], out)
    group = zarr.open_group(str(out), mode="r+")
    group["ids"][100, 0, 0] = 65000  # window 100 is in chunk 3; its marker no longer matches
    assert verify_store(out)[0].startswith("chunk 3 ")


def test_store_info(topk_store):
    info = store_info(topk_store[0])
    assert info["num_chunks"] == info["chunks_done"] == NUM_CHUNKS
    assert {k: v for k, v in info["arrays"]["ids"].items() if k != "bytes_per_token"} == {
        "shape": [442, 32, 8], "dtype": "uint16", "chunks": [32, 32, 8]}
    assert info["arrays"]["c_T"]["dtype"] == "float32" and info["arrays"]["tokens"]["shape"] == [442, 33]
    assert 0 < info["bytes_per_token"] < 2 * 8 * 4 and info["compression_vs_dense_fp16"] > 10
    tokens = info["num_tokens"]
    for name, array in info["arrays"].items():  # each array's own files, counted here independently
        on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(topk_store[0] / name) for f in files)
        assert on_disk > 0 and math.isclose(array["bytes_per_token"], on_disk / tokens)
    assert math.isclose(sum(a["bytes_per_token"] for a in info["arrays"].values()), info["bytes_per_token"])
    assert len(info["teachers"]) == 2 and info["fidelity"]["positions"] == 64


# --- bad input --------------------------------------------------------------------------------


def test_store_from_other_inputs_is_refused_and_left_intact(topk_store, tiny_run, teachers, tmp_path):
    out = tmp_path / "logits.zarr"
    shutil.copytree(topk_store[0], out)
    with pytest.raises(ValueError, match=r"other inputs \(k, slots\).*--force"):
        capture(tiny_run, teachers, out, dataclasses.replace(CFG, k=4))
    with pytest.raises(ValueError, match=r"other inputs \(teachers\).*--force"):
        capture(tiny_run, teachers[::-1], out)
    assert incomplete_reason(out) is None and not lock_path(out).exists()
    assert_same_store(topk_store[0], out)


def test_a_store_with_tail_probabilities_is_refused_for_a_config_without_them_and_back(tiny_run, teachers, tmp_path):
    """cache.tail_logp is left out of the identity when false, so each side of the comparison must count a
    missing key as false: a store with the array is not taken for one without it, nor the other way round."""
    with_p = dataclasses.replace(CFG, mode="hybrid", k=4, samples=6, tail_logp=True, chunk_windows=64)
    out = tmp_path / "with.zarr"
    capture(tiny_run, teachers, out, cfg=with_p)
    with pytest.raises(ValueError, match=r"other inputs \(tail_logp\).*--force"):
        capture(tiny_run, teachers, out, cfg=dataclasses.replace(with_p, tail_logp=False))
    plain = tmp_path / "plain.zarr"
    capture(tiny_run, teachers, plain, cfg=dataclasses.replace(with_p, tail_logp=False))
    with pytest.raises(ValueError, match=r"other inputs \(tail_logp\).*--force"):
        capture(tiny_run, teachers, plain, cfg=with_p)
    assert incomplete_reason(out) is None and incomplete_reason(plain) is None


def test_draw_sets_hold_independent_tail_draws_and_each_epoch_reads_its_own(tiny_run, teachers, tmp_path):
    """cache.draw_sets = 3: the head, then 3 tail draw sets; set 0 is the one-set store bit for bit, every set
    passes verify on its own (ids may repeat across sets, not within one), and the reader gives epoch e set
    e mod 3, with the matching tail_logp columns."""
    from babydistill.stores.reader import LogitStoreReader

    one = dataclasses.replace(CFG, mode="hybrid", k=4, samples=6, tail_logp=True, chunk_windows=64, temperatures=[1.0])
    single, triple = tmp_path / "one.zarr", tmp_path / "three.zarr"
    capture(tiny_run, teachers, single, cfg=one)
    capture(tiny_run, teachers, triple, cfg=dataclasses.replace(one, draw_sets=3))
    g1, g3 = zarr.open_group(str(single), mode="r"), zarr.open_group(str(triple), mode="r")
    ids, logp, tail_logp = g3["ids"][:], g3["logp"][:], g3["tail_logp"][:]
    assert ids.shape[-1] == 4 + 3 * 6 and tail_logp.shape[-1] == 3 * 6 and store_info(triple)["draw_sets"] == 3
    np.testing.assert_array_equal(ids[..., :10], g1["ids"][:])
    np.testing.assert_array_equal(logp[..., :10], g1["logp"][:])
    np.testing.assert_array_equal(tail_logp[..., :6], g1["tail_logp"][:])
    assert not np.array_equal(ids[..., 4:10], ids[..., 10:16]), "the sets are independent draws"
    repeated = (np.sort(ids[..., 4:], -1)[..., 1:] == np.sort(ids[..., 4:], -1)[..., :-1]).any()
    assert repeated and verify_store(triple, tiny_run.tokens_path) == []

    source = LogitStoreReader(triple, tiny_run.tokens_path, seed=3)
    positions = np.arange(20)
    for epoch in range(4):
        batch = source.batch(epoch, positions)
        rows = source.order(epoch)[positions]
        cols = np.r_[0:4, 4 + 6 * (epoch % 3):10 + 6 * (epoch % 3)]  # the head, then set epoch mod 3
        np.testing.assert_array_equal(read_header(triple).draw_set_columns(epoch), cols)
        np.testing.assert_array_equal(batch["target_ids"].numpy(), ids[rows][..., cols])
        np.testing.assert_array_equal(batch["target_logp"].numpy(), logp[rows][..., cols].astype(np.float32))
        np.testing.assert_array_equal(batch["tail_logp"].numpy(), tail_logp[rows][..., cols[4:] - 4].astype(np.float32))

    broken = tmp_path / "broken.zarr"
    shutil.copytree(triple, broken)
    group = zarr.open_group(str(broken), mode="r+")
    chunk = {name: group[name][0:64] for name in read_header(broken).array_names}
    chunk["ids"][0, 0, 11] = chunk["ids"][0, 0, 10]  # a repeat within draw set 1, with a marker that matches it
    write_chunk(broken, group, 0, 0, chunk)
    assert verify_store(broken) == ["chunk 0 (rows 0-63): repeated ids within a position"]
    with pytest.raises(ValueError, match=r"other inputs \(.*draw_sets.*\).*--force"):
        capture(tiny_run, teachers, single, cfg=dataclasses.replace(one, draw_sets=3))
    with pytest.raises(ValueError, match=r"other inputs \(.*draw_sets.*\).*--force"):  # and back: 1 is named too
        capture(tiny_run, teachers, triple, cfg=one)


def test_draw_sets_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"cache.draw_sets.*mode topk"):
        CacheConfig(mode="topk", draw_sets=2)
    with pytest.raises(ConfigError, match=r"cache.draw_sets.*>= 1"):
        CacheConfig(draw_sets=0)


def test_teachers_with_different_vocab_sizes_are_refused(tiny_run, teachers, tmp_path):
    vocab = TokenStore(tiny_run.tokens_path).vocab_size
    odd = make_teacher(tiny_run, tmp_path / "t_odd", 3, vocab_size=vocab + 16)
    with pytest.raises(ValueError, match=f"teachers {teachers[0]} and {odd} have different vocab sizes "
                                         rf"\({vocab} vs {vocab + 16}\)") as err:
        capture(tiny_run, [teachers[0], odd], tmp_path / "out.zarr")
    assert "\n" not in str(err.value) and not (tmp_path / "out.zarr").exists()


def test_a_folder_that_is_not_a_checkpoint_is_refused(tiny_run, teachers, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'} is not a model checkpoint"):
        capture(tiny_run, [teachers[0], tmp_path / "empty"], tmp_path / "out.zarr")


def test_k_larger_than_the_vocab_is_refused(tiny_run, teachers, tmp_path):
    with pytest.raises(ValueError, match="cache.k = 100000 is larger than the vocab size"):
        capture(tiny_run, teachers, tmp_path / "out.zarr", dataclasses.replace(CFG, k=100000))


@pytest.mark.parametrize("override, message", [
    ("cache.samples=0", "cache.samples: must be >= 1"),
    ("cache.k=0", "cache.k: must be >= 1"),
    ("cache.k=401", "cache.k: must be in 1..400 for mode topk"),
    ("cache.samples=401", None),
    ("cache.mode=hybrid\0cache.k=400\0cache.samples=4", "cache.k: must be in 1..399 for mode hybrid"),
    ("cache.mode=sample\0cache.samples=401", "cache.samples: must be in 1..400"),
    ("cache.mode=sample\0cache.samples=8\0distill.temperature=2", "distill.temperature: cannot be served by cache.mode sample: sample targets keep no exact"),
    ("cache.mode=dense", "cache.mode"),
    ("cache.order=sorted", "cache.order"),
    ("distill.control_variate=on", "distill.control_variate: must be one of auto, required, never"),
    ("distill.control_min_beta=1.5", "distill.control_min_beta: must be in [0, 1]"),
    ("cache.temperatures=[1.0, 0]", "cache.temperatures: must be a non-empty list of temperatures > 0"),
    ("cache.temperatures=[-2]", "cache.temperatures: must be a non-empty list of temperatures > 0"),
])
def test_bad_cache_config_values_are_config_errors(tiny_config_path, override, message):
    if message is None:  # samples only matter in the sampled modes
        load_config(tiny_config_path, override.split("\0"))
        return
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as err:
        load_config(tiny_config_path, override.split("\0"))
    assert "\n" not in str(err.value)


def _float16_capture(logp: torch.Tensor, samples: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sample_targets as the capture of a float16 store with tail_logp calls it: draws from the rounded teacher,
    the stored weights rounded to float16; returns (ids, weights decoded to float64, -inf on padding)."""
    head = logp.topk(k, -1).indices
    ids, weights = sample_targets(logp.float(), samples, k + samples, torch.Generator().manual_seed(seed), head,
                                  logp.float().half().float())
    stored = torch.from_numpy(weights.numpy().astype(np.float16).astype(np.float64))
    return ids, torch.where(stored > PAD_LOGP / 2, stored, float("-inf"))


def _confident_rows(vocab: int, tail_masses: list[float]) -> torch.Tensor:
    """Rows whose 4 tied ids hold 1 - r and whose tail (random shape) holds r: log-probabilities, float64."""
    gen = torch.Generator().manual_seed(3)
    rows = []
    for r in tail_masses:
        tail = torch.softmax(torch.randn(vocab - 4, generator=gen, dtype=torch.float64), 0) * r
        rows.append(torch.cat([torch.full((4,), (1 - r) / 4, dtype=torch.float64), tail]).log())
    return torch.stack(rows)


def test_float16_stores_keep_the_tail_mass_of_confident_rows_within_one_percent():
    """The tail's mass comes from the tail's own (unrounded) probabilities: 1 - the float16 head put the head's
    rounding into the tail (4.25e-4 stored for a true 1.25e-5)."""
    masses = [1e-2, 1e-3, 1.25e-5, 1e-5, 3e-6, 1.1e-6]
    logp = _confident_rows(200, masses)
    k = 4
    for seed in range(20):
        ids, weights = _float16_capture(logp, 12, k, seed)
        stored_tail = weights[:, k:].exp().sum(1)
        assert ((stored_tail / torch.tensor(masses) - 1).abs() < 0.01).all(), (seed, stored_tail)
    # The rule this replaces cannot meet that: 1 - sum of the float16-rounded head.
    rounded_head = logp.gather(1, logp.topk(k, -1).indices).half().double()
    old = -torch.expm1(torch.logsumexp(rounded_head, 1))
    assert ((old / torch.tensor(masses) - 1).abs() > 0.01).any()
    # Random peaked rows, tail mass 1e-6 .. 1e-2
    gen = torch.Generator().manual_seed(5)
    peaked = torch.log_softmax(torch.randn(128, 300, generator=gen, dtype=torch.float64)
                               * torch.linspace(3, 12, 128, dtype=torch.float64)[:, None], -1)
    true_tail = peaked.exp().sum(1) - peaked.topk(k, -1).values.exp().sum(1)
    rows = (true_tail > 1e-6) & (true_tail < 1e-2)
    assert rows.sum() >= 20
    ids, weights = _float16_capture(peaked[rows], 12, k, 0)
    assert ((weights[:, k:].exp().sum(1) / true_tail[rows] - 1).abs() < 0.01).all()


def test_a_row_whose_tail_underflows_stores_no_tail_weight():
    logp = torch.cat([torch.full((1, 4), -math.log(4), dtype=torch.float64),
                      torch.full((1, 96), -400.0, dtype=torch.float64)], 1)
    ids, weights = _float16_capture(logp, 6, 4, 0)
    assert weights[0, 4:].exp().sum().item() < 1e-30  # 4.3e-4 of weight before, against a true 0


def test_float16_hybrid_targets_are_unbiased_for_a_confident_teacher():
    """Averaged over capture seeds, the gradient from float16-stored hybrid targets converges to the dense one,
    for rows with tail mass 1e-5 .. 1e-2 (the float16 capture path, confident rows)."""
    from babydistill.kernels import reference

    masses = [1e-2, 1e-3, 1e-4, 1e-5]
    logp = _confident_rows(60, masses)
    num_rows, vocab = logp.shape
    student = torch.randn(num_rows, vocab, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.zeros(num_rows, dtype=torch.int64)

    def grad_of(ids, weights_logp):
        z = student.clone().requires_grad_(True)
        reference.sparse_distill_loss(z, labels, ids, weights_logp, alpha=0.0, tail="renorm")[0].backward()
        return z.grad

    dense = grad_of(torch.arange(vocab).expand(num_rows, vocab), logp)
    samples, draws = 8, 400
    grads = torch.stack([grad_of(*_float16_capture(logp, samples, 4, seed)) for seed in range(draws)])
    # binomial noise of the draws (as in the test above) plus float16's rounding of each weight (2^-11 relative)
    tol = 5 * (logp.exp() / samples).sqrt() / num_rows / draws ** 0.5 + 2 ** -10 * logp.exp() / num_rows
    assert ((grads.mean(0) - dense).abs() <= tol).all()
