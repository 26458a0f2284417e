"""Stage `tokenize` (module `encode`: `tokenize` would shadow the standard library's module): prepared splits ->
``tokens.zarr`` (token streams and fixed windows).

Every document becomes ``<s> tokens </s>``; documents are concatenated in file order, so a
window may span document boundaries (the end-of-document token marks them).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from babydistill.pipeline.config import DataConfig
from babydistill.pipeline.prepare import SPLITS, read_manifest, split_documents
from babydistill.pipeline.tokenizer import BOS, EOD, PAD, load_tokenizer, tokenizer_hash
from babydistill.stores.tokens import write_token_store

_BATCH_DOCUMENTS = 2048


def encode_documents(tokenizer, documents: list[str], desc: str) -> np.ndarray:
    backend = tokenizer.backend_tokenizer
    bos, eod = tokenizer.convert_tokens_to_ids(BOS), tokenizer.convert_tokens_to_ids(EOD)
    pieces = []
    for begin in tqdm(range(0, len(documents), _BATCH_DOCUMENTS), desc=desc, unit="batch", leave=False):
        batch = backend.encode_batch(documents[begin:begin + _BATCH_DOCUMENTS], add_special_tokens=False)
        for encoding in batch:
            pieces.append(np.asarray([bos, *encoding.ids, eod], dtype=np.uint16))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)


def tokenize_corpus(cfg: DataConfig, data_dir: Path, tokenizer_dir: Path, out: Path) -> dict:
    """Encode every prepared split with the run's tokenizer into the token store ``out``.

    Returns per-split statistics (documents, tokens, windows, seconds, tokens/s).
    """
    manifest = read_manifest(data_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    streams, stats = {}, {}
    for split in SPLITS:
        documents = split_documents(data_dir, split)
        start = time.perf_counter()
        streams[split] = encode_documents(tokenizer, documents, f"tokenize {split}")
        seconds = time.perf_counter() - start
        stats[split] = {"documents": len(documents), "tokens": int(len(streams[split])),
                        "windows": max(0, (len(streams[split]) - 1) // cfg.seq_len),
                        "seconds": round(seconds, 3), "tokens_per_second": round(len(streams[split]) / max(seconds, 1e-9))}
    if stats["train"]["windows"] == 0:
        raise ValueError(f"{data_dir}: the train split has {stats['train']['tokens']} tokens, fewer than one window "
                         f"of data.seq_len={cfg.seq_len}; add text or lower data.seq_len")
    write_token_store(
        out, streams, seq_len=cfg.seq_len, vocab_size=len(tokenizer),
        special_ids={"pad": tokenizer.convert_tokens_to_ids(PAD), "bos": tokenizer.convert_tokens_to_ids(BOS),
                     "eod": tokenizer.convert_tokens_to_ids(EOD)},
        tokenizer_hash=tokenizer_hash(tokenizer_dir),
        corpus_hashes={split: manifest["splits"][split]["sha256"] for split in SPLITS},
    )
    return stats
