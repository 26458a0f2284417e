"""Benchmark `bench loader`: capture overhead, bytes per token (codecs, encodings), reader vs student speed.

Builds a temporary run from the demo config (a share of the bundled corpus), trains two demo-size
teachers for a few dozen CE steps (random-init teachers have unrealistically flat distributions),
then measures:

- capture overhead: capture wall time vs the teachers' bare forward over the same windows, and the
  share of it spent outside ``compute_chunk`` (store writing, markers);
- store size: bytes per token on disk for topk k = 32 and sample S = 64; codecs on the same chunks
  (Blosc-zstd shuffle / bitshuffle / none, Blosc-lz4, plain Zstd); encodings (logp 8-bit quantised,
  ids sorted and delta-coded) with their fidelity KL against float16 storage;
- reader tokens/s (the training loop's reader, in-process, one epoch) vs the demo student's CE training tokens/s.

Run: ``python -m babydistill.workflows.benchmarks.bench_loader --out bench_loader.json`` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from babydistill.pipeline.config import PROJECT_ROOT, load_config, model_name
from babydistill.workflows.benchmarks import machine

DEMO_CONFIG = PROJECT_ROOT / "configs" / "demo.yaml"


# --- setup: a demo-size run and two briefly trained teachers -----------------------------------


def _display_path(path: Path) -> str:
    """Relative to the project when inside it, so results carry no machine-specific prefix."""
    try:
        return str(Path(path).resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


def _make_run(config_path: Path, work: Path, max_train_words: int):
    from babydistill.workflows.runner import build_token_run

    config = load_config(config_path, [f"run_dir={work / 'run'}", f"data.max_train_words={max_train_words}"])
    return config if config.tokens_path.exists() else build_token_run(config)


def _train_teacher(config, seed: int, steps: int, out: Path) -> Path:
    """A demo teacher trained ``steps`` steps by the project's own loop: enough to give peaked distributions
    (random-init teachers have unrealistically flat ones)."""
    from babydistill.pipeline.teacher import train_teacher

    if (out / "model.safetensors").is_file():
        return out
    short = dataclasses.replace(config, train=dataclasses.replace(config.train, max_steps=steps, log_every=steps))
    return train_teacher(short, config.tokens_path, config.tokenizer_path, out, seed=seed)


# --- measurements -----------------------------------------------------------------------------


def _bare_forward_seconds(teacher_dirs: list[Path], tokens_path: Path, batch_size: int) -> tuple[float, float]:
    """(wall, process CPU) seconds of every teacher's forward over every training window."""
    from babydistill.pipeline.model import load_teachers
    from babydistill.stores.tokens import TokenStore

    tokens = TokenStore(tokens_path)
    windows = torch.from_numpy(tokens.windows("train", np.arange(tokens.num_windows("train"))))
    models = load_teachers(teacher_dirs)
    started, started_cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for b in range(0, len(windows), batch_size):
            for model in models:
                model(input_ids=windows[b:b + batch_size, :-1]).logits.float()
    return time.perf_counter() - started, time.process_time() - started_cpu


def _best_seconds(fn, *args, rounds: int = 3) -> float:
    """The fastest of ``rounds`` calls of ``fn(*args)``, in seconds."""
    timings = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn(*args)
        timings.append(time.perf_counter() - started)
    return min(timings)


def _codec_table(store: Path, num_chunks: int = 4) -> dict:
    """Bytes and decode time of candidate codecs on the first chunks of ``ids`` and ``logp``."""
    import numcodecs
    import zarr

    group = zarr.open_group(str(store), mode="r")
    rows = min(group["ids"].shape[0], num_chunks * group["ids"].chunks[0])
    data = {name: np.ascontiguousarray(group[name][:rows]) for name in ("ids", "logp")}
    blosc = numcodecs.Blosc
    candidates = {
        "blosc-zstd5-shuffle": blosc(cname="zstd", clevel=5, shuffle=blosc.SHUFFLE),
        "blosc-zstd5-bitshuffle": blosc(cname="zstd", clevel=5, shuffle=blosc.BITSHUFFLE),
        "blosc-zstd5-noshuffle": blosc(cname="zstd", clevel=5, shuffle=blosc.NOSHUFFLE),
        "blosc-zstd7-shuffle": blosc(cname="zstd", clevel=7, shuffle=blosc.SHUFFLE),
        "blosc-zstd9-shuffle": blosc(cname="zstd", clevel=9, shuffle=blosc.SHUFFLE),
        "blosc-lz4-shuffle": blosc(cname="lz4", clevel=5, shuffle=blosc.SHUFFLE),
        "zstd3": numcodecs.Zstd(level=3),
        "zstd9": numcodecs.Zstd(level=9),
    }
    table = {}
    for name, codec in candidates.items():
        row = {}
        for array, values in data.items():
            encoded = codec.encode(values)
            row[array] = {"bytes_per_token": len(encoded) / (values.shape[0] * values.shape[1]),
                          "encode_MB_per_s": values.nbytes / 1e6 / _best_seconds(codec.encode, values),
                          "decode_MB_per_s": values.nbytes / 1e6 / _best_seconds(codec.decode, encoded)}
        row["bytes_per_token"] = row["ids"]["bytes_per_token"] + row["logp"]["bytes_per_token"]
        table[name] = row
    return table


def _encodings(store: Path, teacher_dirs: list[Path], tokens_path: Path, num_windows: int = 8) -> dict:
    """Bytes per token and fidelity KL (vs dense) of alternative encodings of the top-k targets."""
    import numcodecs
    import zarr

    from babydistill.pipeline.capture_targets import ensemble_logp
    from babydistill.pipeline.fidelity import fidelity_row
    from babydistill.pipeline.model import load_teachers
    from babydistill.stores.tokens import TokenStore

    codec = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
    group = zarr.open_group(str(store), mode="r")
    rows = min(group["ids"].shape[0], 4 * group["ids"].chunks[0])
    ids, logp16 = group["ids"][:rows], group["logp"][:rows]
    num_tokens = ids.shape[0] * ids.shape[1]

    def size(*arrays) -> float:
        return sum(len(codec.encode(np.ascontiguousarray(a))) for a in arrays) / num_tokens

    # logp quantised to 8 bits: -logp in steps of 1/16 nat (values below -15.9 nats clip: mass < 1.3e-7).
    q8 = np.clip(np.round(-logp16.astype(np.float32) * 16), 0, 255).astype(np.uint8)
    logp8 = (-q8.astype(np.float32) / 16).astype(np.float32)
    # ids sorted ascending per position, delta-coded (logp permuted alike): small numbers compress well.
    order = np.argsort(ids, axis=-1, kind="stable")
    sorted_ids = np.take_along_axis(ids, order, -1)
    deltas = np.diff(sorted_ids.astype(np.int32), axis=-1, prepend=0).astype(np.uint16)
    logp16_perm = np.take_along_axis(logp16, order, -1)
    q8_perm = np.take_along_axis(q8, order, -1)
    result = {
        "fp16_logp+uint16_ids": size(ids, logp16),
        "fp16_logp+delta_ids": size(deltas, logp16_perm),
        "u8_logp+uint16_ids": size(ids, q8),
        "u8_logp+delta_ids": size(deltas, q8_perm),
        "fp16_logp_only": size(logp16), "uint16_ids_only": size(ids), "delta_ids_only": size(deltas),
        "u8_logp_only": size(q8),
    }
    # Fidelity of float16 vs 8-bit logp against the dense ensemble on a few windows.
    tokens = TokenStore(tokens_path)
    # Store row w holds training window window_ids[w] (rows are shuffled): compare each row with its own window.
    windows = torch.from_numpy(tokens.windows("train", group["window_ids"][:num_windows].astype(np.int64)))
    models = load_teachers(teacher_dirs)
    with torch.inference_mode():
        dense = ensemble_logp([m(input_ids=windows[:, :-1]).logits.float() for m in models], "logits").numpy()
    kls = {"fp16": [], "u8": [], "fp32": []}
    stored32 = np.take_along_axis(dense, ids[:num_windows].astype(np.int64), -1)
    for w in range(num_windows):
        for s in range(dense.shape[1]):
            row_ids = ids[w, s].astype(np.int64)
            kls["fp32"].append(fidelity_row(dense[w, s], row_ids, stored32[w, s], "topk"))
            kls["fp16"].append(fidelity_row(dense[w, s], row_ids, logp16[w, s], "topk"))
            kls["u8"].append(fidelity_row(dense[w, s], row_ids, logp8[w, s], "topk"))
    result["fidelity_kl_mean"] = {
        enc: {"bucket": float(np.mean([r[0] for r in v])), "uniform": float(np.mean([r[2] for r in v]))}
        for enc, v in kls.items()}
    return result


def _read_epoch(reader, epoch: int, batch_size: int) -> tuple[int, float]:
    """(tokens, seconds) of one epoch read as the training loop reads it, batch by batch."""
    started, num_tokens = time.perf_counter(), 0
    for start in range(0, reader.num_windows - batch_size + 1, batch_size):
        num_tokens += reader.batch(epoch, np.arange(start, start + batch_size))["input_ids"].numel()
    return num_tokens, time.perf_counter() - started


def _reader_tokens_per_s(store: Path, tokens_path: Path, batch_size: int, seq_len: int) -> float:
    from babydistill.stores.reader import LogitStoreReader

    num_tokens, seconds = _read_epoch(LogitStoreReader(store, tokens_path, seed=0, temperature=1.0), 0, batch_size)
    return num_tokens / seconds


def reader_check_overhead(store: Path, tokens_path: Path, batch_size: int, rounds: int = 41) -> dict:
    """What the reader's per-chunk size + crc32 check costs: two epochs read with the check and two with a
    reader that skips it, alternated ``rounds`` times (side by side, so machine load hits both alike; which
    one goes first alternates too, so neither always runs on a cache the other warmed); the best of each. The first epoch's time includes building the reader (which parses every chunk's done
    marker once), so it is a reader's whole cost up to then. Run on a store:
    ``python -m babydistill.workflows.benchmarks.bench_loader --check-overhead STORE TOKENS``."""
    from babydistill.stores.checksum import crc32
    from babydistill.stores.logits import incomplete_reason, read_markers, store_info
    from babydistill.stores.reader import LogitStoreReader

    class UncheckedReader(LogitStoreReader):
        def _checked_bytes(self, chunk: int, name: str) -> bytes:
            return (self.path / self._chunk_file(chunk, name)).read_bytes()

    def epoch_seconds(reader_class) -> tuple[float, float]:
        """(build + first epoch, second epoch) of one reader."""
        start = time.perf_counter()
        reader = reader_class(store, tokens_path, seed=0, temperature=1.0)
        build = time.perf_counter() - start
        (num_tokens, first), (_, second) = _read_epoch(reader, 0, batch_size), _read_epoch(reader, 1, batch_size)
        tokens_per_epoch.add(num_tokens)
        return build + first, second

    tokens_per_epoch: set[int] = set()

    checked, unchecked = [], []
    for round_ in range(rounds):
        pair = [(checked, LogitStoreReader), (unchecked, UncheckedReader)]
        for times, reader_class in pair if round_ % 2 == 0 else pair[::-1]:
            times.append(epoch_seconds(reader_class))
    # The check's own work, timed alone (the noise-free floor of the side-by-side ratio): crc32 of every
    # chunk file the done markers record (the files the checked reader reads), against an unchecked epoch.
    num_chunks = len(LogitStoreReader(store, tokens_path, seed=0).ranges)
    contents = [(Path(store) / rel).read_bytes() for marker in read_markers(Path(store), num_chunks)
                for rel in marker["files"]]
    crc_seconds = _best_seconds(lambda: [crc32(data) for data in contents], rounds=rounds)
    zlib_seconds = _best_seconds(lambda: [zlib.crc32(data) for data in contents], rounds=rounds)
    # The up-to-date check `cache`, `run` and `status` make before calling the store done (every chunk's
    # marker, file sizes, and with checksum=True every file's crc32): warm page cache, best of `rounds`.
    store_check_s = {label: round(_best_seconds(lambda c=checksum: incomplete_reason(store, checksum=c), rounds=rounds), 4)
                     for label, checksum in (("sizes", False), ("sizes_and_crc32", True))}
    first = min(c[0] for c in checked) / min(u[0] for u in unchecked) - 1
    later = min(c[1] for c in checked) / min(u[1] for u in unchecked) - 1
    # Also the median over rounds of each round's own ratio: steadier than a ratio of two minimums when the
    # machine's load drifts.
    paired = [float(np.median([c[i] / u[i] - 1 for c, u in zip(checked, unchecked)])) for i in (0, 1)]
    (num_tokens,) = tokens_per_epoch
    return {"tokens_per_epoch": num_tokens,
            "checked_tokens_per_s": [round(num_tokens / min(c[i] for c in checked)) for i in (0, 1)],
            "checked_epoch_s": [round(min(c[i] for c in checked), 4) for i in (0, 1)],
            "unchecked_epoch_s": [round(min(u[i] for u in unchecked), 4) for i in (0, 1)],
            "overhead_first_epoch": round(first, 4), "overhead_later_epochs": round(later, 4), "rounds": rounds,
            "overhead_median_paired": {"first_epoch": round(paired[0], 4), "later_epochs": round(paired[1], 4)},
            "goal": "<= 0.03", "store_bytes": store_info(Path(store))["disk_bytes"],
            "full_store_check_s": store_check_s,
            "crc32_s_per_epoch": round(crc_seconds, 5),
            "crc32_GB_per_s": {"isal": round(sum(map(len, contents)) / crc_seconds / 1e9, 1),
                               "zlib": round(sum(map(len, contents)) / zlib_seconds / 1e9, 1)},
            "crc32_share_of_unchecked_epoch": round(crc_seconds / min(u[1] for u in unchecked), 4)}


def reader_vs_step(stores: list[Path], tokens_path: Path, config, rounds: int = 5) -> dict:
    """Reader tokens/s of each finished store (one epoch each round, the stores in turn; best and median of
    ``rounds``) against the config's student CE step: the reader's budget with each encoding."""
    from babydistill.stores.logits import store_info
    from babydistill.stores.reader import LogitStoreReader

    seconds: dict[str, list[float]] = {str(store): [] for store in stores}
    tokens = {}
    for _ in range(rounds):
        for store in stores:
            reader = LogitStoreReader(store, tokens_path, seed=0, temperature=1.0)
            tokens[str(store)], elapsed = _read_epoch(reader, 0, config.train.batch_size)
            seconds[str(store)].append(elapsed)
    student_tps = _student_tokens_per_s(config)
    result = {}
    for store in stores:
        info, times = store_info(store), sorted(seconds[str(store)])
        best, median = tokens[str(store)] / times[0], tokens[str(store)] / times[len(times) // 2]
        result[_display_path(store)] = {
            "mode": info["mode"], "k": info["k"], "samples": info["samples"], "logp_dtype": info["logp_dtype"],
            "bytes_per_token": info["bytes_per_token"],
            "array_bytes_per_token": {name: a["bytes_per_token"] for name, a in info["arrays"].items()},
            "reader_tokens_per_s_best": best, "reader_tokens_per_s_median": median,
            "ratio_to_student_step": median / student_tps}
    return {"stores": result, "student_train_tokens_per_s": student_tps, "rounds": rounds, "goal": ">= 20x",
            "student_step": "CE step of the config's model via bench step's ce mode"}


def _student_tokens_per_s(config, steps: int = 5, warmup: int = 2) -> float:
    """Training tokens/s of the config's student: the CE step of `babydistill bench step` (the product's model,
    attention choice and ``optimizer_step``, data fetching included), median of ``steps``."""
    import tempfile

    from babydistill.pipeline.training.runtime import resolve_device, resolve_precision
    from babydistill.stores.tokens import TokenStore
    from babydistill.workflows.benchmarks.bench_step import _time_modes

    device = resolve_device(config.train.device)
    with tempfile.TemporaryDirectory(prefix="bench_loader_step_") as scratch:
        timing = _time_modes(config, TokenStore(config.tokens_path), ["ce"], steps, warmup, device,
                             resolve_precision(config.train.precision, device), Path(scratch))
    return timing["ce"]["tokens_per_second"]


def _capture_summary(topk: dict, sample: dict, forward_s: float, forward_cpu_s: float) -> dict:
    """Capture time against the teachers' bare forward, in wall and in CPU seconds."""
    return {
        "bare_forward_s": forward_s, "topk_capture_s": topk["seconds"], "sample_capture_s": sample["seconds"],
        "topk_overhead_vs_forward_wall": topk["seconds"] / forward_s - 1,
        # CPU seconds: the machine is shared, so wall times are noisy.
        "bare_forward_cpu_s": forward_cpu_s,
        "topk_compute_cpu_s": topk["task_compute_cpu_s"], "topk_write_cpu_s": topk["task_write_cpu_s"],
        "topk_overhead_vs_forward_cpu": (topk["task_compute_cpu_s"] + topk["task_write_cpu_s"]) / forward_cpu_s - 1,
        "topk_write_vs_forward_cpu": topk["task_write_cpu_s"] / forward_cpu_s,
        "sample_overhead_vs_forward_cpu":
            (sample["task_compute_cpu_s"] + sample["task_write_cpu_s"]) / forward_cpu_s - 1,
        "sample_write_vs_forward_cpu": sample["task_write_cpu_s"] / forward_cpu_s,
        "goal": "store writing adds <= 10% over the bare teacher forward",
    }


# --- the benchmark ------------------------------------------------------------------------------


def bench_loader(out: Path | None, *, quick: bool = False, config_path: Path = DEMO_CONFIG,
                 work_dir: Path | None = None, max_train_words: int | None = None,
                 teacher_steps: int | None = None) -> dict:
    """Run the loader benchmark; write the JSON to ``out`` (if given) and return it.

    Defaults: 60000 training words and 40 CE steps per teacher; ``quick``: 40000 words, 8 steps.
    """
    max_train_words = max_train_words or (40000 if quick else 60000)
    teacher_steps = teacher_steps or (8 if quick else 40)
    started = machine.start()
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        result = {
            "command": "python -m babydistill.workflows.benchmarks.bench_loader --out FILE.json" + (" --quick" if quick else ""),
            "config": _display_path(config_path), "max_train_words": max_train_words, "teacher_steps": teacher_steps,
            "torch_threads": torch.get_num_threads(),
            **_measure(Path(config_path), work, max_train_words, teacher_steps),
        }
    finally:
        if work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    result["machine"] = machine.finish(started)
    if out is not None:
        Path(out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def _measure(config_path: Path, work: Path, max_train_words: int, teacher_steps: int) -> dict:
    """Two teachers trained in ``work``, a top-k and a sampled store captured from them, then measured."""
    from babydistill.pipeline.capture import capture_logits
    from babydistill.stores.logits import store_info

    started = time.perf_counter()
    config = _make_run(config_path, work, max_train_words)
    teachers = [_train_teacher(config, seed, teacher_steps, work / model_name("teacher", seed)) for seed in (1, 2)]
    setup_s = time.perf_counter() - started
    topk_cfg = dataclasses.replace(config.cache, mode="topk", k=32, workers=1)
    sample_cfg = dataclasses.replace(config.cache, mode="sample", samples=64, workers=1)

    # capture overhead (bare forward first, so both runs see warm caches)
    forward_s, forward_cpu_s = _bare_forward_seconds(teachers, config.tokens_path, config.cache.batch_size)
    topk_store, sample_store = work / "topk.zarr", work / "sample.zarr"
    shutil.rmtree(topk_store, ignore_errors=True)
    topk = capture_logits(topk_cfg, config.tokens_path, config.tokenizer_path, teachers, topk_store)
    shutil.rmtree(sample_store, ignore_errors=True)
    sample = capture_logits(sample_cfg, config.tokens_path, config.tokenizer_path, teachers, sample_store)
    topk_info, sample_info = store_info(topk_store), store_info(sample_store)

    # sizes, codecs, encodings, throughput
    codecs = _codec_table(topk_store)
    encodings = _encodings(topk_store, teachers, config.tokens_path)
    reader_tps = _reader_tokens_per_s(topk_store, config.tokens_path, config.train.batch_size, config.data.seq_len)
    student_tps = _student_tokens_per_s(config)
    check_overhead = reader_check_overhead(topk_store, config.tokens_path, config.train.batch_size)
    return {
        "setup_s": round(setup_s, 1), "num_windows": topk_info["num_windows"], "num_tokens": topk_info["num_tokens"],
        "vocab_size": topk_info["vocab_size"],
        "capture": _capture_summary(topk, sample, forward_s, forward_cpu_s),
        "size": {
            "topk_k32_bytes_per_token": topk_info["bytes_per_token"],
            "topk_k32_vs_dense_fp16": topk_info["compression_vs_dense_fp16"],
            "sample_s64_bytes_per_token": sample_info["bytes_per_token"],
            "sample_s64_slots": sample_info["slots"],
            "dense_fp16_bytes_per_token": 2 * topk_info["vocab_size"],
            "goal": "<= 64 bytes/token at k = 32, fidelity KL within 1e-4 nats of float16 storage",
            "codecs": codecs, "encodings": encodings,
        },
        "fidelity": {"topk": topk["fidelity"], "sample": sample["fidelity"]},
        "throughput": {
            "reader_tokens_per_s_1_worker": reader_tps, "student_train_tokens_per_s": student_tps,
            "ratio": reader_tps / student_tps, "goal": ">= 20x", "reader_crc_check": check_overhead,
            "student_step": "CE step of the config's model via bench step's ce mode (pipeline.training.loop.optimizer_step, "
                            f"{config.train.num_threads or torch.get_num_threads()} threads)",
        },
    }


def _main_stores(args) -> None:
    started = machine.start()
    result = {"command": "python -m babydistill.workflows.benchmarks.bench_loader --stores STORE... --tokens TOKENS "
                         "--config CONFIG --set run_dir=RUN",
              **reader_vs_step(args.stores, args.tokens, load_config(args.config, args.set))}
    result["machine"] = machine.finish(started)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write (default: print only)")
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG, help=f"run config (default: {DEMO_CONFIG})")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the run here (default: a temp dir, removed)")
    parser.add_argument("--quick", action="store_true", help="a smaller run (default: off)")
    parser.add_argument("--max-train-words", type=int, default=None,
                        help="training words (default: 60000, 40000 with --quick)")
    parser.add_argument("--teacher-steps", type=int, default=None, help="CE steps per teacher (default: 40, 8 with --quick)")
    parser.add_argument("--check-overhead", nargs=2, type=Path, metavar=("STORE", "TOKENS"), default=None,
                        help="only measure the reader's crc32 check on an existing logits.zarr and its tokens.zarr "
                             "(e.g. runs/demo/logits.zarr runs/demo/tokens.zarr)")
    parser.add_argument("--stores", nargs="+", type=Path, default=None, metavar="STORE",
                        help="only measure the reader on these finished logit stores (of one tokens.zarr, --tokens) "
                             "against --config's student step (its run_dir set with --set run_dir=...)")
    parser.add_argument("--tokens", type=Path, default=None, help="the stores' tokens.zarr (with --stores)")
    parser.add_argument("--set", action="append", default=None, metavar="SECTION.KEY=VALUE",
                        help="override a config value (with --stores)")
    args = parser.parse_args(argv)
    if args.stores is not None:
        _main_stores(args)
        return
    if args.check_overhead is not None:
        store, tokens = args.check_overhead
        for path in (store, tokens):
            if not path.is_dir():
                parser.exit(2, f"bench_loader: error: {path} is not a store folder; make it with `babydistill run CONFIG`\n")
        started = machine.start()
        result = {"command": "python -m babydistill.workflows.benchmarks.bench_loader --check-overhead STORE TOKENS",
                  "store": _display_path(store), **reader_check_overhead(store, tokens, batch_size=16)}
        result["machine"] = machine.finish(started)
        if args.out is not None:
            args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(json.dumps(result, indent=2))
        return
    result = bench_loader(args.out, quick=args.quick, config_path=args.config, work_dir=args.work_dir,
                          max_train_words=args.max_train_words, teacher_steps=args.teacher_steps)
    print(json.dumps({k: result[k] for k in ("capture", "throughput")}, indent=2))
    print(json.dumps({k: v for k, v in result["size"].items() if k not in ("codecs",)}, indent=2))


if __name__ == "__main__":
    main()
