"""The one reader of ``logits.zarr``: windows with their sparse teacher targets, addressed by position.

The training loop (and the loader benchmark, and the tests) ask for the rows at positions
``[a, b)`` of an epoch's order; the answer depends on (seed, epoch, positions) only, so resume is
exact and DDP ranks, which ask for disjoint positions, together read every window once per epoch.

Order of an epoch: the store's chunks shuffled from (seed, epoch) and taken
``shuffle_buffer_chunks`` at a time; the rows of one such buffer permuted together. The store
already holds the windows in a global permutation (``order: shuffled``, see stores/logits.py), so
every buffer is a uniform sample of the corpus and batches are as well mixed as a global shuffle,
while positions read in increasing order decode each chunk about once per epoch (decoded chunks
of the current buffer are kept in a small cache).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from babydistill.stores.chunks import read_bytes_or_none, recorded_file_problem
from babydistill.stores.logits import (
    chunk_file,
    chunk_ranges,
    decode_chunk,
    incomplete_reason,
    open_store,
    read_markers,
)

REBUILD = "rebuild it with `babydistill capture CONFIG --force`"
REPAIR = "re-run `babydistill capture CONFIG` to rewrite it"
STORED = ("tokens", "ids", "logp", "window_ids")


class LogitStoreReader:
    """Rows of a finished logit store as training batches, by (epoch, positions).

    Batch keys: ``input_ids`` int64 [B, S], ``labels`` int64 [B, S], ``target_ids`` int64 [B, S, K],
    ``target_logp`` float32 [B, S, K] (log-probabilities at T = 1; padding slots hold -1e4, weight 0),
    ``c_T`` float32 [B, S] (only when ``temperature`` is one of the store's capture temperatures),
    ``window_ids`` int64 [B] (the training windows of tokens.zarr these rows hold),
    ``tail_logp`` float32 [B, S, K - k] (stores captured with ``cache.tail_logp`` only, unless the reader is
    built with ``tail_logp=False``: the tail draws' exact teacher log-probabilities, -1e4 on padding).
    A store of several tail draw sets (``cache.draw_sets``) gives epoch e the head and the set e mod draw_sets.

    Examples
    --------
    >>> reader = LogitStoreReader("runs/demo/logits.zarr", "runs/demo/tokens.zarr", seed=0,
    ...                           temperature=2.0)  # doctest: +SKIP
    >>> batch = reader.batch(epoch=0, positions=np.arange(16))  # doctest: +SKIP
    >>> batch["target_logp"].shape  # doctest: +SKIP
    torch.Size([16, 128, 32])
    """

    def __init__(self, path: str | Path, tokens_path: str | Path, tokenizer_dir: str | Path | None = None, *,
                 seed: int, temperature: float | None = None, shuffle_buffer_chunks: int = 4,
                 tail_logp: bool = True):
        from babydistill.stores.tokens import TokenStore, tokenizer_file_hash

        self.path, self.tokens_path = Path(path), Path(tokens_path)
        if shuffle_buffer_chunks < 1:
            raise ValueError(f"shuffle_buffer_chunks must be >= 1, got {shuffle_buffer_chunks}")
        _, header = open_store(self.path)
        self.header = header
        self.num_windows, self.chunk_windows = header.num_windows, header.chunk_windows
        self.ranges = chunk_ranges(self.num_windows, self.chunk_windows)
        # Each chunk's done marker is parsed once, here, and kept: it records the sizes and crc32s that every
        # read of the chunk's files is checked against (the bytes are checked chunk by chunk, as read).
        markers = read_markers(self.path, len(self.ranges))
        reason = incomplete_reason(self.path, checksum=False, markers=markers)
        if reason:
            raise ValueError(f"{self.path} is incomplete ({reason}); finish it with `babydistill capture CONFIG`")
        tokens = TokenStore(self.tokens_path)
        for key in ("tokenizer_hash", "tokens_hash", "windows_hash"):
            ours, theirs = getattr(header, key), getattr(tokens.header, key)
            if ours != theirs:
                raise ValueError(f"{self.path} was made from other tokens than {self.tokens_path} ({key} "
                                 f"{ours[:12]} vs {theirs[:12]}); {REBUILD}")
        if tokenizer_dir is not None and tokenizer_file_hash(tokenizer_dir) != header.tokenizer_hash:
            tok = Path(tokenizer_dir) / "tokenizer.json"
            raise ValueError(f"{self.path} was made with another tokenizer than {tok}; {REBUILD}")
        # A student without the control variate has no use for the tail draws' probabilities: not decoded then.
        self.tail_logp = tail_logp and header.tail_logp
        self.seed, self.shuffle_buffer_chunks = seed, shuffle_buffer_chunks
        self.c_T_column = header.temperature_column(temperature)
        self._epoch: int | None = None
        self._order = np.zeros(0, dtype=np.int64)
        self._chunks: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._arrays: dict | None = None
        self._recorded = [marker["files"] for marker in markers]

    def order(self, epoch: int) -> np.ndarray:
        """Store rows in epoch ``epoch``'s reading order (a permutation of all rows)."""
        chunks = np.random.default_rng([self.seed, epoch]).permutation(len(self.ranges))
        pieces = []
        for b in range(0, len(chunks), self.shuffle_buffer_chunks):
            buffer = chunks[b:b + self.shuffle_buffer_chunks]
            rows = np.concatenate([np.arange(*self.ranges[c], dtype=np.int64) for c in buffer])
            pieces.append(rows[np.random.default_rng([self.seed, epoch, int(buffer[0])]).permutation(len(rows))])
        return np.concatenate(pieces)

    def _chunk(self, chunk: int) -> dict[str, np.ndarray]:
        if chunk not in self._chunks:
            if self._arrays is None:  # opened on first use: a reader can be built in one process, used in another
                group, _ = open_store(self.path)
                names = (STORED + (("c_T",) if self.c_T_column is not None else ())
                         + (("tail_logp",) if self.tail_logp else ()))
                self._arrays = {name: group[name] for name in names}
            start, stop = self.ranges[chunk]
            arrays = {name: decode_chunk(array, self._checked_bytes(chunk, name))[:stop - start]
                      for name, array in self._arrays.items()}
            if "c_T" in arrays:
                arrays["c_T"] = arrays["c_T"][:, :, self.c_T_column]
            self._chunks[chunk] = arrays
            while len(self._chunks) > self.shuffle_buffer_chunks + 1:
                self._chunks.popitem(last=False)
        return self._chunks[chunk]

    def _chunk_file(self, chunk: int, name: str) -> str:
        """Array ``name``'s chunk file of store chunk ``chunk``, relative to the store."""
        return chunk_file(name, self._arrays[name], chunk)

    def _checked_bytes(self, chunk: int, name: str) -> bytes:
        """The bytes of array ``name``'s chunk file, refused unless they have the size and crc32 its done
        marker recorded. Read once, checked, then decoded; `python -m babydistill.workflows.benchmarks.bench_loader --check-overhead` measures the cost."""
        rel = self._chunk_file(chunk, name)
        data = read_bytes_or_none(self.path / rel)
        info = self._recorded[chunk].get(rel)
        if info is None:
            why = f"{rel} is not among the files its chunk's done marker records"
        elif not (why := recorded_file_problem(rel, data, crc=info["crc32"], size=info["bytes"])):
            return data
        start, stop = self.ranges[chunk]
        raise ValueError(f"{self.path}: chunk {chunk} (rows {start}-{stop - 1}) {why}; {REPAIR}")

    def rows(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The stored arrays of store rows ``rows``, stacked in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        chunks = rows // self.chunk_windows
        out: dict[str, np.ndarray] = {}
        # Chunks in order of first use, so the small cache of decoded chunks sees the access pattern it expects.
        _, first = np.unique(chunks, return_index=True)
        for chunk in chunks[np.sort(first)]:
            picked = np.flatnonzero(chunks == chunk)
            for name, array in self._chunk(int(chunk)).items():
                if name not in out:
                    out[name] = np.empty((len(rows),) + array.shape[1:], dtype=array.dtype)
                out[name][picked] = array[rows[picked] - self.ranges[chunk][0]]
        return out

    def batch(self, epoch: int, positions: np.ndarray) -> dict[str, torch.Tensor]:
        """The rows at ``positions`` of epoch ``epoch``'s order, as a batch of CPU tensors."""
        if self._epoch != epoch:
            self._order, self._epoch = self.order(epoch), epoch
        arrays = self.rows(self._order[np.asarray(positions, dtype=np.int64)])
        if self.header.draw_sets > 1:
            cols, k = self.header.draw_set_columns(epoch), self.header.k
            arrays["ids"], arrays["logp"] = arrays["ids"][..., cols], arrays["logp"][..., cols]
            if "tail_logp" in arrays:
                arrays["tail_logp"] = arrays["tail_logp"][..., cols[k:] - k]
        tokens = torch.from_numpy(arrays["tokens"].astype(np.int64))
        batch = {
            "input_ids": tokens[:, :-1].contiguous(),
            "labels": tokens[:, 1:].contiguous(),
            "target_ids": torch.from_numpy(arrays["ids"].astype(np.int64)),
            "target_logp": torch.from_numpy(arrays["logp"].astype(np.float32)),
            "window_ids": torch.from_numpy(arrays["window_ids"].astype(np.int64)),
        }
        if "c_T" in arrays:
            batch["c_T"] = torch.from_numpy(arrays["c_T"].astype(np.float32))
        if "tail_logp" in arrays:
            batch["tail_logp"] = torch.from_numpy(arrays["tail_logp"].astype(np.float32))
        return batch
