"""Stage `report`: report.md and its plots for a fake run (no models are loaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from babydistill.pipeline.config import Config
from babydistill.pipeline.evaluate import FIELDS
from babydistill.pipeline.report import find_models, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_eval(val_ce: float, test_ce: float, blimp: float, *, num_pairs: int = 335) -> dict:
    """An eval.json in the schema evaluate_model writes (field accuracies offset around overall)."""
    fields = {field: blimp + 0.01 * (i - 1.5) for i, field in enumerate(FIELDS)}
    split = lambda ce: {"ce": ce, "perplexity": 2.718281828 ** ce, "num_windows": 8, "num_tokens": 256}  # noqa: E731
    return {"format": "babydistill.eval", "format_version": 1, "model": "m", "tokens_hash": "abc",
            "loss": {"validation": split(val_ce), "test": split(test_ce)},
            "blimp": {"source": "blimp.zip", "overall": blimp, "fields": fields, "paradigms": {"adjunct_island": blimp},
                      "num_pairs": num_pairs, "num_paradigms": 67, "max_pairs_per_paradigm": 5, "seed": 0},
            "seconds": {"load": 0.1, "loss": 1.0, "blimp": 2.0, "total": 3.1}}


def fake_metrics(final: float, student: bool) -> list[dict]:
    lines = []
    for step in range(10, 101, 10):
        line = {"kind": "train", "step": step, "epoch": step // 50, "lr": 1e-3, "loss": final + 5 / step,
                "tokens_per_second": 1000.0}
        if student:
            line.update(ce=final + 6 / step, kl=0.5)
        lines.append(line)
    lines += [{"kind": "val", "step": s, "epoch": s // 50, "val_loss": final + 3 / s} for s in (50, 100)]
    return lines


def make_model(root: Path, name: str, evaluation: dict | None, final: float) -> None:
    folder = root / ("teachers" if name.startswith("t") else "students") / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    lines = fake_metrics(final, student=not name.startswith("t"))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + "\n")
    if evaluation is not None:
        (folder / "eval.json").write_text(json.dumps(evaluation))


@pytest.fixture
def fake_run(tmp_path) -> Config:
    root = tmp_path / "run"
    make_model(root, "t1", fake_eval(3.30, 3.40, 0.600), 3.3)
    make_model(root, "t2", fake_eval(3.10, 3.20, 0.620), 3.1)
    make_model(root, "s1", fake_eval(3.05, 3.15, 0.630), 3.0)
    make_model(root, "s2", fake_eval(3.00, 3.05, 0.610), 3.0)
    make_model(root, "s3", None, 3.0)  # trained, not evaluated
    make_model(root, "o1", fake_eval(3.02, 3.10, 0.640), 3.0)
    return Config(run_dir=str(root))


def table_row(text: str, first_cell: str) -> list[str]:
    rows = [line for line in text.splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(rows) == 1, f"expected one row for {first_cell!r}, got {rows}"
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


def test_report_table_plots_and_best_model(fake_run, tmp_path):
    out = tmp_path / "report"
    path = write_report(fake_run, out)
    assert path == out / "report.md"
    text = path.read_text()

    assert table_row(text, "model")[:5] == ["model", "group", "val CE", "test CE", "BLiMP"]
    assert table_row(text, "model")[5:] == list(FIELDS)
    assert table_row(text, "t1") == ["t1", "teachers", "3.300", "3.400", "60.0", "58.5", "59.5", "60.5", "61.5"]
    assert table_row(text, "s2")[:5] == ["s2", "offline students", "3.000", "3.050", "61.0"]
    assert table_row(text, "o1")[:5] == ["o1", "online students", "3.020", "3.100", "64.0"]
    assert table_row(text, "s3")[:3] == ["s3", "offline students", "not evaluated"]
    # mean ± std (sample std) per group with several evaluated seeds; none for the single online student
    teachers = table_row(text, "**teachers mean ± std (n=2)**")
    assert teachers[2:5] == ["3.200 ± 0.141", "3.300 ± 0.141", "61.0 ± 1.4"]
    students = table_row(text, "**offline students mean ± std (n=2)**")
    assert students[2:5] == ["3.025 ± 0.035", "3.100 ± 0.071", "62.0 ± 1.4"]
    assert "online students mean" not in text
    # rows in group order: teachers, offline, online
    order = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")][2:]
    assert order == ["t1", "t2", "**teachers mean ± std (n=2)**", "s1", "s2", "s3",
                     "**offline students mean ± std (n=2)**", "o1"]

    assert "Lowest test CE: **s2** (offline students), 3.050, -0.150 nats versus the best teacher t2 (3.200)." in text
    assert "Highest BLiMP: **o1** (online students), 64.0%, +2.0 points versus the best teacher t2 (62.0%)." in text
    assert "- offline students (mean of 2) versus teachers (mean of 2): test CE -0.200 nats, BLiMP +1.0 points." in text
    assert "- online students (mean of 1) versus teachers (mean of 2): test CE -0.200 nats, BLiMP +3.0 points." in text
    assert "Not evaluated (no eval.json): s3." in text
    assert "Models: 2 teachers, 3 offline students, 1 online student (5 evaluated)." in text
    assert "Warning" not in text

    for name in ("curves.png", "blimp_fields.png", "test_ce.png"):
        png = out / name
        assert png.is_file() and png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000, name
        assert f"({name})" in text


def test_report_says_when_a_teacher_is_best(tmp_path):
    root = tmp_path / "run"
    make_model(root, "t1", fake_eval(3.0, 3.0, 0.70), 3.0)
    make_model(root, "s1", fake_eval(3.1, 3.2, 0.65), 3.1)
    text = write_report(Config(run_dir=str(root)), tmp_path / "report").read_text()
    assert "Lowest test CE: **t1** (teachers), 3.000; it is a teacher; the best student, s1, is 0.200 nats behind." in text
    assert "Highest BLiMP: **t1** (teachers), 70.0%; it is a teacher; the best student, s1, is 5.0 points behind." in text
    assert "mean ± std (n=" not in text


def test_report_warns_when_evaluations_differ(tmp_path):
    root = tmp_path / "run"
    make_model(root, "t1", fake_eval(3.0, 3.0, 0.70), 3.0)
    make_model(root, "s1", fake_eval(3.1, 3.2, 0.65, num_pairs=67000), 3.1)
    text = write_report(Config(run_dir=str(root)), tmp_path / "report").read_text()
    assert "not all evaluated on the same" in text


def test_report_without_evaluations_still_plots_curves(tmp_path):
    root = tmp_path / "run"
    make_model(root, "t1", None, 3.0)
    make_model(root, "t2", None, 3.1)
    text = write_report(Config(run_dir=str(root)), tmp_path / "report").read_text()
    assert "Not evaluated (no eval.json): t1, t2." in text and "## Best model" not in text
    assert (tmp_path / "report" / "curves.png").is_file()
    assert not (tmp_path / "report" / "test_ce.png").exists()


def test_models_are_found_in_natural_order(tmp_path):
    root = tmp_path / "run"
    for name in ("t10", "t2", "o1", "s1", "s2.partial"):
        make_model(root, name, None, 3.0)
    assert [(m.name, m.group) for m in find_models(Config(run_dir=str(root)))] == [
        ("t2", "teachers"), ("t10", "teachers"), ("s1", "offline students"), ("o1", "online students")]


def test_empty_run_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no teachers or students"):
        write_report(Config(run_dir=str(tmp_path / "nothing")), tmp_path / "report")
