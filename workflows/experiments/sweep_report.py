"""The report of a sweep: ``run_dir/sweeps/NAME/report.md``, ``results.json`` and three plots.

The trials table (parameters, state, validation CE, steps run), the best trial and the command that
trains its configuration as a named student, the steps pruning saved, and Optuna's matplotlib plots:
optimisation history, parameter importances and the trials' validation curves (the values each
trial reported to the pruner).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from babydistill.pipeline.config import Config

PLOTS = {"history.png": "optimisation history", "importances.png": "parameter importances",
         "curves.png": "validation CE of every trial (what the pruner saw)"}


def _last_value(t) -> float | None:
    if t.value is not None:
        return t.value
    return t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None


def _arg(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)  # repr: the exact float, so retraining matches


def best_command(config_path: str, config: Config, name: str, params: dict) -> str:
    """The `babydistill distill` command that trains the best trial's configuration as the student ``name``."""
    sets = " ".join(f"--set {k}={_arg(v)}" for k, v in params.items())
    return f"babydistill distill {config_path} --seed {config.sweep.student_seed} --name {name} {sets}"


def collect(study, config: Config) -> dict:
    """The sweep's trials and best trial as plain data (results.json)."""
    trials = []
    for t in study.get_trials(deepcopy=False):
        trials.append({"number": t.number, "state": t.state.name.lower(), "params": t.params,
                       "value": t.value, "last_value": _last_value(t), "steps": t.user_attrs.get("steps"),
                       "dir": t.user_attrs.get("dir"), "surplus": bool(t.user_attrs.get("surplus")),
                       "resumed_from_trial": t.user_attrs.get("resumed_from_trial"),
                       "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                       if t.datetime_complete and t.datetime_start else None})
    complete = [t for t in trials if t["state"] == "complete"]
    best = min(complete, key=lambda t: t["value"]) if complete else None
    counted = [t for t in trials if t["state"] in ("complete", "pruned")]
    full = max((t["steps"] for t in complete), default=None)
    run = sum(t["steps"] or 0 for t in counted)
    return {"name": study.study_name, "space": config.sweep.space, "objective": config.sweep.objective,
            "sampler": config.sweep.sampler, "pruner": config.sweep.pruner, "trials": trials, "best": best,
            "steps": {"run": run, "full_trial": full, "if_all_complete": full * len(counted) if full else None,
                      "saved_fraction": 1 - run / (full * len(counted)) if full and counted else None}}


def _plots(study, out_dir: Path) -> dict[str, str]:
    """Optuna's matplotlib plots; a plot that cannot be drawn yet (too few trials) says why instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    drawn = {}
    makers = {"history.png": vis.plot_optimization_history, "importances.png": vis.plot_param_importances,
              "curves.png": vis.plot_intermediate_values}
    for file, make in makers.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's matplotlib module is marked experimental
            try:
                ax = make(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as exc:
                drawn[file] = f"not drawn: {' '.join(str(exc).split())[:160]}"
                plt.close("all")
                continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(7, 4.5)
        fig.tight_layout()
        fig.savefig(out_dir / file, dpi=110)
        plt.close(fig)
        drawn[file] = "ok"
    return drawn


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def write_sweep_report(study, config: Config, out_dir: Path, *, config_path: str, command: str) -> Path:
    """Write ``report.md``, ``results.json`` and the plots into ``out_dir``; returns the report's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = collect(study, config)
    drawn = _plots(study, out_dir)
    keys = list(config.sweep.space)
    best = results["best"]
    name = results["name"]
    lines = [f"# Sweep `{name}`", "",
             f"Reproduce: `{command}`; this report alone: `babydistill sweep {config_path} --name {name} --report`.", "",
             f"Objective: minimise {results['objective']} CE at the trial's last step "
             f"(train.eval_windows = {config.train.eval_windows or 'all'} validation windows; the test split is never "
             f"used to choose). Sampler: {results['sampler']}; pruner: {results['pruner']} (every train.eval_every = "
             f"{config.train.eval_every} steps). Every trial trains with seed {config.sweep.student_seed}.", "",
             "Search space:", ""]
    lines += [f"- `{k}`: " + (f"one of {spec['choices']}" if "choices" in spec else
                               f"[{spec['low']}, {spec['high']}]" + (" (log scale)" if spec["log"] else "")
                               + (f", step {spec['step']}" if "step" in spec else ""))
              for k, spec in config.sweep.space.items()]
    counts: dict[str, int] = {}
    for t in results["trials"]:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    steps = results["steps"]
    lines += ["", "Trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + "."]
    if steps["if_all_complete"]:
        lines.append(f"Steps run by the completed and pruned trials: {steps['run']:,} of the {steps['if_all_complete']:,} "
                     f"they would take complete ({steps['full_trial']} each): pruning saved "
                     f"{100 * steps['saved_fraction']:.0f}%.")
    lines += ["", "## Best trial", ""]
    if best:
        lines += [f"Trial {best['number']} (`{best['dir']}`): validation CE **{best['value']:.4f}** after "
                  f"{best['steps']} steps.", "",
                  "Train its configuration as a named student (the same seed and parameters as the trial):", "",
                  "```", best_command(config_path, config, f"{name}-best", best["params"]), "```"]
    else:
        lines.append("No trial has completed yet.")
    lines += ["", "## Trials", "",
              "| trial | state | " + " | ".join(f"`{k}`" for k in keys) + " | val CE | steps | seconds |",
              "| --- | --- | " + " | ".join("---" for _ in keys) + " | --- | --- | --- |"]
    for t in results["trials"]:
        state = (t["state"] + (" (surplus)" if t["surplus"] else "")
                 + (f" (resumes trial {t['resumed_from_trial']})" if t["resumed_from_trial"] is not None else ""))
        params = " | ".join(_arg(t["params"][k]) if k in t["params"] else "-" for k in keys)
        mark = "**" if best and t["number"] == best["number"] else ""
        lines.append(f"| {mark}{t['number']}{mark} | {state} | {params} | {_cell(t['last_value'], '.4f')} | "
                     f"{_cell(t['steps'], 'd')} | {_cell(t['seconds'], '.0f')} |")
    lines += ["", "Pruned trials show the last validation CE they reported; their folders keep `metrics.jsonl`, "
              "`run_config.json` and `train.log`, and completed trials also a Hugging Face checkpoint.", "",
              "## Plots", ""]
    for file, what in PLOTS.items():
        lines.append(f"![{what}]({file})" if drawn[file] == "ok" else f"- {what}: {drawn[file]}")
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
