"""The shared training loop: schedule, data order, resume modes, corrupt checkpoints, NaN, keep_best."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from babydistill.pipeline.model import build_model
from babydistill.pipeline.teacher import train_teacher
from babydistill.pipeline.training.checkpoint import COMPLETE, STATE_DIR, complete_checkpoints
from babydistill.pipeline.training.loop import train_loop
from babydistill.pipeline.training.metrics import format_log_line
from babydistill.pipeline.training.optimizer import lr_at
from babydistill.pipeline.training.runtime import TrainingError
from babydistill.pipeline.training.windows import TokenWindows, ce_loss, epoch_order
from babydistill.stores.tokens import TokenStore


def with_train(config, **train):
    return dataclasses.replace(config, train=dataclasses.replace(config.train, **train))


def run_teacher(config, out: Path, resume=False, seed: int = 1) -> Path:
    return train_teacher(config, config.tokens_path, config.tokenizer_path, out, seed=seed, resume=resume)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def assert_same_weights(a: Path, b: Path, atol: float = 1e-6) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= atol, f"max weight difference {worst:.3g} > {atol}"


def metric_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(got: Path, want: Path, atol: float) -> None:
    """The same records of metrics.jsonl (kind and step), with the same losses up to ``atol``."""
    got_lines, want_lines = metric_lines(got), metric_lines(want)
    assert [(r["kind"], r["step"]) for r in got_lines] == [(r["kind"], r["step"]) for r in want_lines]
    for got_record, want_record in zip(got_lines, want_lines):
        key = "loss" if got_record["kind"] == "train" else "val_loss"
        assert got_record[key] == pytest.approx(want_record[key], abs=atol), (got_record, want_record)


def steps_of(state_dir: Path) -> list[str]:
    return [p.name for p in complete_checkpoints(state_dir)]


# --- pure pieces ---------------------------------------------------------------------------


def test_lr_schedule_warms_up_linearly_then_cosine_to_min(tiny_run):
    cfg = dataclasses.replace(tiny_run.train, lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg, 20) for s in range(21)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[12] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert lrs[20] == pytest.approx(0.1)


def test_token_windows_reshuffle_per_epoch_and_random_offset(tiny_run):
    tokens = TokenStore(tiny_run.tokens_path)
    source = TokenWindows(tokens, "train", seed=3)
    n = source.num_windows
    assert sorted(epoch_order(3, 0, n)) == list(range(n))
    assert not np.array_equal(epoch_order(3, 0, n), epoch_order(3, 1, n))
    assert np.array_equal(epoch_order(3, 1, n), epoch_order(3, 1, n))
    batch = source.batch(0, np.arange(4))
    windows = tokens.windows("train", epoch_order(3, 0, n)[:4])
    assert torch.equal(batch["input_ids"], torch.from_numpy(windows[:, :-1]))
    assert torch.equal(batch["labels"], torch.from_numpy(windows[:, 1:]))
    shifted = TokenWindows(tokens, "train", seed=3, random_offset=True).batch(0, np.arange(4))
    assert shifted["input_ids"].shape == batch["input_ids"].shape
    assert not torch.equal(shifted["input_ids"], batch["input_ids"])


def test_log_line_format():
    line = format_log_line(120, 800, 3.4123, {"ce": 3.1, "kl": 0.3}, 6.9e-4, 0.21, 9750.4, 1.23)
    assert line == "step 120/800 | loss 3.412 (ce 3.100 kl 0.300) | lr 6.9e-04 | dt 210ms | tok/s 9,750 | mem 1.2GB"


# --- resume modes ---------------------------------------------------------------------------


def test_resume_modes(tiny_run, tmp_path):
    config = with_train(tiny_run, max_steps=6, save_every=3)
    with pytest.raises(TrainingError, match=r"no checkpoint in .*use --resume auto to start fresh"):
        run_teacher(config, tmp_path / "t", resume=True)
    run_teacher(config, tmp_path / "t", resume="auto")  # nothing to resume: starts fresh
    assert steps_of(tmp_path / "t" / STATE_DIR) == ["step-000003", "step-000006"]
    with pytest.raises(TrainingError, match=r"already has checkpoints .*pass --resume to continue or --force"):
        run_teacher(config, tmp_path / "t", resume=False)
    before = weights(tmp_path / "t")
    run_teacher(config, tmp_path / "t", resume=True)  # already finished: re-exports the same weights
    assert all(torch.equal(before[k], v) for k, v in weights(tmp_path / "t").items())
    with pytest.raises(TrainingError, match="not a complete checkpoint"):
        run_teacher(config, tmp_path / "t", resume=tmp_path / "nowhere")
    with pytest.raises(TrainingError, match="another model, data or global batch"):
        run_teacher(with_train(config, batch_size=4), tmp_path / "t", resume=True)
    with pytest.raises(TrainingError, match="past this run's 3 steps"):
        run_teacher(with_train(config, max_steps=3), tmp_path / "t", resume=True)


def test_head_lr_scale_multiplies_the_output_layers_step_only_and_resumes(tiny_run, tmp_path):
    """The first AdamW step is lr * (g / (|g| + eps) + wd * w): proportional to the group's lr, so the output
    layer moves exactly head_lr_scale times as far and every other weight exactly as far as at scale 1."""
    config = with_train(tiny_run, max_steps=1, warmup_steps=1, random_offset=False)
    start = build_model(config, TokenStore(tiny_run.tokens_path), 1).state_dict()
    plain = weights(run_teacher(config, tmp_path / "plain"))
    scaled = weights(run_teacher(with_train(config, head_lr_scale=3.0), tmp_path / "scaled"))
    for name, w in plain.items():
        moved_plain, moved_scaled = w - start[name], scaled[name] - start[name]
        if name == "lm_head.weight":
            assert moved_plain.abs().max() > 0
            torch.testing.assert_close(moved_scaled, 3.0 * moved_plain, rtol=1e-4, atol=1e-7)
        else:
            torch.testing.assert_close(moved_scaled, moved_plain, rtol=0, atol=0)
    # resumed from step 3, the run ends where the uninterrupted one did
    longer = with_train(config, max_steps=6, save_every=3, head_lr_scale=3.0)
    whole = run_teacher(longer, tmp_path / "whole")

    def cut(name: str) -> Path:
        shutil.copytree(whole, tmp_path / name)
        shutil.rmtree(tmp_path / name / STATE_DIR / "step-000006")
        return tmp_path / name

    assert_same_weights(whole, run_teacher(longer, cut("cut"), resume=True), atol=0)
    # the config's scale counts on resume, like its lr: at 5 the last 3 steps move the output layer further
    faster = weights(run_teacher(with_train(longer, head_lr_scale=5.0), cut("faster"), resume=True))
    assert not torch.equal(faster["lm_head.weight"], weights(whole)["lm_head.weight"])
    # back to 1, the output layer would change optimizer groups: refused in one line, the checkpoint kept
    with pytest.raises(TrainingError, match=r"train.head_lr_scale = 3, this run has 1; resume with 3") as err:
        run_teacher(with_train(longer, head_lr_scale=1.0), cut("back"), resume=True)
    assert "\n" not in str(err.value)
    assert steps_of(tmp_path / "back" / STATE_DIR) == ["step-000003"]
    assert not (tmp_path / "back" / STATE_DIR / "unreadable").exists()
    with pytest.raises(ValueError, match="train.head_lr_scale"):
        with_train(config, head_lr_scale=0.0)


def test_resume_from_a_path_and_skipping_incomplete_or_corrupt_checkpoints(tiny_run, tmp_path):
    config = with_train(tiny_run, max_steps=12, save_every=4, keep_checkpoints=3)
    reference = run_teacher(config, tmp_path / "ref")
    ref_lines = metric_lines(reference)
    state = reference / STATE_DIR
    assert steps_of(state) == ["step-000004", "step-000008", "step-000012"]

    # an explicit folder: continue from step 4
    run = run_teacher(with_train(config, keep_checkpoints=2), tmp_path / "ref", resume=state / "step-000004")
    assert_same_weights(run, tmp_path / "ref")

    # newest without its marker, the next one garbled: both skipped with a warning, resume from step 4
    run = run_teacher(config, tmp_path / "b")
    (run / STATE_DIR / "step-000012" / COMPLETE).unlink()
    (run / STATE_DIR / "step-000008" / "model.pt").write_bytes(b"garbage")
    (run / "model.safetensors").unlink()
    with pytest.warns(UserWarning) as caught:
        run_teacher(config, run, resume=True)
    messages = " ".join(str(w.message) for w in caught)
    assert "step-000012: incomplete checkpoint" in messages and "step-000008: unreadable checkpoint" in messages
    assert_same_weights(run, reference)
    lines = metric_lines(run)
    assert [(r["kind"], r["step"]) for r in lines] == [(r["kind"], r["step"]) for r in ref_lines]
    assert [r.get("loss", r.get("val_loss")) for r in lines] == pytest.approx(
        [r.get("loss", r.get("val_loss")) for r in ref_lines], abs=1e-6)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_run, tmp_path):
    config = with_train(tiny_run, max_steps=12, save_every=5)
    tokens = TokenStore(tiny_run.tokens_path)
    calls = 0

    def nan_from_step_7(model, batch):
        nonlocal calls
        calls += 1
        loss, metrics = ce_loss(model, batch)
        return (loss * math.nan if calls >= 7 else loss), metrics

    with pytest.raises(TrainingError, match=r"^step 7: loss is nan; .*step-000005"):
        train_loop(config, build_model(config, tokens, 1), TokenWindows(tokens, seed=1), nan_from_step_7,
                   tmp_path / "t", seed=1, tokens=tokens, tokenizer_dir=tiny_run.tokenizer_path)
    state = tmp_path / "t" / STATE_DIR
    assert steps_of(state) == ["step-000005"]
    assert not (tmp_path / "t" / "model.safetensors").exists()
    assert all(math.isfinite(v) for v in torch.load(state / "step-000005" / "model.pt")["lm_head.weight"].flatten())


def test_keep_best_exports_the_best_validation_weights(tiny_run, tmp_path):
    config = with_train(tiny_run, max_steps=12, save_every=4, eval_every=2, keep_best=True)
    tokens = TokenStore(tiny_run.tokens_path)
    calls = 0

    def ce_then_ascent(model, batch):  # learn for 6 steps, then unlearn: the best is not the final
        nonlocal calls
        calls += 1
        loss, metrics = ce_loss(model, batch)
        return (loss if calls <= 6 else -loss), metrics

    out = train_loop(config, build_model(config, tokens, 1), TokenWindows(tokens, seed=1), ce_then_ascent,
                     tmp_path / "t", seed=1, tokens=tokens, tokenizer_dir=tiny_run.tokenizer_path)
    summary = json.loads((out / "train_summary.json").read_text())
    vals = {r["step"]: r["val_loss"] for r in metric_lines(out) if r["kind"] == "val"}
    assert sorted(vals) == [2, 4, 6, 8, 10, 12]
    best_step = min(vals, key=vals.get)
    assert best_step <= 8 and vals[12] > vals[best_step]
    assert summary["best_step"] == best_step and summary["exported"] == "best"
    assert summary["best_val_loss"] == pytest.approx(vals[best_step])
    best = torch.load(out / STATE_DIR / f"best-step-{best_step:06d}.pt")
    exported = weights(out)
    assert all(torch.equal(exported[k], best[k]) for k in exported)
    # only best files that a kept checkpoint (or the loop) still refers to remain
    assert [p.name for p in (out / STATE_DIR).glob("best-step-*.pt")] == [f"best-step-{best_step:06d}.pt"]


# --- checkpoints that cannot be trusted -------------------------------------------------------


class _RunsCode:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.sentinel}",)


def test_a_pickle_in_a_checkpoint_is_never_unpickled(tiny_run, tmp_path):
    import pickle

    config = with_train(tiny_run, max_steps=8, save_every=4)
    run = run_teacher(config, tmp_path / "t")
    state = run / STATE_DIR
    assert sorted(p.name for p in (state / "step-000008").iterdir()) == [
        "COMPLETE", "meta.json", "model.pt", "optimizer.pt", "rng-rank0.safetensors"]
    sentinel = tmp_path / "code-ran"
    evil = pickle.dumps(_RunsCode(sentinel))
    (state / "step-000008" / "rng-rank0.safetensors").write_bytes(evil)  # unreadable: moved aside
    old = state / "step-000004"  # as an older babydistill wrote it: a pickled RNG state, no checksums
    (old / "rng-rank0.safetensors").unlink()
    (old / "rng-rank0.pt").write_bytes(evil)
    meta = json.loads((old / "meta.json").read_text())
    del meta["files"]
    (old / "meta.json").write_text(json.dumps(meta))
    (old / "COMPLETE").write_text("4\n")
    with pytest.warns(UserWarning) as caught:
        run_teacher(config, run, resume="auto")
    messages = [str(w.message) for w in caught]
    assert any("step-000008: unreadable checkpoint" in m and "moved to" in m for m in messages)
    assert any("pickled by an older babydistill, not loaded" in m for m in messages)
    assert not sentinel.exists()
    assert (state / "unreadable" / "step-000008" / "rng-rank0.safetensors").read_bytes() == evil
    assert steps_of(state) == ["step-000004", "step-000008"]


def test_every_checkpoint_garbled_is_kept_and_a_fresh_start_needs_force(tiny_run, tmp_path):
    config = with_train(tiny_run, max_steps=8, save_every=4)
    run = run_teacher(config, tmp_path / "t")
    state = run / STATE_DIR
    for step in ("step-000004", "step-000008"):
        (state / step / "model.pt").write_bytes(b"garbage " + step.encode())
    metrics = (run / "metrics.jsonl").read_bytes()
    message = r"^no readable checkpoint in .*trainer_state \(unreadable ones are in .*unreadable\); pass --force"
    with pytest.raises(TrainingError, match=message), pytest.warns(UserWarning, match="moved to"):
        run_teacher(config, run, resume="auto")
    for resume in (True, "auto"):  # again: only the moved-aside checkpoints are left, still no fresh start
        with pytest.raises(TrainingError, match=message) as err:
            run_teacher(config, run, resume=resume)
        assert "\n" not in str(err.value)
    for step in ("step-000004", "step-000008"):  # moved aside whole, never deleted
        assert (state / "unreadable" / step / "model.pt").read_bytes() == b"garbage " + step.encode()
        assert (state / "unreadable" / step / "optimizer.pt").is_file()
    assert (run / "metrics.jsonl").read_bytes() == metrics


def record_checksums_again(folder: Path) -> None:
    """Record a checkpoint's present files as if it had been written so (the way save_checkpoint does)."""
    from babydistill.stores.checksum import crc32, file_records

    meta = json.loads((folder / "meta.json").read_text())
    meta["files"] = file_records(folder, sorted(meta["files"]))
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    (folder / "meta.json").write_text(text)
    (folder / "COMPLETE").write_text(json.dumps({"step": meta["step"], "meta_crc32": f"{crc32(text.encode()):08x}"}))


def test_a_checkpoint_is_loaded_all_or_nothing(tiny_run, tmp_path):
    from babydistill.pipeline.training.checkpoint import load_checkpoint
    from babydistill.pipeline.training.optimizer import build_optimizer
    from babydistill.pipeline.training.runtime import Dist

    config = with_train(tiny_run, max_steps=4, save_every=4)
    run = run_teacher(config, tmp_path / "t")
    folder = run / STATE_DIR / "step-000004"
    tokens = TokenStore(tiny_run.tokens_path)
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])  # an optimizer state for other parameters
    other.zero_grad()
    torch.save(other.state_dict(), folder / "optimizer.pt")
    record_checksums_again(folder)  # a checkpoint written so: it passes its checksums and fails to apply
    model = build_model(config, tokens, 7)
    optimizer = build_optimizer(model, config.train)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    fingerprint = json.loads((folder / "meta.json").read_text())["fingerprint"]
    with pytest.raises(ValueError):
        load_checkpoint(folder, fingerprint, model, optimizer, None, Dist())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the weights were put back
    assert optimizer.state_dict()["state"] == {} and torch.equal(torch.get_rng_state(), rng_before)


def test_a_checkpoint_write_that_fails_leaves_nothing_that_looks_complete(tiny_run, tmp_path, monkeypatch):
    import errno

    config = with_train(tiny_run, max_steps=8, save_every=4)
    reference = run_teacher(config, tmp_path / "ref")
    save = torch.save

    def disk_full_at_step_8(obj, path, *args, **kwargs):
        if "step-000008" in str(path) and Path(path).name == "optimizer.pt":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_8)
    with pytest.raises(TrainingError, match=r"step-000008: writing the checkpoint failed \(.*No space left on "
                                            r"device.*\); the previous checkpoints are kept") as err:
        run_teacher(config, tmp_path / "t")
    assert "\n" not in str(err.value)
    state = tmp_path / "t" / STATE_DIR
    assert steps_of(state) == ["step-000004"] and not list(state.glob("step-000008*"))
    monkeypatch.setattr(torch, "save", save)
    assert_same_weights(run_teacher(config, tmp_path / "t", resume=True), reference)
