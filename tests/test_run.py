"""`babydistill run`: every stage in order on a tiny corpus; a second run does nothing and says so."""

from __future__ import annotations

import json

import pytest
from conftest import write_config, write_corpus

from pipeline.config import load_config
from workflows.cli import main


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

    # A changed config is refused for the stages it touches, and --force rebuilds them.
    assert main(["run", str(path), "--set", "distill.alpha=0.9"]) == 2
    assert "student s1" in capsys.readouterr().err
