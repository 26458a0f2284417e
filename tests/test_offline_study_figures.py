"""The offline study's page (docs/results/offline-study/README.md) quotes its arm tables and contrasts from
results.json beside it. Each entry here is recomputed from the per-seed numbers and rounded once to the printed
digits: a figure taken from already-rounded numbers (a difference of two rounded means) can be off by 0.001
and still look right, and an edited table can drift from the data it claims to show."""
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

# The repository's own files, not the installed package's: the venv may import babydistill from another checkout.
STUDY = Path(__file__).resolve().parents[1] / "docs" / "results" / "offline-study"
PAGE = (STUDY / "README.md").read_text(encoding="utf-8")
RESULTS = json.loads((STUDY / "results.json").read_text(encoding="utf-8"))
ARMS = {arm["name"]: arm for arm in RESULTS["arms"]}
TEACHERS = {teacher["name"]: teacher for teacher in RESULTS["teachers"]}
CE_DIGITS = 3
TOKEN_TABLE = "| arm | store | bytes/token | val CE | test CE | Δ test CE vs online (95% CI) |"
SEQUENCE_TABLE = "| arm | store | bytes/token | val CE | test CE | Δ test CE vs online-seq (95% CI) |"
CONTRASTS_TABLE = "| contrast | factor | Δ val CE | Δ test CE |"


def table_rows(header: str) -> list[list[str]]:
    """The body rows of the page's table under `header`, as stripped cells with the bold marks removed."""
    lines = PAGE.splitlines()
    assert lines.count(header) == 1, f"the page should hold exactly one table headed {header!r}"
    rows = []
    for line in lines[lines.index(header) + 2:]:  # + 2: past the header and its --- line
        if not line.startswith("|"):
            break
        rows.append([cell.strip().replace("**", "") for cell in line.strip().strip("|").split("|")])
    assert rows, f"the table headed {header!r} has no rows"
    return rows


def arm_name(cell: str) -> str:
    """`online (reference)` and `dense (run 2026-11-28)` name the arms `online` and `dense`."""
    return cell.split(" (")[0].strip()


def seed_values(arm: str, metric: str) -> dict[str, float]:
    return {seed: row[metric] for seed, row in ARMS[arm]["per_seed"].items() if row.get("status") == "done"}


def mean_and_sd(arm: str, metric: str) -> str:
    values = np.array(list(seed_values(arm, metric).values()))
    return f"{values.mean():.{CE_DIGITS}f} ± {values.std(ddof=1):.{CE_DIGITS}f}"


def paired_interval(arm: str, minus: str, metric: str) -> tuple[float, float, float]:
    """Mean over seeds of (arm - minus) on the same seed, with the 95% t-interval t(0.975, n-1) sd / sqrt(n)."""
    first, second = seed_values(arm, metric), seed_values(minus, metric)
    differences = np.array([first[seed] - second[seed] for seed in sorted(first.keys() & second.keys())])
    half_width = stats.t.ppf(0.975, len(differences) - 1) * differences.std(ddof=1) / math.sqrt(len(differences))
    mean = differences.mean()
    return mean, mean - half_width, mean + half_width


def printed_interval(arm: str, minus: str, metric: str) -> str:
    mean, low, high = paired_interval(arm, minus, metric)
    return f"{mean:+.{CE_DIGITS}f} [{low:+.{CE_DIGITS}f}, {high:+.{CE_DIGITS}f}]"


def printed_bytes_per_token(arm: str) -> str:
    store = ARMS[arm].get("store")
    if not store:
        return "-"
    # The page gives stores of thousands of bytes per token to the byte, the others to a tenth.
    value = store["bytes_per_token"]
    return f"{value:,.0f}" if value >= 1000 else f"{value:,.1f}"


def expected_arm_row(arm: str, reference: str) -> list[str]:
    """bytes/token, val CE, test CE and Δ test CE vs the reference, as the page should print them."""
    delta = "-" if arm == reference else printed_interval(arm, reference, "test_ce")
    return [printed_bytes_per_token(arm), mean_and_sd(arm, "val_ce"), mean_and_sd(arm, "test_ce"), delta]


def arm_table_cases(header: str, reference: str) -> list:
    cases = []
    for cells in table_rows(header):
        if cells[0].startswith("teachers"):
            continue  # the teachers' row has no seeds; test_the_teachers_row checks it
        cases.append(pytest.param(cells, reference, id=arm_name(cells[0])))
    return cases


@pytest.mark.parametrize(("cells", "reference"), arm_table_cases(TOKEN_TABLE, "online")
                         + arm_table_cases(SEQUENCE_TABLE, "online-seq"))
def test_an_arm_row_equals_its_per_seed_numbers_rounded_once(cells, reference):
    arm = arm_name(cells[0])
    assert arm in ARMS, f"the page names an arm results.json does not have: {arm}"
    assert cells[2:] == expected_arm_row(arm, reference)


def test_the_tables_show_every_arm_they_should():
    token_arms = {arm_name(cells[0]) for cells in table_rows(TOKEN_TABLE) if not cells[0].startswith("teachers")}
    sequence_arms = {arm_name(cells[0]) for cells in table_rows(SEQUENCE_TABLE)}
    assert token_arms == {"online", "topk32-corpus-order", "topk32", "hybrid8-8", "hybrid8-24", "sample32",
                          "sample8", "dense"}
    assert sequence_arms == {"online-seq", "topk32-seq", "hybrid8-8-seq", "hybrid8-24-seq", "hybrid8-64-seq",
                             "dense-seq"}


def test_the_teachers_row():
    cells = next(cells for cells in table_rows(TOKEN_TABLE) if cells[0].startswith("teachers"))
    names = re.findall(r"t\d+", cells[0])
    for column, metric in ((3, "val_ce"), (4, "test_ce")):
        assert cells[column] == " / ".join(f"{TEACHERS[name][metric]:.{CE_DIGITS}f}" for name in names)


def contrast_cases() -> list:
    cases = []
    for cells in table_rows(CONTRASTS_TABLE):
        arm, minus = (name.strip() for name in cells[0].split("−"))  # U+2212, the page's minus sign
        cases.append(pytest.param(arm, minus, cells[2], cells[3], id=f"{arm} - {minus}"))
    return cases


@pytest.mark.parametrize(("arm", "minus", "printed_val", "printed_test"), contrast_cases())
def test_a_contrast_equals_its_paired_per_seed_differences(arm, minus, printed_val, printed_test):
    assert printed_val == printed_interval(arm, minus, "val_ce")
    assert printed_test == printed_interval(arm, minus, "test_ce")


def stored_intervals() -> list:
    """Every paired interval results.json records (against the reference arm, and each contrast)."""
    reference = RESULTS["reference"]
    found = [(arm["name"], reference, arm["vs_reference"]) for arm in RESULTS["arms"]]
    found += [(contrast["arm"], contrast["minus"], contrast) for contrast in RESULTS["contrasts"]]
    return [pytest.param(arm, minus, stored, id=f"{arm} - {minus}") for arm, minus, stored in found]


@pytest.mark.parametrize(("arm", "minus", "stored"), stored_intervals())
def test_the_stored_intervals_are_the_exact_per_seed_ones(arm, minus, stored):
    # The report and the page may quote results.json's intervals directly only if they are unrounded.
    for metric in ("val_ce", "test_ce"):
        mean, low, high = paired_interval(arm, minus, metric)
        recorded = stored[metric]
        assert (recorded["mean"], recorded["low"], recorded["high"]) == pytest.approx((mean, low, high), abs=1e-12)
