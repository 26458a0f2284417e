"""Refactors do not change the numbers: a fixed-seed run through teacher, cache and student, against losses
recorded from the code before the refactor (issue 14). Two 2-layer teachers, a hybrid store (the default
mode) and a top-k store, an offline student on each and an online one, a few steps each.

A change that does touch the math must update GOLDEN on purpose and say why in its commit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from babydistill.pipeline.capture import capture_logits
from babydistill.pipeline.config import load_config
from babydistill.pipeline.distill import train_student
from babydistill.pipeline.teacher import train_teacher

TOLERANCE = 1e-6
# Per model (see golden_run): [step, loss, ce, kl] of the train records and [step, val_loss] of the val records,
# recorded before the refactor of issue 14.
GOLDEN: dict[str, dict] = json.loads(Path(__file__).with_name("golden_losses.json").read_text())


def _records(out: Path) -> dict:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"train": [[r["step"], r["loss"], r.get("ce", r["loss"]), r.get("kl", 0.0)] for r in lines
                      if r["kind"] == "train"],
            "val": [[r["step"], r["val_loss"]] for r in lines if r["kind"] == "val"]}


@pytest.fixture(scope="module")
def golden_run(tiny_run, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("golden")
    shutil.copytree(tiny_run.run_path, root / "run")
    raw = tiny_run.to_dict()
    raw["run_dir"] = str(root / "run")
    path = root / "config.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    config = load_config(path, ["train.max_steps=4", "train.eval_every=2", "train.log_every=1",
                                "train.num_threads=1", "cache.samples=8"])
    records = {}
    teachers = []
    for seed in (1, 2):
        out = train_teacher(config, config.tokens_path, config.tokenizer_path, root / f"t{seed}", seed=seed)
        records[f"t{seed}"] = _records(out)
        teachers.append(out)
    for mode in ("hybrid", "topk"):
        cache_cfg = load_config(path, [f"cache.mode={mode}", "cache.samples=8"]).cache  # as recorded
        store = root / f"{mode}.zarr"
        capture_logits(cache_cfg, config.tokens_path, config.tokenizer_path, teachers, store, workers=1)
        out = train_student(config, config.tokens_path, config.tokenizer_path, store, root / f"s-{mode}", seed=1)
        records[f"s-{mode}"] = _records(out)
    out = train_student(config, config.tokens_path, config.tokenizer_path, None, root / "o1", seed=1, online=True,
                        teacher_dirs=teachers)
    records["o1"] = _records(out)
    return records


def test_fixed_seed_losses_match_the_recorded_ones(golden_run):
    assert golden_run.keys() == GOLDEN.keys(), json.dumps(golden_run)
    for model, expected in GOLDEN.items():
        actual = golden_run[model]
        for kind in ("train", "val"):
            assert [row[0] for row in actual[kind]] == [row[0] for row in expected[kind]], (model, kind)
            for got, want in zip(actual[kind], expected[kind]):
                for g, w in zip(got[1:], want[1:]):
                    assert abs(g - w) <= TOLERANCE, f"{model} {kind} step {got[0]}: {g!r} != {w!r} (recorded)"
