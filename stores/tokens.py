"""The token store, ``tokens.zarr`` (Zarr v3).

Layout::

    tokens.zarr/                 group; attributes below
      <split>/tokens             uint16 [num_tokens]   the token stream: <s> doc </s> <s> doc </s> ...
      <split>/windows            int64  [num_windows]  start offset of each window in the stream

Window ``i`` of a split is ``tokens[start_i : start_i + seq_len + 1]``: the model reads the first
``seq_len`` tokens and predicts the last ``seq_len``. Windows are fixed and numbered; the logit
cache and the student refer to training windows by number.

Group attributes: ``format`` ("babydistill.tokens"), ``format_version``, ``vocab_size``,
``seq_len``, ``bos_id``, ``eod_id``, ``pad_id``, ``tokenizer_hash``, ``corpus_hashes`` (per split),
``splits`` (per split: num_tokens, num_windows), ``tokens_hash`` (all streams and window tables),
``windows_hash`` (the training window table) and ``chunk_crc32`` (every chunk file's crc32, written
after the arrays: a changed byte is named by ``verify_token_store`` and refused by the reader).

Examples
--------
>>> store = TokenStore("runs/demo/tokens.zarr")            # doctest: +SKIP
>>> store.windows("train", [0, 1]).shape                   # doctest: +SKIP
(2, 129)
"""

from __future__ import annotations

import hashlib
from functools import cached_property
from pathlib import Path

import numpy as np
import zarr

from babydistill.stores.checksum import file_crc32
from babydistill.stores.chunks import chunk_file, read_bytes_or_none, recorded_file_problem
from babydistill.stores.files import file_sha256
from babydistill.stores.header import TOKENS_FORMAT, TOKENS_FORMAT_VERSION, HeaderError, TokenStoreHeader

FORMAT, FORMAT_VERSION = TOKENS_FORMAT, TOKENS_FORMAT_VERSION
_STREAM_CHUNK = 1 << 20
REBUILD = "rebuild it with `babydistill tokenize CONFIG`"


class TokenStoreError(ValueError):
    """The token store is missing, of another format, or does not match what it is used with."""


def window_starts(num_tokens: int, seq_len: int) -> np.ndarray:
    """Non-overlapping windows of seq_len predictions (neighbours share one boundary token)."""
    num_windows = max(0, (num_tokens - 1) // seq_len)
    return np.arange(num_windows, dtype=np.int64) * seq_len


def tokenizer_file_hash(tokenizer_dir: Path) -> str | None:
    """The tokenizer hash every store records: sha256 of ``tokenizer.json``; None when there is none."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    return file_sha256(path) if path.is_file() else None


def _hash_arrays(*arrays: np.ndarray, prefix: str = "") -> str:
    digest = hashlib.sha256(prefix.encode())
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def write_token_store(path: Path, streams: dict[str, np.ndarray], *, seq_len: int, vocab_size: int,
                      special_ids: dict[str, int], tokenizer_hash: str, corpus_hashes: dict[str, str]) -> None:
    """Write the token streams of every split and their window tables to ``path``."""
    if vocab_size > np.iinfo(np.uint16).max + 1:
        raise TokenStoreError(f"vocab size {vocab_size} does not fit uint16 token ids (max 65536)")
    group = zarr.open_group(store=str(path), mode="w")
    digest_parts = []
    splits = {}
    for split, stream in streams.items():
        stream = np.asarray(stream, dtype=np.uint16)
        starts = window_starts(len(stream), seq_len)
        tokens = group.create_array(f"{split}/tokens", shape=stream.shape, dtype="uint16",
                                    chunks=(min(_STREAM_CHUNK, max(1, len(stream))),))
        tokens[:] = stream
        windows = group.create_array(f"{split}/windows", shape=starts.shape, dtype="int64",
                                     chunks=(max(1, len(starts)),))
        windows[:] = starts
        digest_parts.append(_hash_arrays(stream, starts, prefix=split))
        splits[split] = {"num_tokens": int(len(stream)), "num_windows": int(len(starts))}
    train_starts = window_starts(splits.get("train", {}).get("num_tokens", 0), seq_len)
    crcs = {rel: (file_crc32(Path(path) / rel) if (Path(path) / rel).is_file() else None)
            for split in streams for name in ("tokens", "windows") for rel in _chunk_files(group, f"{split}/{name}")}
    group.attrs.update({
        "chunk_crc32": crcs,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vocab_size": int(vocab_size),
        "seq_len": int(seq_len),
        **{f"{name}_id": int(i) for name, i in special_ids.items()},
        "tokenizer_hash": tokenizer_hash,
        "corpus_hashes": corpus_hashes,
        "splits": splits,
        "tokens_hash": hashlib.sha256((tokenizer_hash + "".join(digest_parts)).encode()).hexdigest(),
        "windows_hash": _hash_arrays(train_starts, prefix=f"seq_len={seq_len}"),
    })


def _chunk_files(group: zarr.Group, name: str) -> list[str]:
    """Store-relative files of every chunk of the 1-D array ``name``."""
    array = group[name]
    return [chunk_file(name, array, i) for i in range(-(-array.shape[0] // array.chunks[0]))]


def _file_problem(path: Path, rel: str, crc: int | None) -> str | None:
    file = Path(path) / rel
    if crc is None:  # a chunk equal to the fill value is not written
        return f"{rel} appeared since it was written" if file.is_file() else None
    return recorded_file_problem(rel, read_bytes_or_none(file), crc=crc)


def verify_token_store(path: Path) -> list[str]:
    """Every chunk file of ``tokens.zarr`` against its recorded crc32 ([] = fine); stores written before
    chunk checksums are checked against their ``tokens_hash`` instead."""
    try:
        store = TokenStore(path)
    except TokenStoreError as exc:
        return [str(exc)]
    crcs = store.header.chunk_crc32
    if crcs is None:
        try:
            digest = "".join(_hash_arrays(store.group[f"{split}/tokens"][:], store.group[f"{split}/windows"][:],
                                          prefix=split) for split in store.splits)
        except Exception as exc:  # a corrupt chunk surfaces as a codec error of any type
            return [f"unreadable ({type(exc).__name__}: {exc})"]
        if hashlib.sha256((store.tokenizer_hash + digest).encode()).hexdigest() != store.tokens_hash:
            return ["the token streams changed since they were written (tokens_hash)"]
        return []
    return [why for rel, crc in crcs.items() if (why := _file_problem(path, rel, crc))]


def incomplete_reason(path: Path) -> str | None:
    """None when ``path`` holds an intact token store, else the first problem (for `run` and `status`)."""
    problems = verify_token_store(path)
    return f"{len(problems)} problem(s), first: {problems[0]}" if problems else None


class TokenStore:
    """Read access to ``tokens.zarr``; streams are small, so each is read whole on first use."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise TokenStoreError(f"{self.path}: no token store; run `babydistill tokenize CONFIG` first")
        self.group = zarr.open_group(store=str(self.path), mode="r")
        try:
            self.header = TokenStoreHeader.from_attrs(dict(self.group.attrs), str(self.path))
        except HeaderError as exc:
            raise TokenStoreError(str(exc)) from None
        self._streams: dict[str, np.ndarray] = {}
        self._starts: dict[str, np.ndarray] = {}

    @property
    def seq_len(self) -> int:
        return int(self.header.seq_len)

    @property
    def vocab_size(self) -> int:
        return int(self.header.vocab_size)

    @property
    def tokenizer_hash(self) -> str:
        return self.header.tokenizer_hash

    @property
    def tokens_hash(self) -> str:
        return self.header.tokens_hash

    @property
    def windows_hash(self) -> str:
        return self.header.windows_hash

    @cached_property
    def splits(self) -> list[str]:
        return list(self.header.splits)

    def _check_split(self, split: str) -> None:
        if split not in self.header.splits:
            raise TokenStoreError(f"{self.path}: no split {split!r} (has {', '.join(self.splits)})")

    def _read(self, name: str) -> np.ndarray:
        """Array ``name`` whole, after checking its chunk files against their recorded crc32."""
        for rel in _chunk_files(self.group, name) if self.header.chunk_crc32 is not None else []:
            why = _file_problem(self.path, rel, self.header.chunk_crc32.get(rel))
            if why:
                raise TokenStoreError(f"{self.path}: {why}; {REBUILD}")
        return self.group[name][:]

    def stream(self, split: str) -> np.ndarray:
        self._check_split(split)
        if split not in self._streams:
            self._streams[split] = self._read(f"{split}/tokens")
        return self._streams[split]

    def starts(self, split: str) -> np.ndarray:
        self._check_split(split)
        if split not in self._starts:
            self._starts[split] = self._read(f"{split}/windows")
        return self._starts[split]

    def num_windows(self, split: str) -> int:
        self._check_split(split)
        return self.header.num_windows(split)

    def windows(self, split: str, indices, offsets=None) -> np.ndarray:
        """Windows ``indices`` of ``split`` as int64 [n, seq_len + 1].

        ``offsets`` (optional, per window) shift each window right, clamped to the stream end:
        the paper's random-offset sampling for teachers.
        """
        stream, starts = self.stream(split), self.starts(split)
        begin = starts[np.asarray(indices, dtype=np.int64)]
        if offsets is not None:
            begin = np.minimum(begin + np.asarray(offsets, dtype=np.int64), len(stream) - self.seq_len - 1)
        rows = begin[:, None] + np.arange(self.seq_len + 1, dtype=np.int64)[None, :]
        return stream[rows].astype(np.int64)

    def check_tokenizer(self, tokenizer_hash: str, what: str) -> None:
        if tokenizer_hash != self.tokenizer_hash:
            raise TokenStoreError(
                f"{what} was made with another tokenizer than {self.path} "
                f"({tokenizer_hash[:12]} vs {self.tokenizer_hash[:12]}); use the run's own tokenizer")
