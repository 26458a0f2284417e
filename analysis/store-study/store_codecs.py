"""What other codecs could save on real uint8 stores, losslessly. For the ids and the uint8 codes of ``logp`` and
``tail_logp``, chunk by chunk as the store holds them: the bytes per token on disk (Blosc-zstd, byte shuffle); the
same chunks through Blosc-zstd again, numcodecs' BZ2 (level 9) and LZMA (preset 6), with their single-thread decode
rates; and the order-0 entropy slot by slot (the ideal of an arithmetic or ANS coder that codes each slot with one fixed
distribution over the whole store). The entropy uses no context, so it bounds no coder that models the text; BWT
(bz2) and LZ matches exploit context and can beat it.

    python analysis/store-study/store_codecs.py STORE.zarr [STORE.zarr ...] --out analysis/store-study/store_codecs_v16000.json
"""

import argparse
import json
import time
from pathlib import Path

import numcodecs
import numpy as np
import zarr

from babydistill.stores import quant
from babydistill.stores.logits import LogitStoreError, store_info
from babydistill.workflows.benchmarks import machine

CODED = ("ids", "logp", "tail_logp")
# Blosc as the store writes it, re-encoded here so that its decode rate is measured beside the others.
CODECS = {"blosc-zstd5-shuffle": numcodecs.Blosc("zstd", 5, numcodecs.Blosc.SHUFFLE), "bz2-9": numcodecs.BZ2(level=9),
          "lzma-6": numcodecs.LZMA(preset=6)}


def entropy_bits(values: np.ndarray) -> float:
    """Order-0 entropy in bits per value of the integers ``values``."""
    counts = np.unique(values, return_counts=True)[1].astype(np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def slot_entropy_bytes(array: np.ndarray) -> float:
    """Sum over the last axis's slots of each slot's order-0 entropy, in bytes per position."""
    rows = array.reshape(-1, array.shape[-1])
    return sum(entropy_bits(rows[:, slot]) for slot in range(rows.shape[1])) / 8


def codes(values: np.ndarray, step: float) -> np.ndarray:
    """The uint8 codes of the float32 values zarr reads out of a quantised array (its padding, the range's bottom,
    back to code 0)."""
    return quant.quantize(quant.padded(values, step), step)[0]


def integer_arrays(group, step: float, pad_to: int = 1) -> dict[str, np.ndarray]:
    """The ids, and the log-probabilities as the uint8 codes the store keeps (zarr hands back their float32). With
    ``pad_to``, the rows are padded to a multiple of it with the arrays' fill value, as zarr pads an edge chunk."""
    arrays = {"ids": (group["ids"][:], group["ids"].fill_value)}
    arrays |= {name: (codes(group[name][:], step), codes(np.float32(group[name].fill_value), step))
               for name in ("logp", "tail_logp")}
    return {name: np.concatenate([values, np.full((-len(values) % pad_to, *values.shape[1:]), fill, values.dtype)])
            for name, (values, fill) in arrays.items()}


def through(codec, array: np.ndarray, chunk_windows: int) -> tuple[int, float]:
    """(compressed bytes, decode seconds) of ``array`` encoded chunk by chunk along its first axis (its rows a
    multiple of ``chunk_windows``)."""
    blobs = [codec.encode(np.ascontiguousarray(array[start:start + chunk_windows]))
             for start in range(0, array.shape[0], chunk_windows)]
    began = time.perf_counter()
    for blob in blobs:
        codec.decode(blob)
    return sum(len(b) for b in blobs), time.perf_counter() - began


def measure(store: Path) -> dict:
    """The figures of one uint8 store (LogitStoreError, one line, when it is not one)."""
    info = store_info(store)
    if info["logp_dtype"] != "uint8":
        raise LogitStoreError(f"{store} is not a uint8 store: capture one with --set cache.logp_dtype=uint8")
    tokens, chunk_windows = info["num_tokens"], info["arrays"]["ids"]["chunks"][0]
    stored = {name: array["bytes_per_token"] for name, array in info["arrays"].items()}
    uncoded = sum(per_token for name, per_token in stored.items() if name not in CODED)
    arrays = integer_arrays(zarr.open_group(str(store), mode="r"), info["logp_step"], pad_to=chunk_windows)
    per_codec = {}
    for name, codec in CODECS.items():
        sizes, seconds = zip(*(through(codec, arrays[a], chunk_windows) for a in CODED))
        per_codec[name] = {"bytes_per_token": {a: round(s / tokens, 2) for a, s in zip(CODED, sizes)},
                           "decode_tokens_per_s": round(tokens / sum(seconds)),
                           "store_total": round(sum(sizes) / tokens + uncoded, 2)}
    rows = info["num_windows"]  # the entropy of the real rows, not of the edge chunk's padding
    entropy = {a: round(slot_entropy_bytes(arrays[a][:rows]), 2) for a in CODED}
    return {"tokens": tokens, "mode": info["mode"], "k": info["k"], "samples": info["samples"],
            "stored_bytes_per_token": {k: round(v, 2) for k, v in stored.items()},
            "stored_total": round(info["bytes_per_token"], 2), "codecs": per_codec, "order0_bytes_per_token": entropy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stores", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = machine.start()
    result = {"stores": {}}
    for store in args.stores:
        try:
            result["stores"][str(store)] = measure(store)
        except LogitStoreError as exc:  # no store, another format, a header to rebuild, not uint8
            parser.error(str(exc))
        print(store, json.dumps(result["stores"][str(store)]), flush=True)
    result["machine"] = machine.finish(started)  # the decode rates depend on it
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
