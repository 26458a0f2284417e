"""Quantised log-probabilities (``cache.logp_dtype: uint8``, stores/quant.py): codes, plain zarr, the reader's
decode, format version, clipping, and a capture into a uint8 store read by the student's reader."""

from __future__ import annotations

import json
from pathlib import Path

import numcodecs.blosc
import numpy as np
import pytest
import torch
import zarr
from _scripts import load_script
from test_cache import teachers  # noqa: F401  (the session fixture)

from babydistill.pipeline import capture_chunk as capture_chunk_module
from babydistill.pipeline.capture_chunk import _quantise, compute_chunk
from babydistill.stores import quant
from babydistill.stores.header import (
    LOGITS_FORMAT,
    REBUILD_STORE,
    HeaderError,
    LogitStoreHeader,
    _check_format,
)
from babydistill.stores.logits import (
    PAD_LOGP,
    chunk_file,
    chunk_ranges,
    create_store,
    decode_chunk,
    open_store,
    read_header,
    verify_store,
    window_order,
    write_chunk,
)

VOCAB, SEQ_LEN, NUM_WINDOWS, CHUNK, K, SLOTS = 300, 6, 13, 5, 3, 7
STEP = quant.QUANT_STEP


def _attrs() -> dict:
    return {"format_version": 3, "order": "shuffled", "mode": "hybrid", "k": K, "samples": 4, "slots": SLOTS,
            "tail_logp": True, "ensemble": "logits", "temperatures": [1.0], "logp_dtype": "uint8", "logp_step": STEP,
            "chunk_windows": CHUNK, "seed": 0, "vocab_size": VOCAB, "seq_len": SEQ_LEN, "num_windows": NUM_WINDOWS,
            "teachers": [], "tokenizer_hash": "t" * 64, "tokens_hash": "k" * 64, "windows_hash": "w" * 64}


def _chunk(start: int, stop: int) -> dict[str, np.ndarray]:
    """A hybrid chunk: a head of K, 4 tail slots, the last one padding; the tail's probabilities tiny."""
    rng = np.random.default_rng(start)
    n = stop - start
    ids = np.stack([rng.permutation(VOCAB)[:SLOTS] for _ in range(n * SEQ_LEN)]).reshape(n, SEQ_LEN, SLOTS)
    p = rng.dirichlet(np.ones(SLOTS), size=(n, SEQ_LEN))
    logp = np.log(p)
    logp[..., K:] = np.log(p[..., K:].sum(-1, keepdims=True) / 3)  # r * count / S, three draws
    logp[..., -1] = PAD_LOGP
    tail = np.where(logp[..., K:] > PAD_LOGP / 2, rng.uniform(-20, -1, size=(n, SEQ_LEN, SLOTS - K)), PAD_LOGP)
    return {"ids": ids.astype(np.uint16), "logp": logp.astype(np.float32), "tail_logp": tail.astype(np.float32),
            "c_T": np.zeros((n, SEQ_LEN, 1), np.float32),
            "tokens": rng.integers(0, VOCAB, size=(n, SEQ_LEN + 1)).astype(np.uint16),
            "window_ids": window_order(NUM_WINDOWS, "shuffled", 0)[start:stop].astype(np.uint32)}


@pytest.fixture
def store(tmp_path) -> Path:
    path = tmp_path / "logits.zarr"
    path.mkdir()
    group = create_store(path, _attrs())
    for i, (start, stop) in enumerate(chunk_ranges(NUM_WINDOWS, CHUNK)):
        write_chunk(path, group, i, start, _chunk(start, stop))
    return path


def test_codes_round_trip_within_half_a_step_and_clip_at_the_bottom():
    values = np.array([0.0, -1e-7, -0.05, -3.3333, -25.35, -25.46, -40.0, PAD_LOGP])
    codes, clipped = quant.quantize(values, STEP)
    assert codes[-1] == 0 and (codes[:-1] >= 1).all()
    assert clipped.tolist() == [False] * 5 + [True, True, False]
    back = quant.dequantize(codes, STEP)
    assert back[-1] == PAD_LOGP and back.dtype == np.float32
    np.testing.assert_array_less(np.abs(back[:5] - values[:5]), STEP / 2 + 1e-6)
    assert back[5] == back[6] == np.float32(quant.offset(STEP) + STEP)
    # the table is what zarr's FixedScaleOffset filter decodes each code to (padding aside)
    snapped, count = quant.snap(values, STEP)
    assert count == 2 and np.array_equal(snapped, back)


def test_the_capture_draws_from_exactly_the_values_the_store_keeps():
    """snap_torch (what the capture draws tail ids from, over every id) equals the store's codes read back, entry for
    entry, including values at a code's rounding boundary and below the range."""
    import torch

    rng = np.random.default_rng(0)
    values = np.concatenate([np.log(rng.dirichlet(np.full(4000, 0.05))).clip(-60), np.arange(-255, 1) * STEP + STEP / 2,
                             [-25.45, -25.46, -0.05, 0.0]]).astype(np.float32)
    from_torch = quant.snap_torch(torch.from_numpy(values), STEP).numpy()
    assert np.array_equal(from_torch, quant.snap(values.astype(np.float64), STEP)[0])
    as_float64 = torch.from_numpy(values.astype(np.float64))
    assert np.array_equal(quant.snap_torch(as_float64, STEP).numpy(), from_torch)
    assert np.array_equal(as_float64.numpy(), values.astype(np.float64))  # its input left as it was
    rows = torch.from_numpy(np.tile(values, (2 * quant.SNAP_BLOCK_ROWS + 3, 1)))  # [N, V] in more than one block
    assert np.array_equal(quant.snap_torch(rows, STEP).numpy(), np.tile(from_torch, (rows.shape[0], 1)))


def test_plain_zarr_reads_log_probabilities_and_the_reader_reads_padding(store):
    group = zarr.open_group(str(store), mode="r")
    assert group["logp"].dtype == np.float32 and group["tail_logp"].dtype == np.float32
    codecs = json.loads((store / "logp" / "zarr.json").read_text())["codecs"]
    assert codecs[0] == {"name": "numcodecs.fixedscaleoffset", "configuration": {
        "offset": -255 * STEP, "scale": 1 / STEP, "dtype": "<f4", "astype": "|u1"}}
    assert codecs[2]["configuration"]["typesize"] == 1  # Blosc shuffles the 1-byte codes, not float32
    for i, (start, stop) in enumerate(chunk_ranges(NUM_WINDOWS, CHUNK)):
        expected = _chunk(start, stop)
        for name in ("logp", "tail_logp"):
            want = quant.snap(expected[name], STEP)[0]
            plain = group[name][start:stop]
            real = want > PAD_LOGP / 2
            np.testing.assert_array_equal(plain[real], want[real])
            assert (plain[~real] == np.float32(quant.offset(STEP))).all()  # padding: the range's bottom
            np.testing.assert_array_equal(quant.padded(plain, STEP), want)
            data = (store / chunk_file(name, group[name], i)).read_bytes()
            np.testing.assert_array_equal(decode_chunk(group[name], data)[:stop - start], want)
            assert len(numcodecs.blosc.decompress(data)) == np.prod(group[name].chunks)  # one byte a value
        np.testing.assert_array_equal(group["ids"][start:stop], expected["ids"])


def test_verify_and_info_accept_a_quantised_store(store):
    assert verify_store(store) == []
    header = read_header(store)
    assert (header.logp_dtype, header.logp_step, header.identity["format_version"]) == ("uint8", STEP, 3)


def test_an_older_reader_refuses_a_quantised_store_naming_the_rebuild(store):
    """Readers before uint8 accepted format version 2 only (their `_check_format` with version 2): a uint8 store
    carries 3, so they refuse it with the rebuild command instead of reading its padding as probabilities."""
    attrs = json.loads((store / "zarr.json").read_text())["attributes"]
    with pytest.raises(HeaderError, match=r"format version 3, this babydistill reads 2.*capture CONFIG --force"):
        _check_format(attrs, str(store), "logit", (LOGITS_FORMAT, 2), f"; {REBUILD_STORE}")
    # and this reader refuses a store that says uint8 under the old version (or the converse)
    with pytest.raises(HeaderError, match="logp_dtype uint8 in a store of format version 2"):
        LogitStoreHeader.from_attrs({**attrs, "format": LOGITS_FORMAT, "format_version": 2}, "x")
    with pytest.raises(HeaderError, match="logp_step"):
        LogitStoreHeader.from_attrs({**attrs, "format": LOGITS_FORMAT, "logp_step": None}, "x")


def test_the_capture_counts_tail_clips_and_refuses_head_clips():
    logp = np.array([[[-1.0, -30.0, -2.0, -40.0, PAD_LOGP]]])
    tail = np.array([[[-31.0, -5.0, PAD_LOGP]]])
    with pytest.raises(ValueError, match="1 head .* would clip .*cache.logp_dtype float16"):
        _quantise({"logp": logp.copy(), "tail_logp": tail.copy()}, head=2)
    arrays = {"logp": logp.copy(), "tail_logp": tail.copy()}
    assert _quantise(arrays, head=1) == {"head": 0, "tail": 2, "tail_logp": 1}
    assert arrays["logp"][0, 0, 1] == np.float32(quant.offset(STEP) + STEP) and arrays["logp"][0, 0, -1] == PAD_LOGP


@pytest.mark.slow
def test_a_uint8_capture_is_read_by_the_reader(tiny_run, teachers, tmp_path, monkeypatch):  # noqa: F811
    """A hybrid capture with logp_dtype uint8: the chunk's values are its float32 capture snapped to the codes,
    the store verifies, the reader's batch equals plain zarr's values (padding aside), and a step so fine that
    the head would clip is refused."""
    from babydistill.pipeline.capture import capture_logits
    from babydistill.pipeline.config import CacheConfig
    from babydistill.stores.reader import LogitStoreReader
    from babydistill.stores.tokens import TokenStore

    windows = TokenStore(tiny_run.tokens_path).windows("train", np.arange(8))
    spec = {"teachers": [(str(t), "") for t in teachers], "mode": "hybrid", "k": 8, "samples": 16, "slots": 24,
            "temperatures": [1.0], "ensemble": "logits", "logp_dtype": "uint8", "batch_size": 16, "seed": 0,
            "threads": 1, "tail_logp": True}
    stats: dict = {}
    arrays, _ = compute_chunk(spec, 3, windows, [], stats)
    exact, _ = compute_chunk({**spec, "logp_dtype": "float32", "tail_logp": False}, 3, windows, [])
    np.testing.assert_array_equal(arrays["ids"][..., :8], exact["ids"][..., :8])
    np.testing.assert_array_equal(arrays["logp"][..., :8], quant.snap(exact["logp"][..., :8], STEP)[0])
    assert set(np.unique(quant.quantize(arrays["tail_logp"], STEP)[0])) - {0} and stats["clipped"]["head"] == 0
    monkeypatch.setattr(capture_chunk_module.quant, "QUANT_STEP", 1e-3)
    with pytest.raises(ValueError, match="head .* would clip"):
        compute_chunk(spec, 3, windows, [])
    monkeypatch.undo()
    cfg = CacheConfig(mode="hybrid", k=8, samples=16, chunk_windows=64, batch_size=16, temperatures=[1.0],
                      fidelity_positions=16, logp_dtype="uint8")
    out = tmp_path / "logits.zarr"
    summary = capture_logits(cfg, tiny_run.tokens_path, tiny_run.tokenizer_path, teachers, out)
    assert summary["capture"]["clipped"]["head"] == 0 and verify_store(out, tiny_run.tokens_path) == []
    reader = LogitStoreReader(out, tiny_run.tokens_path, seed=0, temperature=1.0)
    batch = reader.batch(0, np.arange(16))
    group, _ = open_store(out)
    rows = batch["window_ids"].numpy()
    order = np.argsort(group["window_ids"][:])
    plain = quant.padded(group["logp"][:][order[rows]], STEP)
    torch.testing.assert_close(batch["target_logp"], torch.from_numpy(plain))
    assert (batch["target_logp"] == PAD_LOGP).any() or (batch["target_logp"] > PAD_LOGP / 2).all()


def test_the_codec_analysis_reads_the_stores_codes_and_re_encodes_them_like_for_like(store, tmp_path, monkeypatch):
    """analysis/store-study/store_codecs.py: the codes it reads are the store's, its Blosc re-encoding gives the
    chunk files' bytes, and it refuses a store that is not uint8 in one line."""
    script = load_script(Path("analysis") / "store-study" / "store_codecs.py")
    group = zarr.open_group(str(store), mode="r")
    arrays = script.integer_arrays(group, STEP)
    for name in ("logp", "tail_logp"):
        np.testing.assert_array_equal(quant.padded(quant.dequantize(arrays[name], STEP), STEP),
                                      quant.padded(group[name][:], STEP))
    result = script.measure(store)
    tokens = NUM_WINDOWS * SEQ_LEN
    for name in script.CODED:
        files = sum((store / chunk_file(name, group[name], i)).stat().st_size
                    for i in range(len(chunk_ranges(NUM_WINDOWS, CHUNK))))
        assert result["codecs"]["blosc-zstd5-shuffle"]["bytes_per_token"][name] == round(files / tokens, 2)
        assert result["codecs"]["bz2-9"]["bytes_per_token"][name] > 0
    assert 0 < result["order0_bytes_per_token"]["ids"] <= SLOTS * np.log2(VOCAB) / 8
    monkeypatch.setattr("sys.argv", ["store_codecs.py", str(store), "--out", str(tmp_path / "codecs.json")])
    script.main()
    written = json.loads((tmp_path / "codecs.json").read_text())
    same = written["stores"][str(store)]
    assert {c: {**v, "decode_tokens_per_s": 0} for c, v in same.pop("codecs").items()} == {
        c: {**v, "decode_tokens_per_s": 0} for c, v in result["codecs"].items()}  # the rates are timings
    assert same == {k: v for k, v in result.items() if k != "codecs"} and written["machine"]["command"]
    float16 = tmp_path / "f16.zarr"
    float16.mkdir()
    create_store(float16, {key: value for key, value in _attrs().items() if key != "logp_step"}
                 | {"logp_dtype": "float16", "format_version": 2})
    monkeypatch.setattr("sys.argv", ["store_codecs.py", str(float16), "--out", str(tmp_path / "out.json")])
    with pytest.raises(SystemExit) as exit_:
        script.main()
    assert exit_.value.code == 2 and not (tmp_path / "out.json").exists()
