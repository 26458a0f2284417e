"""The logit store (``logits.zarr``): schema, chunk writer, done markers, lock, info and verify.

Layout (Zarr v3 group; every array chunked along windows only, ``C = chunk_windows``)::

    logits.zarr/
      zarr.json            group attributes (below)
      ids/                 uint16  [W, S, K]   sparse teacher ids per position
      logp/                float16 [W, S, K]   log-probabilities at T = 1 (float32 with logp_dtype float32)
      c_T/                 float32 [W, S, nT]  c_T = LSE(zbar/T) - LSE(zbar)/T, one column per capture temperature
      tokens/              uint16  [W, S + 1]  the row's token ids: inputs = [:, :-1], labels = [:, 1:]
      window_ids/          uint32  [W]         the training window of tokens.zarr that each row holds
      tail_logp/           float16 [W, S, K-k] hybrid stores with attribute tail_logp only: the teacher's exact
                           log-probability of each tail slot's id (PAD_LOGP on padding), for the student's
                           control variate (`pipeline.distill.control_coefficients`)
      _done/               a plain zarr group holding the done markers
      _done/000012/zarr.json  done marker of chunk 12 (a zarr group node; the marker is its attributes):
                           written only after the chunk's files, holds their byte sizes and crc32 (a
                           truncated, changed or deleted chunk file is detected and redone)
    logits.zarr.lock       beside the store, present while a capture runs (pid + host)

Every piece of bookkeeping is a zarr node (the runner's stage marker too: ``_stage/zarr.json``), so
plain zarr walks the store without a warning. Stores written before keep ``_done/000012.json`` and
``stage.json``, which are still read (a re-run of `babydistill cache` moves them to the new places).

``W`` = training windows of tokens.zarr, ``S`` = seq_len. Row order (attribute ``order``):
``shuffled`` (default) stores the windows in a global permutation fixed by ``cache.seed``
(``window_order``), so any run of consecutive rows, and so any chunk, is a uniform sample of the
corpus and a reader that streams a few chunks at a time still gets batches as well mixed as a
global shuffle; ``corpus`` keeps tokens.zarr's order (row w is window w; for comparison only).

Slots ``K`` per position, by ``mode``:
- ``topk``: the k most probable ids, by decreasing probability, ``logp`` = their log-probability.
- ``sample``: the distinct ids of ``samples`` draws from the ensemble, by decreasing count,
  ``logp = log(count / samples)``; min(samples, vocab) slots. An unbiased estimate of the
  teacher distribution with an empty tail.
- ``hybrid``: the top k exactly as ``topk``, then the distinct ids of ``samples`` draws from the
  remaining tail (renormalised), by decreasing count, ``logp = log(r * count / samples)`` with r the
  tail mass; k + min(samples, vocab - k) slots. Exact on the head, unbiased on the tail, empty tail.
  With attribute ``draw_sets`` D > 1 (``cache.draw_sets``), D independent such tail draw sets follow the
  head one after the other: K = k + D * min(samples, vocab - k). One draw set with the head
  (``draw_set_columns``) is a target as above; ids are distinct within it, not across sets. Readers
  give epoch e the set e mod D.
Sampled weights are probabilities at T = 1 only: there is no exact way back to p_j^(1/T) from them,
so sample and hybrid stores serve students at temperature 1 (the paper's value).

Padding (modes sample and hybrid, rows with fewer distinct ids than slots): the free slots hold ids that occur
nowhere else in the row (the smallest unused ids), so ids stay distinct per row, and ``logp = PAD_LOGP``
(-1e4, finite in float16): its weight exp(-1e4) is exactly 0, so a loss needs no mask, and a tail
computed as 1 - sum(exp(logp)) is unaffected. ``target_mask = logp > PAD_LOGP / 2`` recovers the
real slots.

Open it with plain zarr or dask::

    import zarr, dask.array as da
    group = zarr.open_group("runs/demo/logits.zarr", mode="r")
    ids = da.from_zarr(group["ids"])            # [W, S, K]
    p = da.exp(da.from_zarr(group["logp"]).astype("f4"))
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numcodecs.blosc
import numpy as np
import zarr
from zarr.codecs import BloscCodec

from babydistill.stores.checksum import SEAL, file_crc32, sealed, unsealed

FORMAT = "babydistill.logits"
FORMAT_VERSION = 2
# Version 1 stored rows in corpus order, which a chunk-streaming reader cannot mix into good batches.
PAD_LOGP = -1.0e4
DONE_DIR = "_done"
ARRAYS = ("ids", "logp", "c_T", "tokens", "window_ids")
MODES = ("topk", "sample", "hybrid")
ORDERS = ("shuffled", "corpus")
# Chosen by measurement (workflows/bench_loader.py, demo teachers, k = 32): Blosc-zstd with byte
# shuffle gives the smallest chunks of the candidates at ~the same decode speed; see the README.
CODEC = {"cname": "zstd", "clevel": 5, "shuffle": "shuffle"}


class LogitStoreError(ValueError):
    """The logit store is missing, of another format, incomplete, or does not match its inputs."""


# --- schema -------------------------------------------------------------------------------


def window_order(num_windows: int, order: str, seed: int) -> np.ndarray:
    """The training window held by each store row: a permutation fixed by ``seed`` (``shuffled``) or
    the identity (``corpus``). int64 [num_windows]."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if order == "corpus":
        return np.arange(num_windows, dtype=np.int64)
    return np.random.default_rng([seed, 2]).permutation(num_windows).astype(np.int64)


def array_names(attrs: dict) -> tuple[str, ...]:
    """The arrays a store with attributes ``attrs`` holds (hybrid stores captured with ``cache.tail_logp`` also
    keep the tail draws' exact log-probabilities)."""
    return ARRAYS + (("tail_logp",) if attrs.get("tail_logp") else ())


def draw_sets(attrs: dict) -> int:
    """Independent tail draw sets per position (1 for stores without the attribute and for non-hybrid modes)."""
    return int(attrs.get("draw_sets", 1))


def draw_set_slots(k: int | None, slots: int, sets: int) -> int:
    """The slots one draw set reads: all of them with one set, else the head's k plus the set's share of the tail."""
    return slots if sets == 1 else k + (slots - k) // sets


def draw_set_columns(attrs: dict, draw_set: int) -> np.ndarray:
    """The slot columns of draw set ``draw_set`` (taken mod the store's draw sets): the head, then the set's tail."""
    sets, k, slots = draw_sets(attrs), attrs["k"], attrs["slots"]
    if sets == 1:
        return np.arange(slots)
    width = draw_set_slots(k, slots, sets) - k
    first = k + (draw_set % sets) * width
    return np.concatenate([np.arange(k), np.arange(first, first + width)])


def targets_are_complete(attrs: dict) -> bool:
    """True for stores whose slot weights sum to 1 by construction (sample, hybrid): no tail."""
    return attrs["mode"] in ("sample", "hybrid")


def array_shapes(attrs: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each array's (shape, dtype), as the store's header (its group attributes) fixes them."""
    num_windows, seq_len, slots = attrs["num_windows"], attrs["seq_len"], attrs["slots"]
    shapes = {"ids": ((num_windows, seq_len, slots), "uint16"),
              "logp": ((num_windows, seq_len, slots), attrs["logp_dtype"]),
              "c_T": ((num_windows, seq_len, len(attrs["temperatures"])), "float32"),
              "tokens": ((num_windows, seq_len + 1), "uint16"),
              "window_ids": ((num_windows,), "uint32")}
    if attrs.get("tail_logp"):
        shapes["tail_logp"] = ((num_windows, seq_len, slots - attrs["k"]), attrs["logp_dtype"])
    return shapes


def _create_arrays(group: zarr.Group, attrs: dict, codec: dict, names: tuple[str, ...] | None = None) -> None:
    chunk = min(attrs["chunk_windows"], max(1, attrs["num_windows"]))
    for name, (shape, dtype) in array_shapes(attrs).items():
        if names is None or name in names:
            group.create_array(name, shape=shape, dtype=dtype, chunks=(chunk, *shape[1:]),
                               compressors=BloscCodec(**codec), fill_value=0, overwrite=True)


def create_store(path: Path, attrs: dict, *, codec: dict | None = None) -> zarr.Group:
    """Create the group and its empty arrays; ``attrs`` is the store's identity (``pipeline.cache.store_identity``:
    at least num_windows, seq_len, slots, chunk_windows, logp_dtype and temperatures)."""
    group = zarr.open_group(store=str(path), mode="a")
    _create_arrays(group, attrs, codec or CODEC)
    update_header(group, {"format": FORMAT, **attrs, "codec": codec or CODEC})
    group.require_group(DONE_DIR)
    return group


def update_header(group: zarr.Group, values: dict) -> None:
    """Set header keys (the group attributes) and seal the header again (``stores.checksum.sealed``), so that
    every reader can tell a header changed after it was written."""
    header = {key: value for key, value in dict(group.attrs).items() if key != SEAL}
    group.attrs.put(sealed({**header, **values}))


# The parts of an array's zarr.json that decide how its chunk files decode.
_METADATA_KEYS = ("zarr_format", "node_type", "shape", "data_type", "chunk_grid", "chunk_key_encoding", "fill_value",
                  "codecs")


def expected_metadata(attrs: dict) -> dict[str, dict]:
    """Each array's zarr.json as ``create_store`` writes it for this header (made in memory)."""
    store = zarr.storage.MemoryStore()
    _create_arrays(zarr.open_group(store=store, mode="a"), attrs, attrs.get("codec") or CODEC)
    return {name: json.loads(store._store_dict[f"{name}/zarr.json"].to_bytes()) for name in array_shapes(attrs)}


def metadata_problems(path: Path, attrs: dict) -> list[str]:
    """Every array whose zarr.json is missing, unreadable or differs from what the header fixes (shape, dtype,
    chunk shape, codecs), one line each: ``logp/zarr.json: data_type int16, expected float16``."""
    problems = []
    node_file = Path(path) / DONE_DIR / "zarr.json"
    # The done markers' parent node: read by plain zarr, not by babydistill (which reads the markers). Stores of
    # the layout before marker nodes (_done/N.json) have none until a cache run migrates them.
    if node_file.is_file() or any((Path(path) / DONE_DIR).glob("*/zarr.json")):
        try:
            node = json.loads(node_file.read_text(encoding="utf-8"))
            if node.get("zarr_format") != 3 or node.get("node_type") != "group":
                raise ValueError("not a zarr v3 group node")
        except (OSError, ValueError, AttributeError):
            problems.append(f"{DONE_DIR}/zarr.json is not the zarr group node it was written as")
    for name, expected in expected_metadata(attrs).items():
        file = Path(path) / name / "zarr.json"
        try:
            found = json.loads(file.read_text(encoding="utf-8"))
            if not isinstance(found, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            problems.append(f"{name}/zarr.json {'is missing' if isinstance(exc, OSError) else 'is not valid JSON'}")
            continue
        for key in _METADATA_KEYS:
            if found.get(key) != expected[key]:
                problems.append(f"{name}/zarr.json: {key} {json.dumps(found.get(key))}, expected "
                                f"{json.dumps(expected[key])}")
                break
    return problems


def repair_metadata(path: Path, attrs: dict) -> list[str]:
    """Rewrite every array's zarr.json that ``metadata_problems`` finds, from the header; chunk files are left
    alone (their done markers' checksums then say which chunks are intact). Returns the problems repaired."""
    problems = metadata_problems(path, attrs)
    expected = expected_metadata(attrs)
    for problem in problems:
        name = problem.split("/")[0]
        if name == DONE_DIR:
            (Path(path) / DONE_DIR / "zarr.json").write_text(node_json({}), encoding="utf-8")
            continue
        (Path(path) / name).mkdir(exist_ok=True)
        (Path(path) / name / "zarr.json").write_text(json.dumps(expected[name], indent=2), encoding="utf-8")
    return problems


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


def read_attrs(path: Path) -> dict | None:
    """The group attributes, or None when ``path`` holds no logit store yet."""
    try:
        meta = json.loads((Path(path) / "zarr.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta.get("attributes", {})


def header_problem(path: Path) -> str | None:
    """Why the store's header (its zarr.json) cannot be trusted: unreadable, or changed after it was written
    (its seal); None when it is fine or there is no store."""
    attrs = read_attrs(path)
    if attrs is None and (Path(path) / "zarr.json").is_file():
        return f"{path}/zarr.json: the store's header is unreadable"
    if attrs is not None and unsealed(attrs) is None:
        return f"{path}/zarr.json: the store's header changed after it was written"
    return None


def open_store(path: Path) -> tuple[zarr.Group, dict]:
    if problem := header_problem(path):
        raise LogitStoreError(f"{problem}; rebuild the store with `babydistill cache CONFIG --force` (the old one "
                              f"is moved aside)")
    attrs = read_attrs(path)
    if attrs is None:
        raise LogitStoreError(f"{path}: no logit store; run `babydistill cache CONFIG` first")
    if attrs.get("format") != FORMAT:
        raise LogitStoreError(f"{path}: not a babydistill logit store (format {attrs.get('format')!r})")
    if attrs.get("format_version") != FORMAT_VERSION:
        raise LogitStoreError(f"{path}: logit store format version {attrs.get('format_version')}, this babydistill "
                              f"reads {FORMAT_VERSION} (rows in a global shuffle, for well-mixed batches); "
                              f"rebuild it with `babydistill cache CONFIG --force`")
    return zarr.open_group(store=str(path), mode="r"), attrs


def chunk_ranges(num_windows: int, chunk_windows: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk_windows, num_windows)) for s in range(0, num_windows, chunk_windows)]


def chunk_file(name: str, array: zarr.Array, chunk: int) -> str:
    """Store-relative file of array ``name``'s chunk ``chunk`` (arrays are chunked along rows only)."""
    return f"{name}/" + array.metadata.encode_chunk_key((chunk,) + (0,) * (array.ndim - 1))


def chunk_files(group: zarr.Group, chunk: int) -> dict[str, str]:
    """Store-relative file of each array's chunk ``chunk``."""
    return {name: chunk_file(name, group[name], chunk) for name in array_names(dict(group.attrs))}


def decode_chunk(array: zarr.Array, data: bytes) -> np.ndarray:
    """One chunk file's bytes -> the chunk (full chunk shape; an edge chunk is padded), without reading it
    again: the reader checks the bytes' crc32 and decodes the same bytes. Stores made by ``create_store``
    only (little-endian bytes, then Blosc)."""
    codecs = array.metadata.codecs
    assert [type(c).__name__ for c in codecs] == ["BytesCodec", "BloscCodec"] and codecs[0].endian.value == "little"
    return np.frombuffer(numcodecs.blosc.decompress(data), dtype=np.dtype(array.dtype).newbyteorder("<")).reshape(
        array.chunks)


# --- chunk writer and done markers --------------------------------------------------------


def write_chunk(path: Path, group: zarr.Group, chunk: int, start: int, arrays: dict[str, np.ndarray],
                extra: dict | None = None) -> dict:
    """Write one chunk of every array, then its done marker (atomically, last). Returns the marker.

    A write that fails (disk full, I/O error) leaves the chunk unmarked, so it counts as not done, and
    raises one line naming the store and the chunk; zarr writes each file atomically.
    """
    stop = start + len(arrays["ids"])
    partial = marker_path(path, chunk).with_suffix(".json.partial")
    try:
        for name in array_names(dict(group.attrs)):  # a chunk equal to the fill value must still be written
                                                     # (c_T at T = 1 is all 0)
            group[name].with_config({"write_empty_chunks": True})[start:stop] = arrays[name]
        files = {}
        for rel in chunk_files(group, chunk).values():
            file = path / rel
            files[rel] = {"bytes": file.stat().st_size, "crc32": file_crc32(file)}
        marker = {"chunk": chunk, "start": start, "stop": stop, "files": files, **(extra or {})}
        _write_marker(path, chunk, marker)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise LogitStoreError(f"{path}: writing chunk {chunk} failed ({exc.strerror or exc}: {exc.filename or path}); "
                              f"it is not marked done: free space and re-run `babydistill cache CONFIG` to finish "
                              f"(chunks already done are kept)") from exc
    return marker


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


_READ_IT = object()  # chunk_problem's default: read the marker from disk


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
        if checksum and file_crc32(file) != info["crc32"]:
            return f"{rel} changed since it was written (crc32)"
    return None


def incomplete_reason(path: Path, *, checksum: bool = True, markers: list[dict | None] | None = None) -> str | None:
    """None when the store exists and every chunk is marked done with intact files, else a short reason.

    ``checksum`` also compares every chunk file's crc32 with its done marker, so a changed byte makes the
    store incomplete (and `babydistill cache` rewrites that chunk). It reads the whole store once; see the
    README for its cost. ``markers``: every chunk's done marker (`read_markers`) if the caller has them.
    """
    if problem := header_problem(path):
        return f"{problem}; only --force rebuilds it"
    attrs = read_attrs(path)
    if attrs is None or attrs.get("format") != FORMAT:
        return "no logit store"
    try:
        broken = metadata_problems(path, attrs)
    except (KeyError, TypeError, ValueError) as exc:  # a header edited past reading
        return f"its header (zarr.json) is damaged ({type(exc).__name__}: {exc}); only --force rebuilds it"
    if broken:
        return f"array metadata changed: {broken[0]}" + (f" (and {len(broken) - 1} more)" if len(broken) > 1 else "")
    ranges = chunk_ranges(attrs["num_windows"], attrs["chunk_windows"])
    if markers is not None and len(markers) != len(ranges):
        return f"it has {len(ranges)} chunks, not the {len(markers)} it had a moment ago (rewritten while read?)"
    markers = markers if markers is not None else [_READ_IT] * len(ranges)
    bad = [(i, why) for i in range(len(ranges))
           if (why := chunk_problem(path, i, checksum=checksum, marker=markers[i]))]
    if bad:
        first, why = bad[0]
        return f"{len(bad)} of {len(ranges)} chunks to (re)do (first: chunk {first}: {why})"
    return None


# --- lock ---------------------------------------------------------------------------------


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


# --- info and verify ----------------------------------------------------------------------


def _array_bytes(path: Path, name: str) -> int:
    return sum(f.stat().st_size for f in (Path(path) / name).rglob("*") if f.is_file())


def _disk_bytes(path: Path, attrs: dict) -> int:
    return sum(_array_bytes(path, name) for name in array_names(attrs))


def store_info(path: Path) -> dict:
    """Shapes, mode, k, teachers, bytes per token on disk, compression vs dense fp16 logits, chunks done.

    Examples
    --------
    >>> info = store_info(Path("runs/demo/logits.zarr"))  # doctest: +SKIP
    >>> info["bytes_per_token"], info["chunks_done"], info["num_chunks"]  # doctest: +SKIP
    """
    group, attrs = open_store(path)
    num_windows, seq_len = attrs["num_windows"], attrs["seq_len"]
    ranges = chunk_ranges(num_windows, attrs["chunk_windows"])
    done = sum(chunk_problem(path, i) is None for i in range(len(ranges)))
    disk = _disk_bytes(path, attrs)
    num_tokens = num_windows * seq_len
    dense_fp16 = num_tokens * attrs["vocab_size"] * 2
    return {
        "path": str(path),
        "format": f"{attrs['format']} v{attrs['format_version']}",
        "mode": attrs["mode"], "k": attrs["k"], "samples": attrs["samples"], "slots": attrs["slots"],
        "draw_sets": draw_sets(attrs),
        "order": attrs["order"],
        "ensemble": attrs["ensemble"], "temperatures": attrs["temperatures"], "logp_dtype": attrs["logp_dtype"],
        "vocab_size": attrs["vocab_size"],
        "arrays": {name: {"shape": list(group[name].shape), "dtype": str(group[name].dtype),
                          "chunks": list(group[name].chunks),
                          "bytes_per_token": _array_bytes(path, name) / max(1, num_windows * seq_len)}
                   for name in array_names(attrs)},
        "teachers": attrs["teachers"],
        "num_windows": num_windows, "num_tokens": num_tokens,
        "num_chunks": len(ranges), "chunks_done": done,
        "disk_bytes": disk,
        "bytes_per_token": disk / max(1, num_tokens),
        "compression_vs_dense_fp16": dense_fp16 / max(1, disk),
        "codec": attrs.get("codec"),
        "fidelity": attrs.get("fidelity"),
    }


def _target_problem(ids: np.ndarray, logp: np.ndarray, tail_logp: np.ndarray | None, vocab: int, tolerance: float,
                    k: int) -> str | None:
    """What is wrong with one target per position (a store's slots, or one draw set of them), or None."""
    real = logp > PAD_LOGP / 2
    if int(ids.max(initial=0)) >= vocab:
        return f"id {int(ids.max())} >= vocab size {vocab}"
    if (np.diff(np.sort(ids, axis=-1), axis=-1) == 0).any():
        return "repeated ids within a position"
    if not np.isfinite(logp).all() or (logp[real] > 1e-3).any() or not real[..., 0].all():
        return "probabilities outside (0, 1]"
    if (residual := 1.0 - np.exp(logp).sum(-1)).min() < -tolerance:
        return f"residual mass {residual.min():.2e} < 0"
    if tail_logp is not None and (not np.isfinite(tail_logp).all() or ((tail_logp > PAD_LOGP / 2) != real[..., k:]).any()
                                  or (tail_logp > 1e-3).any()):
        return "tail_logp not a probability on every real tail slot (and padding elsewhere)"
    return None


def verify_store(path: Path, tokens_path: Path | None = None) -> list[str]:
    """Read every chunk and check it; returns the problems, the first bad chunk first ([] = fine).

    Checks: format, done marker and file sizes/crc32, every chunk readable, ids < vocab and distinct
    per row (per draw set), probabilities in (0, 1] (sample-mode padding excepted), residual mass >= 0 within
    rounding, c_T finite, tail_logp (if kept) a probability exactly where a tail slot is real, rows holding the windows of the recorded order; with ``tokens_path``: the hashes match tokens.zarr and the stored windows
    equal its training windows.
    """
    from babydistill.stores.tokens import TokenStore

    try:
        group, attrs = open_store(path)
        broken = metadata_problems(path, attrs)
    except LogitStoreError as exc:
        return [str(exc)]
    except (KeyError, TypeError, ValueError) as exc:
        return [f"{path}/zarr.json: the store's header is damaged ({type(exc).__name__}: {exc}); rebuild it with "
                f"`babydistill cache CONFIG --force`"]
    if broken:
        return [f"{path}/{problem}; `babydistill cache CONFIG` rewrites it from the store's header" for problem in broken]
    problems = []
    tokens = None
    if tokens_path is not None:
        tokens = TokenStore(tokens_path)
        for key in ("tokenizer_hash", "tokens_hash", "windows_hash"):
            if attrs[key] != tokens.attrs[key]:
                problems.append(f"{key} differs from {tokens_path} ({attrs[key][:12]} vs {tokens.attrs[key][:12]})")
        if attrs["num_windows"] != tokens.num_windows("train"):
            problems.append(f"{attrs['num_windows']} windows, {tokens_path} has {tokens.num_windows('train')}")
        if problems:
            return problems
    vocab = attrs["vocab_size"]
    # Rounding of log-probabilities stored in float16: up to ~1e-3 relative per value.
    set_slots = draw_set_slots(attrs["k"], attrs["slots"], draw_sets(attrs))
    tolerance = 2e-3 * set_slots ** 0.5 if attrs["logp_dtype"] == "float16" else 1e-5 * set_slots
    expected_windows = window_order(attrs["num_windows"], attrs["order"], attrs["seed"])
    for i, (start, stop) in enumerate(chunk_ranges(attrs["num_windows"], attrs["chunk_windows"])):
        where = f"chunk {i} (rows {start}-{stop - 1})"
        why = chunk_problem(path, i, checksum=True)
        if why:
            problems.append(f"{where}: {why}")
            continue
        try:
            ids = group["ids"][start:stop]
            logp = group["logp"][start:stop].astype(np.float32)
            c_T = group["c_T"][start:stop]
            window_tokens = group["tokens"][start:stop]
            row_windows = group["window_ids"][start:stop].astype(np.int64)
            tail_logp = group["tail_logp"][start:stop].astype(np.float32) if attrs.get("tail_logp") else None
        except Exception as exc:  # a corrupt chunk surfaces as a codec error of any type
            problems.append(f"{where}: unreadable ({type(exc).__name__}: {exc})")
            continue
        target_problem = None
        for draw_set in range(draw_sets(attrs)):
            cols, k = draw_set_columns(attrs, draw_set), attrs["k"]
            set_tail_logp = None if tail_logp is None else tail_logp[..., cols[k:] - k]
            target_problem = _target_problem(ids[..., cols], logp[..., cols], set_tail_logp, vocab, tolerance, k)
            if target_problem:
                break
        if target_problem:
            problems.append(f"{where}: {target_problem}")
        elif not np.isfinite(c_T).all():
            problems.append(f"{where}: c_T not finite")
        elif not np.array_equal(row_windows, expected_windows[start:stop]):
            problems.append(f"{where}: window_ids differ from the store's {attrs['order']} order")
        elif tokens is not None and not np.array_equal(window_tokens, tokens.windows("train", row_windows)):
            problems.append(f"{where}: token ids differ from {tokens_path}")
    return problems
