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
``stage.json``, which are still read (a re-run of `babydistill capture` moves them to the new places).

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
Sampled weights estimate probabilities at T = 1. A hybrid store with ``tail_logp`` serves every captured T
without bias: each slot's tempered weight is w p^(1/T - 1) e^-c_T (``kernels.targets.tempered_slot_logp``); sample
stores and hybrid stores without ``tail_logp`` keep no p_j and serve T = 1 only (``stores.header.temperature_refusal``).

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
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from babydistill.stores import quant
from babydistill.stores.checksum import SEAL, file_crc32, sealed, unsealed
from babydistill.stores.chunks import (  # noqa: F401  (the chunk bookkeeping, re-exported: one import for a store)
    DONE_DIR,
    LogitStoreError,
    _write_marker,
    acquire_lock,
    chunk_file,
    chunk_problem,
    chunk_ranges,
    decode_chunk,
    lock_path,
    marker_path,
    migrate_markers,
    node_json,
    read_marker,
    read_markers,
    remove_marker,
)
from babydistill.stores.header import (  # noqa: F401
    LOGITS_FORMAT,
    LOGITS_FORMAT_VERSION,
    MODES,
    ORDERS,
    REBUILD_STORE,
    HeaderError,
    LogitStoreHeader,
    temperature_refusal,
)

FORMAT, FORMAT_VERSION = LOGITS_FORMAT, LOGITS_FORMAT_VERSION
PAD_LOGP = -1.0e4
ARRAYS = ("ids", "logp", "c_T", "tokens", "window_ids")
# Blosc: zstd level 5, byte shuffle; the same codec every array (one codec to read, measured in
# docs/benchmarks/loader.json).
CODEC = {"cname": "zstd", "clevel": 5, "shuffle": "shuffle"}


def window_order(num_windows: int, order: str, seed: int) -> np.ndarray:
    """The training window held by each store row: a permutation fixed by ``seed`` (``shuffled``) or
    the identity (``corpus``). int64 [num_windows]."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if order == "corpus":
        return np.arange(num_windows, dtype=np.int64)
    return np.random.default_rng([seed, 2]).permutation(num_windows).astype(np.int64)


def draw_set_slots(k: int | None, slots: int, sets: int) -> int:
    """The slots one draw set reads: all of them with one set, else the head's k plus the set's share of the tail."""
    return slots if sets == 1 else k + (slots - k) // sets


QUANTISED = ("logp", "tail_logp")  # the arrays that logp_dtype uint8 stores as codes (stores.quant)


def _create_arrays(group: zarr.Group, header: LogitStoreHeader, codec: dict,
                   names: tuple[str, ...] | None = None) -> None:
    chunk = min(header.chunk_windows, max(1, header.num_windows))
    for name, (shape, dtype) in header.array_shapes().items():
        if names is None or name in names:
            quantised = header.logp_dtype == "uint8" and name in QUANTISED
            group.create_array(name, shape=shape, dtype=dtype, chunks=(chunk, *shape[1:]),
                               filters=[quant.zarr_filter(header.logp_step)] if quantised else None,
                               # typesize: the codes' (1 byte), not the float32 zarr hands out
                               compressors=BloscCodec(**codec, **({"typesize": 1} if quantised else {})),
                               fill_value=0, overwrite=True)


def create_store(path: Path, identity: dict, *, codec: dict | None = None) -> zarr.Group:
    """Create the group and its empty arrays; ``identity`` is the store's identity
    (``pipeline.capture.store_identity``: at least num_windows, seq_len, slots, chunk_windows, logp_dtype and
    temperatures), written as its header."""
    group = zarr.open_group(store=str(path), mode="a")
    _create_arrays(group, LogitStoreHeader.from_identity(identity, str(path)), codec or CODEC)
    update_header(group, {"format": FORMAT, **identity, "codec": codec or CODEC})
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


def expected_metadata(header: LogitStoreHeader) -> dict[str, dict]:
    """Each array's zarr.json as ``create_store`` writes it for this header (made in memory)."""
    store = zarr.storage.MemoryStore()
    _create_arrays(zarr.open_group(store=store, mode="a"), header, header.codec or CODEC)
    return {name: json.loads(store._store_dict[f"{name}/zarr.json"].to_bytes()) for name in header.array_names}


def _done_node_problem(path: Path) -> str | None:
    node_file = Path(path) / DONE_DIR / "zarr.json"
    # The done markers' parent node: read by plain zarr, not by babydistill (which reads the markers). Stores of
    # the layout before marker nodes (_done/N.json) have none until a capture run migrates them.
    if not (node_file.is_file() or any((Path(path) / DONE_DIR).glob("*/zarr.json"))):
        return None
    try:
        node = json.loads(node_file.read_text(encoding="utf-8"))
        if node.get("zarr_format") != 3 or node.get("node_type") != "group":
            raise ValueError("not a zarr v3 group node")
    except (OSError, ValueError, AttributeError):
        return f"{DONE_DIR}/zarr.json is not the zarr group node it was written as"
    return None


def _array_metadata_problem(path: Path, name: str, expected: dict) -> str | None:
    file = Path(path) / name / "zarr.json"
    try:
        found = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(found, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        return f"{name}/zarr.json {'is missing' if isinstance(exc, OSError) else 'is not valid JSON'}"
    for key in _METADATA_KEYS:
        if found.get(key) != expected[key]:
            return f"{name}/zarr.json: {key} {json.dumps(found.get(key))}, expected {json.dumps(expected[key])}"
    return None


def metadata_problems(path: Path, header: LogitStoreHeader) -> list[str]:
    """Every array whose zarr.json is missing, unreadable or differs from what the header fixes (shape, dtype,
    chunk shape, codecs), one line each: ``logp/zarr.json: data_type int16, expected float16``."""
    problems = [problem] if (problem := _done_node_problem(path)) else []
    for name, expected in expected_metadata(header).items():
        if problem := _array_metadata_problem(path, name, expected):
            problems.append(problem)
    return problems


def repair_metadata(path: Path, header: LogitStoreHeader) -> list[str]:
    """Rewrite every array's zarr.json that ``metadata_problems`` finds, from the header; chunk files are left
    alone (their done markers' checksums then say which chunks are intact). Returns the problems repaired."""
    problems = metadata_problems(path, header)
    expected = expected_metadata(header)
    for problem in problems:
        name = problem.split("/")[0]
        if name == DONE_DIR:
            (Path(path) / DONE_DIR / "zarr.json").write_text(node_json({}), encoding="utf-8")
            continue
        (Path(path) / name).mkdir(exist_ok=True)
        (Path(path) / name / "zarr.json").write_text(json.dumps(expected[name], indent=2), encoding="utf-8")
    return problems


def read_attrs(path: Path) -> dict | None:
    """The group attributes, or None when ``path`` holds no logit store yet."""
    try:
        meta = json.loads((Path(path) / "zarr.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta.get("attributes", {})


def read_header(path: Path) -> LogitStoreHeader | None:
    """The typed header of the logit store at ``path``; None when there is none (or it is another kind of
    store); LogitStoreError when it cannot be trusted or read."""
    if problem := header_problem(path):
        raise LogitStoreError(f"{problem}; {REBUILD_STORE}")
    attrs = read_attrs(path)
    if attrs is None or attrs.get("format") != FORMAT:
        return None
    try:
        return LogitStoreHeader.from_attrs(attrs, str(path))
    except HeaderError as exc:
        raise LogitStoreError(str(exc)) from None


def header_problem(path: Path) -> str | None:
    """Why the store's header (its zarr.json) cannot be trusted: unreadable, or changed after it was written
    (its seal); None when it is fine or there is no store."""
    attrs = read_attrs(path)
    if attrs is None and (Path(path) / "zarr.json").is_file():
        return f"{path}/zarr.json: the store's header is unreadable"
    if attrs is not None and unsealed(attrs) is None:
        return f"{path}/zarr.json: the store's header changed after it was written"
    return None


def open_store(path: Path) -> tuple[zarr.Group, LogitStoreHeader]:
    """The store's group (read-only) and its typed header, or LogitStoreError naming the problem and the fix."""
    attrs = read_attrs(path)
    if attrs is None and not header_problem(path):
        raise LogitStoreError(f"{path}: no logit store; run `babydistill capture CONFIG` first")
    if attrs is not None and attrs.get("format") != FORMAT and not header_problem(path):
        raise LogitStoreError(f"{path}: not a babydistill logit store (format {attrs.get('format')!r})")
    return zarr.open_group(store=str(path), mode="r"), read_header(path)


def chunk_files(group: zarr.Group, chunk: int) -> dict[str, str]:
    """Store-relative file of each array's chunk ``chunk``."""
    header = LogitStoreHeader.from_identity(dict(group.attrs), str(group.store))
    return {name: chunk_file(name, group[name], chunk) for name in header.array_names}


def write_chunk(path: Path, group: zarr.Group, chunk: int, start: int, arrays: dict[str, np.ndarray],
                extra: dict | None = None) -> dict:
    """Write one chunk of every array, then its done marker (atomically, last). Returns the marker.

    A write that fails (disk full, I/O error) leaves the chunk unmarked, so it counts as not done, and
    raises one line naming the store and the chunk; zarr writes each file atomically.
    """
    header = LogitStoreHeader.from_identity(dict(group.attrs), str(path))
    stop = start + len(arrays["ids"])
    partial = marker_path(path, chunk).with_suffix(".json.partial")
    try:
        for name in header.array_names:
            values = arrays[name]
            if header.logp_dtype == "uint8" and name in QUANTISED:  # padding to code 0, the rest to its code
                values = quant.zarr_values(values, header.logp_step)
            # a chunk equal to the fill value must still be written (c_T at T = 1 is all 0)
            group[name].with_config({"write_empty_chunks": True})[start:stop] = values
        files = {}
        for rel in chunk_files(group, chunk).values():
            file = path / rel
            files[rel] = {"bytes": file.stat().st_size, "crc32": file_crc32(file)}
        marker = {"chunk": chunk, "start": start, "stop": stop, "files": files, **(extra or {})}
        _write_marker(path, chunk, marker)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise LogitStoreError(f"{path}: writing chunk {chunk} failed ({exc.strerror or exc}: {exc.filename or path}); "
                              f"it is not marked done: free space and re-run `babydistill capture CONFIG` to finish "
                              f"(chunks already done are kept)") from exc
    return marker


def incomplete_reason(path: Path, *, checksum: bool = True, markers: list[dict | None] | None = None) -> str | None:
    """None when the store exists and every chunk is marked done with intact files, else a short reason.

    ``checksum`` also compares every chunk file's crc32 with its done marker, so a changed byte makes the
    store incomplete (and `babydistill capture` rewrites that chunk). It reads the whole store once; see
    docs/benchmarks for its cost. ``markers``: every chunk's done marker (`read_markers`) if the caller has them.
    """
    try:
        header = read_header(path)
        broken = metadata_problems(path, header) if header is not None else []
    except LogitStoreError as exc:
        return f"{exc}".replace(f"; {REBUILD_STORE}", "; only --force rebuilds it")
    except (KeyError, TypeError, ValueError) as exc:  # a header edited past reading
        return f"its header (zarr.json) is damaged ({type(exc).__name__}: {exc}); only --force rebuilds it"
    if header is None:
        return "no logit store"
    if broken:
        return f"array metadata changed: {broken[0]}" + (f" (and {len(broken) - 1} more)" if len(broken) > 1 else "")
    ranges = chunk_ranges(header.num_windows, header.chunk_windows)
    if markers is not None and len(markers) != len(ranges):
        return f"it has {len(ranges)} chunks, not the {len(markers)} it had a moment ago (rewritten while read?)"
    bad = [(i, why) for i in range(len(ranges))
           if (why := chunk_problem(path, i, checksum=checksum,
                                    **({} if markers is None else {"marker": markers[i]})))]
    if bad:
        first, why = bad[0]
        return f"{len(bad)} of {len(ranges)} chunks to (re)do (first: chunk {first}: {why})"
    return None


# --- info and verify ----------------------------------------------------------------------


def _array_bytes(path: Path, name: str) -> int:
    return sum(f.stat().st_size for f in (Path(path) / name).rglob("*") if f.is_file())


def store_info(path: Path) -> dict:
    """Shapes, mode, k, teachers, bytes per token on disk, compression vs dense fp16 logits, chunks done.

    Examples
    --------
    >>> info = store_info(Path("runs/demo/logits.zarr"))  # doctest: +SKIP
    >>> info["bytes_per_token"], info["chunks_done"], info["num_chunks"]  # doctest: +SKIP
    """
    group, header = open_store(path)
    ranges = chunk_ranges(header.num_windows, header.chunk_windows)
    num_tokens = header.num_windows * header.seq_len
    array_bytes = {name: _array_bytes(path, name) for name in header.array_names}
    disk = sum(array_bytes.values())
    return {
        "path": str(path),
        "format": f"{FORMAT} v{header.identity.get('format_version', FORMAT_VERSION)}",
        "mode": header.mode, "k": header.k, "samples": header.samples, "slots": header.slots,
        "draw_sets": header.draw_sets, "order": header.order, "ensemble": header.ensemble,
        "temperatures": list(header.temperatures), "logp_dtype": header.logp_dtype, "logp_step": header.logp_step,
        "vocab_size": header.vocab_size,
        "arrays": {name: {"shape": list(group[name].shape), "dtype": str(group[name].dtype),
                          "chunks": list(group[name].chunks), "bytes_per_token": array_bytes[name] / max(1, num_tokens)}
                   for name in header.array_names},
        "teachers": list(header.teachers),
        "num_windows": header.num_windows, "num_tokens": num_tokens,
        "num_chunks": len(ranges), "chunks_done": sum(chunk_problem(path, i) is None for i in range(len(ranges))),
        "disk_bytes": disk,
        "bytes_per_token": disk / max(1, num_tokens),
        "compression_vs_dense_fp16": num_tokens * header.vocab_size * 2 / max(1, disk),
        "codec": header.codec,
        "fidelity": header.fidelity,
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
    if tail_logp is not None and (not np.isfinite(tail_logp).all()
                                  or ((tail_logp > PAD_LOGP / 2) != real[..., k:]).any() or (tail_logp > 1e-3).any()):
        return "tail_logp not a probability on every real tail slot (and padding elsewhere)"
    return None


def _input_problems(header: LogitStoreHeader, tokens_path: Path) -> tuple[list[str], object]:
    """How the store's recorded inputs differ from the token store at ``tokens_path``, and that token store."""
    from babydistill.stores.tokens import TokenStore

    tokens = TokenStore(tokens_path)
    problems = []
    for key in ("tokenizer_hash", "tokens_hash", "windows_hash"):
        ours, theirs = getattr(header, key), getattr(tokens.header, key)
        if ours != theirs:
            problems.append(f"{key} differs from {tokens_path} ({ours[:12]} vs {theirs[:12]})")
    if header.num_windows != tokens.num_windows("train"):
        problems.append(f"{header.num_windows} windows, {tokens_path} has {tokens.num_windows('train')}")
    return problems, tokens


def _read_logp(group: zarr.Group, header: LogitStoreHeader, name: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a log-probability array through plain zarr, float32, padding as PAD_LOGP."""
    values = group[name][start:stop].astype(np.float32)
    return quant.padded(values, header.logp_step) if header.logp_dtype == "uint8" else values


def _chunk_content_problem(group: zarr.Group, header: LogitStoreHeader, start: int, stop: int, expected_windows,
                           tokens, tolerance: float) -> str | None:
    """What is wrong with the decoded content of rows [start, stop), or None."""
    try:
        ids = group["ids"][start:stop]
        logp = _read_logp(group, header, "logp", start, stop)
        c_T = group["c_T"][start:stop]
        window_tokens = group["tokens"][start:stop]
        row_windows = group["window_ids"][start:stop].astype(np.int64)
        tail_logp = _read_logp(group, header, "tail_logp", start, stop) if header.tail_logp else None
    except Exception as exc:  # a corrupt chunk surfaces as a codec error of any type
        return f"unreadable ({type(exc).__name__}: {exc})"
    for draw_set in range(header.draw_sets):
        cols, k = header.draw_set_columns(draw_set), header.k
        set_tail_logp = None if tail_logp is None else tail_logp[..., cols[k:] - k]
        if problem := _target_problem(ids[..., cols], logp[..., cols], set_tail_logp, header.vocab_size, tolerance, k):
            return problem
    if not np.isfinite(c_T).all():
        return "c_T not finite"
    if not np.array_equal(row_windows, expected_windows[start:stop]):
        return f"window_ids differ from the store's {header.order} order"
    if tokens is not None and not np.array_equal(window_tokens, tokens.windows("train", row_windows)):
        return f"token ids differ from {tokens.path}"
    return None


def verify_store(path: Path, tokens_path: Path | None = None) -> list[str]:
    """Read every chunk and check it; returns the problems, the first bad chunk first ([] = fine).

    Checks: format, done marker and file sizes/crc32, every chunk readable, ids < vocab and distinct
    per row (per draw set), probabilities in (0, 1] (sample-mode padding excepted), residual mass >= 0 within
    rounding, c_T finite, tail_logp (if kept) a probability exactly where a tail slot is real, rows holding the
    windows of the recorded order; with ``tokens_path``: the hashes match tokens.zarr and the stored windows
    equal its training windows.
    """
    try:
        group, header = open_store(path)
        broken = metadata_problems(path, header)
    except LogitStoreError as exc:
        return [str(exc)]
    except (KeyError, TypeError, ValueError) as exc:
        return [f"{path}/zarr.json: the store's header is damaged ({type(exc).__name__}: {exc}); {REBUILD_STORE}"]
    if broken:
        return [f"{path}/{problem}; `babydistill capture CONFIG` rewrites it from the store's header"
                for problem in broken]
    tokens = None
    if tokens_path is not None:
        problems, tokens = _input_problems(header, tokens_path)
        if problems:
            return problems
    # Rounding of log-probabilities stored in float16: up to ~1e-3 relative per value; as uint8 codes up to
    # step / 2 (5% at the default step), so the head's mass may read up to that much above 1.
    set_slots = draw_set_slots(header.k, header.slots, header.draw_sets)
    tolerance = {"float16": 2e-3 * set_slots ** 0.5, "uint8": (header.logp_step or 0) * 0.51}.get(
        header.logp_dtype, 1e-5 * set_slots)
    expected_windows = window_order(header.num_windows, header.order, header.seed)
    problems = []
    for i, (start, stop) in enumerate(chunk_ranges(header.num_windows, header.chunk_windows)):
        why = (chunk_problem(path, i, checksum=True)
               or _chunk_content_problem(group, header, start, stop, expected_windows, tokens, tolerance))
        if why:
            problems.append(f"chunk {i} (rows {start}-{stop - 1}): {why}")
    return problems
