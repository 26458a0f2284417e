"""Stage `teacher` end to end: training, the HF checkpoint on disk, kill-and-resume, bad input, bench."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_config
from test_train import assert_same_weights, metric_lines, run_teacher, with_train
from transformers import AutoModelForCausalLM, AutoTokenizer

from babydistill.pipeline.config import ConfigError, load_config
from babydistill.pipeline.model import build_model
from babydistill.pipeline.teacher import train_teacher
from babydistill.pipeline.tokenizer import load_tokenizer
from babydistill.pipeline.training.checkpoint import STATE_DIR, complete_checkpoints
from babydistill.stores.tokens import TokenStore

HELPER = Path(__file__).with_name("_train_run.py")


def test_teacher_learns_and_writes_a_hugging_face_checkpoint(tiny_run, tmp_path):
    config = with_train(tiny_run, max_steps=30, save_every=10, eval_every=15)
    out = run_teacher(config, tmp_path / "t1")

    # --- layout ---
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "run_config.json",
                 "train_summary.json"):
        assert (out / name).is_file(), name
    assert [p.name for p in complete_checkpoints(out / STATE_DIR)] == ["step-000020", "step-000030"]
    assert sorted(p.name for p in (out / STATE_DIR / "step-000030").iterdir()) == [
        "COMPLETE", "meta.json", "model.pt", "optimizer.pt", "rng-rank0.safetensors"]
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["train"]["seed"] == 1 and run_config["model"] == dataclasses.asdict(tiny_run.model)

    # --- metrics: the format the report stage reads, and the loss goes down ---
    lines = metric_lines(out)
    train = [r for r in lines if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 31))
    assert set(train[0]) >= {"kind", "step", "epoch", "lr", "loss", "tokens_per_second", "ce"}
    assert sum(r["loss"] for r in train[-5:]) / 5 < sum(r["loss"] for r in train[:5]) / 5 - 1.0
    val = [r for r in lines if r["kind"] == "val"]
    assert [r["step"] for r in val] == [15, 30] and set(val[0]) == {"kind", "step", "epoch", "val_loss"}
    assert val[1]["val_loss"] < val[0]["val_loss"]
    assert json.loads((out / "train_summary.json").read_text())["final_val_loss"] == val[1]["val_loss"]

    # --- HF round trip: same logits as the weights the loop trained; the run's tokenizer ---
    tokens = TokenStore(tiny_run.tokens_path)
    trained = build_model(config, tokens, 0)
    trained.load_state_dict(torch.load(out / STATE_DIR / "step-000030" / "model.pt"))
    loaded = AutoModelForCausalLM.from_pretrained(out)
    input_ids = torch.from_numpy(tokens.windows("validation", [0, 1])[:, :-1])
    with torch.no_grad():
        # Same weights; a plain from_pretrained picks SDPA, training used eager attention for GQA on
        # the CPU (pipeline.model.attention_implementation): equal up to float rounding.
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, trained.eval()(input_ids=input_ids).logits,
                                   rtol=1e-5, atol=1e-5)
        assert torch.equal(loaded.model.embed_tokens.weight, trained.model.embed_tokens.weight)
    text = "Once upon a time the little cat saw the big dog."
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == load_tokenizer(tiny_run.tokenizer_path)(text)["input_ids"]


@pytest.mark.slow
def test_sigkill_and_resume_ends_with_the_uninterrupted_weights(tiny_run, tmp_path):
    config = with_train(tiny_run, max_steps=14, save_every=5, eval_every=4, num_threads=1)
    config_json = tmp_path / "config.json"
    config_json.write_text(json.dumps(config.to_dict()))
    reference = run_teacher(config, tmp_path / "ref")

    # killed in the middle of step 13 (after the step-10 checkpoint, metrics already written to step 12)
    proc = subprocess.run([sys.executable, str(HELPER), str(config_json), str(tmp_path / "b"), "--seed", "1",
                           "--kill-at-step", "13"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in complete_checkpoints(tmp_path / "b" / STATE_DIR)] == ["step-000005", "step-000010"]
    assert max(r["step"] for r in metric_lines(tmp_path / "b")) == 12
    assert not (tmp_path / "b" / "model.safetensors").exists()

    resumed = run_teacher(config, tmp_path / "b", resume=True)
    assert_same_weights(resumed, reference, atol=1e-6)
    ref_lines, lines = metric_lines(reference), metric_lines(resumed)
    assert [(r["kind"], r["step"]) for r in lines] == [(r["kind"], r["step"]) for r in ref_lines]
    for got, want in zip(lines, ref_lines):
        key = "loss" if got["kind"] == "train" else "val_loss"
        assert got[key] == pytest.approx(want[key], abs=1e-6), (got, want)


# --- bad input: one-line ValueError that says what to do -------------------------------------


def test_missing_token_store_or_tokenizer(tiny_run, tmp_path):
    with pytest.raises(ValueError, match=r"no token store; run `babydistill tokenize CONFIG` first") as err:
        train_teacher(tiny_run, tmp_path / "tokens.zarr", tiny_run.tokenizer_path, tmp_path / "t", seed=1)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"no tokenizer; run `babydistill tokenizer CONFIG` first"):
        train_teacher(tiny_run, tiny_run.tokens_path, tmp_path / "tok", tmp_path / "t", seed=1)
    assert not (tmp_path / "t").exists()


def test_token_store_of_another_sequence_length(tiny_run, tmp_path):
    config = dataclasses.replace(tiny_run, data=dataclasses.replace(tiny_run.data, seq_len=64))
    with pytest.raises(ValueError, match=r"windows of 32 tokens but data.seq_len is 64"):
        run_teacher(config, tmp_path / "t")


def test_heads_not_dividing_are_refused_by_the_config(tmp_path):
    with pytest.raises(ConfigError, match="model.num_heads: must divide model.hidden_size"):
        load_config(write_config(tmp_path, {"model": {"hidden_size": 30, "num_heads": 4}}))
    with pytest.raises(ConfigError, match="model.num_kv_heads: must divide model.num_heads"):
        load_config(write_config(tmp_path, {"model": {"num_heads": 4, "num_kv_heads": 3}}))


def test_too_few_windows_for_one_global_batch(tiny_run, tmp_path):
    with pytest.raises(ValueError, match=r"fewer than one global batch .* lower train.batch_size"):
        run_teacher(with_train(tiny_run, batch_size=100_000), tmp_path / "t")


# --- benchmark -------------------------------------------------------------------------------


def test_bench_step_ce_writes_json(tiny_run, tmp_path):
    from babydistill.workflows.benchmarks.bench_step import bench_step

    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(json.dumps(tiny_run.to_dict()))  # JSON is YAML
    report = bench_step(config_path, tmp_path / "bench.json", mode="ce", steps=2, warmup=1)
    assert json.loads((tmp_path / "bench.json").read_text()) == report
    assert report["temporary_run"] is False
    ce = report["modes"]["ce"]
    assert ce["tokens_per_second"] > 0 and ce["tokens_per_step"] == 8 * 32
    with pytest.raises(ValueError, match="unknown mode 'nope'"):
        bench_step(config_path, None, mode="nope")


@pytest.mark.slow
def test_bench_step_builds_a_temporary_run_when_tokens_are_missing(tiny_config_path):
    from babydistill.workflows.benchmarks.bench_step import bench_step

    report = bench_step(tiny_config_path, None, mode="all", steps=1, warmup=0)
    assert report["temporary_run"] is True and set(report["modes"]) == {"ce", "offline", "online"}
    assert {"offline_over_ce_time", "offline_over_ce_peak_memory", "offline_over_online_time"} <= set(report["ratios"])
    assert not load_config(tiny_config_path).run_path.exists()


# --- through the CLI ---------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_teacher_runs_resumes_and_reports_errors_in_one_line(tiny_config_path, capsys):
    from babydistill.workflows.cli import main

    args = [str(tiny_config_path), "--set", "train.max_steps=6", "--set", "train.save_every=3"]
    assert main(["teacher", *args, "--seed", "1"]) == 2  # no tokens yet
    err = capsys.readouterr().err.strip()
    assert err.startswith("babydistill: error:") and "tokenize" in err and "\n" not in err
    for verb in ("prepare", "tokenizer", "tokenize"):
        assert main([verb, str(tiny_config_path)]) == 0
    config = load_config(tiny_config_path)
    assert main(["teacher", *args, "--seed", "1"]) == 0
    out = config.teacher_path("t1")
    assert (out / "model.safetensors").is_file() and not out.with_name("t1.partial").exists()
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2
    capsys.readouterr()
    assert main(["teacher", *args, "--seed", "1"]) == 0  # up to date: skipped
    assert "[skip]" in capsys.readouterr().out
