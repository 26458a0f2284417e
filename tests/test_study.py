"""`babydistill study`: the paired interval, study-file refusals, a tiny 2-arm x 2-seed study end to end."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import yaml
from conftest import write_config, write_corpus

from babydistill.pipeline.config import load_config
from babydistill.workflows.cli import _config, build_parser, main
from babydistill.workflows.experiments.study_spec import load_study
from babydistill.workflows.experiments.study_stats import paired_ci
from babydistill.workflows.experiments.study_units import arm_units, teacher_units, unit_commands

ONLINE = {"name": "online", "online": True}
OFFLINE = {"name": "topk4", "set": ["cache.k=4", "distill.alpha=0.3"]}


def write_study(tmp_path, **fields):
    study = {"base": "tiny.yaml", "seeds": [1, 2], "reference": "online",
             "set": ["eval.max_pairs_per_paradigm=1"], "arms": [ONLINE, OFFLINE], **fields}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study), encoding="utf-8")
    return path


def table_row(text: str, first_cell: str, index: int = 0) -> list[str]:
    """The cells of the ``index``-th table row starting with ``first_cell`` (0: the arms table, 1: contrasts, 2: test
    CE per seed)."""
    rows = [line for line in text.splitlines() if line.startswith(f"| {first_cell} |")]
    return [cell.strip() for cell in rows[index].strip("|").split("|")]


# --- statistics ---------------------------------------------------------------------------------


def test_paired_ci_matches_a_hand_computed_example():
    # d = (0.10, 0.20, 0.05): mean 0.116667, sd 0.0763763, se 0.0440959, t(0.975, 2) = 4.302653
    ci = paired_ci({1: 3.00, 2: 3.20, 3: 3.10, 4: 9.9}, {1: 2.90, 2: 3.00, 3: 3.05})
    assert ci["seeds"] == [1, 2, 3] and ci["n"] == 3  # seed 4 has no reference: not paired
    assert ci["mean"] == pytest.approx(0.1166667, abs=1e-6)
    assert ci["sd"] == pytest.approx(0.0763763, abs=1e-6)
    assert ci["half_width"] == pytest.approx(4.302653 * 0.0440959, abs=1e-5)
    assert (ci["low"], ci["high"]) == pytest.approx((-0.073063, 0.306396), abs=1e-5)
    one = paired_ci({1: 3.0}, {1: 2.5, 2: 2.0})
    assert one["n"] == 1 and one["mean"] == pytest.approx(0.5) and one["half_width"] is None


# --- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, expected", [
    ({"arms": [ONLINE, {"name": "b", "set": ["model.num_layers=4"]}]}, "arms[1].set: 'model.num_layers=4' changes `model`"),
    ({"arms": [ONLINE, {"name": "b", "set": ["teachers.count=3"]}]}, "changes `teachers`"),
    ({"arms": [ONLINE, {"name": "b", "set": ["cache.nope=1"]}]}, "arms[1] (b): cache.nope: unknown key"),
    ({"arms": [ONLINE, {"name": "online"}]}, "arms[1].name: duplicate arm name 'online'"),
    ({"reference": "offline"}, "reference: must name one of the arms"),
    ({"seeds": [1]}, "seeds: a paired comparison needs at least 2 seeds"),
    ({"set": ["data.seq_len=16"]}, "set: 'data.seq_len=16' changes `data`"),
    ({"arms": [ONLINE, {"name": "b", "online": "yes"}]}, "arms[1].online: must be true or false"),
    ({"contrasts": [["online", "nope"]]}, "contrasts: 'nope' is not an arm"),
    ({"contrasts": ["online"]}, "contrasts: must be a list of [arm, arm] pairs"),
])
def test_bad_study_files_are_refused_in_one_line_and_write_nothing(tmp_path, capsys, fields, expected):
    write_config(tmp_path)
    path = write_study(tmp_path, **fields)
    assert main(["study", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("babydistill: error: ") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "run").exists()


def test_unknown_arm_or_seed_on_the_command_line_is_refused(tmp_path, capsys):
    write_config(tmp_path)
    path = write_study(tmp_path)
    assert main(["study", str(path), "--arms", "online,nope"]) == 2
    assert "--arms: no arm named 'nope'" in capsys.readouterr().err
    assert main(["study", str(path), "--seeds", "3"]) == 2
    assert "--seeds: 3 is not one of the study's seeds [1, 2]" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_subprocess_commands_load_the_same_config_as_the_arm(tmp_path):
    """--jobs runs `babydistill distill/evaluate` with --set: they must rebuild exactly the arm's config."""
    write_config(tmp_path)
    study = load_study(write_study(tmp_path))
    for unit in [*teacher_units(study), *arm_units(study.arm("topk4"), [2]), *arm_units(study.arm("online"), [1])]:
        for argv in unit_commands(study, unit, num_threads=3):
            args = build_parser().parse_args(argv)
            config = _config(args)
            assert config.train.num_threads == 3
            config.train.num_threads = unit.config.train.num_threads
            assert config.to_dict() == unit.config.to_dict()
    distill = unit_commands(study, arm_units(study.arm("online"), [1])[0], 1)[0]
    assert distill[0] == "distill" and distill[-1] == "--online" and "o1" in distill


# --- end to end ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_study_partial_then_report_only_then_complete_then_a_unit_with_jobs(tmp_path, capsys):
    write_corpus(tmp_path / "corpus", num_files=3, paragraphs=60)
    write_config(tmp_path, {"train": {"max_steps": 2, "save_every": 2, "log_every": 1},
                            "eval": {"max_pairs_per_paradigm": 1, "max_windows": 2}})
    path = write_study(tmp_path, contrasts=[["online", "topk4"]])
    run = load_config(tmp_path / "tiny.yaml").run_path
    study_dir = run / "study"

    # --- seed 1 only: a partial study
    assert main(["study", str(path), "--seeds", "1"]) == 0
    captured = capsys.readouterr()
    assert "only 2 seeds" in captured.err  # the warning below 3 seeds
    assert "online seed 1: test CE" in captured.out and "topk4 seed 1: test CE" in captured.out
    assert "teacher t1: test CE" in captured.out and "topk4 cache:" in captured.out
    for arm in ("online", "topk4"):
        for name in ("data", "tokenizer", "tokens.zarr", "teachers"):
            link = study_dir / arm / name
            assert link.is_symlink() and os.readlink(link) == f"../../{name}" and link.resolve() == (run / name).resolve()
    assert (study_dir / "online/students/o1/eval.json").is_file() and not (study_dir / "online/logits.zarr").exists()
    assert (study_dir / "topk4/students/s1/eval.json").is_file() and (study_dir / "topk4/logits.zarr").is_dir()
    assert (study_dir / "topk4/logs/s1.log").is_file()
    assert (study_dir / "teachers/t1/eval.json").is_file() and not (run / "teachers/t1/eval.json").exists()

    # --- report only, elsewhere: seed 2 is missing and flagged, nothing invented
    out = tmp_path / "partial-report"
    assert main(["study", str(path), "--report-only", "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "Incomplete: 2 of 4" in text
    assert table_row(text, "online")[2] == "1/2 (incomplete)"
    assert table_row(text, "topk4")[1] == "topk k=4 shuffled order"
    assert table_row(text, "topk4")[5].endswith("(n=1, no interval)")
    assert table_row(text, "topk4")[8] != "-"  # bytes/token: the store is finished
    assert table_row(text, "online", 2)[2] == "-" and table_row(text, "online", 2)[1] != "-"  # test CE, seeds 1, 2
    assert "- topk4 seed 2: student" in text
    results = json.loads((out / "results.json").read_text())
    cell = results["arms"][1]["per_seed"]["2"]
    assert cell["test_ce"] is None and cell["status"].startswith("student")
    assert not (study_dir / "online/students/o2").exists()  # report-only trained nothing

    # --- the whole study: seed 1 is skipped, seed 2 runs
    assert main(["study", str(path)]) == 0
    captured = capsys.readouterr().out
    assert "online seed 1: test CE" in captured and "(up to date)" in captured
    report = study_dir / "report"
    text = (report / "report.md").read_text()
    results = json.loads((report / "results.json").read_text())
    assert "Incomplete" not in text and "Reproduce: `babydistill study " in text
    assert (report / "test_ce_vs_bytes.png").read_bytes()[:4] == b"\x89PNG"
    online, topk = results["arms"]
    assert [a["name"] for a in results["arms"]] == ["online", "topk4"] and online["seeds_finished"] == [1, 2]
    for arm, folder, prefix in ((online, "online", "o"), (topk, "topk4", "s")):
        for seed in (1, 2):
            e = json.loads((study_dir / folder / f"students/{prefix}{seed}/eval.json").read_text())
            assert arm["per_seed"][str(seed)]["test_ce"] == e["loss"]["test"]["ce"]
    d = [topk["per_seed"][s]["test_ce"] - online["per_seed"][s]["test_ce"] for s in ("1", "2")]
    ci = topk["vs_reference"]["test_ce"]
    assert ci["n"] == 2 and ci["mean"] == pytest.approx(sum(d) / 2) and ci["low"] <= ci["mean"] <= ci["high"]
    contrast = results["contrasts"][0]  # online minus topk4: the same pairs, the other sign
    assert (contrast["arm"], contrast["minus"]) == ("online", "topk4")
    assert contrast["test_ce"]["mean"] == pytest.approx(-ci["mean"]) and contrast["test_ce"]["n"] == 2
    assert table_row(text, "online", 1)[1] == "topk4"  # the contrasts table
    assert table_row(text, "online")[5] == "reference" and table_row(text, "topk4")[5].startswith(f"{ci['mean']:+.3f} [")
    assert topk["store"]["bytes_per_token"] > 0 and topk["store"]["capture_seconds"] is not None
    assert topk["step_seconds"] > 0 and online["store"] is None
    assert table_row(text, "t1")[1] == "teacher" and results["best_teacher"] in ("t1", "t2")
    assert "Best teacher by validation CE" in text  # chosen on validation, never on test
    assert results["best_teacher"] == min(results["teachers"], key=lambda t: t["val_ce"])["name"]

    # --- --jobs: the same unit again, as `babydistill distill/evaluate` subprocesses with a log
    before = online["per_seed"]["2"]["test_ce"]
    shutil.rmtree(study_dir / "online/students/o2")
    assert main(["study", str(path), "--arms", "online", "--jobs", "2"]) == 0
    assert "online seed 2: test CE" in capsys.readouterr().out
    log = (study_dir / "online/logs/o2.log").read_text()
    assert "$ babydistill distill " in log and "--online" in log and "$ babydistill evaluate " in log
    again = json.loads((report / "results.json").read_text())["arms"][0]["per_seed"]["2"]["test_ce"]
    assert again == pytest.approx(before, abs=1e-3)


# --- claim studies: per-arm seeds and teachers, per-seed captures, a CE-only control, the protocol ---------------

CLAIM_ARMS = [{"name": "online", "online": True, "seeds": [1, 2, 3]},
              {"name": "store", "set": ["cache.k=4"], "capture": "per_seed", "seeds": [1, 2, 3]},
              {"name": "b-store", "set": ["cache.k=4"], "teachers": [3, 4], "seeds": [1, 2]},
              {"name": "ce", "set": ["distill.alpha=1"], "seeds": [1, 2]}]


def write_claim_study(tmp_path, **fields):
    (tmp_path / "PROTOCOL.md").write_text("margin 0.01, TOST\n", encoding="utf-8")
    claim = {"primary": [["store", "online"]], "secondary": [["b-store", "store"]], "control": "ce", **fields}
    return write_study(tmp_path, arms=CLAIM_ARMS, protocol="PROTOCOL.md", **claim)


def test_tost_verdict_at_the_margin():
    from babydistill.workflows.experiments.study_verdicts import tost_verdict

    def ci(low, high):
        return {"low": low, "high": high}

    assert tost_verdict(ci(-0.009, 0.009), ci(-0.012, 0.012), 0.01) == "equivalent"
    assert tost_verdict(ci(-0.005, 0.011), ci(-0.007, 0.013), 0.01) == "not equivalent"
    assert tost_verdict(ci(0.012, 0.03), ci(0.011, 0.031), 0.01) == "different"


def test_an_equivalent_verdict_says_when_a_smaller_difference_is_shown():
    from babydistill.workflows.experiments.study_verdicts import _verdict_cell

    def comparison(low95, high95):
        return {"verdict": "equivalent", "val_ce": {"95": {"low": low95, "high": high95}}}

    assert _verdict_cell(comparison(0.004, 0.008), 0.01).startswith("**equivalent** (the 95% interval excludes 0")
    assert _verdict_cell(comparison(-0.002, 0.008), 0.01) == "**equivalent**"
    assert _verdict_cell({"verdict": None, "why_no_verdict": "incomplete (2/8 pairs finished)"}, 0.01) == (
        "none: incomplete (2/8 pairs finished)")
    assert _verdict_cell({**comparison(-0.002, 0.008), "margin": 0.005}, 0.01) == "**equivalent** at ±0.005"


def test_a_primary_comparison_with_its_own_margin_is_judged_at_it(tmp_path):
    """[u8, f16, 0.005] beside [store, online] at the study's ±0.01: the same differences pass at ±0.01 and
    fail at ±0.005, and the report and results say which margin each verdict used."""
    from babydistill.workflows.experiments.study_verdicts import claim_sections, comparison

    write_config(tmp_path)
    study = load_study(write_claim_study(tmp_path, primary=[["store", "online"], ["b-store", "store", 0.005]]))
    assert study.primary == [("store", "online"), ("b-store", "store")]
    assert study.primary_margins == {("b-store", "store"): 0.005} and study.margin == 0.01

    def arm(name, values):
        return {"name": name, "seeds": [1, 2, 3], "ce_only": False, "vs_best_teacher": None, "best_teacher": None,
                "per_seed": {str(s): {"status": "done", "val_ce": v, "test_ce": v} for s, v in enumerate(values, 1)}}

    first, second = arm("a", [5.006, 5.007, 5.005]), arm("b", [5.0, 5.0, 5.0])  # +0.006 ± 0.001
    wide, narrow = (comparison(first, second, "primary", m, None) for m in (0.01, 0.005))
    assert (wide["verdict"], narrow["verdict"]) == ("equivalent", "different") and narrow["margin"] == 0.005
    claim = {"protocol": "PROTOCOL.md", "sha256": "0" * 64, "margin": 0.01, "refusal": None, "control": None,
             "primary": [wide, narrow], "secondary": []}
    text = "\n".join(claim_sections({"claim": claim, "arms": [first, second], "teachers": []}))
    assert "Margin ±0.01 nats of validation CE (±0.005 where a comparison names its own)" in text
    assert "**different** at ±0.005" in text and "TOST at ±0.005 passes" in text
    from babydistill.workflows.experiments.study_plot import plot_paired_intervals

    assert plot_paired_intervals({"claim": claim, "arms": [first, second]}, tmp_path / "intervals.png")
    assert (tmp_path / "intervals.png").read_bytes()[:4] == b"\x89PNG"


def test_a_margin_changed_after_results_voids_the_verdicts(tmp_path):
    """The study file is not hashed: each result records the margins it was made under, and the report refuses a
    verdict once the study file says otherwise. Records from before margins were kept are not held against it."""
    from types import SimpleNamespace

    from babydistill.workflows.experiments.study_protocol import (
        protocol_sha256,
        read_record,
        record_cell,
        registered_margins,
        verdict_refusal,
    )

    write_config(tmp_path)
    study = load_study(write_claim_study(tmp_path, primary=[["store", "online", 0.005]]))
    record_cell(study, "store-seed1", SimpleNamespace(fingerprint="f" * 16))
    record = read_record(study, "store-seed1")
    assert record["margins"] == {"margin": 0.01, "primary": {"store − online": 0.005}}
    sha = protocol_sha256(study)
    assert verdict_refusal(study, [sha], [record["margins"], None]) is None
    widened = load_study(write_claim_study(tmp_path, primary=[["store", "online", 0.02]]))
    assert registered_margins(widened)["primary"] == {"store − online": 0.02}
    refusal = verdict_refusal(widened, [sha], [record["margins"]])
    assert "changed its margins after results were recorded" in refusal and "0.02" in refusal


@pytest.mark.parametrize("n, sd, true_difference, margin", [
    (3, 0.003, 0.0, 0.005), (3, 0.007, -0.0036, 0.005), (8, 0.020, 0.0, 0.01), (30, 0.020, 0.003, 0.01)])
def test_tost_power_matches_simulated_studies(n, sd, true_difference, margin):
    """The exact power against 40,000 simulated studies of normal paired differences (binomial sd <= 0.0025)."""
    from scipy.stats import t

    from babydistill.workflows.experiments.study_stats import tost_power

    d = np.random.default_rng(0).normal(true_difference, sd, (40_000, n))
    half = t.ppf(0.95, n - 1) * d.std(axis=1, ddof=1) / np.sqrt(n)
    simulated = np.mean((d.mean(axis=1) - half > -margin) & (d.mean(axis=1) + half < margin))
    assert abs(tost_power(n, sd, true_difference, margin) - simulated) < 0.01


def test_pairs_for_power_is_the_fewest_that_reach_it():
    from babydistill.workflows.experiments.study_stats import pairs_for_power, tost_power

    n = pairs_for_power(0.020, 0.0, 0.01)
    assert tost_power(n, 0.020, 0.0, 0.01) >= 0.8 > tost_power(n - 1, 0.020, 0.0, 0.01)
    assert pairs_for_power(0.020, 0.0058, 0.01) > n  # a true difference inside the margin needs more pairs
    assert pairs_for_power(0.020, 0.01, 0.01) is None and pairs_for_power(0.020, -0.02, 0.01) is None
    # near the margin it takes thousands of pairs: the power there is still computed, not lost to quadrature
    many = pairs_for_power(0.020, 0.0092, 0.01)
    assert 1000 < many < 5000 and tost_power(many, 0.020, 0.0092, 0.01) >= 0.8


@pytest.mark.parametrize("fields, expected", [
    ({"arms": [ONLINE, {"name": "b", "teachers": [3, 3]}]}, "arms[1].teachers: must be a list of distinct"),
    ({"arms": [ONLINE, {"name": "b", "capture": "each"}]}, "arms[1].capture: must be one of shared, per_seed"),
    ({"arms": [ONLINE, {"name": "b", "seeds": [1]}]}, "arms[1].seeds: a paired comparison needs at least 2"),
    ({"arms": [{**ONLINE, "capture": "per_seed"}, OFFLINE]}, "per_seed is for offline arms"),
    ({"arms": [ONLINE, {"name": "c", "set": ["distill.alpha=1"], "online": True}]}, "distils nothing"),
    ({"control": "online"}, "control: must name a CE-only arm"),
    ({"primary": [["topk4", "online"]]}, "primary: a study with primary comparisons needs `protocol:`"),
    ({"margin": 0}, "margin: must be a number > 0"),
    ({"primary": [["topk4", "online", -0.01]]}, "primary: the margin of ['topk4', 'online'] must be a number > 0"),
    ({"primary": [["topk4"]]}, "primary: must be a list of [arm, arm] or [arm, arm, margin] items"),
    ({"primary": [["topk4", "online", 0.005], ["topk4", "online"]]}, "primary: lists a pair of arms twice"),
    ({"folder": "teachers"}, "folder: must be a folder name (letters, digits, . _ -) other than the base run's own"),
    ({"folder": "../elsewhere"}, "folder: must be a folder name"),
])
def test_bad_claim_keys_are_refused_in_one_line(tmp_path, capsys, fields, expected):
    write_config(tmp_path)
    assert main(["study", str(write_study(tmp_path, **fields))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


def test_studies_sharing_a_base_run_keep_apart_by_folder(tmp_path):
    write_config(tmp_path)
    first, second = load_study(write_claim_study(tmp_path)), load_study(write_claim_study(tmp_path, folder="other"))
    assert first.root.name == "study" and second.root == first.root.parent / "other"
    assert second.arm("store").seed_config(2).run_path == second.root / "store/seed2"
    assert first.arm("store").run_path.parent == first.root


def test_selected_arms_need_only_their_teachers(tmp_path):
    write_config(tmp_path)
    study = load_study(write_claim_study(tmp_path))
    pair_a = [study.arm("store"), study.arm("online")]
    assert study.teacher_seeds_of(pair_a) == [1, 2] and study.teacher_pairs_of(pair_a) == [("t1", "t2")]
    assert [u.model_dir.name for u in teacher_units(study, pair_a)] == ["t1", "t2"]
    assert study.teacher_seeds_of([study.arm("ce")]) == [1, 2]  # the base run's own teachers always
    assert [u.model_dir.name for u in teacher_units(study)] == ["t1", "t2", "t3", "t4"]


def test_the_pool_goes_seed_by_seed_across_arms(tmp_path):
    from babydistill.workflows.experiments.study_execute import seed_major

    write_config(tmp_path)
    study = load_study(write_claim_study(tmp_path))
    per_arm = {a.name: arm_units(a) for a in study.arms}
    assert [(u.arm.name, u.seed) for u in seed_major(per_arm)] == [
        ("online", 1), ("store", 1), ("b-store", 1), ("ce", 1), ("online", 2), ("store", 2), ("b-store", 2),
        ("ce", 2), ("online", 3), ("store", 3)]


def test_claim_arms_configs_and_commands(tmp_path):
    write_config(tmp_path)
    study = load_study(write_claim_study(tmp_path))
    assert study.teacher_seeds == [1, 2, 3, 4] and study.teacher_pairs == [("t1", "t2"), ("t3", "t4")]
    store, ce = study.arm("store"), study.arm("ce")
    assert store.seed_config(2).cache.seed == 2 and store.seed_config(2).run_path == store.run_path / "seed2"
    assert store.student_path(2) == store.run_path / "seed2/students/s2"
    assert study.arm("b-store").teacher_names == ["t3", "t4"] and ce.ce_only and not ce.needs_store
    assert study.all_seeds == [1, 2, 3]
    for unit in [*arm_units(store, [2]), *arm_units(study.arm("b-store"), [1]), *arm_units(ce, [1])]:
        for argv in unit_commands(study, unit, num_threads=1):
            config = _config(build_parser().parse_args(argv))
            config.train.num_threads = unit.config.train.num_threads
            assert config.to_dict() == unit.config.to_dict()


@pytest.mark.slow
def test_tiny_claim_study_empty_report_then_run_then_protocol_changed(tmp_path, capsys):
    import time

    write_corpus(tmp_path / "corpus", num_files=3, paragraphs=60)
    write_config(tmp_path, {"train": {"max_steps": 2, "save_every": 2, "log_every": 1},
                            "eval": {"max_pairs_per_paradigm": 1, "max_windows": 2}})
    path = write_claim_study(tmp_path)
    run = load_config(tmp_path / "tiny.yaml").run_path
    study_dir = run / "study"

    # --- an empty run: every arm incomplete (0/N), no verdict, no error
    out = tmp_path / "empty"
    assert main(["study", str(path), "--report-only", "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert [table_row(text, a["name"])[2] for a in CLAIM_ARMS] == ["0/3 (incomplete)", "0/3 (incomplete)",
                                                                   "0/2 (incomplete)", "0/2 (incomplete)"]
    assert "none: incomplete (0/3 pairs finished)" in text and "**equivalent**" not in text
    assert "(No comparison is complete yet.)" in text

    started = time.time()
    assert main(["study", str(path), "--jobs", "2"]) == 0
    seconds = time.time() - started
    capsys.readouterr()
    print(f"tiny claim study end to end: {seconds:.0f} s")
    assert all((run / f"teachers/t{s}").is_dir() for s in (1, 2, 3, 4))
    for pair in ("t1-t2", "t3-t4"):
        e = json.loads((study_dir / f"teachers/ensemble-{pair}/eval.json").read_text())
        assert e["format"] == "babydistill.eval-ensemble" and e["loss"]["test"]["ce"] > 0
    stores = [study_dir / f"store/seed{s}/logits.zarr" for s in (1, 2, 3)]
    assert all(s.is_dir() for s in stores) and not (study_dir / "store/logits.zarr").exists()
    from babydistill.workflows.markers import output_fingerprint
    assert len({output_fingerprint(s) for s in stores}) == 3  # cache.seed = the student seed: three captures
    assert (study_dir / "b-store/logits.zarr").is_dir() and not (study_dir / "ce/logits.zarr").exists()
    assert '"ce_only": true' in (study_dir / "ce/students/s1/train_summary.json").read_text()

    report = study_dir / "report"
    text = (report / "report.md").read_text()
    results = json.loads((report / "results.json").read_text())
    primary = results["claim"]["primary"][0]
    assert primary["complete"] and primary["verdict"] in ("equivalent", "not equivalent", "different")
    assert results["claim"]["refusal"] is None and len(results["claim"]["sha256"]) == 64
    cell = results["arms"][1]["per_seed"]["2"]
    assert cell["protocol_sha256"] == results["claim"]["sha256"]
    assert f"**{primary['verdict']}**" in text and "no multiplicity correction" in text
    assert primary["sizing"]["paired_sd"] == primary["val_ce"]["90"]["sd"]
    assert ("Sizing, computed after the fact" in text) == (primary["verdict"] != "equivalent")
    assert "| store − online | 3 |" in text  # the test section: a complete comparison
    assert (report / "paired_intervals.png").read_bytes()[:4] == b"\x89PNG"
    assert "b-store vs t3" in text or "b-store vs t4" in text  # the best teacher of its own pair
    assert results["arms"][1]["vs_control"]["val_ce"]["n"] == 2

    # --- the protocol changed after the results: no verdict, one line why; then missing
    (tmp_path / "PROTOCOL.md").write_text("margin 0.02\n", encoding="utf-8")
    assert main(["study", str(path), "--report-only"]) == 0
    text = (report / "report.md").read_text()
    assert "**No verdict: the protocol file" in text and "changed after results were recorded" in text
    assert f"**{primary['verdict']}**" not in text
    (tmp_path / "PROTOCOL.md").unlink()
    assert main(["study", str(path), "--report-only"]) == 0
    assert "is missing" in (report / "report.md").read_text()


CARRY_ARMS = [{"name": "online", "online": True}, {"name": "store", "set": ["cache.k=4"], "capture": "per_seed"}]


@pytest.mark.slow
def test_cells_carried_to_a_fresh_machine_are_not_trained_again(tmp_path, capsys, monkeypatch):
    """A study half run on one machine, its results.json carried to another folder (a fresh machine: another
    path, no runs): the finished cells are neither trained nor captured for again and enter the report; a cell
    whose settings changed since is trained; a bad --carry file is refused in one line."""
    machines = {}
    for name in ("one", "two"):
        root = tmp_path / name
        write_corpus(root / "corpus", num_files=3, paragraphs=60)
        write_config(root, {"train": {"max_steps": 2, "save_every": 2, "log_every": 1},
                            "eval": {"max_pairs_per_paradigm": 1, "max_windows": 2}})
        (root / "PROTOCOL.md").write_text("margin 0.01, TOST\n", encoding="utf-8")
        machines[name] = write_study(root, arms=CARRY_ARMS, protocol="PROTOCOL.md", primary=[["store", "online"]])

    assert main(["study", str(machines["one"]), "--seeds", "1"]) == 0
    first = tmp_path / "first"
    assert main(["study", str(machines["one"]), "--report-only", "--out", str(first)]) == 0
    carried = json.loads((first / "results.json").read_text())
    fingerprints = {a["name"]: a["per_seed"]["1"]["student_fingerprint"] for a in carried["arms"]}
    assert all(fingerprints.values())
    capsys.readouterr()

    run_two = tmp_path / "two/run"
    assert main(["study", str(machines["two"]), "--carry", str(first / "results.json")]) == 0
    printed = capsys.readouterr().out
    assert "online seed 1: carried from" in printed and "store seed 1: carried from" in printed
    assert not (run_two / "study/online/students/o1").exists()
    assert not (run_two / "study/store/seed1/logits.zarr").exists()
    assert (run_two / "study/online/students/o2/eval.json").is_file()
    assert (run_two / "study/store/seed2/logits.zarr").is_dir()

    second = tmp_path / "second"
    assert main(["study", str(machines["two"]), "--report-only", "--out", str(second),
                 "--carry", str(first / "results.json")]) == 0
    results = json.loads((second / "results.json").read_text())
    for arm in results["arms"]:
        assert arm["seeds_finished"] == [1, 2]
        one = arm["per_seed"]["1"]
        assert one["carried_from"] == str(first / "results.json") and one["student_fingerprint"] == fingerprints[arm["name"]]
        assert one["val_ce"] == next(a for a in carried["arms"] if a["name"] == arm["name"])["per_seed"]["1"]["val_ce"]
        assert "carried_from" not in arm["per_seed"]["2"]
    assert results["claim"]["primary"][0]["verdict"] != "refused"
    text = (second / "report.md").read_text()
    assert "## Carried cells" in text and "online seed 1, store seed 1" in text

    # the store arm's settings change: its carried cell no longer stands for it, and is trained here
    changed = yaml.safe_load(machines["two"].read_text())
    changed["arms"][1]["set"] = ["cache.k=5"]
    machines["two"].write_text(yaml.safe_dump(changed), encoding="utf-8")
    shutil.rmtree(run_two / "study/store")
    capsys.readouterr()
    assert main(["study", str(machines["two"]), "--seeds", "1", "--carry", str(first / "results.json")]) == 0
    captured = capsys.readouterr()
    assert "store seed 1: the carried cell" in captured.err and "it is trained here" in captured.err
    assert (run_two / "study/store/seed1/students/s1/eval.json").is_file()
    assert "online seed 1: carried from" in captured.out

    for bad, expected in [("missing.json", "not found"), ("broken.json", "is not valid JSON"),
                          ("other.json", "is not a study's results.json")]:
        path = tmp_path / bad
        if bad != "missing.json":
            path.write_text("{" if bad == "broken.json" else "[]", encoding="utf-8")
        assert main(["study", str(machines["two"]), "--carry", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err

    # a student's cell names the teachers' weights it learned from, as its training recorded them, not today's
    from babydistill.workflows.experiments import study_results
    monkeypatch.setattr(study_results, "weights_sha256", lambda model_dir: "f" * 64)  # as if retrained since
    assert main(["study", str(machines["one"]), "--report-only", "--out", str(tmp_path / "third")]) == 0
    results = json.loads((tmp_path / "third/results.json").read_text())
    assert all(t["weights_sha256"] == "f" * 64 for t in results["teachers"])
    summary = json.loads((tmp_path / "one/run/study/online/students/o1/train_summary.json").read_text())
    online, store = (a["per_seed"]["1"]["teacher_weights_sha256"] for a in results["arms"])
    assert online == {os.path.basename(t["path"]): t["sha256"] for t in summary["teacher_weights"]}
    assert store == online  # the store's header: hashed at capture, from the same teachers


def test_deviations_beside_the_protocol_enter_the_report_without_voiding_it(tmp_path):
    write_config(tmp_path)
    path, out = write_claim_study(tmp_path), tmp_path / "report"
    assert main(["study", str(path), "--report-only", "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "## Deviations" in text and "None recorded" in text
    assert "- store seed 1: not started: the study has not run this arm yet (`--arms store`)" in text
    (tmp_path / "DEVIATIONS.md").write_text("- Teachers trained outside the study, same settings.\n", encoding="utf-8")
    assert main(["study", str(path), "--report-only", "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "None recorded" not in text and "- Teachers trained outside the study, same settings." in text
    claim = json.loads((out / "results.json").read_text())["claim"]
    assert claim["deviations"].startswith("- Teachers") and claim["refusal"] is None
