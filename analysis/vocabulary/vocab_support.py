"""Can a training split support a BPE vocabulary of 16,000 (issue 27, the curve at the paper's vocabulary)?

Trains the project's byte-level BPE (``pipeline.tokenizer.build_bpe``, min_frequency 2 as the configs use) at
4,096, 6,000 and 16,000 on a split and counts how often each token type occurs in it. A vocabulary the data
support has its merges reached (the trainer stops early when no pair occurs twice) and most types seen often
enough to be learnt.

    .venv/bin/python analysis/vocabulary/vocab_support.py runs/cpu-experiment/data/train data/corpus/train \
        --out docs/results/store-study/vocab_support.json

The first folder is the cpu-experiment's 200k-word training share (`babydistill prepare configs/cpu-experiment.yaml`
makes it), the second the bundled corpus's whole training split.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from babydistill.pipeline.tokenizer import build_bpe

VOCABULARIES = (4096, 6000, 16000)


def support(documents: list[str], vocab_size: int) -> dict:
    tokenizer = build_bpe(documents, vocab_size, min_frequency=2)
    counts = collections.Counter(i for d in documents for i in tokenizer.encode(d).ids)
    frequencies = sorted(counts.values())
    words = sum(len(d.split()) for d in documents)
    return {"asked": vocab_size, "reached": tokenizer.get_vocab_size(), "train_tokens": sum(frequencies),
            "tokens_per_word": round(sum(frequencies) / words, 3), "types_seen": len(counts),
            "types_never_seen": tokenizer.get_vocab_size() - len(counts),
            "types_seen_under_5_times": sum(c < 5 for c in frequencies),
            "types_seen_under_10_times": sum(c < 10 for c in frequencies),
            "median_count_of_a_seen_type": frequencies[len(frequencies) // 2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("splits", nargs="+", type=Path, help="folders of *.txt training documents")
    parser.add_argument("--out", type=Path, required=True, help="the JSON to write")
    args = parser.parse_args()
    results = {}
    for split in args.splits:
        documents = [p.read_text(encoding="utf-8") for p in sorted(split.glob("*.txt"))]
        results[str(split)] = {"words": sum(len(d.split()) for d in documents),
                               "vocabularies": [support(documents, v) for v in VOCABULARIES]}
        print(json.dumps({str(split): results[str(split)]}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
