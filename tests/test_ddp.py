"""DDP: two gloo processes (torchrun) match one process with the same global batch, teacher and student."""
# ruff: noqa: F811  (the module fixture imported from test_distill is used as an argument)

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_distill import distill_run  # noqa: F401  (module fixture)
from test_train import assert_same_metrics, assert_same_weights, run_teacher, with_train

from babydistill.pipeline.training.checkpoint import STATE_DIR, complete_checkpoints

HELPER = Path(__file__).with_name("_train_run.py")


def assert_same_run(ddp: Path, single: Path) -> None:
    """The same weights and the same logged losses, step by step."""
    assert_same_weights(ddp, single, atol=1e-5)
    assert_same_metrics(ddp, single, atol=1e-5)


def _torchrun(config, out: Path, *args: str) -> subprocess.CompletedProcess:
    config_json = out.parent / f"{out.name}.json"
    config_json.write_text(json.dumps(config.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(HELPER), str(config_json), str(out), "--seed", "1", *args],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tiny_run, tmp_path):
    # global batch 8 windows: 1 process x 8, and 2 processes x 4
    single = run_teacher(with_train(tiny_run, batch_size=8, max_steps=6, save_every=3, eval_every=3,
                                    num_threads=1), tmp_path / "single")
    config = with_train(tiny_run, batch_size=4, max_steps=6, save_every=3, eval_every=3, num_threads=1)
    proc = _torchrun(config, tmp_path / "ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = tmp_path / "ddp"
    assert_same_run(ddp, single)

    # only rank 0 wrote the outputs; every rank saved its RNG state; rank 0 alone printed the log
    assert json.loads((ddp / "train_summary.json").read_text())["world_size"] == 2
    newest = complete_checkpoints(ddp / STATE_DIR)[-1]
    assert {"rng-rank0.safetensors", "rng-rank1.safetensors"} <= {p.name for p in newest.iterdir()}
    assert proc.stdout.count("step 6/6 | loss") == 1


@pytest.mark.slow
def test_two_process_offline_student_matches_one_process(distill_run, tmp_path):
    """Each rank reads its own positions of the store; together they equal one process with the global batch."""
    from babydistill.pipeline.distill import train_student

    single_cfg = with_train(distill_run, batch_size=8, max_steps=6, save_every=3, eval_every=3, num_threads=1)
    single = train_student(single_cfg, single_cfg.tokens_path, single_cfg.tokenizer_path, single_cfg.logits_path,
                           tmp_path / "single", seed=1)
    config = with_train(distill_run, batch_size=4, max_steps=6, save_every=3, eval_every=3, num_threads=1)
    proc = _torchrun(config, tmp_path / "ddp", "--stage", "student")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(tmp_path / "ddp", single)


@pytest.mark.slow
def test_two_process_student_with_the_tail_control_variate_matches_one_process(distill_run, tmp_path):
    """With the control variate each half of the ranks takes its beta from the other half: two processes
    compute what one process with their global batch computes."""
    import shutil

    from babydistill.pipeline.capture import capture_logits
    from babydistill.pipeline.distill import train_student

    run = tmp_path / "run"
    run.mkdir()
    for name in ("data", "tokenizer", "tokens.zarr", "teachers"):
        (run / name).symlink_to(distill_run.run_path / name)
    single_cfg = with_train(distill_run, batch_size=8, max_steps=4, save_every=2, eval_every=2, num_threads=1)
    single_cfg = dataclasses.replace(
        single_cfg, run_dir=str(run),
        cache=dataclasses.replace(single_cfg.cache, mode="hybrid", k=4, samples=12, tail_logp=True),
        distill=dataclasses.replace(single_cfg.distill, control_variate="required", normalization="sequence"))
    capture_logits(dataclasses.replace(single_cfg.cache, workers=1), single_cfg.tokens_path, single_cfg.tokenizer_path,
                   [single_cfg.teacher_path("t1"), single_cfg.teacher_path("t2")], single_cfg.logits_path)
    single = train_student(single_cfg, single_cfg.tokens_path, single_cfg.tokenizer_path, single_cfg.logits_path,
                           tmp_path / "single", seed=1)
    config = dataclasses.replace(single_cfg, train=dataclasses.replace(single_cfg.train, batch_size=4))
    proc = _torchrun(config, tmp_path / "ddp", "--stage", "student")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(tmp_path / "ddp", single)
    assert json.loads((single / "train_summary.json").read_text())["control_variate"] is True
    shutil.rmtree(run / "logits.zarr")
