"""The logit store format on synthetic data: one conformance class, one subclass per variant."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from babydistill.stores.logits import (
    PAD_LOGP,
    LogitStoreError,
    acquire_lock,
    chunk_files,
    chunk_ranges,
    create_store,
    incomplete_reason,
    lock_path,
    open_store,
    read_attrs,
    read_markers,
    store_info,
    verify_store,
    window_order,
    write_chunk,
)

VOCAB, SEQ_LEN, NUM_WINDOWS, CHUNK = 300, 6, 23, 5


class LogitStoreTests:
    """Round trip, partial reads, done markers and resume, verify, lock. Subclasses set the variant."""

    mode = "topk"
    slots = 4
    logp_dtype = "float16"

    def attrs(self) -> dict:
        return {"format_version": 2, "order": "shuffled", "mode": self.mode, "k": self.slots if self.mode == "topk" else None,
                "samples": 8 if self.mode == "sample" else None, "slots": self.slots, "ensemble": "logits",
                "temperatures": [1.0, 2.0], "logp_dtype": self.logp_dtype, "chunk_windows": CHUNK, "seed": 0,
                "fidelity_positions": 0, "vocab_size": VOCAB, "seq_len": SEQ_LEN, "num_windows": NUM_WINDOWS,
                "teachers": [], "tokenizer_hash": "t" * 64, "tokens_hash": "k" * 64, "windows_hash": "w" * 64}

    def chunk_arrays(self, start: int, stop: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(start)
        n = stop - start
        ids = np.stack([rng.permutation(VOCAB)[:self.slots] for _ in range(n * SEQ_LEN)]).reshape(n, SEQ_LEN, -1)
        logp = np.sort(np.log(rng.dirichlet(np.ones(self.slots + 2), size=(n, SEQ_LEN))[..., :self.slots]))[..., ::-1]
        if self.mode == "sample":
            logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
            logp[..., -1] = PAD_LOGP  # one padding slot per position
        return {"ids": ids.astype(np.uint16), "logp": logp.astype(self.logp_dtype),
                "c_T": rng.normal(size=(n, SEQ_LEN, 2)).astype(np.float32),
                "tokens": rng.integers(0, VOCAB, size=(n, SEQ_LEN + 1)).astype(np.uint16),
                "window_ids": window_order(NUM_WINDOWS, "shuffled", 0)[start:stop].astype(np.uint32)}

    @pytest.fixture
    def store(self, tmp_path) -> Path:
        path = tmp_path / "logits.zarr"
        path.mkdir()
        create_store(path, self.attrs())
        return path

    def fill(self, path: Path, chunks=None) -> None:
        group = zarr.open_group(str(path), mode="r+")
        for i, (start, stop) in enumerate(chunk_ranges(NUM_WINDOWS, CHUNK)):
            if chunks is None or i in chunks:
                write_chunk(path, group, i, start, self.chunk_arrays(start, stop))

    def test_round_trip(self, store):
        self.fill(store)
        group, header = open_store(store)
        assert header.identity["format"] == "babydistill.logits" and header.slots == self.slots
        for start, stop in chunk_ranges(NUM_WINDOWS, CHUNK):
            expected = self.chunk_arrays(start, stop)
            for name, values in expected.items():
                np.testing.assert_array_equal(group[name][start:stop], values, err_msg=name)
        assert group["logp"].dtype == np.dtype(self.logp_dtype) and group["ids"].dtype == np.uint16
        assert group["ids"].chunks == (CHUNK, SEQ_LEN, self.slots)

    def test_partial_range_reads(self, store):
        self.fill(store)
        group, _ = open_store(store)
        whole = np.concatenate([self.chunk_arrays(a, b)["logp"] for a, b in chunk_ranges(NUM_WINDOWS, CHUNK)])
        np.testing.assert_array_equal(group["logp"][3:12, 2:4], whole[3:12, 2:4])
        np.testing.assert_array_equal(group["logp"][[0, 7, 22]], whole[[0, 7, 22]])

    def test_done_markers_and_resume(self, store):
        self.fill(store, chunks={0, 2})
        assert incomplete_reason(store) == "3 of 5 chunks to (re)do (first: chunk 1: not marked done)"
        # Markers read earlier (a reader's) are what is judged, not a later look at the disk.
        earlier = read_markers(store, 5)
        self.fill(store, chunks={1})
        assert incomplete_reason(store, markers=earlier).startswith("3 of 5 chunks")
        assert "not the 4 it had" in incomplete_reason(store, markers=earlier[:4])
        self.fill(store, chunks={1, 3, 4})
        assert incomplete_reason(store) is None
        assert store_info(store)["chunks_done"] == 5 and verify_store(store) == []

    def test_all_zero_chunks_are_written(self, store):
        group = zarr.open_group(str(store), mode="r+")
        arrays = {name: np.zeros_like(a) for name, a in self.chunk_arrays(0, CHUNK).items()}
        arrays["logp"][...] = -1.0
        write_chunk(store, group, 0, 0, arrays)  # c_T, ids and tokens equal the fill value
        assert all((store / rel).is_file() for rel in chunk_files(group, 0).values())

    def test_verify_names_the_first_bad_chunk(self, store):
        self.fill(store)
        group = zarr.open_group(str(store), mode="r+")
        bad = self.chunk_arrays(10, 15)
        bad["ids"][0, 0, 0] = VOCAB + 1
        write_chunk(store, group, 2, 10, bad)  # consistent marker, bad content
        worse = self.chunk_arrays(15, 20)
        worse["logp"][1, 1, 0] = 0.5  # a probability above 1
        write_chunk(store, group, 3, 15, worse)
        problems = verify_store(store)
        assert problems == [f"chunk 2 (rows 10-14): id {VOCAB + 1} >= vocab size {VOCAB}",
                            "chunk 3 (rows 15-19): probabilities outside (0, 1]"]

    def test_verify_reports_an_unreadable_chunk(self, store):
        self.fill(store)
        group = zarr.open_group(str(store), mode="r")
        rel = chunk_files(group, 1)["logp"]
        size = (store / rel).stat().st_size
        (store / rel).write_bytes(b"\0" * size)
        problems = verify_store(store)
        assert len(problems) == 1 and problems[0].startswith("chunk 1 (rows 5-9): ") and "crc32" in problems[0]

    def test_lock(self, store):
        lock = acquire_lock(store)
        with pytest.raises(LogitStoreError, match="another capture is running"):
            acquire_lock(store)
        lock.unlink()
        # A lock left by a dead process on this host is stale and taken over.
        lock_path(store).write_text(json.dumps({"pid": 2**22 + 12345, "host": os.uname().nodename}))
        assert json.loads(acquire_lock(store).read_text())["pid"] == os.getpid()

    def test_not_a_store(self, tmp_path):
        assert read_attrs(tmp_path) is None and incomplete_reason(tmp_path) == "no logit store"
        with pytest.raises(LogitStoreError, match="no logit store; run `babydistill capture CONFIG` first"):
            open_store(tmp_path)
        assert verify_store(tmp_path)[0].endswith("no logit store; run `babydistill capture CONFIG` first")


class TestFloat16TopK(LogitStoreTests):
    pass


class TestFloat32Sample(LogitStoreTests):
    mode = "sample"
    slots = 5
    logp_dtype = "float32"


def test_store_checksum_is_zlib_crc32():
    """Stores record zlib's crc32; the fast implementation must give the same numbers, or every existing
    store would read as changed (and new ones as changed to a plain-zlib reader)."""
    import zlib

    isal_zlib = pytest.importorskip("isal.isal_zlib")
    from babydistill.stores.checksum import crc32

    assert crc32 is isal_zlib.crc32  # the fast one is in use (pyproject installs it)
    rng = np.random.default_rng(0)
    for size in (0, 1, 7, 4096, 1 << 20):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert crc32(data) == zlib.crc32(data)
