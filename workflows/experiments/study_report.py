"""The study's report: ``report.md`` and ``results.json`` (and the figure, study_plot) from collect_results.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from babydistill.stores.files import atomic_write_text
from babydistill.workflows.experiments.study_plot import plot_paired_intervals, plot_test_ce_vs_bytes
from babydistill.workflows.experiments.study_verdicts import claim_sections


def _mean_sd(summary: dict, scale: float = 1.0, digits: int = 3) -> str:
    if not summary["n"]:
        return "-"
    text = f"{scale * summary['mean']:.{digits}f}"
    return text + (f" ± {scale * summary['sd']:.{digits}f}" if summary["sd"] is not None else " (n=1)")


def _interval(ci: dict, scale: float = 1.0, digits: int = 3) -> str:
    if not ci["n"]:
        return "-"
    text = f"{scale * ci['mean']:+.{digits}f}"
    if ci["half_width"] is None:
        return text + f" (n={ci['n']}, no interval)"
    return text + f" [{scale * ci['low']:+.{digits}f}, {scale * ci['high']:+.{digits}f}]"


def _number(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _vs_teacher(arm: dict) -> dict:
    """The arm's test CE minus the best teacher's (results.json before 2026-12: the interval itself)."""
    ci = arm["vs_best_teacher"]
    return ci["test_ce"] if "test_ce" in ci else ci


def _complete(arm: dict) -> bool:
    return len(arm["seeds_finished"]) == len(arm.get("seeds") or [])


def _comparison_sections(results: dict) -> list[str]:
    """The report's "students vs the best teacher" and "contrasts" sections."""
    lines: list[str] = []
    best = next((t for t in results["teachers"] if t["name"] == results["best_teacher"]), None)
    if results.get("claim"):
        pass  # the claim's own sections compare each arm with the best teacher of its pair
    elif best is not None:
        lines += ["## Students vs the best teacher", "",
                  f"Best teacher by validation CE: **{best['name']}** (validation {best['val_ce']:.3f}, test "
                  f"{best['test_ce']:.3f}). Per arm, mean test CE minus the best teacher's, with a 95% t-interval "
                  "over seeds (the teacher taken as fixed; negative: the students beat it):", ""]
        lines += [f"- {a['name']}: {_interval(_vs_teacher(a))}" for a in results["arms"]]
        lines.append("")
    else:
        lines += ["No teacher is evaluated yet, so there is no student vs teacher comparison.", ""]

    if results.get("contrasts"):
        lines += ["## Contrasts", "", "Paired by seed, each isolating one factor (negative: the first arm is better):",
                  "", "| arm | minus | Δ val CE (95% CI) | Δ test CE (95% CI) | seeds |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {c['arm']} | {c['minus']} | {_interval(c['val_ce'])} | {_interval(c['test_ce'])} | "
                  f"{c['test_ce']['n']} |" for c in results["contrasts"]]
        lines.append("")
    return lines


def _arms_table(results: dict) -> list[str]:
    """The report's "Arms" section: one row per arm and per teacher, then what the columns mean."""
    ref, e = results["reference"], results["eval_config"]
    by_name = {a["name"]: a for a in results["arms"]}
    header = ["arm", "cache", "seeds", "val CE", "test CE", f"Δ test CE vs {ref} (95% CI)",
              f"Δ val CE vs {ref} (95% CI)", "BLiMP %", "bytes/token", "capture s", "step s"]
    lines = ["## Arms", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for a in results["arms"]:
        n, seeds = len(a["seeds_finished"]), a.get("seeds") or results["seeds"]
        count = f"{n}/{len(seeds)}" + (" (incomplete)" if n < len(seeds) else "")
        is_ref = a["name"] == ref
        # a claim study gives a comparison's test figure only once both arms are complete
        hide_test = bool(results.get("claim")) and not (_complete(a) and _complete(by_name[ref]))
        store = a["store"] or {}
        lines.append("| " + " | ".join([
            a["name"], a["cache_label"], count, _mean_sd(a["val_ce"]), _mean_sd(a["test_ce"]),
            "reference" if is_ref else "-" if hide_test else _interval(a["vs_reference"]["test_ce"]),
            "reference" if is_ref else _interval(a["vs_reference"]["val_ce"]),
            _mean_sd(a["blimp"], 100, 1), _number(store.get("bytes_per_token"), ".1f"),
            _number(store.get("capture_seconds"), ".0f"), _number(a["step_seconds"], ".3f")]) + " |")
    for t in results["teachers"]:
        done = t["status"] == "done"
        lines.append("| " + " | ".join([
            t["name"], "teacher", "1" if done else "0 (not evaluated)", _number(t["val_ce"], ".3f"),
            _number(t["test_ce"], ".3f"), "-", "-", _number(t["blimp"] and 100 * t["blimp"], ".1f"),
            "-", "-", "-"]) + " |")
    lines += ["", "CE in nats (lower is better), mean ± sample std over the finished seeds. Δ: mean over seeds of "
              f"(arm - {ref}) on the same seed, with the 95% t-interval mean ± t(0.975, n-1) · sd / √n. "
              "bytes/token: the store's bytes on disk over its tokens. capture s: wall time of the cache stage "
              "(its stage marker; a resumed capture counts its last run only). step s: seconds per optimizer "
              "step, the median over logged windows (global batch x seq_len / tokens per second), median over seeds. "
              f"Evaluation, the same for every row: validation/test windows: {e['max_windows'] or 'all'}; "
              f"BLiMP pairs per paradigm: {e['max_pairs_per_paradigm'] or 'all'}.", ""]
    return lines


def _carried_section(results: dict) -> list[str]:
    """Which cells come from an earlier run's results.json (``--carry``), and whether their teachers' weights
    are this run's."""
    carried = [(a["name"], int(s), c) for a in results["arms"] for s, c in a["per_seed"].items() if c.get("carried_from")]
    if not carried:
        return []
    local = {t["name"]: t.get("weights_sha256") for t in results["teachers"]}
    other = [f"{arm} seed {seed}" for arm, seed, c in carried
             if any(local.get(n) != sha for n, sha in (c.get("teacher_weights_sha256") or {}).items())]
    sources = sorted({c["carried_from"] for _, _, c in carried})
    lines = ["## Carried cells", "",
             f"{len(carried)} cells were finished by an earlier run and carried from {', '.join(f'`{x}`' for x in sources)} "
             "(`--carry`; each made from the same settings and inputs, its student fingerprint): "
             + ", ".join(f"{arm} seed {seed}" for arm, seed, _ in carried) + ".", ""]
    if other:
        lines += [f"Their teachers were retrained here from the same settings but are not bit-identical for "
                  f"{len(other)} of them ({', '.join(other)}): their pairs mix two trainings of each teacher.", ""]
    return lines


def write_study_report(results: dict, out_dir: Path, *, command: str) -> Path:
    """``out_dir``/report.md, results.json and test_ce_vs_bytes.png; returns the report's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {**results, "command": command, "reproduce": f"babydistill study {results['study']}"}
    ref = results["reference"]
    seeds = sorted({int(s) for a in results["arms"] for s in a["per_seed"]})
    num_cells = sum(len(a["per_seed"]) for a in results["arms"])
    missing = [(a["name"], s, c["status"]) for a in results["arms"] for s, c in a["per_seed"].items()
               if c["status"] != "done"]

    lines = [f"# Offline vs online: controlled study ({Path(results['study']).name})", "",
             f"Generated {results['generated']}. Base config `{results['base_config']}`, shared stages in "
             f"`{results['base_run_dir']}`; seeds {', '.join(map(str, seeds))} (differences paired by seed, over the "
             f"seeds both arms have); reference arm **{ref}**.", "",
             f"Reproduce: `{results['reproduce']}` (finished work is skipped). This report: `{command}`.", ""]
    if missing:
        lines += [f"**Incomplete: {len(missing)} of {num_cells} arm x seed cells are not finished** (shown as `-`; "
                  "statistics use the finished seeds only, paired differences the seeds finished in both arms).", ""]

    if results.get("claim"):
        lines += claim_sections(results)
        if plot_paired_intervals(results, out_dir / "paired_intervals.png"):
            lines += ["![paired differences of validation CE](paired_intervals.png)", "",
                      "Each row: the mean paired difference of validation CE (first arm minus second, same seeds), "
                      "its 90% interval (thick) and 95% interval (thin); dashed lines: the study's margin (red ticks on a row: "
                      "that comparison's own margin).", ""]
    lines += _arms_table(results)
    lines += _comparison_sections(results)
    lines += ["## Test CE per seed", "", "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|" + " --- |" * (len(seeds) + 1)]
    for a in results["arms"]:
        lines.append(f"| {a['name']} | " + " | ".join(_number(a["per_seed"].get(str(s), {}).get("test_ce"), ".4f")
                                                      if str(s) in a["per_seed"] else "" for s in seeds) + " |")
    lines.append("")
    if missing:
        lines += ["## Missing cells", ""] + [f"- {arm} seed {seed}: {status}" for arm, seed, status in missing]
        lines.append("")
    lines += _carried_section(results)

    if plot_test_ce_vs_bytes(results, out_dir / "test_ce_vs_bytes.png"):
        lines += ["## Test CE against store size", "", "![test CE vs bytes per token](test_ce_vs_bytes.png)", "",
                  "Offline arms: mean ± std over seeds at their store's bytes per token; the online arm (no store) "
                  "is the solid line with its ± std band, the best teacher the dashed line.", ""]
    lines.append("Every per-seed number is in `results.json`.")

    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def study_command(path: str, arms: str | None, seeds: str | None, jobs: int, report_only: bool,
                  out: str | None, carry: str | None = None) -> str:
    argv = ["babydistill", "study", str(path)]
    argv += ["--arms", arms] if arms else []
    argv += ["--seeds", seeds] if seeds else []
    argv += ["--jobs", str(jobs)] if jobs != 1 else []
    argv += ["--report-only"] if report_only else []
    argv += ["--out", out] if out else []
    argv += ["--carry", carry] if carry else []
    return shlex.join(argv)
