"""Stage `report`: every model's ``eval.json`` and ``metrics.jsonl`` -> ``report.md`` and PNG plots.

The table follows the paper's Table 3 (one row per teacher and student) with this project's
measures: validation CE, test CE (nats, lower is better), BLiMP overall and per field (percent),
then one column per BabyLM zero-shot suite of ``eval.zero_shot`` found in any eval.json (percent).
Each group with several evaluated seeds (teachers, offline students, online students) gets a
mean ± std row (sample standard deviation). Models without ``eval.json`` are listed as
"not evaluated". Plots: training and validation curves (``curves.png``), BLiMP by field per
model (``blimp_fields.png``), test CE per model (``test_ce.png``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

from babydistill.pipeline.config import Config, parse_model_name  # noqa: E402
from babydistill.pipeline.evaluate import FIELDS  # noqa: E402
from babydistill.stores.files import atomic_write_text

GROUPS = ("teachers", "offline students", "online students")
_GROUP_STYLE = {"teachers": "-", "offline students": "--", "online students": ":"}
_GROUP_COLOR = {"teachers": "tab:gray", "offline students": "tab:blue", "online students": "tab:orange"}


@dataclass
class ModelRun:
    name: str
    group: str
    path: Path
    eval: dict | None
    metrics: list[dict]


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def find_models(config: Config) -> list[ModelRun]:
    """Every model directory of the run, teachers first, then offline and online students."""
    found = []
    for folder, is_teacher in ((config.run_path / "teachers", True), (config.run_path / "students", False)):
        if not folder.is_dir():
            continue
        # "s1.partial" and the like are stages still running (or interrupted), not models
        dirs = [p for p in folder.iterdir() if p.is_dir() and "." not in p.name]
        for path in sorted(dirs, key=lambda p: _natural_key(p.name)):
            online = (parse_model_name(path.name) or ("",))[0] == "online"
            group = "teachers" if is_teacher else "online students" if online else "offline students"
            eval_path = path / "eval.json"
            found.append(ModelRun(path.name, group, path,
                                  json.loads(eval_path.read_text(encoding="utf-8")) if eval_path.is_file() else None,
                                  _read_metrics(path / "metrics.jsonl")))
    return sorted(found, key=lambda m: GROUPS.index(m.group))


# --- table ------------------------------------------------------------------------------


def _measures(run: ModelRun, fields: list[str], suites: list[str]) -> list[float]:
    """val CE, test CE, BLiMP overall, BLiMP per field, each zero-shot suite's overall (fractions; NaN where missing)."""
    e = run.eval
    zero_shot = e.get("zero_shot", {})
    return [e["loss"]["validation"]["ce"], e["loss"]["test"]["ce"], e["blimp"]["overall"],
            *(e["blimp"]["fields"].get(f, float("nan")) for f in fields),
            *(zero_shot[s]["overall"] if s in zero_shot else float("nan") for s in suites)]


def _zero_shot_suites(evaluated: list[ModelRun]) -> list[str]:
    """Names of the BabyLM zero-shot suites (eval.zero_shot) in any eval.json, in first-seen order."""
    return list(dict.fromkeys(name for m in evaluated for name in m.eval.get("zero_shot", {})))


def _cells(values: list[float], stds: list[float] | None = None) -> list[str]:
    cells = []
    for i, value in enumerate(values):
        scale, digits = (1, 3) if i < 2 else (100, 1)  # CE in nats, BLiMP in percent
        text = f"{scale * value:.{digits}f}" if not np.isnan(value) else "—"
        if stds is not None and not np.isnan(value):
            text += f" ± {scale * stds[i]:.{digits}f}"
        cells.append(text)
    return cells


def _table(models: list[ModelRun], fields: list[str], suites: list[str]) -> list[str]:
    header = ["model", "group", "val CE", "test CE", "BLiMP", *fields, *suites]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for group in GROUPS:
        members = [m for m in models if m.group == group]
        for m in members:
            cells = _cells(_measures(m, fields, suites)) if m.eval else ["not evaluated"] + ["—"] * (len(header) - 3)
            lines.append(f"| {m.name} | {group} | " + " | ".join(cells) + " |")
        evaluated = [m for m in members if m.eval]
        if len(evaluated) >= 2:
            values = np.array([_measures(m, fields, suites) for m in evaluated])
            cells = _cells(list(values.mean(axis=0)), list(values.std(axis=0, ddof=1)))
            lines.append(f"| **{group} mean ± std (n={len(evaluated)})** | {group} | " + " | ".join(cells) + " |")
    return lines


def _suite_source(evaluated: list[ModelRun], name: str) -> str:
    first = next(m.eval["zero_shot"][name] for m in evaluated if name in m.eval.get("zero_shot", {}))
    return f"task {first['task']}, {first['num_items']} items in {first['num_subsets']} subsets from {first['path']}"


def _test_ce(run: ModelRun) -> float:
    return run.eval["loss"]["test"]["ce"]


def _blimp(run: ModelRun) -> float:
    return run.eval["blimp"]["overall"]


def _best_lines(evaluated: list[ModelRun]) -> list[str]:
    teachers = [m for m in evaluated if m.group == "teachers"]
    students = [m for m in evaluated if m.group != "teachers"]
    lines = []
    for label, key, better, fmt, unit in (("Lowest test CE", _test_ce, min, "{:.3f}", "nats"),
                                          ("Highest BLiMP", _blimp, max, "{:.1%}", "points")):
        scale = 100 if unit == "points" else 1
        digits = 1 if unit == "points" else 3
        best = better(evaluated, key=key)
        text = f"- {label}: **{best.name}** ({best.group}), {fmt.format(key(best))}"
        if teachers and best.group == "teachers":
            text += "; it is a teacher"
            if students:
                best_student = better(students, key=key)
                gap = scale * abs(key(best_student) - key(best))
                text += f"; the best student, {best_student.name}, is {gap:.{digits}f} {unit} behind"
        elif teachers:
            best_teacher = better(teachers, key=key)
            text += (f", {scale * (key(best) - key(best_teacher)):+.{digits}f} {unit} versus the best teacher "
                     f"{best_teacher.name} ({fmt.format(key(best_teacher))})")
        lines.append(text + ".")
    if teachers:
        # the paper's claim is about students against teachers as groups, not single seeds
        for group in GROUPS[1:]:
            members = [m for m in evaluated if m.group == group]
            if members:
                d_ce = np.mean([_test_ce(m) for m in members]) - np.mean([_test_ce(m) for m in teachers])
                d_blimp = np.mean([_blimp(m) for m in members]) - np.mean([_blimp(m) for m in teachers])
                lines.append(f"- {group} (mean of {len(members)}) versus teachers (mean of {len(teachers)}): "
                             f"test CE {d_ce:+.3f} nats, BLiMP {100 * d_blimp:+.1f} points.")
    return lines


def _eval_settings(run: ModelRun) -> tuple:
    e = run.eval
    return (e["loss"]["validation"]["num_windows"], e["loss"]["test"]["num_windows"], e["blimp"]["num_pairs"],
            e["blimp"].get("seed"), e.get("tokens_hash"),
            tuple(sorted((name, r["num_items"]) for name, r in e.get("zero_shot", {}).items())))


# --- plots ------------------------------------------------------------------------------


def _colors(models: list[ModelRun]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(models) <= 10 else "tab20")
    return {m.name: cmap(i % cmap.N) for i, m in enumerate(models)}


def _plot_curves(models: list[ModelRun], path: Path) -> bool:
    with_metrics = [m for m in models if m.metrics]
    if not with_metrics:
        return False
    colors = _colors(models)
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in with_metrics:
        train = [r for r in m.metrics if r.get("kind") == "train"]
        val = [r for r in m.metrics if r.get("kind") == "val"]
        style = dict(color=colors[m.name], linestyle=_GROUP_STYLE[m.group])
        if train:
            # students log the mixed distillation loss; their CE term is the comparable curve
            ax_train.plot([r["step"] for r in train], [r.get("ce", r["loss"]) for r in train],
                          label=m.name, linewidth=1, **style)
        if val:
            ax_val.plot([r["step"] for r in val], [r["val_loss"] for r in val], marker="o", markersize=3,
                        label=m.name, **style)
    ax_train.set(title="training CE (loss where no CE is logged)", xlabel="step", ylabel="nats")
    ax_val.set(title="validation CE", xlabel="step", ylabel="nats")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_blimp(evaluated: list[ModelRun], fields: list[str], path: Path) -> None:
    colors = _colors(evaluated)
    categories = ["overall", *fields]
    width = 0.8 / len(evaluated)
    all_values = []
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(categories) + 0.3 * len(evaluated)), 4.5))
    for i, m in enumerate(evaluated):
        values = [m.eval["blimp"]["overall"], *(m.eval["blimp"]["fields"].get(f, np.nan) for f in fields)]
        all_values += values
        ax.bar(np.arange(len(categories)) + (i - (len(evaluated) - 1) / 2) * width, 100 * np.array(values),
               width, label=m.name, color=colors[m.name], hatch="//" if m.group == "online students" else None)
    ax.axhline(50, color="black", linewidth=0.8, linestyle="--", label="chance")
    ax.set_xticks(np.arange(len(categories)), categories)
    low, high = np.nanmin(100 * np.array(all_values)), np.nanmax(100 * np.array(all_values))
    ax.set(title="BLiMP accuracy by field", ylabel="accuracy (%)", ylim=(min(40, low - 5), min(100, high + 5)))
    ax.legend(fontsize=8, ncols=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_test_ce(evaluated: list[ModelRun], path: Path) -> None:
    values = np.array([m.eval["loss"]["test"]["ce"] for m in evaluated])
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(evaluated) + 2), 4))
    bars = ax.bar([m.name for m in evaluated], values, color=[_GROUP_COLOR[m.group] for m in evaluated])
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=8)
    spread = max(values.max() - values.min(), 0.05 * values.max())
    ax.set_ylim(max(0.0, values.min() - 2 * spread), values.max() + spread)  # differences are small: zoom in
    handles = [plt.Rectangle((0, 0), 1, 1, color=_GROUP_COLOR[g]) for g in GROUPS
               if any(m.group == g for m in evaluated)]
    ax.legend(handles, [g for g in GROUPS if any(m.group == g for m in evaluated)], fontsize=8)
    ax.set(title="test CE per model (lower is better)", ylabel="nats")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- entry point ------------------------------------------------------------------------


def write_report(config: Config, out_dir: Path) -> Path:
    """Write ``out_dir/report.md`` and its plots for every model of the run; returns the report path."""
    out_dir = Path(out_dir)
    models = find_models(config)
    if not models:
        raise ValueError(f"{config.run_path}: no teachers or students to report on; train some first")
    out_dir.mkdir(parents=True, exist_ok=True)
    evaluated = [m for m in models if m.eval]
    present = {f for m in evaluated for f in m.eval["blimp"]["fields"]}
    fields = [f for f in FIELDS if f in present] + sorted(present - set(FIELDS))
    suites = _zero_shot_suites(evaluated)

    # --- text
    numbers = {g: sum(m.group == g for m in models) for g in GROUPS}
    counts = ", ".join(f"{n} {g if n > 1 else g[:-1]}" for g, n in numbers.items() if n)
    lines = [f"# babydistill report: {config.run_dir}", "",
             f"Generated {datetime.now(UTC).isoformat(timespec='seconds')}. Models: {counts} "
             f"({len(evaluated)} evaluated).", "",
             "## Results (in the form of the paper's Table 3)", "", *_table(models, fields, suites), ""]
    if evaluated:
        first = evaluated[0].eval
        lines += [f"CE in nats on the first {first['loss']['validation']['num_windows']} validation and "
                  f"{first['loss']['test']['num_windows']} test windows "
                  f"({first['loss']['test']['num_tokens']} test tokens); lower is better. BLiMP: accuracy (%) on "
                  f"{first['blimp']['num_pairs']} minimal pairs from {first['blimp']['num_paradigms']} paradigms "
                  f"(max {first['blimp']['max_pairs_per_paradigm'] or 'all'} per paradigm), overall and per field "
                  "as the mean over paradigms. mean ± std: sample standard deviation over seeds.", ""]
        if suites:
            described = "; ".join(f"{name}: {_suite_source(evaluated, name)}" for name in suites)
            lines += [f"BabyLM zero-shot suites (eval.zero_shot; accuracy %, scored as the BabyLM evaluation "
                      f"pipeline 2025 does): {described}.", ""]
        if len({_eval_settings(m) for m in evaluated}) > 1:
            lines += ["**Warning:** the models were not all evaluated on the same windows, pairs or token store; "
                      "re-run `babydistill evaluate` on each with the same config before comparing them.", ""]
        lines += ["## Best model", "", *_best_lines(evaluated), ""]
    not_evaluated = [m.name for m in models if not m.eval]
    if not_evaluated:
        lines += [f"Not evaluated (no eval.json): {', '.join(not_evaluated)}. "
                  "Run `babydistill evaluate CONFIG --model PATH` on each.", ""]

    # --- plots
    lines += ["## Plots", ""]
    if _plot_curves(models, out_dir / "curves.png"):
        lines += ["![training and validation curves](curves.png)", ""]
    if evaluated:
        _plot_blimp(evaluated, fields, out_dir / "blimp_fields.png")
        _plot_test_ce(evaluated, out_dir / "test_ce.png")
        lines += ["![BLiMP by field](blimp_fields.png)", "", "![test CE per model](test_ce.png)", ""]

    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
