"""What each encoding of the stored log-probabilities and ids costs, in error and in bytes (`babydistill bench
store-bytes`).

Over the first training windows of a run with its teachers, the capture's hybrid targets of the token default
(k = 8, 12 draws, with the draws' probabilities) and of the sequence default (32 + 64) are made from the dense
ensemble, then every candidate encoding of ``logp`` and ``tail_logp`` is applied to the same targets:

    float16         the store as it was (the reference)
    uint8/s         uint8 codes in the log domain over the fixed range [-255 s, 0], step s (code 0 = padding)
    float8_e4m3fn   an 8-bit float of the log-probability (``ml_dtypes``, when installed)
    float8_e5m2     the same, 5 exponent bits
    counts          the hybrid tail as integer counts plus one float16 r per position (exact); the head float16

For each, per position, against the float16 target (both renormalised as the student reads them):
``kl_to_float16`` KL(float16 target || encoded target), nats; ``grad_change_rel`` ||encoded - float16 target||_2
relative to the dense gradient's norm ||1/V - p|| at a uniform student (what the encoding moves the distillation
gradient by for the same draws: a bound on the bias it adds); ``tail_logp_max_abs`` the largest error of a
stored draw probability (log domain); clipped entries (head, tail, tail_logp). For scale, the draws' own noise on
the same positions: ``draws_kl`` KL(target || dense teacher) and ``draws_spread_rel`` ||target - p|| / ||1/V - p||.

Bytes per token of every array under each Blosc setting, chunks of 64 windows as the store writes them; for the ids
also after a Delta filter and as frequency ranks (a remap table the header would have to keep). For uint8 stores,
also two candidate layouts (``uint8_layouts_bytes_per_token``): the tail slots, or the head's and the tail's apart,
in increasing id within each position, with the ids stored as differences along the row.

    python -m babydistill.workflows.benchmarks.bench_store_bytes configs/demo.yaml --set run_dir=runs/demo
        --out docs/benchmarks/store_bytes.json       (one line)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numcodecs
import numpy as np
import torch

from babydistill.pipeline.capture_targets import sample_targets
from babydistill.pipeline.config import load_config
from babydistill.pipeline.model import load_teachers
from babydistill.stores.logits import PAD_LOGP
from babydistill.stores.quant import QUANT_STEP, dequantize, quantize
from babydistill.stores.tokens import TokenStore
from babydistill.workflows.benchmarks import machine
from babydistill.workflows.benchmarks.bench_precision import config_bench_main, ensemble_logp, publish

STEPS = (1 / 32, 1 / 16, 1 / 10, 1 / 8, 1 / 5)
DEFAULTS = {"token": (8, 12), "sequence": (32, 64)}
CHUNK = 64
BLOSC = {"zstd5-shuffle": ("zstd", 5, numcodecs.Blosc.SHUFFLE),
         "zstd5-bitshuffle": ("zstd", 5, numcodecs.Blosc.BITSHUFFLE),
         "zstd5-noshuffle": ("zstd", 5, numcodecs.Blosc.NOSHUFFLE),
         "zstd9-shuffle": ("zstd", 9, numcodecs.Blosc.SHUFFLE)}


def _stats(values: np.ndarray) -> dict:
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "p50": float(np.percentile(values, 50)),
            "p99": float(np.percentile(values, 99)), "max": float(values.max())}


def _float8(values: np.ndarray, name: str) -> np.ndarray | None:
    try:
        import ml_dtypes
    except ImportError:
        return None
    real = values > PAD_LOGP / 2
    return np.where(real, values.astype(getattr(ml_dtypes, name)).astype(np.float64), PAD_LOGP)


def _encodings(logp: np.ndarray, tail: np.ndarray, k: int, samples: int, log_r: np.ndarray) -> dict:
    """Each candidate's decoded (logp, tail_logp), float64, from the exact ones."""
    f16 = lambda a: np.where(a > PAD_LOGP / 2, a.astype(np.float16).astype(np.float64), PAD_LOGP)  # noqa: E731
    out = {"float16": (f16(logp), f16(tail))}
    for step in STEPS:
        out[f"uint8/{step:g}"] = tuple(dequantize(quantize(a, step)[0], step).astype(np.float64) for a in (logp, tail))
    for name in ("float8_e4m3fn", "float8_e5m2"):
        pair = (_float8(logp, name), _float8(tail, name))
        if pair[0] is not None:
            out[name] = pair
    counts_tail = np.where(logp[:, k:] > PAD_LOGP / 2, np.exp(logp[:, k:] - log_r[:, None]) * samples, 0).round()
    r16 = log_r.astype(np.float16).astype(np.float64)[:, None]
    exact_tail = np.where(counts_tail > 0, r16 + np.log(np.maximum(counts_tail, 1) / samples), PAD_LOGP)
    out["counts"] = (np.concatenate([f16(logp[:, :k]), exact_tail], 1), f16(tail))
    return out


def _weights(logp: np.ndarray) -> np.ndarray:
    w = np.where(logp > PAD_LOGP / 2, np.exp(logp), 0.0)
    return w / w.sum(1, keepdims=True)


def _errors(reference: tuple, encoded: tuple, norm: np.ndarray, k: int, step: float | None) -> dict:
    ref, enc = _weights(reference[0]), _weights(encoded[0])
    kl = np.where(ref > 0, ref * (np.log(np.maximum(ref, 1e-300)) - np.log(np.maximum(enc, 1e-300))), 0).sum(1)
    real_tail = reference[1] > PAD_LOGP / 2
    result = {"kl_to_float16": _stats(np.maximum(kl, 0)),
              "grad_change_rel": _stats(np.linalg.norm(enc - ref, axis=1) / norm),
              "tail_logp_max_abs": float(np.abs(encoded[1] - reference[1])[real_tail].max())}
    if step is not None:
        bottom = -254 * step - step / 2
        result["clipped"] = {"head": int((reference[0][:, :k] < bottom).sum()),
                             "tail": int(((reference[0][:, k:] < bottom) & (reference[0][:, k:] > PAD_LOGP / 2)).sum()),
                             "tail_logp": int(((reference[1] < bottom) & real_tail).sum())}
    return result


def _targets(logp_NV: torch.Tensor, k: int, samples: int, generator: torch.Generator) -> dict[str, np.ndarray]:
    """The capture's hybrid target (with tail_logp) of every row, exact (float64), and the dense figures."""
    head = logp_NV.topk(k, dim=-1).indices
    ids, logp = sample_targets(logp_NV, samples, k + samples, generator, head)
    tail = torch.where(logp[:, k:] > PAD_LOGP / 2, logp_NV.gather(1, ids[:, k:]).double(), PAD_LOGP)
    p = logp_NV.double().exp()
    norm = torch.linalg.vector_norm(1.0 / p.shape[1] - p, dim=1)
    log_r = torch.logsumexp(logp_NV.double().scatter(1, head, -torch.inf), dim=1)
    w = torch.from_numpy(_weights(logp.numpy()))
    p_ids = p.gather(1, ids)
    spread = torch.sqrt((p * p).sum(1) - 2 * (w * p_ids).sum(1) + (w * w).sum(1)) / norm
    kl = torch.where(w > 0, w * (w.clamp_min(1e-300).log() - p_ids.log()), 0.0).sum(1)
    return {"ids": ids.numpy(), "logp": logp.numpy(), "tail": tail.numpy(), "norm": norm.numpy(),
            "log_r": log_r.numpy(), "spread": spread.numpy(), "kl": kl.numpy()}


def _blosc_bytes(array: np.ndarray, seq_len: int, delta: bool = False) -> dict:
    """Bytes per token of ``array`` [windows * seq_len, ...] under each Blosc setting, chunked as the store is."""
    per_window = array.reshape(-1, seq_len, *array.shape[1:])
    out = {}
    for name, (cname, level, shuffle) in BLOSC.items():
        codec = numcodecs.Blosc(cname=cname, clevel=level, shuffle=shuffle)
        pre = numcodecs.Delta(array.dtype) if delta else None
        size = sum(len(codec.encode(pre.encode(chunk) if pre else chunk))
                   for chunk in (np.ascontiguousarray(per_window[s:s + CHUNK])
                                 for s in range(0, len(per_window), CHUNK)))
        out[name] = size / array.shape[0]
    return out


def _id_encodings(ids: np.ndarray, vocab: int) -> dict[str, np.ndarray]:
    """The ids as stored (uint16) and, for comparison, the frequency-ranked remap (a table the header would keep)."""
    rank = np.empty(vocab, dtype=np.uint16)
    rank[np.argsort(-np.bincount(ids.ravel(), minlength=vocab), kind="stable")] = np.arange(vocab, dtype=np.uint16)
    return {"uint16": ids.astype(np.uint16), "frequency_ranked": rank[ids]}


def _sorted_by_id(ids: np.ndarray, arrays: list[np.ndarray], k: int, head_too: bool) -> tuple[np.ndarray, list]:
    """A candidate layout: within each position the tail slots (and, with ``head_too``, the head's k slots apart
    from them) in increasing id, each log-probability array permuted alike; the ids then stored as differences
    along the row (``_row_deltas``) or through zarr's Delta filter over the chunk. Order within the head or the tail
    carries nothing the loss reads when there is one draw set. Returns the ids in that order and the arrays."""
    order = np.concatenate([np.argsort(ids[:, :k], axis=1, kind="stable") if head_too
                            else np.broadcast_to(np.arange(k), (len(ids), k)),
                            k + np.argsort(ids[:, k:], axis=1, kind="stable")], axis=1)
    permuted = [np.take_along_axis(a, order, axis=1) if a.shape[1] == ids.shape[1]
                else np.take_along_axis(a, order[:, k:] - k, axis=1) for a in arrays]
    return np.take_along_axis(ids, order, axis=1).astype(np.uint16), permuted


def _row_deltas(ids: np.ndarray) -> np.ndarray:
    """Each row's ids as differences from the slot before (the first from 0), uint16 mod 2^16."""
    return np.diff(ids.astype(np.int64), axis=1, prepend=0).astype(np.uint16)


def _layout_bytes(t: dict, k: int, seq_len: int) -> dict:
    """Bytes per token of ids, logp and tail_logp (uint8 codes) as stored now and in the id-sorted layouts."""
    codes = [quantize(t["logp"], QUANT_STEP)[0], quantize(t["tail"], QUANT_STEP)[0]]
    tail_sorted, head_and_tail_sorted = (_sorted_by_id(t["ids"], codes, k, head_too) for head_too in (False, True))
    layouts = {"as stored": (t["ids"].astype(np.uint16), codes, False),
               "tail sorted by id, row deltas": (_row_deltas(tail_sorted[0]), tail_sorted[1], False),
               "head and tail sorted by id, row deltas": (_row_deltas(head_and_tail_sorted[0]), head_and_tail_sorted[1],
                                                          False),
               "head and tail sorted by id, zarr Delta filter": (*head_and_tail_sorted, True)}
    out = {}
    for name, (ids, (logp, tail), delta) in layouts.items():
        parts = {"ids": _blosc_bytes(ids, seq_len, delta=delta)["zstd5-shuffle"],
                 "logp": _blosc_bytes(logp, seq_len)["zstd5-shuffle"], "tail_logp": _blosc_bytes(tail, seq_len)["zstd5-shuffle"]}
        out[name] = {**parts, "sum": sum(parts.values())}
    return out


def _measure_default(logp_NV_batches: list[torch.Tensor], k: int, samples: int, seed: int, seq_len: int,
                     vocab: int) -> dict:
    """Errors and bytes of every encoding on one default store's targets (k exact + samples draws)."""
    generator = torch.Generator().manual_seed(seed)
    parts = [_targets(logp_NV, k, samples, generator) for logp_NV in logp_NV_batches]
    t = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    encodings = _encodings(t["logp"], t["tail"], k, samples, t["log_r"])
    reference = encodings["float16"]
    errors = {name: _errors(reference, pair, t["norm"], k, float(name.split("/")[1]) if "/" in name else None)
              for name, pair in encodings.items() if name != "float16"}
    codes = {"float16": [a.astype(np.float16) for a in reference],
             f"uint8/{QUANT_STEP:g}": [quantize(a, QUANT_STEP)[0] for a in (t["logp"], t["tail"])]}
    array_bytes = {f"ids {name}": _blosc_bytes(ids, seq_len) for name, ids in _id_encodings(t["ids"], vocab).items()}
    array_bytes["ids uint16 delta"] = _blosc_bytes(t["ids"].astype(np.uint16), seq_len, delta=True)
    for name, (logp, tail) in codes.items():
        array_bytes[f"logp {name}"] = _blosc_bytes(logp, seq_len)
        array_bytes[f"tail_logp {name}"] = _blosc_bytes(tail, seq_len)
    return {"k": k, "samples": samples, "positions": int(len(t["norm"])),
            "draws_kl": _stats(t["kl"]), "draws_spread_rel": _stats(t["spread"]),
            "encodings": errors, "bytes_per_token": array_bytes,
            "uint8_layouts_bytes_per_token": _layout_bytes(t, k, seq_len)}


def bench_store_bytes(config_path: Path, out: Path | None = None, *, windows: int = 256, batch_size: int = 16,
                      overrides: list[str] | None = None) -> dict:
    """Errors and bytes of the candidate encodings over the first ``windows`` training windows of the run."""
    from babydistill.workflows.runner import default_teacher_names

    started = machine.start()
    config = load_config(config_path, overrides)
    dirs = [config.teacher_path(n) for n in default_teacher_names(config)]
    tokens = TokenStore(config.tokens_path)
    teachers = load_teachers(dirs, tokens.vocab_size, device=torch.device("cpu"))
    ids = np.arange(min(windows, tokens.num_windows("train")))
    batches = [ensemble_logp(teachers, torch.from_numpy(tokens.windows("train", ids[b:b + batch_size])[:, :-1]),
                             config.cache.ensemble, None) for b in range(0, len(ids), batch_size)]
    timed = time.perf_counter()
    stores = {name: _measure_default(batches, k, samples, config.cache.seed, tokens.seq_len, tokens.vocab_size)
              for name, (k, samples) in DEFAULTS.items()}
    report = {
        "command": " ".join(["python -m babydistill.workflows.benchmarks.bench_store_bytes", str(config_path)]
                            + [f"--set {o}" for o in overrides or []] + (["--out", str(out)] if out else [])),
        "teachers": [str(d) for d in dirs], "windows": len(ids), "vocab_size": tokens.vocab_size,
        "seq_len": tokens.seq_len, "chunk_windows": CHUNK, "chosen_step": QUANT_STEP, "stores": stores,
        "measure_s": time.perf_counter() - timed,
        "note": __doc__.split("\n\n")[2].strip(),
        "machine": machine.finish(started),
    }
    return publish(report, out, format_report(report))


def format_report(report: dict) -> str:
    lines = []
    for name, store in report["stores"].items():
        lines.append(f"{name} default (hybrid {store['k']} + {store['samples']}), {store['positions']} positions; "
                     f"draws' own noise: KL {store['draws_kl']['mean']:.3f} nats, gradient spread "
                     f"{store['draws_spread_rel']['mean']:.3f}")
        for enc, e in store["encodings"].items():
            lines.append(f"  {enc:<14} KL to float16 mean {e['kl_to_float16']['mean']:.2e} max "
                         f"{e['kl_to_float16']['max']:.2e}  gradient change mean {e['grad_change_rel']['mean']:.2e} "
                         f"p99 {e['grad_change_rel']['p99']:.2e}  tail_logp max err {e['tail_logp_max_abs']:.3f}"
                         + (f"  clipped {e['clipped']}" if "clipped" in e else ""))
        for array, codecs in store["bytes_per_token"].items():
            lines.append(f"  {array:<22} " + "  ".join(f"{c} {b:.2f}" for c, b in codecs.items()))
        for layout, parts in store.get("uint8_layouts_bytes_per_token", {}).items():
            lines.append(f"  uint8, {layout}: " + "  ".join(f"{a} {b:.2f}" for a, b in parts.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return config_bench_main(argv, "bench_store_bytes", __doc__, bench_store_bytes, 256)

if __name__ == "__main__":
    sys.exit(main())
