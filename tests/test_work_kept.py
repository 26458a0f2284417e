"""No work lost: a changed config never deletes a partial training run, checkpoints and exported models carry
checksums that loading checks, checkpoint folders without COMPLETE are moved aside."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import write_config, write_corpus
from safetensors.torch import load_file
from test_train import run_teacher, with_train

import babydistill.pipeline.training.checkpoint as train_module
from babydistill.pipeline.config import load_config
from babydistill.pipeline.model import load_model
from babydistill.pipeline.training.checkpoint import INCOMPLETE, STATE_DIR, UNREADABLE, complete_checkpoints
from babydistill.workflows.cli import main


def _interrupted_teacher(tmp_path, monkeypatch, capsys, **train) -> Path:
    """`run` of one teacher killed after its last checkpoint, before its export: t1.partial with checkpoints."""
    write_corpus(tmp_path / "corpus", num_files=3, paragraphs=60)
    path = write_config(tmp_path, {"train": {"max_steps": 8, "save_every": 4, "log_every": 4, **train},
                                   "teachers": {"count": 1}, "distill": {"students": 0}})
    export = train_module.export_hf

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "export_hf", killed)
    assert main(["run", str(path)]) == 130
    monkeypatch.setattr(train_module, "export_hf", export)
    capsys.readouterr()
    return path


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("babydistill: error: "), err
    return err[0]


def test_a_changed_key_refuses_the_partial_run_naming_the_key_and_deletes_nothing(tmp_path, monkeypatch, capsys):
    path = _interrupted_teacher(tmp_path, monkeypatch, capsys)
    state = load_config(path).run_path / "teachers" / "t1.partial" / STATE_DIR
    before = {p.name: (p / "model.pt").read_bytes() for p in complete_checkpoints(state)}
    assert sorted(before) == ["step-000004", "step-000008"]
    for args in (["teacher", str(path), "--seed", "1", "--resume", "--set", "train.eval_every=2"],
                 ["teacher", str(path), "--seed", "1", "--resume", "auto", "--set", "train.lr=0.001"],
                 ["run", str(path), "--set", "train.eval_every=2"]):
        assert main(args) == 2
        line = _error(capsys)
        key = "train.lr: 0.003 -> 0.001" if "train.lr=0.001" in args[-1] else "train.eval_every: null -> 2"
        assert key in line and "--force moves it aside" in line and "t1.partial" in line, line
        assert {p.name: (p / "model.pt").read_bytes() for p in complete_checkpoints(state)} == before


def test_force_moves_the_partial_run_aside_and_names_it(tmp_path, monkeypatch, capsys):
    path = _interrupted_teacher(tmp_path, monkeypatch, capsys)
    teachers = load_config(path).run_path / "teachers"
    assert main(["teacher", str(path), "--seed", "1", "--force", "--set", "train.eval_every=2"]) == 0
    out = capsys.readouterr().out
    aside = [p for p in teachers.iterdir() if p.name.startswith("t1.aside-")]
    assert len(aside) == 1 and f"moved {teachers / 't1.partial'} aside to {aside[0]}" in out
    assert [p.name for p in complete_checkpoints(aside[0] / STATE_DIR)] == ["step-000004", "step-000008"]
    assert (teachers / "t1" / "model.safetensors").is_file()


@pytest.mark.slow
def test_extending_a_run_resumes_it_and_equals_the_uninterrupted_longer_run(tmp_path, monkeypatch, capsys):
    """With a constant learning rate after warm-up (min_lr_ratio = 1) the schedule does not depend on the
    run's length, so 8 steps, then 4 more after train.max_steps 8 -> 12, give the weights of 12 steps."""
    constant = {"min_lr_ratio": 1.0, "warmup_steps": 2}
    path = _interrupted_teacher(tmp_path / "a", monkeypatch, capsys, **constant)
    assert main(["teacher", str(path), "--seed", "1", "--resume", "--set", "train.max_steps=12"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "train.max_steps: 8 -> 12" in out and "step 8/12" in out
    resumed = load_file(load_config(path).run_path / "teachers" / "t1" / "model.safetensors")

    write_corpus(tmp_path / "b" / "corpus", num_files=3, paragraphs=60)
    whole = write_config(tmp_path / "b", {"train": {"max_steps": 12, "save_every": 4, "log_every": 4, **constant},
                                          "teachers": {"count": 1}, "distill": {"students": 0}})
    assert main(["run", str(whole)]) == 0
    uninterrupted = load_file(load_config(whole).run_path / "teachers" / "t1" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert (resumed[name] - uninterrupted[name]).abs().max().item() < 1e-6, name


def _flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model.pt", "optimizer.pt", "rng-rank0.safetensors", "meta.json"])
def test_a_flipped_byte_in_a_checkpoint_is_found_and_the_previous_one_resumed(tiny_run, tmp_path, name):
    config = with_train(tiny_run, max_steps=8, save_every=4)
    run = run_teacher(config, tmp_path / "t")
    state = run / STATE_DIR
    # meta.json: a digit of the step, which JSON still parses
    _flip_byte(state / "step-000008" / name, None if name != "meta.json" else
               (state / "step-000008" / name).read_bytes().index(b'"step": 8') + 8)
    with pytest.warns(UserWarning, match="step-000008: unreadable checkpoint .*changed after"):
        run_teacher(config, run, resume="auto")
    assert (state / UNREADABLE / "step-000008" / name).is_file()  # moved aside whole
    assert (run / "model.safetensors").is_file()
    assert json.loads((run / "train_summary.json").read_text())["num_steps"] == 8


def test_checkpoint_folders_without_complete_are_moved_aside_not_deleted(tiny_run, tmp_path):
    config = with_train(tiny_run, max_steps=8, save_every=4)
    run = run_teacher(config, tmp_path / "t")
    state = run / STATE_DIR
    for folder in complete_checkpoints(state):
        (folder / "COMPLETE").unlink()
    (state / "step-000012.tmp").mkdir()
    with pytest.warns(UserWarning, match="incomplete checkpoint"):
        run_teacher(config, run, resume="auto")  # nothing to resume: a fresh start, the folders kept
    kept = sorted(p.name for p in (state / INCOMPLETE).iterdir())
    assert kept == ["step-000004", "step-000008", "step-000012.tmp"]
    assert (state / INCOMPLETE / "step-000008" / "model.pt").is_file()


def test_an_exported_model_whose_weights_changed_is_refused_by_every_loader(tiny_run, tmp_path):
    run = run_teacher(with_train(tiny_run, max_steps=4, save_every=4), tmp_path / "t")
    records = json.loads((run / "checksums.json").read_text())
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(records)
    load_model(run)  # as written: loads
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    _flip_byte(copy / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors \(crc32 .* written\) changed after the model was exp"):
        load_model(copy)
    (copy / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"model.safetensors \(100 bytes"):
        load_model(copy)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A whole tiny run (1 teacher, its store, 1 student, evaluations, report): copy it before changing it."""
    root = tmp_path_factory.mktemp("finished")
    write_corpus(root / "corpus", num_files=3, paragraphs=60)
    path = write_config(root, {"train": {"max_steps": 4, "save_every": 4, "log_every": 4},
                               "teachers": {"count": 1}, "cache": {"mode": "hybrid", "k": 4, "samples": 6,
                                                                   "temperatures": [1.0]},
                               "distill": {"students": 1}})
    assert main(["run", str(path)]) == 0
    return root


def _copy_run(finished_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    shutil.copytree(finished_run, tmp_path / "r")
    path = tmp_path / "r" / "tiny.yaml"
    raw = path.read_text().replace(str(finished_run), str(tmp_path / "r"))
    path.write_text(raw)
    return path, load_config(path).run_path


@pytest.mark.parametrize("edit", ["data_type", "shape", "chunk_shape", "deleted", "not json"])
def test_edited_array_metadata_is_refused_by_the_reader_and_repaired_by_cache(finished_run, tmp_path, capsys, edit):
    path, run = _copy_run(finished_run, tmp_path)
    meta_file = run / "logits.zarr" / "logp" / "zarr.json"
    original = meta_file.read_text()
    meta = json.loads(original)
    if edit == "data_type":
        meta["data_type"] = "int16"
    elif edit == "shape":
        meta["shape"][0] = 400
    elif edit == "chunk_shape":
        meta["chunk_grid"]["configuration"]["chunk_shape"][0] += 1
    meta_file.write_text("{not json" if edit == "not json" else json.dumps(meta))
    if edit == "deleted":
        meta_file.unlink()
    capsys.readouterr()
    assert main(["store", "verify", str(run / "logits.zarr")]) != 0
    out = capsys.readouterr()
    assert "logp/zarr.json" in out.out + out.err and "Traceback" not in out.err
    assert main(["distill", str(path), "--seed", "1", "--name", "s9"]) == 2
    line = _error(capsys)
    assert "logp/zarr.json" in line and "babydistill capture CONFIG" in line, line
    assert not (run / "students" / "s9").exists()
    assert main(["status", str(path)]) == 0
    assert "array metadata changed" in capsys.readouterr().out
    assert main(["cache", str(path)]) == 0
    assert "rewrote" in capsys.readouterr().out
    assert json.loads(meta_file.read_text()) == json.loads(original)
    assert main(["store", "verify", str(run / "logits.zarr")]) == 0
    assert main(["distill", str(path), "--seed", "1", "--name", "s9"]) == 0


def test_a_finished_model_whose_weights_changed_is_refused_until_force_which_keeps_it(finished_run, tmp_path,
                                                                                      capsys):
    path, run = _copy_run(finished_run, tmp_path)
    weights = run / "teachers" / "t1" / "model.safetensors"
    _flip_byte(weights)
    damaged = weights.read_bytes()
    capsys.readouterr()
    assert main(["run", str(path)]) == 2
    line = _error(capsys)
    assert "teacher t1" in line and "model.safetensors (crc32" in line and "--force" in line, line
    assert main(["status", str(path)]) == 0
    assert "damaged" in capsys.readouterr().out
    assert main(["teacher", str(path), "--seed", "1", "--force"]) == 0
    out = capsys.readouterr().out
    aside = [p for p in (run / "teachers").iterdir() if p.name.startswith("t1.aside-")]
    assert len(aside) == 1 and (aside[0] / "model.safetensors").read_bytes() == damaged and str(aside[0]) in out


def test_a_finished_model_without_its_marker_is_not_retrained_over(finished_run, tmp_path, capsys):
    path, run = _copy_run(finished_run, tmp_path)
    (run / "students" / "s1" / "stage.json").unlink()
    weights = (run / "students" / "s1" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["run", str(path)]) == 2
    line = _error(capsys)
    assert "student s1" in line and "no stage marker" in line and "--force" in line, line
    assert (run / "students" / "s1" / "model.safetensors").read_bytes() == weights
