"""Every benchmark JSON under docs/benchmarks/ says where and how it ran (workflows/benchmarks/machine.py)."""
import json
from pathlib import Path

import pytest

from babydistill.workflows.benchmarks import machine

BENCHMARKS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"


def test_the_record_has_every_key():
    record = machine.finish(machine.start())
    assert tuple(record) == machine.KEYS
    assert record["logical_cores"] >= 1 and len(record["load_average_end"]) == 3
    assert set(record["versions"]) == {"python", *machine.PACKAGES} and record["versions"]["torch"]
    json.dumps(record)  # a JSON value as it is


@pytest.mark.parametrize("path", sorted(BENCHMARKS.glob("*.json")), ids=lambda p: p.name)
def test_every_benchmark_json_records_its_machine(path):
    record = json.loads(path.read_text(encoding="utf-8"))["machine"]
    missing = set(machine.KEYS) - set(record)
    assert not missing, f"{path.name}: machine record lacks {sorted(missing)}"
    assert record["cpu_model"] and record["commit"] and record["command"] and record["date_utc"]
    assert set(machine.PACKAGES) <= set(record["versions"])


def test_the_kernel_tables_are_those_of_the_kernel_json():
    from babydistill.workflows.benchmarks.bench_kernels import markdown

    result = json.loads((BENCHMARKS / "kernels.json").read_text(encoding="utf-8"))
    assert (BENCHMARKS / "kernels.md").read_text(encoding="utf-8") == markdown(result)
