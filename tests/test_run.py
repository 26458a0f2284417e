"""`babydistill run`: every stage in order on a tiny corpus; a second run does nothing and says so."""

from __future__ import annotations

import json

import pytest
from conftest import write_config, write_corpus

from babydistill.pipeline.config import load_config
from babydistill.workflows.cli import build_parser, main


@pytest.mark.slow
def test_run_goes_end_to_end_then_skips_everything(tmp_path, capsys):
    write_corpus(tmp_path / "corpus", num_files=3, paragraphs=120)
    path = write_config(tmp_path, {"train": {"max_steps": 6, "save_every": 3, "log_every": 3},
                                   "distill": {"students": 2, "online_students": 1}})
    config = load_config(path)
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Ran 15 stage(s)" in out and str(config.report_path / "report.md") in out

    run = config.run_path
    for model in ("teachers/t1", "teachers/t2", "students/s1", "students/s2", "students/o1"):
        eval_json = json.loads((run / model / "eval.json").read_text())
        assert eval_json["loss"]["test"]["ce"] > 0 and 0 <= eval_json["blimp"]["overall"] <= 1
        assert (run / model / "stage.json").is_file()
    report = (config.report_path / "report.md").read_text()
    assert "| s1 |" in report and "| o1 |" in report and "teachers mean" in report
    assert not list(run.rglob("*.partial"))

    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Everything is up to date: nothing to do" in out and "[run ]" not in out
    assert main(["status", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert len(lines) == 15 and all(line.split()[0] == "done" for line in lines)

    # The store's stage is `capture`; `cache`, its earlier name, is the same verb.
    for verb in ("capture", "cache"):
        assert main([verb, str(path)]) == 0
        assert f"[skip] capture: up to date ({run / 'logits.zarr'})" in capsys.readouterr().out

    # A changed config is refused for the stages it touches, and --force rebuilds them.
    assert main(["run", str(path), "--set", "distill.alpha=0.9"]) == 2
    assert "student s1" in capsys.readouterr().err


def test_run_keeps_garbled_checkpoints_and_refuses_a_fresh_start_without_force(tmp_path, capsys, monkeypatch):
    """`run` resumes with --resume auto: when every checkpoint of an interrupted teacher is unreadable they are
    moved aside (never deleted), `run` stops with one line naming --force, and --force starts over."""
    import babydistill.pipeline.training.checkpoint as train_module

    write_corpus(tmp_path / "corpus", num_files=3, paragraphs=60)
    path = write_config(tmp_path, {"train": {"max_steps": 8, "save_every": 4, "log_every": 4}})
    export = train_module.export_hf

    def interrupted(*args, **kwargs):  # killed after the last checkpoint, before the export
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "export_hf", interrupted)
    assert main(["run", str(path)]) == 130
    capsys.readouterr()
    work = load_config(path).run_path / "teachers" / "t1.partial"
    state = work / "trainer_state"
    steps = sorted(p.name for p in state.glob("step-*"))
    assert steps == ["step-000004", "step-000008"]
    for step in steps:
        (state / step / "model.pt").write_bytes(b"garbage " + step.encode())

    monkeypatch.setattr(train_module, "export_hf", export)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("babydistill: error: ") and "--force" in err[-1] and "unreadable" in err[-1]
    for step in steps:  # moved aside whole, never deleted
        assert (state / "unreadable" / step / "model.pt").read_bytes() == b"garbage " + step.encode()
    assert main(["run", str(path)]) == 2  # still no fresh start without --force
    capsys.readouterr()

    assert main(["teacher", str(path), "--seed", "1", "--force"]) == 0
    assert (load_config(path).run_path / "teachers" / "t1" / "model.safetensors").is_file()


def test_capture_is_the_listed_verb_and_cache_its_alias(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one line per verb
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert "logit store" in lines["capture"] and "alias of `capture`" in lines["cache"]
    for verb in ("capture", "cache"):
        with pytest.raises(SystemExit):
            parser.parse_args([verb, "--help"])
        assert f"usage: babydistill {verb} " in capsys.readouterr().out


@pytest.mark.parametrize("verb", ["capture", "cache"])
def test_capture_and_cache_run_the_capture_stage(tiny_config_path, capsys, verb):
    assert main([verb, str(tiny_config_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("babydistill: error: capture: run `babydistill tokenize CONFIG`, `babydistill teacher")


@pytest.mark.parametrize("verb", ["capture", "cache"])
@pytest.mark.parametrize(("flags", "k", "workers"), [
    ([], 8, 1),
    (["--k", "4"], 4, 1),
    (["--set", "cache.k=4"], 4, 1),
    (["--set", "cache.k=2", "--k", "5"], 5, 1),  # the later wins, as between two --set
    (["--k", "5", "--set", "cache.k=2", "--workers", "3"], 2, 3),
])
def test_k_and_workers_flags_are_spellings_of_set(tiny_config_path, verb, flags, k, workers):
    """`--k K` is `--set cache.k=K` (one way to set k): the flag becomes an override of the config key."""
    args = build_parser().parse_args([verb, str(tiny_config_path), *flags])
    config = load_config(args.config, args.set)
    assert (config.cache.k, config.cache.workers) == (k, workers)
