"""What the checkpoints' checksums cost: a checkpoint save of the demo model (weights, AdamW state, RNG), timed
with and without the crc32 of its files, side by side in one process; the share is the checksum's part of a save.

    python -m babydistill.workflows.benchmarks.bench_checkpoint [CONFIG] [--repeats 10] [--out FILE.json]

Writes JSON (the command, the checkpoint's size, the median seconds of a save, of its checksums, and of a
crc32 of the same bytes already in memory: the floor any full-content checksum has).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from babydistill.pipeline.config import load_config
from babydistill.pipeline.training.checkpoint import save_checkpoint
from babydistill.pipeline.training.optimizer import build_optimizer
from babydistill.pipeline.training.runtime import Dist
from babydistill.stores.checksum import crc32, file_records
from babydistill.workflows.benchmarks import machine


def _demo_model(config_path: Path, vocab_size: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = load_config(config_path)
    m = config.model
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=m.hidden_size,
                                         intermediate_size=m.intermediate_size, num_hidden_layers=m.num_layers,
                                         num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
                                         max_position_embeddings=config.data.seq_len))
    optimizer = build_optimizer(model, config.train)
    model(input_ids=torch.zeros(1, 8, dtype=torch.long)).logits.sum().backward()
    optimizer.step()  # an AdamW state of the full size
    return model, optimizer, config


def bench_checkpoint(config_path: Path, repeats: int) -> dict:
    started_run = machine.start()
    config = load_config(config_path)
    model, optimizer, _ = _demo_model(config_path, config.tokenizer.vocab_size)
    saves, checksums, in_memory = [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        state = Path(scratch)
        for step in range(1, repeats + 1):
            started = time.perf_counter()
            folder = save_checkpoint(state, step, model, optimizer, None, {"step": step}, Dist())
            saves.append(time.perf_counter() - started)
            names = sorted(p.name for p in folder.iterdir() if p.suffix in (".pt", ".safetensors"))
            started = time.perf_counter()
            file_records(folder, names)  # what save_checkpoint spent on checksums, measured again alone
            checksums.append(time.perf_counter() - started)
            size = sum(p.stat().st_size for p in folder.iterdir())
            data = b"".join((folder / name).read_bytes() for name in names)
            started = time.perf_counter()
            crc32(data)  # the floor: the crc32 of bytes already in memory, without reading the files back
            in_memory.append(time.perf_counter() - started)
    save, checksum, floor = statistics.median(saves), statistics.median(checksums), statistics.median(in_memory)
    return {"command": f"python -m babydistill.workflows.benchmarks.bench_checkpoint {config_path} --repeats {repeats}",
            "checkpoint_bytes": size, "save_s_median": save, "checksum_s_median": checksum,
            "checksum_share_of_save": checksum / save, "crc32_in_memory_s_median": floor,
            "crc32_in_memory_share_of_save": floor / save,
            "save_bytes_per_s": size / save, "crc32_bytes_per_s": len(data) / floor,
            "machine": machine.finish(started_run)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m babydistill.workflows.benchmarks.bench_checkpoint",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/demo.yaml")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args(argv)
    result = bench_checkpoint(Path(args.config), args.repeats)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
