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

from pipeline.cache import capture_logits
from pipeline.config import load_config
from pipeline.distill import train_student
from pipeline.teacher import train_teacher

TOLERANCE = 1e-6
# step -> (loss, ce, kl) of the train records and val_loss of the val records, per model (see golden_run).
GOLDEN: dict[str, dict] = {
    "t1": {
        "train": [
            [1, 6.015223503112793, 6.015223503112793, 0.0],
            [2, 5.937627792358398, 5.937627792358398, 0.0],
            [3, 5.835042476654053, 5.835042476654053, 0.0],
            [4, 5.711145401000977, 5.711145401000977, 0.0],
        ],
        "val": [[2, 5.824702898661296], [4, 5.64540155728658]],
    },
    "t2": {
        "train": [
            [1, 5.9942402839660645, 5.9942402839660645, 0.0],
            [2, 5.9183268547058105, 5.9183268547058105, 0.0],
            [3, 5.80312967300415, 5.80312967300415, 0.0],
            [4, 5.67767858505249, 5.67767858505249, 0.0],
        ],
        "val": [[2, 5.793622414271037], [4, 5.622652451197307]],
    },
    "s-hybrid": {
        "train": [
            [1, 4.907082557678223, 6.0253987312316895, 3.788766860961914],
            [2, 4.870876312255859, 5.952362537384033, 3.7893903255462646],
            [3, 4.811741352081299, 5.837242126464844, 3.786240816116333],
            [4, 4.762484073638916, 5.7336273193359375, 3.7913405895233154],
        ],
        "val": [[2, 5.841762145360311], [4, 5.683300892512004]],
    },
    "s-topk": {
        "train": [
            [1, 3.013747453689575, 6.0253987312316895, 0.002096347976475954],
            [2, 2.9759681224823, 5.950349807739258, 0.0015864726155996323],
            [3, 2.912930727005005, 5.824976921081543, 0.0008844438125379384],
            [4, 2.851794958114624, 5.703307151794434, 0.000282601045910269],
        ],
        "val": [[2, 5.829349597295125], [4, 5.6446841557820635]],
    },
    "o1": {
        "train": [
            [1, 3.013446569442749, 6.015223026275635, 0.011670045554637909],
            [2, 2.9736063480377197, 5.937071323394775, 0.01014125905930996],
            [3, 2.9203059673309326, 5.833791732788086, 0.006820094771683216],
            [4, 2.8570737838745117, 5.710293292999268, 0.003854339476674795],
        ],
        "val": [[2, 5.823718627293904], [4, 5.6447990735371905]],
    },
}


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
        cache_cfg = load_config(path, [f"cache.mode={mode}"]).cache
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
