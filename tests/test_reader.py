"""The store reader: content, determinism, mixing, chunk reads, resume, refusals."""
# ruff: noqa: F811  (the session fixtures imported from test_cache are used as arguments)

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from test_cache import CFG, capture, teachers, topk_store  # noqa: F401  (session fixtures)

from babydistill.stores.logits import ARRAYS, chunk_files, remove_marker, window_order
from babydistill.stores.reader import LogitStoreReader
from babydistill.stores.tokens import TokenStore, write_token_store

NUM_WINDOWS = 442
NUM_CHUNKS = 14  # of 32 windows


def reader(store, run, **kwargs) -> LogitStoreReader:
    return LogitStoreReader(store[0], run.tokens_path, run.tokenizer_path, **{"seed": 3, **kwargs})


def epoch_batches(source: LogitStoreReader, epoch: int, batch_size: int = 16) -> list[dict]:
    return [source.batch(epoch, np.arange(s, min(s + batch_size, source.num_windows)))
            for s in range(0, source.num_windows, batch_size)]


def test_batches_hold_the_stored_targets(topk_store, tiny_run):
    source = reader(topk_store, tiny_run, temperature=2.0)
    group = zarr.open_group(str(topk_store[0]), mode="r")
    rows = source.order(0)[5:21]
    batch = source.batch(0, np.arange(5, 21))
    assert {k: (tuple(v.shape), v.dtype) for k, v in batch.items()} == {
        "input_ids": ((16, 32), torch.int64), "labels": ((16, 32), torch.int64),
        "target_ids": ((16, 32, 8), torch.int64), "target_logp": ((16, 32, 8), torch.float32),
        "c_T": ((16, 32), torch.float32), "window_ids": ((16,), torch.int64)}
    windows = TokenStore(tiny_run.tokens_path).windows("train", batch["window_ids"].numpy())
    np.testing.assert_array_equal(batch["input_ids"].numpy(), windows[:, :-1])
    np.testing.assert_array_equal(batch["labels"].numpy(), windows[:, 1:])
    np.testing.assert_array_equal(batch["window_ids"].numpy(), group["window_ids"][rows])
    np.testing.assert_array_equal(batch["target_ids"].numpy(), group["ids"][rows])
    np.testing.assert_array_equal(batch["target_logp"].numpy(), group["logp"][rows].astype(np.float32))
    np.testing.assert_array_equal(batch["c_T"].numpy(), group["c_T"][rows, :, 1])
    assert "c_T" not in reader(topk_store, tiny_run, temperature=1.5).batch(0, np.arange(4))


def test_every_epoch_is_a_permutation_fixed_by_seed_and_epoch(topk_store, tiny_run):
    source = reader(topk_store, tiny_run)
    for epoch in range(3):
        ids = torch.cat([b["window_ids"] for b in epoch_batches(source, epoch)]).numpy()
        np.testing.assert_array_equal(np.sort(ids), np.arange(NUM_WINDOWS))  # every window exactly once
    np.testing.assert_array_equal(source.order(1), reader(topk_store, tiny_run).order(1))
    assert not np.array_equal(source.order(1), source.order(2))
    assert not np.array_equal(source.order(1), reader(topk_store, tiny_run, seed=4).order(1))


def test_store_rows_hold_a_seeded_global_permutation(topk_store):
    group = zarr.open_group(str(topk_store[0]), mode="r")
    stored = group["window_ids"][:].astype(np.int64)
    np.testing.assert_array_equal(stored, window_order(NUM_WINDOWS, "shuffled", CFG.seed))
    np.testing.assert_array_equal(np.sort(stored), np.arange(NUM_WINDOWS))
    assert not np.array_equal(window_order(NUM_WINDOWS, "shuffled", 0), window_order(NUM_WINDOWS, "shuffled", 1))
    np.testing.assert_array_equal(window_order(NUM_WINDOWS, "corpus", 5), np.arange(NUM_WINDOWS))


def _spread(source: LogitStoreReader, batch_size: int = 16) -> float:
    """Mean distance in corpus position between the windows of a batch, over the windows (1/3 for a global shuffle)."""
    gaps = []
    for batch in epoch_batches(source, 0, batch_size)[:-1]:
        ids = batch["window_ids"].numpy()
        gaps.append(np.abs(ids[:, None] - ids[None, :]).sum() / (len(ids) * (len(ids) - 1)))
    return float(np.mean(gaps)) / NUM_WINDOWS


def test_batches_from_a_shuffled_store_are_as_mixed_as_a_global_shuffle(topk_store, tiny_run, teachers,
                                                                        tmp_path):
    shuffled = _spread(reader(topk_store, tiny_run, shuffle_buffer_chunks=1))
    assert 0.28 < shuffled < 0.39  # a global permutation gives 1/3 (within sampling noise)
    out = tmp_path / "corpus-order.zarr"
    capture(tiny_run, teachers, out, cfg=dataclasses.replace(CFG, order="corpus"))
    corpus = _spread(reader((out,), tiny_run, shuffle_buffer_chunks=1))
    # Most batches lie within one chunk of 32 contiguous windows (mean gap 32/3 windows); the few that straddle
    # two random chunks raise the mean.
    assert corpus < 0.15, corpus


def test_reading_an_epoch_in_order_decodes_each_chunk_once(topk_store, tiny_run, monkeypatch):
    decoded = []
    original = LogitStoreReader._chunk

    def counting(self, chunk):
        if chunk not in self._chunks:
            decoded.append(chunk)
        return original(self, chunk)

    monkeypatch.setattr(LogitStoreReader, "_chunk", counting)
    epoch_batches(reader(topk_store, tiny_run, shuffle_buffer_chunks=3), 0, batch_size=12)
    assert sorted(decoded) == list(range(NUM_CHUNKS))


def test_a_fresh_reader_resumes_at_any_position(topk_store, tiny_run):
    full = epoch_batches(reader(topk_store, tiny_run), 1, batch_size=12)
    resumed = reader(topk_store, tiny_run)
    for i in (20, 21, len(full) - 1):
        batch = resumed.batch(1, np.arange(i * 12, min((i + 1) * 12, NUM_WINDOWS)))
        for key in full[i]:
            assert torch.equal(batch[key], full[i][key]), (i, key)


# --- refusals -----------------------------------------------------------------------------------


def test_a_store_from_other_tokens_is_refused(topk_store, tiny_run, tmp_path):
    tokens = TokenStore(tiny_run.tokens_path)
    other = tmp_path / "tokens.zarr"
    streams = {split: tokens.stream(split)[::-1].copy() for split in tokens.splits}
    write_token_store(other, streams, seq_len=tokens.seq_len, vocab_size=tokens.vocab_size,
                      special_ids={k[:-3]: getattr(tokens.header, k) for k in ("pad_id", "bos_id", "eod_id")},
                      tokenizer_hash=tokens.tokenizer_hash, corpus_hashes={})
    with pytest.raises(ValueError, match=rf"{topk_store[0]} was made from other tokens than {other} "
                                         r"\(tokens_hash .*`babydistill capture CONFIG --force`") as err:
        LogitStoreReader(topk_store[0], other, seed=0)
    assert "\n" not in str(err.value)


def test_a_store_from_another_tokenizer_is_refused(topk_store, tiny_run, tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"other": 1}')
    with pytest.raises(ValueError, match="made with another tokenizer than .*--force"):
        LogitStoreReader(topk_store[0], tiny_run.tokens_path, tmp_path, seed=0)


def test_an_incomplete_store_is_refused(topk_store, tiny_run, tmp_path):
    store = tmp_path / "logits.zarr"
    shutil.copytree(topk_store[0], store)
    remove_marker(store, 4)
    with pytest.raises(ValueError, match=r"is incomplete \(1 of 14 chunks to \(re\)do \(first: chunk 4"):
        LogitStoreReader(store, tiny_run.tokens_path, seed=0)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("name", ARRAYS)
def test_a_damaged_chunk_is_refused_when_read_naming_the_store_chunk_and_repair(topk_store, tiny_run, tmp_path,
                                                                              name, damage):
    store = tmp_path / "logits.zarr"
    shutil.copytree(topk_store[0], store)
    source = reader((store,), tiny_run, temperature=2.0)  # opened while intact: damage lands mid-training
    rel = chunk_files(zarr.open_group(str(store), mode="r"), 7)[name]
    data = bytearray((store / rel).read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        (store / rel).write_bytes(bytes(data))
    elif damage == "truncate":
        (store / rel).write_bytes(bytes(data[:-3]))
    else:
        (store / rel).unlink()
    position = int(np.flatnonzero(source.order(0) // 32 == 7)[0])
    source.batch(0, np.arange(0, position))  # the chunks before it read fine
    with pytest.raises(ValueError) as err:
        source.batch(0, np.arange(position, position + 1))
    why = {"delete": "is missing", "truncate": f"has {len(data) - 3} bytes, {len(data)} were written",
           "flip": "changed since it was written (crc32)"}[damage]
    assert str(err.value) == (f"{store}: chunk 7 (rows 224-255) {rel} {why}; "
                              "re-run `babydistill capture CONFIG` to rewrite it")


def test_a_store_without_the_c_T_column_read_skips_checking_it(topk_store, tiny_run, tmp_path):
    store = tmp_path / "logits.zarr"
    shutil.copytree(topk_store[0], store)
    source = reader((store,), tiny_run, temperature=1.5)  # not a capture temperature: c_T is never read
    rel = chunk_files(zarr.open_group(str(store), mode="r"), 0)["c_T"]
    (store / rel).write_bytes((store / rel).read_bytes()[:-1])
    assert len(epoch_batches(source, 0)) == 28


def test_a_format_1_store_is_refused_with_the_rebuild_command(topk_store, tiny_run, tmp_path):
    store = tmp_path / "logits.zarr"
    shutil.copytree(topk_store[0], store)
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["format_version"] = 1
    del meta["attributes"]["record_crc32"]  # format 1 stores had no sealed header
    (store / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"format version 1, this babydistill reads 2 .*"
                                         r"rebuild the store with `babydistill capture CONFIG --force`") as err:
        LogitStoreReader(store, tiny_run.tokens_path, seed=0)
    assert "\n" not in str(err.value)


def test_bad_arguments(topk_store, tiny_run):
    with pytest.raises(ValueError, match="shuffle_buffer_chunks must be >= 1, got 0"):
        reader(topk_store, tiny_run, shuffle_buffer_chunks=0)
    with pytest.raises(ValueError, match="no logit store"):
        LogitStoreReader(Path(tiny_run.run_dir) / "nowhere", tiny_run.tokens_path, seed=0)
