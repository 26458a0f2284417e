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


def test_the_id_sorted_store_layout_loses_nothing():
    """bench store-bytes' candidate layout: a cumulative sum of the row deltas gives back the ids, every (id,
    log-probability) pair stays in its row, the head's k slots stay the head's, and the tail's are in increasing id."""
    import numpy as np

    from babydistill.workflows.benchmarks.bench_store_bytes import _row_deltas, _sorted_by_id

    rng = np.random.default_rng(0)
    k, slots, vocab = 4, 10, 16_000
    ids = np.stack([rng.choice(vocab, slots, replace=False) for _ in range(50)])
    logp, tail = rng.integers(1, 256, (50, slots)).astype(np.uint8), rng.integers(1, 256, (50, slots - k)).astype(np.uint8)
    for head_too in (False, True):
        sorted_ids, (logp_sorted, tail_sorted) = _sorted_by_id(ids, [logp, tail], k, head_too)
        restored = np.cumsum(_row_deltas(sorted_ids).astype(np.int64), axis=1) % 2**16
        assert np.array_equal(restored, sorted_ids)
        assert np.all(np.diff(restored[:, k:], axis=1) > 0)
        for row in range(50):
            assert set(zip(restored[row], logp_sorted[row])) == set(zip(ids[row], logp[row]))
            assert set(zip(restored[row, k:], tail_sorted[row])) == set(zip(ids[row, k:], tail[row]))
            assert set(restored[row, :k]) == set(ids[row, :k])
        assert head_too or np.array_equal(restored[:, :k], ids[:, :k])
