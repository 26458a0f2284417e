"""A claim study's pre-registered comparisons (``primary``, ``secondary``, ``control`` in the study file): the
paired 90% and 95% intervals of validation CE, the TOST verdict at the margin, and the report's sections for them.

TOST (two one-sided paired t-tests at 5%) passes when the 90% paired t-interval of (first - second) lies inside
(-margin, +margin): "equivalent". Otherwise "not equivalent", and "different" when the 95% interval excludes 0 too.
No verdict is given for a comparison with an unfinished cell, nor when the protocol's hash is missing or changed
(study_protocol.verdict_refusal). Test figures of a comparison only once every cell of it is finished.
"""

from __future__ import annotations

from babydistill.workflows.experiments.study_protocol import protocol_sha256, verdict_refusal
from babydistill.workflows.experiments.study_spec import Study
from babydistill.workflows.experiments.study_stats import paired_ci, pairs_for_power


def tost_verdict(ci90: dict, ci95: dict, margin: float) -> str:
    if ci90["low"] is not None and -margin < ci90["low"] and ci90["high"] < margin:
        return "equivalent"
    return "different" if ci95["low"] is not None and (ci95["low"] > 0 or ci95["high"] < 0) else "not equivalent"


def _finished(arm: dict, metric: str) -> dict[int, float]:
    return {int(s): c[metric] for s, c in arm["per_seed"].items() if c["status"] == "done"}


def comparison(first: dict, second: dict, kind: str, margin: float, refusal: str | None) -> dict:
    """One pre-registered comparison of two arms' results, paired over the seeds both arms have."""
    required = sorted(set(first["seeds"]) & set(second["seeds"]))
    val_a, val_b = _finished(first, "val_ce"), _finished(second, "val_ce")
    done = [s for s in required if s in val_a and s in val_b]
    complete = len(done) == len(required)
    result = {"arm": first["name"], "minus": second["name"], "kind": kind, "margin": margin, "seeds": required,
              "finished": done, "complete": complete,
              "val_ce": {"90": paired_ci(val_a, val_b, 0.90), "95": paired_ci(val_a, val_b, 0.95)},
              "test_ce": None, "verdict": None, "why_no_verdict": None}
    if complete:
        test_a, test_b = _finished(first, "test_ce"), _finished(second, "test_ce")
        result["test_ce"] = {"90": paired_ci(test_a, test_b, 0.90), "95": paired_ci(test_a, test_b, 0.95)}
    if kind != "primary":
        return result
    if not complete:
        result["why_no_verdict"] = f"incomplete ({len(done)}/{len(required)} pairs finished)"
    elif refusal:
        result["why_no_verdict"] = refusal
    else:
        result["verdict"] = tost_verdict(result["val_ce"]["90"], result["val_ce"]["95"], margin)
    result["sizing"] = sizing(result["val_ce"]["90"], margin)
    return result


def sizing(ci: dict, margin: float, power: float = 0.8) -> dict | None:
    """After the fact, not pre-registered: the pairs a TOST at ``margin`` would need for ``power`` at the paired
    sd observed, if the true difference were 0 and if it were the observed mean (None: no n reaches it)."""
    if ci["sd"] is None or ci["sd"] <= 0:
        return None
    return {"power": power, "paired_sd": ci["sd"], "pairs_if_no_difference": pairs_for_power(ci["sd"], 0.0, margin, power),
            "pairs_if_observed_mean": pairs_for_power(ci["sd"], ci["mean"], margin, power)}


def claim_results(study: Study, arms: list[dict], others: list[dict]) -> dict | None:
    """The claim's comparisons and protocol check; None for a study without a protocol or primary comparisons."""
    if study.protocol is None and not study.primary:
        return None
    recorded = [c["protocol_sha256"] for a in arms for c in a["per_seed"].values() if c["status"] == "done"]
    recorded += [c["protocol_sha256"] for c in others if c["status"] == "done"]
    margins = [c.get("protocol_margins") for a in arms for c in a["per_seed"].values() if c["status"] == "done"]
    refusal = verdict_refusal(study, recorded, margins)
    by_name = {a["name"]: a for a in arms}
    return {"protocol": str(study.protocol), "sha256": protocol_sha256(study), "margin": study.margin,
            "refusal": refusal, "control": study.control, **_deviations(study),
            "primary": [comparison(by_name[a], by_name[b], "primary", study.primary_margin(a, b), refusal)
                        for a, b in study.primary],
            "secondary": [comparison(by_name[a], by_name[b], "secondary", study.margin, refusal)
                          for a, b in study.secondary]}


def _deviations(study: Study) -> dict:
    """``DEVIATIONS.md`` beside the protocol: what departed from it, with the reasons. Not hashed with the results:
    deviations are found while the study runs, and listing one must not void the verdicts it qualifies."""
    path = None if study.protocol is None else study.protocol.parent / "DEVIATIONS.md"
    text = path.read_text(encoding="utf-8").strip() if path is not None and path.is_file() else None
    return {"deviations_file": None if path is None else str(path), "deviations": text}


# --- the report's sections ----------------------------------------------------------------------------------------


def _ci(ci: dict | None, digits: int = 4) -> str:
    if ci is None or not ci["n"]:
        return "-"
    if ci["low"] is None:
        return f"{ci['mean']:+.{digits}f} (n={ci['n']}, no interval)"
    return f"[{ci['low']:+.{digits}f}, {ci['high']:+.{digits}f}]"


def _mean(ci: dict | None) -> str:
    return "-" if ci is None or not ci["n"] else f"{ci['mean']:+.4f}"


def _row(c: dict, last: str) -> str:
    v = c["val_ce"]
    return (f"| {c['arm']} − {c['minus']} | {len(c['finished'])}/{len(c['seeds'])} | {_mean(v['95'])} | "
            f"{_ci(v['90'])} | {_ci(v['95'])} | {last} |")


def _verdict_cell(c: dict, study_margin: float) -> str:
    at = "" if c.get("margin", study_margin) == study_margin else f" at ±{c['margin']:g}"
    if not c["verdict"]:
        return f"none: {c['why_no_verdict']}"
    ci95 = c["val_ce"]["95"]
    if c["verdict"] == "equivalent" and (ci95["low"] > 0 or ci95["high"] < 0):
        return f"**equivalent**{at} (the 95% interval excludes 0: a difference, smaller than the margin)"
    return f"**{c['verdict']}**{at}"


def direction(c: dict, margin: float) -> str:
    mean = c["val_ce"]["95"]["mean"]
    if mean is None:
        return "-"
    where = "inside the margin" if abs(mean) < margin else ("above +" if mean > 0 else "below -") + f"{margin:g}"
    return where if c["complete"] else f"{where} (incomplete)"


def claim_sections(results: dict) -> list[str]:
    """Protocol, primary verdicts (validation), secondary comparisons, the control, then test: the claim's report."""
    claim = results["claim"]
    m = claim["margin"]
    own = sorted({c["margin"] for c in claim["primary"] if c["margin"] != m})
    where = f" (±{', ±'.join(f'{x:g}' for x in own)} where a comparison names its own)" if own else ""
    lines = ["## Protocol", "", f"`{claim['protocol']}`, sha256 `{claim['sha256'] or 'missing'}`. Margin ±{m:g} nats "
             f"of validation CE{where}; TOST at 5% per side (the 90% paired t-interval inside the margin).", ""]
    if claim["refusal"]:
        lines += [f"**No verdict: {claim['refusal']}.**", ""]
    lines += _deviation_section(claim)
    head = "| comparison (first − second) | pairs | Δ val CE | 90% CI | 95% CI |"
    lines += ["## Primary comparisons: verdicts on validation CE", "", head + " verdict |", "|" + " --- |" * 6]
    lines += [_row(c, _verdict_cell(c, m)) for c in claim["primary"]]
    lines += ["", "Each primary comparison is its own family (one pre-registered claim each): no multiplicity "
              "correction. equivalent: the 90% interval inside the margin; not equivalent: it reaches outside; "
              "different: the 95% interval excludes 0 as well.", ""]
    lines += _sizing_lines(claim["primary"])
    if claim["secondary"]:
        lines += ["## Secondary comparisons: direction only (no verdict)", "", head + " direction |", "|" + " --- |" * 6]
        lines += [_row(c, direction(c, m)) for c in claim["secondary"]]
        lines.append("")
    return lines + _control_sections(results) + _test_section(claim)


def _sizing_lines(comparisons: list[dict]) -> list[str]:
    """What a study that could pass would need, for each primary comparison that did not: computed after the
    fact from its own paired sd, so planning advice, not evidence."""
    lines = []
    for c in comparisons:
        size = c.get("sizing")
        if not size or not c["complete"] or c["verdict"] == "equivalent":
            continue
        at_mean = size["pairs_if_observed_mean"]
        lines.append(f"- {c['arm']} − {c['minus']}: paired sd {size['paired_sd']:.4f}; TOST at ±{c['margin']:g} passes "
                     f"with {size['power']:.0%} power {_pairs(size['pairs_if_no_difference'])} if the true "
                     f"difference is 0, and {_pairs(at_mean)} if it is the observed {c['val_ce']['90']['mean']:+.4f}.")
    if not lines:
        return []
    return ["Sizing, computed after the fact (not pre-registered; `study_stats.pairs_for_power`, exact TOST power):",
            "", *lines, ""]


def _pairs(n: int | None) -> str:
    return f"from {n} pairs" if n else "with no number of pairs up to 100,000"


def _deviation_section(claim: dict) -> list[str]:
    if "deviations_file" not in claim:  # results.json written before 2026-12-05
        return []
    if not claim["deviations"]:
        return ["## Deviations", "", f"None recorded (`{claim['deviations_file']}` would list each, with its reason).", ""]
    return ["## Deviations", "", f"From `{claim['deviations_file']}`:", "", claim["deviations"], ""]


def _control_sections(results: dict) -> list[str]:
    lines = []
    control = results["claim"]["control"]
    students = [a for a in results["arms"] if not a["ce_only"]]
    if control:
        lines += [f"## Students vs the CE-only control ({control}), validation CE", "",
                  "Paired by seed over the seeds both arms have; 95% t-interval (negative: distillation helps):", ""]
        lines += [f"- {a['name']}: {_mean(a['vs_control']['val_ce'])} {_ci(a['vs_control']['val_ce'])} "
                  f"(n={a['vs_control']['val_ce']['n']})" for a in students]
        lines.append("")
    lines += ["## Students vs the best teacher of their pair (chosen on validation CE), validation CE", "",
              "The teacher taken as fixed; 95% t-interval over the arm's seeds (negative: the students beat it):", ""]
    for a in students:
        ci = a["vs_best_teacher"] and a["vs_best_teacher"]["val_ce"]
        lines.append(f"- {a['name']} vs {a['best_teacher'] or '(no teacher evaluated)'}: {_mean(ci)} {_ci(ci)}")
    lines += ["", "## Teachers and ensembles", "", "| model | val CE | test CE |", "| --- | --- | --- |"]
    for t in results["teachers"] + results.get("ensembles", []):
        val, test = (f"{t[k]:.4f}" if t[k] is not None else "-" for k in ("val_ce", "test_ce"))
        lines.append(f"| {t['name']} | {val} | {test} |")
    return lines + ["", "An ensemble is the mean of its teachers' logits (the capture's rule).", ""]


def _test_section(claim: dict) -> list[str]:
    lines = ["## Test CE, read after the verdicts", "",
             "Only comparisons whose every cell is finished; no verdict is taken on test.", ""]
    done = [c for c in claim["primary"] + claim["secondary"] if c["complete"]]
    if not done:
        return lines + ["(No comparison is complete yet.)", ""]
    lines += ["| comparison | pairs | Δ test CE | 90% CI | 95% CI |", "|" + " --- |" * 5]
    lines += [f"| {c['arm']} − {c['minus']} | {len(c['finished'])} | {_mean(c['test_ce']['95'])} | "
              f"{_ci(c['test_ce']['90'])} | {_ci(c['test_ce']['95'])} |" for c in done]
    return lines + [""]
