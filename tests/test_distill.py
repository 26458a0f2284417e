"""Student distillation: offline from the store, online baseline, exactness at k = V, resume, refusals."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from babydistill.kernels import reference
from babydistill.pipeline import distill
from babydistill.pipeline.capture import capture_logits
from babydistill.pipeline.config import ConfigError, load_config
from babydistill.pipeline.distill import (
    control_beta,
    control_coefficients,
    load_teachers,
    offline_loss,
    online_loss,
    open_offline_source,
    train_student,
)
from babydistill.pipeline.model import build_model
from babydistill.pipeline.teacher import train_teacher
from babydistill.pipeline.training.runtime import TrainingError
from babydistill.stores.reader import LogitStoreReader
from babydistill.stores.tokens import TokenStore
from babydistill.workflows.cli import main

HELPER = Path(__file__).with_name("_train_run.py")


def _config(run, tmp_path: Path, *overrides: str):
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(run.to_dict()))  # JSON is YAML
    return load_config(path, list(overrides))


@pytest.fixture(scope="module")
def distill_run(tiny_run, tmp_path_factory):
    """The tiny run plus two briefly trained teachers and a float32 top-8 store."""
    root = tmp_path_factory.mktemp("distill")
    shutil.copytree(tiny_run.run_path, root / "run")
    config = _config(tiny_run, root, f"run_dir={root / 'run'}", "train.max_steps=6", "cache.logp_dtype=float32")
    for seed in (1, 2):
        train_teacher(config, config.tokens_path, config.tokenizer_path, config.teacher_path(f"t{seed}"), seed=seed)
    capture_logits(dataclasses.replace(config.cache, workers=1), config.tokens_path, config.tokenizer_path,
                   [config.teacher_path("t1"), config.teacher_path("t2")], config.logits_path)
    return config


def test_the_student_reads_the_store_through_the_one_reader(distill_run):
    source, use_c_T, tail = open_offline_source(distill_run, distill_run.tokens_path, distill_run.tokenizer_path,
                                                distill_run.logits_path, seed=3)
    assert isinstance(source, LogitStoreReader) and use_c_T and tail == "bucket"
    assert sorted(source.order(1)) == list(range(source.num_windows))
    batch = source.batch(0, np.arange(5, 13))
    expected = TokenStore(distill_run.tokens_path).windows("train", batch["window_ids"].numpy())
    assert torch.equal(batch["input_ids"], torch.from_numpy(expected[:, :-1]))
    assert torch.equal(batch["labels"], torch.from_numpy(expected[:, 1:]))
    assert batch["target_ids"].shape == (8, 32, 8) and batch["c_T"].shape == (8, 32)


@pytest.fixture(scope="module")
def sampled_stores(distill_run, tmp_path_factory):
    """Sample and hybrid stores of the distill run's teachers, in float16 and float32."""
    root = tmp_path_factory.mktemp("sampled")
    teachers = [distill_run.teacher_path("t1"), distill_run.teacher_path("t2")]
    stores = {}
    for mode, dtype in [("sample", "float16"), ("sample", "float32"), ("hybrid", "float16"), ("hybrid", "float32")]:
        cfg = _config(distill_run, root, f"cache.mode={mode}", "cache.samples=12", "cache.k=4",
                      f"cache.logp_dtype={dtype}", "cache.tail_logp=false").cache
        stores[mode, dtype] = capture_logits(cfg, distill_run.tokens_path, distill_run.tokenizer_path, teachers,
                                             root / f"{mode}-{dtype}.zarr")["out"]
    return stores


def _offline_loss_and_logits(run, config, source, use_c_T: bool, tail: str):
    """A batch of the source, the offline loss and metrics of a fresh student on it, and its logits in float64."""
    batch = source.batch(0, np.arange(4))
    student = build_model(config, TokenStore(run.tokens_path), seed=7)
    loss, metrics = offline_loss(config.distill, use_c_T, tail)(student, batch)
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"]).logits.double().flatten(0, 1)
    return batch, loss, metrics, logits


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("mode, dtype", [("sample", "float16"), ("sample", "float32"), ("hybrid", "float16"),
                                         ("hybrid", "float32")])
@pytest.mark.parametrize("use_exact_c_T", [True, False])
def test_sampled_targets_serve_temperature_1_exactly_and_refuse_the_others(distill_run, sampled_stores, tmp_path,
                                                                           mode, dtype, temperature, use_exact_c_T):
    """Sampled weights are p at T = 1: at T = 1 the loss is the dense KL to the renormalised weights whatever
    distill.tail says (no tail is invented from float16 rounding, c_T or not); other temperatures are refused, since
    these stores keep no probabilities of their draws (a hybrid store with them: `test_a_hybrid_store_with_...`)."""
    store = Path(sampled_stores[mode, dtype])
    # The config's cache section is the run's (topk): the store's own mode decides.
    config = _config(distill_run, tmp_path, f"distill.temperature={temperature}", "distill.tail=bucket",
                     f"distill.use_exact_c_T={str(use_exact_c_T).lower()}", f"cache.temperatures=[1.0, {temperature}]")
    if temperature != 1.0:
        with pytest.raises(TrainingError, match=rf"{store}: {mode} targets.* keep no exact probabilities of their "
                                                rf"draws, so they serve distill.temperature 1 only \(got "
                                                rf"{temperature:g}\): rebuild the store with `babydistill capture "
                                                rf"CONFIG --force --set cache.mode=hybrid --set cache.tail_logp=true") as err:
            open_offline_source(config, distill_run.tokens_path, distill_run.tokenizer_path, store, seed=1)
        assert "\n" not in str(err.value)
        return
    source, use_c_T, tail = open_offline_source(config, distill_run.tokens_path, distill_run.tokenizer_path, store,
                                                seed=1)
    assert (use_c_T, tail) == (False, "renorm")
    batch, loss, metrics, logits = _offline_loss_and_logits(distill_run, config, source, use_c_T, tail)
    # The spec: dense KL against the stored weights renormalised, in float64.
    logp = batch["target_logp"].double().flatten(0, 1)
    weights = torch.where(logp > -1e3, logp.exp(), 0)
    weights_logp = (weights / weights.sum(1, keepdim=True)).log()
    k = batch["target_ids"].shape[-1]
    expected, _, kl = reference.sparse_distill_loss(
        logits, batch["labels"].flatten(), batch["target_ids"].reshape(-1, k), weights_logp, tail="bucket")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert metrics["kl"].item() == pytest.approx(kl.item(), rel=1e-4, abs=1e-6)


def test_sampled_targets_under_sequence_normalisation_warn(distill_run, sampled_stores, tmp_path):
    config = _config(distill_run, tmp_path, "distill.normalization=sequence")
    with pytest.warns(UserWarning, match=r"hybrid targets of \d+ exact ids \+ \d+ draws without their probabilities: "
                                         r"under distill.normalization=sequence .*--set cache.k=32 "
                                         r"--set cache.samples=64 --set cache.tail_logp=true"):
        open_offline_source(config, distill_run.tokens_path, distill_run.tokenizer_path,
                            Path(sampled_stores["hybrid", "float16"]), seed=1)


def test_only_the_sequence_default_store_under_sequence_normalisation_does_not_warn(distill_run, control_store,
                                                                                   tmp_path, monkeypatch):
    config = _config(distill_run, tmp_path, "distill.normalization=sequence")
    # the control store (4 ids + 12 draws with their probabilities) is thinner than the sequence default
    with pytest.warns(UserWarning, match=r"hybrid targets of 4 exact ids \+ 12 draws: under"):
        open_offline_source(config, distill_run.tokens_path, distill_run.tokenizer_path, control_store, seed=1)
    monkeypatch.setattr(distill, "SEQUENCE_CACHE_DEFAULTS", {"k": 4, "samples": 12})  # ... and now it is not
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        used, _, _ = open_offline_source(config, distill_run.tokens_path, distill_run.tokenizer_path, control_store,
                                         seed=1)
    never = _config(distill_run, tmp_path, "distill.normalization=sequence", "distill.control_variate=never")
    with pytest.warns(UserWarning, match=r"probabilities unused \(distill.control_variate=never\).*; set "
                                         r"distill.control_variate=auto$"):
        unused, _, _ = open_offline_source(never, distill_run.tokens_path, distill_run.tokenizer_path, control_store,
                                           seed=1)
    # never: the probabilities are not decoded at all
    assert "tail_logp" in used.batch(0, np.arange(4)) and "tail_logp" not in unused.batch(0, np.arange(4))


@pytest.mark.parametrize("mode", ["sample", "hybrid"])
def test_offline_student_trains_from_a_sampled_store(distill_run, sampled_stores, tmp_path, mode):
    config = _config(distill_run, tmp_path, "train.max_steps=12", "train.lr=1e-2", "train.log_every=1")
    out = train_student(config, config.tokens_path, config.tokenizer_path, Path(sampled_stores[mode, "float16"]),
                        tmp_path / "s1", seed=1)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["store_mode"] == mode and summary["tail"] == "renorm"
    train = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert len(train) == 12 and all(np.isfinite(r["loss"]) for r in train)
    assert np.mean([r["loss"] for r in train[-3:]]) < np.mean([r["loss"] for r in train[:3]])


@pytest.fixture(scope="module")
def control_store(distill_run, tmp_path_factory):
    """A float16 hybrid store of the distill run's teachers that keeps the tail draws' exact log-probabilities."""
    root = tmp_path_factory.mktemp("control")
    cfg = _config(distill_run, root, "cache.mode=hybrid", "cache.samples=12", "cache.k=4", "cache.tail_logp=true").cache
    teachers = [distill_run.teacher_path("t1"), distill_run.teacher_path("t2")]
    return Path(capture_logits(cfg, distill_run.tokens_path, distill_run.tokenizer_path, teachers,
                               root / "hybrid-tail.zarr")["out"])


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_a_hybrid_store_with_tail_probabilities_serves_its_captured_temperatures(distill_run, tmp_path, temperature):
    """Captured at [1, T] with tail_logp: T is served (the tempered weights with the exact c_T, the loss the
    reference's on the batch); an uncaptured temperature is refused in one line naming the captured ones."""
    cfg = _config(distill_run, tmp_path, "cache.mode=hybrid", "cache.samples=12", "cache.k=4", "cache.tail_logp=true",
                  f"cache.temperatures=[1.0, {temperature}]", "cache.logp_dtype=float32").cache
    store = Path(capture_logits(cfg, distill_run.tokens_path, distill_run.tokenizer_path,
                                [distill_run.teacher_path("t1"), distill_run.teacher_path("t2")],
                                tmp_path / "tempered.zarr")["out"])
    with pytest.raises(TrainingError, match=rf"{store}: hybrid targets serve the captured temperatures "
                                            rf"\[1.0, {temperature}\] only \(got 3") as err:
        open_offline_source(_config(distill_run, tmp_path, "distill.temperature=3", "cache.temperatures=[3]"),
                            distill_run.tokens_path,
                            distill_run.tokenizer_path, store, seed=1)
    assert "\n" not in str(err.value)
    config = _config(distill_run, tmp_path, f"distill.temperature={temperature}", "distill.control_variate=never",
                     f"cache.temperatures=[{temperature}]")
    source, use_c_T, tail = open_offline_source(config, distill_run.tokens_path, distill_run.tokenizer_path, store, 1)
    assert (use_c_T, tail) == (True, "renorm")
    batch, loss, _, logits = _offline_loss_and_logits(distill_run, config, source, use_c_T, tail)
    K = batch["target_ids"].shape[-1]
    logp, tail_logp = batch["target_logp"].double().reshape(-1, K), batch["tail_logp"].double().reshape(len(logits), -1)
    expected, _, _ = reference.sparse_distill_loss(
        logits, batch["labels"].flatten(), batch["target_ids"].reshape(-1, K), logp, temperature=temperature,
        tail="renorm", c_T=batch["c_T"].double().flatten(), slot_logp=torch.cat([logp[:, :4], tail_logp], 1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_offline_student_trains_with_the_tail_control_variate(distill_run, control_store, tmp_path):
    config = _config(distill_run, tmp_path, "train.max_steps=12", "train.lr=1e-2", "train.log_every=1",
                     "distill.normalization=sequence")
    with pytest.warns(UserWarning, match="4 exact ids"):  # thinner than the sequence default
        out = train_student(config, config.tokens_path, config.tokenizer_path, control_store, tmp_path / "s1", seed=1)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["control_variate"] is True and summary["tail"] == "renorm"
    train = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert len(train) == 12 and all(np.isfinite(r["loss"]) for r in train)
    assert all(0.0 <= r["control_beta"] <= 1.0 for r in train)
    assert np.mean([r["loss"] for r in train[-3:]]) < np.mean([r["loss"] for r in train[:3]])
    # never: the same store, no control variate, another gradient from the same batches
    config_off = _config(distill_run, tmp_path, "train.max_steps=12", "train.lr=1e-2", "train.log_every=1",
                         "distill.normalization=sequence", "distill.control_variate=never")
    with pytest.warns(UserWarning, match="probabilities unused"):  # plain draws under sequence
        off = train_student(config_off, config.tokens_path, config.tokenizer_path, control_store, tmp_path / "s1-off",
                            seed=1)
    assert json.loads((off / "train_summary.json").read_text())["control_variate"] is False
    assert "control_beta" not in (off / "metrics.jsonl").read_text()


def test_a_student_of_a_draw_sets_store_reads_fresh_draws_in_its_second_epoch(distill_run, control_store, tmp_path):
    """cache.draw_sets = 2 holds control_store's draws as set 0 and new ones as set 1: the same student seed
    takes the same steps in epoch 0 as from control_store, and other steps once epoch 1 reads set 1."""
    cfg = _config(distill_run, tmp_path, "cache.mode=hybrid", "cache.samples=12", "cache.k=4", "cache.tail_logp=true",
                  "cache.draw_sets=2").cache
    teachers = [distill_run.teacher_path("t1"), distill_run.teacher_path("t2")]
    two_sets = Path(capture_logits(cfg, distill_run.tokens_path, distill_run.tokenizer_path, teachers,
                                   tmp_path / "two-sets.zarr")["out"])
    config = _config(distill_run, tmp_path, "train.max_steps=10", "train.batch_size=64", "train.log_every=1",
                     "train.epochs=2", "distill.normalization=sequence")
    losses = {}
    for name, store in (("one", control_store), ("two", two_sets)):
        out = train_student(config, config.tokens_path, config.tokenizer_path, store, tmp_path / name, seed=1)
        losses[name] = [(r["epoch"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                        if r.get("kind", "train") == "train" and "loss" in r and "epoch" in r]
    first = [i for i, (epoch, _) in enumerate(losses["one"]) if epoch <= 1.0 + 1e-9]
    later = [i for i, (epoch, _) in enumerate(losses["one"]) if epoch > 1.0 + 1e-9]
    assert len(losses["one"]) == len(losses["two"]) == 10 and first and later
    assert [losses["one"][i] for i in first] == [losses["two"][i] for i in first]
    assert all(losses["one"][i][1] != losses["two"][i][1] for i in later)


def test_a_store_with_tail_probabilities_verifies_and_names_a_bad_one(control_store, tmp_path):
    import shutil

    import zarr

    from babydistill.stores.logits import store_info, verify_store

    assert verify_store(control_store, None) == []
    assert "tail_logp" in store_info(control_store)["arrays"]
    copy = tmp_path / "copy.zarr"
    shutil.copytree(control_store, copy)
    group = zarr.open_group(str(copy), mode="r+")
    bad = group["tail_logp"][0:1]
    bad[0, 0, 0] = np.nan
    group["tail_logp"][0:1] = bad
    problems = verify_store(copy, None)
    assert problems and "chunk 0" in problems[0]


def test_control_variate_on_without_tail_probabilities_is_refused(distill_run, sampled_stores, tmp_path):
    config = _config(distill_run, tmp_path, "distill.control_variate=required")
    store = Path(sampled_stores["hybrid", "float16"])
    with pytest.raises(TrainingError, match=rf"{store} holds no tail probabilities .*cache.tail_logp=true") as err:
        train_student(config, config.tokens_path, config.tokenizer_path, store, tmp_path / "s1", seed=1)
    assert "\n" not in str(err.value) and not (tmp_path / "s1").exists()


def test_control_coefficients_of_a_row_do_not_see_its_own_draws(distill_run, control_store):
    """Each half of the batch gets the beta estimated on the other half, so a row's coefficients are
    independent of its own draws (its target stays unbiased); the head gets beta, a tail draw beta w / p."""
    source = LogitStoreReader(control_store, distill_run.tokens_path, seed=1)
    batch = source.batch(0, np.arange(4))
    k, slots = 4, batch["target_ids"].shape[-1]
    ids, logp = batch["target_ids"].reshape(-1, slots), batch["target_logp"].reshape(-1, slots)
    tail = batch["tail_logp"].reshape(len(ids), -1)
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(len(ids), 16, generator=g), torch.randn(source.header.vocab_size, 16, generator=g) * 0.1
    a, beta = control_coefficients(hidden, weight, ids, logp, tail, k)
    half = len(ids) // 2
    changed = logp.clone()
    changed[:half, k:] = torch.where(logp[:half, k:] > -1e3, logp[:half, k:] - 0.5, logp[:half, k:])  # other draws
    a2, _ = control_coefficients(hidden, weight, ids, changed, tail, k)
    beta_first = a[0, 0].item()
    assert 0 < beta_first <= 1 and torch.allclose(a2[:half, :k], a[:half, :k])  # beta of the first half unchanged
    assert not torch.allclose(a2[half:, :k], a[half:, :k])                     # the second half's did change
    w, p = logp[:half, k:].exp(), tail[:half].exp()
    torch.testing.assert_close(a[:half, k:], torch.where(p > 0, beta_first * w / p.clamp_min(1e-30), 0.0))
    assert 0 <= beta <= 1
    # distill.control_min_beta: an estimate below it is used as 0, so the coefficients vanish
    a_min, beta_min = control_coefficients(hidden, weight, ids, logp, tail, k, min_beta=1.01)
    assert float(beta_min) == 0.0 and not a_min.any()
    a_low, _ = control_coefficients(hidden, weight, ids, logp, tail, k, min_beta=0.0)
    torch.testing.assert_close(a_low, a)


def test_control_beta_minimises_the_tail_noise():
    """On many rows the beta estimated from the draws is near the exact minimiser of the summed tail noise."""
    from babydistill.pipeline.capture_targets import sample_targets

    vocab, rows, k, samples = 200, 400, 4, 16
    g = torch.Generator().manual_seed(1)
    teacher = torch.log_softmax(torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 1.5, 1)
    student = teacher + 0.3 * torch.randn(rows, vocab, generator=g, dtype=torch.float64)
    head = teacher.topk(k, 1).indices
    ids, w_logp = sample_targets(teacher.float(), samples, k + samples, g, head)
    tail_logp = torch.where(w_logp[:, k:] > -1e3, teacher.gather(1, ids[:, k:]), -1e4)
    estimated = control_beta(student, ids, w_logp, tail_logp, k)
    p, q = teacher.exp(), torch.softmax(student, 1)
    in_head = torch.zeros_like(p, dtype=torch.bool).scatter_(1, head, True)
    p_t, q_t = p.masked_fill(in_head, 0), q.masked_fill(in_head, 0)
    r = p_t.sum(1)
    B = r * q_t.sum(1) - (p_t * q_t).sum(1)
    C = r * torch.where(p_t > 0, q_t ** 2 / p_t, 0).sum(1) - (q_t ** 2).sum(1)
    exact = float(B.sum() / C.sum())
    assert 0.3 < exact < 1 and estimated == pytest.approx(exact, abs=0.1)


def test_offline_student_trains_and_its_loss_goes_down(distill_run, tmp_path):
    config = _config(distill_run, tmp_path, "train.max_steps=30", "train.lr=1e-2", "train.log_every=1")
    out = train_student(config, config.tokens_path, config.tokenizer_path, config.logits_path, tmp_path / "s1", seed=1)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["kind"] == "train"]
    assert {"ce", "kl", "loss"} <= set(train[0])
    first, last = np.mean([r["loss"] for r in train[:3]]), np.mean([r["loss"] for r in train[-3:]])
    assert last < first - 0.3, (first, last)
    assert any(r["kind"] == "val" for r in lines)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def test_distill_head_lr_scale_is_the_students_train_head_lr_scale(distill_run, tmp_path, monkeypatch):
    """distill.head_lr_scale trains the student exactly as train.head_lr_scale would, and differs from scale 1."""
    from safetensors.torch import load_file

    def student(name: str, *overrides: str) -> dict[str, torch.Tensor]:
        config = _config(distill_run, tmp_path, "train.max_steps=3", *overrides)
        out = train_student(config, config.tokens_path, config.tokenizer_path, config.logits_path, tmp_path / name,
                            seed=1)
        return load_file(out / "model.safetensors")

    import babydistill.workflows.runner as runner_module
    from babydistill.workflows.runner import student_stage

    monkeypatch.setattr(runner_module, "output_fingerprint", lambda path: "a store")  # no stage marker here

    def stage_fingerprint(*overrides: str) -> str:
        return student_stage(_config(distill_run, tmp_path, *overrides), seed=1).fingerprint

    # one student, either spelling, one fingerprint; not the fingerprint of another key set to the same number
    assert stage_fingerprint("distill.head_lr_scale=0.5") == stage_fingerprint("train.head_lr_scale=0.5")
    assert stage_fingerprint("distill.head_lr_scale=0.5") != stage_fingerprint("distill.control_min_beta=0.5")
    assert stage_fingerprint("distill.head_lr_scale=0.5") != stage_fingerprint()
    by_distill = student("distill", "distill.head_lr_scale=3.0")
    by_train = student("train", "train.head_lr_scale=3.0")
    plain = student("plain")
    assert all(torch.equal(by_distill[k], by_train[k]) for k in plain)
    assert not torch.equal(by_distill["lm_head.weight"], plain["lm_head.weight"])
    with pytest.raises(ConfigError, match="distill.head_lr_scale"):
        _config(distill_run, tmp_path, "distill.head_lr_scale=-1")


def test_sparse_store_with_k_equal_vocab_matches_the_dense_online_path(distill_run, tmp_path):
    """With every id stored in float32, the offline loss and gradients equal the online dense ones."""
    vocab = TokenStore(distill_run.tokens_path).vocab_size
    config = _config(distill_run, tmp_path, f"cache.k={vocab}", f"run_dir={tmp_path / 'run'}")
    shutil.copytree(distill_run.run_path / "teachers", tmp_path / "run" / "teachers")
    teachers = [config.teacher_path("t1"), config.teacher_path("t2")]
    capture_logits(config.cache, distill_run.tokens_path, distill_run.tokenizer_path, teachers, tmp_path / "full.zarr")
    tokens = TokenStore(distill_run.tokens_path)
    for tail in ("bucket", "renorm", "uniform"):
        cfg = _config(distill_run, tmp_path, f"distill.tail={tail}", "distill.alpha=0.3", "distill.temperature=2.0")
        source, use_c_T, store_tail = open_offline_source(cfg, distill_run.tokens_path, distill_run.tokenizer_path,
                                                          tmp_path / "full.zarr", seed=1)
        assert use_c_T and store_tail == tail
        batch = source.batch(0, np.arange(8))
        losses, grads = [], []
        for loss_fn in (offline_loss(cfg.distill, use_c_T, tail), online_loss(cfg.distill, load_teachers(teachers, vocab), "logits")):
            student = build_model(cfg, tokens, seed=7)
            loss, metrics = loss_fn(student, batch)
            loss.backward()
            losses.append((loss.item(), metrics["ce"].item(), metrics["kl"].item()))
            grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
        np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5, atol=1e-6, err_msg=tail)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6, msg=tail)


@pytest.mark.slow
def test_student_killed_with_sigkill_resumes_to_the_same_weights(distill_run, tmp_path):
    config = _config(distill_run, tmp_path, "train.max_steps=10", "train.save_every=3", "train.num_threads=1")
    config_json = tmp_path / "config.json"
    config_json.write_text(json.dumps(config.to_dict()))

    def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(HELPER), str(config_json), str(out), "--seed", "1", "--stage", "student", *extra],
                              capture_output=True, text=True, timeout=300)

    reference = run(tmp_path / "whole")
    assert reference.returncode == 0, reference.stderr[-2000:]
    killed = run(tmp_path / "killed", "--kill-at-step", "8")
    assert killed.returncode == -signal.SIGKILL
    resumed = run(tmp_path / "killed", "--resume", "true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "killed" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    losses = [[json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
              for d in (tmp_path / "whole", tmp_path / "killed")]
    assert losses[0] == losses[1]


# --- refusals -------------------------------------------------------------------------------------


def test_no_store_yet_says_which_command_makes_it(distill_run, tmp_path):
    with pytest.raises(TrainingError, match="run `babydistill capture CONFIG` first"):
        train_student(distill_run, distill_run.tokens_path, distill_run.tokenizer_path, tmp_path / "none.zarr",
                      tmp_path / "s", seed=1)


def test_store_from_other_windows_is_refused(distill_run, tmp_path):
    from babydistill.pipeline.encode import tokenize_corpus

    other = _config(distill_run, tmp_path, "data.seq_len=16")
    tokenize_corpus(other.data, distill_run.data_path, distill_run.tokenizer_path, tmp_path / "tokens16.zarr")
    with pytest.raises(ValueError, match="other tokens than"):
        train_student(other, tmp_path / "tokens16.zarr", distill_run.tokenizer_path, distill_run.logits_path,
                      tmp_path / "s", seed=1)


def test_store_from_another_tokenizer_is_refused(distill_run, tmp_path):
    from babydistill.pipeline.encode import tokenize_corpus
    from babydistill.pipeline.tokenizer import train_tokenizer

    other = _config(distill_run, tmp_path, "tokenizer.vocab_size=380")
    train_tokenizer(other.tokenizer, distill_run.data_path / "train", tmp_path / "tok")
    tokenize_corpus(other.data, distill_run.data_path, tmp_path / "tok", tmp_path / "tokens.zarr")
    with pytest.raises(ValueError, match="other tokens than|another tokenizer"):
        train_student(other, tmp_path / "tokens.zarr", tmp_path / "tok", distill_run.logits_path, tmp_path / "s", seed=1)


def test_online_without_teachers_is_refused(distill_run, tmp_path):
    with pytest.raises(TrainingError, match="--online needs teachers"):
        train_student(distill_run, distill_run.tokens_path, distill_run.tokenizer_path, distill_run.logits_path,
                      tmp_path / "o", seed=1, online=True, teacher_dirs=[])


def test_an_uncaptured_temperature_of_a_topk_store_is_refused_unless_the_approximation_is_asked_for(distill_run):
    """The uniform-tail re-tempering is far off (its bias above the gradient's norm at T = 2): refused in one line
    with the figures and the hybrid recapture; distill.use_exact_c_T=false still asks for it, with the figure in the warning."""
    with pytest.raises(ConfigError, match=r"distill.temperature: .*topk targets serve the captured temperatures "
                                          r"\[1.0, 2.0\] \(got 3; .* 1.7x \(top-8\).*--set cache.temperatures=\[1,2,3\]") as err:
        _config(distill_run, distill_run.run_path.parent, "distill.temperature=3.0")
    assert "\n" not in str(err.value)
    assert "--set cache.mode=hybrid --set cache.tail_logp=true" in str(err.value)  # the tempered design, offered first
    assert "trails online T = 2 students" in str(err.value)  # the students' figure beside the gradient's
    config = _config(distill_run, distill_run.run_path.parent, "distill.temperature=3.0", "distill.use_exact_c_T=false")
    with pytest.warns(UserWarning, match=r"use_exact_c_T is false: .*uniform-tail approximation \(at T = 2 .*1.7x"):
        _, use_c_T, _ = open_offline_source(config, config.tokens_path, config.tokenizer_path, config.logits_path,
                                            seed=1)
    assert not use_c_T
    stored = _config(distill_run, distill_run.run_path.parent, "distill.temperature=3.0", "cache.temperatures=[3]")
    with pytest.raises(TrainingError, match=r"logits.zarr: topk targets serve the captured temperatures \[1.0, 2.0\]"):
        open_offline_source(stored, config.tokens_path, config.tokenizer_path, config.logits_path, seed=1)


def test_cli_distill_bad_inputs_are_one_line(distill_run, tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(distill_run.to_dict()))
    for override, message in [("distill.temperature=0", "distill.temperature: must be > 0"),
                              ("distill.alpha=1.5", "distill.alpha: must be in [0, 1]")]:
        assert main(["distill", str(path), "--set", override]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
    empty = tmp_path / "empty.yaml"
    empty.write_text(json.dumps({**distill_run.to_dict(), "run_dir": str(tmp_path / "fresh")}))
    assert main(["distill", str(empty)]) == 2
    assert "run `babydistill capture CONFIG` first" in capsys.readouterr().err


@pytest.mark.slow
def test_online_student_trains_through_the_cli(distill_run, tmp_path, capsys):
    path = tmp_path / "config.yaml"
    run_dir = tmp_path / "run"
    shutil.copytree(distill_run.run_path, run_dir, ignore=shutil.ignore_patterns("students"))
    path.write_text(json.dumps({**distill_run.to_dict(), "run_dir": str(run_dir)}))
    assert main(["distill", str(path), "--online", "--seed", "1", "--teachers", "t1,t2",
                 "--set", "train.max_steps=4"]) == 0
    out = run_dir / "students" / "o1"
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["online"] is True and summary["stage"] == "student"
    assert (out / "stage.json").is_file()


def test_bench_step_times_the_configs_targets_not_another_store(distill_run, tmp_path, capsys):
    from babydistill.pipeline.capture import target_differences
    from babydistill.stores.logits import read_header
    from babydistill.workflows.benchmarks.bench_step import bench_step

    attrs = read_header(distill_run.logits_path)  # top-8, float32
    assert target_differences(attrs, distill_run.cache) == []
    sample = _config(distill_run, tmp_path, "cache.mode=sample", "cache.samples=12").cache
    assert target_differences(attrs, sample) == ["cache.mode 'topk', not 'sample'", "cache.k 8, not None",
                                                 "cache.samples None, not 12"]
    path = tmp_path / "bench.yaml"
    path.write_text(json.dumps(distill_run.to_dict()))  # JSON is YAML
    same = bench_step(path, None, mode="offline", steps=1, warmup=0)
    assert same["modes"]["offline"]["store"] == {"mode": "topk", "k": 8, "samples": None, "tail_logp": False, "slots": 8}
    assert "temporary store" not in capsys.readouterr().err
    hybrid = ["cache.mode=hybrid", "cache.k=4", "cache.samples=6", "cache.tail_logp=true"]
    other = bench_step(path, None, mode="offline", steps=1, warmup=0, overrides=hybrid)
    assert other["modes"]["offline"]["store"] == {"mode": "hybrid", "k": 4, "samples": 6, "tail_logp": True, "slots": 10}
    err = capsys.readouterr().err
    assert "holds other targets (cache.mode 'topk', not 'hybrid'; cache.k 8, not 4;" in err
    assert target_differences(read_header(distill_run.logits_path), distill_run.cache) == []  # the run's store is kept
