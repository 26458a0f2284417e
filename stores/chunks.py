"""The chunk-level bookkeeping of the logit store: chunk files, done markers, the capture lock.

A chunk is written whole by one task and marked done only after its files are written; the marker records each
file's size and crc32, so a truncated, changed or deleted chunk file is found and the chunk redone. Every piece
of bookkeeping is a zarr node, so plain zarr walks the store without a warning.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numcodecs.blosc
import numpy as np
import zarr

from babydistill.stores import quant
from babydistill.stores.checksum import crc32, sealed, unsealed

DONE_DIR = "_done"


class LogitStoreError(ValueError):
    """A logit store that cannot be used as it is; the message names the store and the fix."""


def recorded_file_problem(rel: str, data: bytes | None, *, crc: int, size: int | None = None) -> str | None:
    """Why the bytes ``data`` of file ``rel`` (None: it is missing) are not what was recorded when it was written
    (its size and crc32), or None. The one wording of this check, for every store and reader."""
    if data is None:
        return f"{rel} is missing"
    if size is not None and len(data) != size:
        return f"{rel} has {len(data)} bytes, {size} were written"
    if crc32(data) != crc:
        return f"{rel} changed since it was written (crc32)"
    return None


def read_bytes_or_none(path: Path) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


_READ_IT = object()  # chunk_problem's default: read the marker from disk


def lock_path(path: Path) -> Path:
    """The capture lock of store ``path``: a file beside it (inside, plain zarr would trip over it)."""
    return Path(path).with_name(Path(path).name + ".lock")


def marker_path(path: Path, chunk: int) -> Path:
    return Path(path) / DONE_DIR / f"{chunk:06d}" / "zarr.json"


def _legacy_marker_path(path: Path, chunk: int) -> Path:
    return Path(path) / DONE_DIR / f"{chunk:06d}.json"


def node_json(attributes: dict) -> str:
    """A zarr v3 group node whose attributes are ``attributes``: how bookkeeping hides in plain sight."""
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attributes}, default=str)


def remove_marker(path: Path, chunk: int) -> None:
    marker = marker_path(path, chunk)
    marker.unlink(missing_ok=True)
    if marker.parent.is_dir():
        for leftover in marker.parent.iterdir():
            leftover.unlink()
        marker.parent.rmdir()
    _legacy_marker_path(path, chunk).unlink(missing_ok=True)


def migrate_markers(path: Path, num_chunks: int) -> None:
    """Move a store's done markers of the layout before zarr nodes (``_done/N.json``) to ``_done/N/zarr.json``."""
    done = Path(path) / DONE_DIR
    if not (done / "zarr.json").is_file():
        zarr.open_group(store=str(path), mode="r+").require_group(DONE_DIR)
    for chunk in range(num_chunks):
        legacy = _legacy_marker_path(path, chunk)
        if legacy.is_file():
            marker = json.loads(legacy.read_text(encoding="utf-8"))
            _write_marker(path, chunk, marker)
            legacy.unlink()


def chunk_ranges(num_windows: int, chunk_windows: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk_windows, num_windows)) for s in range(0, num_windows, chunk_windows)]


def chunk_file(name: str, array: zarr.Array, chunk: int) -> str:
    """Store-relative file of array ``name``'s chunk ``chunk`` (arrays are chunked along rows only)."""
    return f"{name}/" + array.metadata.encode_chunk_key((chunk,) + (0,) * (array.ndim - 1))


def decode_chunk(array: zarr.Array, data: bytes) -> np.ndarray:
    """One chunk file's bytes -> the chunk (full chunk shape; an edge chunk is padded), without reading it
    again: the reader checks the bytes' crc32 and decodes the same bytes. Stores made by ``create_store``
    only: little-endian bytes, then Blosc; quantised log-probabilities (``stores.quant``) have a
    FixedScaleOffset filter first, whose uint8 codes decode here through a table, with padding (code 0) as -1e4
    where plain zarr reads the range's bottom."""
    codecs = array.metadata.codecs
    names = [type(c).__name__ for c in codecs]
    if names == ["FixedScaleOffset", "BytesCodec", "BloscCodec"]:
        config = codecs[0].codec_config
        assert codecs[1].endian.value == "little" and config["astype"] == "|u1" and config["dtype"] == "<f4"
        codes = np.frombuffer(numcodecs.blosc.decompress(data), dtype=np.uint8).reshape(array.chunks)
        return quant.code_table(1.0 / config["scale"])[codes]
    assert names == ["BytesCodec", "BloscCodec"] and codecs[0].endian.value == "little"
    return np.frombuffer(numcodecs.blosc.decompress(data), dtype=np.dtype(array.dtype).newbyteorder("<")).reshape(
        array.chunks)


def _write_marker(path: Path, chunk: int, marker: dict) -> None:
    """Chunk ``chunk``'s done marker, atomically (written whole, then renamed into place)."""
    final = marker_path(path, chunk)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_suffix(".json.partial")
    partial.write_text(node_json(sealed(marker)), encoding="utf-8")
    partial.replace(final)


def read_marker(path: Path, chunk: int) -> dict | None:
    try:  # a marker changed after it was written (its seal) is no marker: the chunk is redone
        return unsealed(json.loads(marker_path(path, chunk).read_text(encoding="utf-8"))["attributes"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        return json.loads(_legacy_marker_path(path, chunk).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_markers(path: Path, num_chunks: int) -> list[dict | None]:
    """The done markers of chunks 0..num_chunks-1 (None where a chunk is not marked done)."""
    return [read_marker(path, chunk) for chunk in range(num_chunks)]


def chunk_problem(path: Path, chunk: int, *, checksum: bool = False, marker: dict | None | object = _READ_IT
                  ) -> str | None:
    """Why chunk ``chunk`` is not done and intact (no marker, file missing / resized / changed), or None.
    ``marker``: the chunk's done marker (None: it has none) if the caller has already read it."""
    if marker is _READ_IT:
        marker = read_marker(path, chunk)
    if marker is None:
        return "not marked done"
    for rel, info in marker["files"].items():
        file = Path(path) / rel
        if not file.is_file():
            return f"{rel} is missing"
        if file.stat().st_size != info["bytes"]:
            return f"{rel} has {file.stat().st_size} bytes, {info['bytes']} were written"
        if checksum and (why := recorded_file_problem(rel, read_bytes_or_none(file), crc=info["crc32"])):
            return why
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(path: Path) -> Path:
    """Take the capture lock of ``path``; a lock left by a dead process on this host is taken over."""
    lock = lock_path(path)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = json.loads(lock.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                owner = {}
            if owner.get("host") == me["host"] and not _pid_alive(int(owner.get("pid", -1))):
                lock.unlink(missing_ok=True)  # stale: its capture was killed
                continue
            raise LogitStoreError(f"{path}: another capture is running (pid {owner.get('pid')} on "
                                  f"{owner.get('host')}); wait for it or remove {lock} if it is gone") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return lock
    raise LogitStoreError(f"{path}: could not take {lock}")
