"""Post hoc, not pre-registered: the re-tempering study's top-32 students at T = 2 against the temper study's online
T = 2 students. Both studies share the cpu-experiment's base run, the student seeds 1-3 and every setting but the
targets, so the students pair by seed. Reads only the two committed results.json files.

    python analysis/store-study/topk_vs_online_at_t2.py      (writes topk_vs_online_at_t2.json beside it)
"""

import json
from pathlib import Path

from babydistill.workflows.experiments.study_stats import paired_ci

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results" / "store-study"


def per_seed(study: str, split: str) -> dict[str, dict[int, float]]:
    """{arm: {seed: split CE}} of one study's results.json."""
    arms = json.loads((RESULTS / study / "results.json").read_text())["arms"]
    return {arm["name"]: {int(seed): cell[split] for seed, cell in arm["per_seed"].items() if cell.get(split) is not None}
            for arm in arms}


result = {}
for split in ("val_ce", "test_ce"):
    online = per_seed("temper", split)["T2-online"]
    topk = per_seed("retemper", split)
    result[split] = {f"{arm} - T2-online": paired_ci(topk[arm], online)
                     for arm in ("T2-topk32-recaptured", "T2-topk32-approx")}
print(json.dumps(result, indent=1))
out = Path(__file__).with_name("topk_vs_online_at_t2.json")
out.write_text(json.dumps(result, indent=2) + "\n")
print("wrote", out)
