"""The study report's figure: test CE against the store's bytes per token.
"""

from __future__ import annotations

import itertools
from pathlib import Path


def _label_points(ax, points: list[tuple[str, float, float]], gap_pt: float = 9.0) -> None:
    """Name each point beside it; labels of points close together are pushed apart vertically (at least
    ``gap_pt`` points), each joined to its point by a thin line, so that clustered arms stay legible."""
    ax.figure.canvas.draw()  # fixes the axes' scales, so data map to display points
    to_points = 72.0 / ax.figure.dpi
    placed: list[tuple[float, float]] = []  # (display x, label display y) in points
    for name, x, y in sorted(points, key=lambda p: p[2]):
        px, py = (v * to_points for v in ax.transData.transform((x, y)))
        label_y = py
        for other_x, other_y in placed:
            if abs(other_x - px) < 120 and label_y - other_y < gap_pt:
                label_y = other_y + gap_pt
        placed.append((px, label_y))
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, label_y - py), fontsize=7, va="center",
                    arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.5} if label_y != py else None)


def plot_test_ce_vs_bytes(results: dict, path: Path) -> bool:
    """Test CE against store bytes per token: one panel per ``distill.normalization`` among the arms (an arm
    is compared with the online arms of its own normalisation), arms named beside their points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def normalization(arm: dict) -> str:
        return arm["config"]["distill"]["normalization"]

    offline = [a for a in results["arms"] if not a["online"] and a["test_ce"]["n"] and a.get("store")
               and a["store"]["bytes_per_token"] is not None]
    online = [a for a in results["arms"] if a["online"] and a["test_ce"]["n"]]
    best = next((t for t in results["teachers"] if t["name"] == results["best_teacher"]), None)
    if not offline and not online:
        return False
    panels = sorted({normalization(a) for a in offline + online})
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.2), sharey=True, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        arms = [a for a in offline if normalization(a) == panel]
        for a in arms:
            x, y = a["store"]["bytes_per_token"], a["test_ce"]["mean"]
            ax.errorbar([x], [y], yerr=[a["test_ce"]["sd"] or 0.0], fmt="o", capsize=3, color="tab:blue")
        xs = [a["store"]["bytes_per_token"] for a in arms]
        if xs and max(xs) / max(min(xs), 1e-9) > 10:
            ax.set_xscale("log")
        _label_points(ax, [(a["name"], a["store"]["bytes_per_token"], a["test_ce"]["mean"]) for a in arms])
        # one colour per online arm, so that a panel with several (recipe variants) tells them apart
        for a, color in zip((a for a in online if normalization(a) == panel),
                            itertools.cycle(("tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"))):
            mean, sd = a["test_ce"]["mean"], a["test_ce"]["sd"]
            ax.axhline(mean, color=color, linewidth=1.5, label=f"{a['name']} (online, no store): mean ± std")
            if sd:
                ax.axhspan(mean - sd, mean + sd, color=color, alpha=0.12)
        if best is not None:
            ax.axhline(best["test_ce"], color="tab:gray", linestyle="--", label=f"best teacher {best['name']}")
        ax.set(title=f"distill.normalization: {panel}", xlabel="store bytes per token on disk")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    axes[0][0].set_ylabel("test CE (nats), mean ± std over seeds")
    fig.suptitle("test CE against store size (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _interval_rows(results: dict) -> list[tuple[str, dict, dict, float]]:
    """(label, 90% interval, 95% interval, margin) of validation CE per pre-registered comparison and per arm vs the control."""
    claim = results["claim"]
    rows = [(f"{c['arm']} − {c['minus']} ({c['kind']}, n={c['val_ce']['90']['n']})", c["val_ce"]["90"], c["val_ce"]["95"],
             c["margin"]) for c in claim["primary"] + claim["secondary"]]
    if claim["control"]:
        from babydistill.workflows.experiments.study_stats import paired_ci

        control = next(a for a in results["arms"] if a["name"] == claim["control"])
        ref = {int(s): c["val_ce"] for s, c in control["per_seed"].items() if c["status"] == "done"}
        for a in results["arms"]:
            if a["ce_only"]:
                continue
            mine = {int(s): c["val_ce"] for s, c in a["per_seed"].items() if c["status"] == "done"}
            ci90, ci95 = paired_ci(mine, ref, 0.90), paired_ci(mine, ref, 0.95)
            rows.append((f"{a['name']} − {control['name']} (control, n={ci95['n']})", ci90, ci95, claim["margin"]))
    return [r for r in rows if r[2]["low"] is not None]


def plot_paired_intervals(results: dict, path: Path) -> bool:
    """The claim's paired differences of validation CE: per comparison its mean, 90% (thick) and 95% (thin) paired
    t-intervals, with the margin; one row per comparison, labelled in full. False when none has an interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _interval_rows(results)
    if not rows:
        return False
    margin = results["claim"]["margin"]
    fig, ax = plt.subplots(figsize=(9, 1.0 + 0.45 * len(rows)))
    for i, (_, ci90, ci95, own_margin) in enumerate(reversed(rows)):
        if own_margin != margin:  # a comparison with its own margin: marked on its row only
            ax.plot([-own_margin, own_margin], [i, i], "|", color="tab:red", markersize=14, markeredgewidth=1.5)
        ax.plot([ci95["low"], ci95["high"]], [i, i], color="tab:blue", linewidth=1.2)
        ax.plot([ci90["low"], ci90["high"]], [i, i], color="tab:blue", linewidth=4.5, solid_capstyle="butt")
        ax.plot([ci95["mean"]], [i], "o", color="black", markersize=4)
    ax.set_yticks(range(len(rows)), [label for label, *_ in reversed(rows)], fontsize=9)
    for x in (-margin, margin):
        ax.axvline(x, color="tab:red", linestyle="--", linewidth=1)
    ax.axvline(0, color="0.4", linewidth=0.8)
    ax.set_xlabel("paired difference of validation CE (nats; first − second, same seeds)")
    own = "; red ticks: a comparison's own margin" if any(r[3] != margin for r in rows) else ""
    ax.set_title(f"paired 90% (thick) and 95% (thin) intervals; dashed: the margin ±{margin:g}{own}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
