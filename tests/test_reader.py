"""The streaming reader: content, determinism, coverage, rank x worker split, resume, refusals."""
# ruff: noqa: F811  (the session fixtures imported from test_cache are used as arguments)

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from test_cache import teachers, topk_store  # noqa: F401  (session fixtures)
from torch.utils.data import DataLoader

from stores.reader import LogitStoreDataset, _resume_roles
from stores.tokens import TokenStore, write_token_store

NUM_WINDOWS = 442


def reader(store, run, **kwargs) -> LogitStoreDataset:
    options = {"batch_size": 16, "seed": 3, **kwargs}
    return LogitStoreDataset(store[0], run.tokens_path, run.tokenizer_path, **options)


def collect(dataset, num_workers: int = 0) -> list[dict]:
    if num_workers == 0:
        return list(dataset)
    return list(DataLoader(dataset, batch_size=None, num_workers=num_workers))


def window_ids(batches) -> np.ndarray:
    return torch.cat([b["window_ids"] for b in batches]).numpy()


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), f"batch {i}: {key} differs"


def test_batches_hold_the_stored_targets(topk_store, tiny_run):
    batches = collect(reader(topk_store, tiny_run, temperature=2.0))
    group = zarr.open_group(str(topk_store[0]), mode="r")
    first = batches[0]
    assert {k: (tuple(v.shape), v.dtype) for k, v in first.items()} == {
        "input_ids": ((16, 32), torch.int64), "labels": ((16, 32), torch.int64),
        "target_ids": ((16, 32, 8), torch.int64), "target_logp": ((16, 32, 8), torch.float32),
        "c_T": ((16, 32), torch.float32), "window_ids": ((16,), torch.int64)}
    for batch in batches[:3] + batches[-1:]:
        rows = batch["window_ids"].numpy()
        windows = TokenStore(tiny_run.tokens_path).windows("train", rows)
        np.testing.assert_array_equal(batch["input_ids"].numpy(), windows[:, :-1])
        np.testing.assert_array_equal(batch["labels"].numpy(), windows[:, 1:])
        np.testing.assert_array_equal(batch["target_ids"].numpy(), group["ids"][rows])
        np.testing.assert_array_equal(batch["target_logp"].numpy(), group["logp"][rows].astype(np.float32))
        np.testing.assert_array_equal(batch["c_T"].numpy(), group["c_T"][rows, :, 1])
    assert len(batches[-1]["window_ids"]) == NUM_WINDOWS % 16
    assert "c_T" not in next(iter(reader(topk_store, tiny_run, temperature=1.5)))
    assert len(collect(reader(topk_store, tiny_run, drop_last=True))) == NUM_WINDOWS // 16


def test_order_is_deterministic_and_covers_every_window_once(topk_store, tiny_run):
    a = collect(reader(topk_store, tiny_run, epoch=1))
    assert_same_batches(a, collect(reader(topk_store, tiny_run, epoch=1)))
    ids = window_ids(a)
    np.testing.assert_array_equal(np.sort(ids), np.arange(NUM_WINDOWS))
    assert not np.array_equal(ids, np.arange(NUM_WINDOWS))
    assert not np.array_equal(ids, window_ids(collect(reader(topk_store, tiny_run, epoch=2))))
    assert not np.array_equal(ids, window_ids(collect(reader(topk_store, tiny_run, epoch=1, seed=4))))
    assert len(reader(topk_store, tiny_run)) == len(a)


def test_each_chunk_is_read_once_per_epoch(topk_store, tiny_run, monkeypatch):
    reads = []
    original = LogitStoreDataset._read
    monkeypatch.setattr(LogitStoreDataset, "_read", lambda self, group, chunks: (reads.extend(chunks),
                                                                                 original(self, group, chunks))[1])
    collect(reader(topk_store, tiny_run, shuffle_buffer_chunks=3))
    assert sorted(reads) == list(range(14))


def test_two_ranks_times_two_workers_split_cleanly(topk_store, tiny_run):
    seen = []
    for rank in range(2):
        dataset = reader(topk_store, tiny_run, rank=rank, world_size=2, batch_size=10)
        batches = collect(dataset, num_workers=2)
        assert len(batches) == dataset.num_batches(num_workers=2) == dataset.num_batches(2, rank=rank)
        ids = window_ids(batches)
        assert set(ids) == set(window_ids(collect(dataset)))  # the rank's windows do not depend on workers
        seen.append(ids)
    both = np.concatenate(seen)
    assert len(both) == NUM_WINDOWS and len(set(both)) == NUM_WINDOWS
    assert abs(len(seen[0]) - len(seen[1])) <= 32  # ranks differ by at most one chunk


def test_resume_mid_epoch_gives_the_same_batches(topk_store, tiny_run, monkeypatch):
    full = collect(reader(topk_store, tiny_run, epoch=1, batch_size=12))
    resumed = reader(topk_store, tiny_run, batch_size=12)
    resumed.load_state_dict(reader(topk_store, tiny_run, epoch=1, batch_size=12).state_dict(20))
    reads = []
    original = LogitStoreDataset._read
    monkeypatch.setattr(LogitStoreDataset, "_read", lambda self, group, chunks: (reads.extend(chunks),
                                                                                 original(self, group, chunks))[1])
    assert_same_batches(collect(resumed), full[20:])
    assert len(reads) == 14 - 4, "the first buffer (4 chunks, 128 windows < 20 x 12) is not read"


@pytest.mark.parametrize("start_batch", [0, 9, 20, 36])
def test_resume_with_dataloader_workers(topk_store, tiny_run, start_batch):
    # With 2 workers of 7 chunks each and batch 11, the workers' batch counts differ (the last chunk is short).
    full = collect(reader(topk_store, tiny_run, batch_size=11), num_workers=2)
    resumed = collect(reader(topk_store, tiny_run, batch_size=11, start_batch=start_batch), num_workers=2)
    assert_same_batches(resumed, full[start_batch:])


def test_resume_roles():
    assert _resume_roles([3, 1, 2], 0) == ([0, 1, 2], [0, 0, 0])
    assert _resume_roles([3, 1, 2], 1) == ([1, 2, 0], [1, 0, 0])
    assert _resume_roles([3, 1, 2], 4) == ([2, 0], [2, 1, 1])  # worker 1 is exhausted
    assert _resume_roles([3, 1, 2], 6) == ([], [3, 1, 2])


# --- refusals -----------------------------------------------------------------------------------


def test_a_store_from_other_tokens_is_refused(topk_store, tiny_run, tmp_path):
    tokens = TokenStore(tiny_run.tokens_path)
    other = tmp_path / "tokens.zarr"
    streams = {split: tokens.stream(split)[::-1].copy() for split in tokens.splits}
    write_token_store(other, streams, seq_len=tokens.seq_len, vocab_size=tokens.vocab_size,
                      special_ids={k[:-3]: tokens.attrs[k] for k in ("pad_id", "bos_id", "eod_id")},
                      tokenizer_hash=tokens.tokenizer_hash, corpus_hashes={})
    with pytest.raises(ValueError, match=rf"{topk_store[0]} was made from other tokens than {other} "
                                         r"\(tokens_hash .*`babydistill cache CONFIG --force`") as err:
        LogitStoreDataset(topk_store[0], other, batch_size=4, seed=0)
    assert "\n" not in str(err.value)


def test_a_store_from_another_tokenizer_is_refused(topk_store, tiny_run, tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"other": 1}')
    with pytest.raises(ValueError, match="made with another tokenizer than .*--force"):
        LogitStoreDataset(topk_store[0], tiny_run.tokens_path, tmp_path, batch_size=4, seed=0)


def test_an_incomplete_store_is_refused(topk_store, tiny_run, tmp_path):
    store = tmp_path / "logits.zarr"
    shutil.copytree(topk_store[0], store)
    (store / "_done" / "000004.json").unlink()
    with pytest.raises(ValueError, match=r"is incomplete \(1 of 14 chunks to \(re\)do \(first: chunk 4"):
        LogitStoreDataset(store, tiny_run.tokens_path, batch_size=4, seed=0)


def test_bad_arguments(topk_store, tiny_run):
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0; rank must be in"):
        reader(topk_store, tiny_run, batch_size=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no logit store"):
        LogitStoreDataset(Path(tiny_run.run_dir) / "nowhere", tiny_run.tokens_path, batch_size=4, seed=0)
