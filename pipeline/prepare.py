"""Stage `prepare`: a BabyLM-style corpus folder -> cleaned train / validation / test splits.

Layouts understood (first match wins):
- BabyLM 2024: ``train_10M/`` (or ``train_100M/``) with ``*.train``, ``dev/`` with ``*.dev``, ``test/``;
- BabyLM 2023: ``babylm_10M/`` (or ``babylm_100M/``), ``babylm_dev/``, ``babylm_test/``;
- pre-split: ``train/``, optional ``validation/``, optional ``test/`` with ``*.txt`` (the bundled corpus);
- plain: a folder of ``*.txt``.

The paper uses the BabyLM dev set as its test set and carves validation out of the training
text, so for the BabyLM layouts test comes from the dev folder (the test folder when there is
no dev folder). Validation is the tail of every training source (whole paragraphs, a
``validation_fraction`` of its words), so every domain is represented and the split is
deterministic. A plain folder also gives up a ``test_fraction`` tail for test.

Documents are blank-line separated blocks: cleaning normalises line endings and whitespace,
drops empty lines inside a block, and keeps the block boundaries.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from babydistill.pipeline.config import DataConfig

SPLITS = ("train", "validation", "test")

_LAYOUTS = [
    # (train folders, train suffix, held-out folders in order of preference for test, suffixes)
    (("train_10M", "train_100M"), ".train", ("dev", "test"), (".dev", ".test")),
    (("babylm_10M", "babylm_100M"), ".train", ("babylm_dev", "babylm_test"), (".dev", ".test")),
]
_SPACES = re.compile(r"[ \t\f\v\u00a0]+")


class CorpusError(ValueError):
    """The corpus folder cannot be read as a corpus."""


@dataclass
class Source:
    name: str
    documents: list[str]

    @property
    def num_words(self) -> int:
        return sum(len(doc.split()) for doc in self.documents)


# --- reading and cleaning ------------------------------------------------------------------


def read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"{path}: not UTF-8 (bad byte 0x{data[exc.start]:02x} at byte offset {exc.start}); "
            "convert it to UTF-8 or remove it from the corpus") from None


def clean_documents(text: str) -> list[str]:
    """Split on blank lines into documents; normalise whitespace; drop empty lines."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n")).lstrip("\ufeff")
    documents = []
    for block in re.split(r"\n\s*\n", text):
        lines = [_SPACES.sub(" ", line).strip() for line in block.split("\n")]
        lines = [line for line in lines if line]
        if lines:
            documents.append("\n".join(lines))
    return documents


def read_sources(folder: Path, suffixes: tuple[str, ...]) -> list[Source]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in suffixes)
    return [Source(p.stem, clean_documents(read_text(p))) for p in files]


def split_tail(source: Source, fraction: float) -> tuple[Source, Source]:
    """Whole documents: the head keeps (1 - fraction) of the words, the tail gets the rest."""
    total = source.num_words
    seen = 0
    head, tail = [], []
    for doc in source.documents:
        (head if seen < (1.0 - fraction) * total else tail).append(doc)
        seen += len(doc.split())
    return Source(source.name, head), Source(source.name, tail)


def take_head(source: Source, num_words: int) -> Source:
    kept, seen = [], 0
    for doc in source.documents:
        if seen >= num_words:
            break
        kept.append(doc)
        seen += len(doc.split())
    return Source(source.name, kept)


# --- layout detection -----------------------------------------------------------------------


def find_splits(corpus: Path, cfg: DataConfig) -> tuple[dict[str, list[Source]], str]:
    """Return the sources of each split and the name of the layout found."""
    if not corpus.is_dir():
        raise CorpusError(f"{corpus}: corpus folder not found; set data.corpus to a folder of text files")

    for train_names, train_suffix, heldout_names, heldout_suffixes in _LAYOUTS:
        train_dir = next((corpus / n for n in train_names if (corpus / n).is_dir()), None)
        if train_dir is None:
            continue
        train = read_sources(train_dir, (train_suffix, ".txt"))
        test_dir = next((corpus / n for n in heldout_names if (corpus / n).is_dir()), None)
        test = read_sources(test_dir, heldout_suffixes + (".txt",)) if test_dir else []
        if not test:
            train, test = _carve(train, cfg.test_fraction)
        train, validation = _carve(train, cfg.validation_fraction)
        return {"train": train, "validation": validation, "test": test}, f"babylm ({train_dir.name}/)"

    if (corpus / "train").is_dir():
        train = read_sources(corpus / "train", (".txt", ".train"))
        if (corpus / "test").is_dir():
            test = read_sources(corpus / "test", (".txt", ".test"))
        else:
            train, test = _carve(train, cfg.test_fraction)
        if (corpus / "validation").is_dir():
            validation = read_sources(corpus / "validation", (".txt", ".dev"))
        else:
            train, validation = _carve(train, cfg.validation_fraction)
        return {"train": train, "validation": validation, "test": test}, "pre-split (train/ validation/ test/)"

    sources = read_sources(corpus, (".txt",))
    if not sources:
        raise CorpusError(
            f"{corpus}: no corpus files found (expected *.txt, train/, train_10M/ or babylm_10M/); "
            "point data.corpus at a BabyLM-style folder")
    # Each source: train head, then validation, then test at the very end (as the bundled corpus).
    train, test = _carve(sources, cfg.test_fraction)
    train, validation = _carve(train, cfg.validation_fraction)
    return {"train": train, "validation": validation, "test": test}, "plain (*.txt)"


def _carve(sources: list[Source], fraction: float) -> tuple[list[Source], list[Source]]:
    if fraction == 0:
        return sources, []
    pairs = [split_tail(s, fraction) for s in sources]
    return [h for h, _ in pairs], [t for _, t in pairs if t.documents]


# --- stage ------------------------------------------------------------------------------------


def prepare_corpus(cfg: DataConfig, corpus: Path, out_dir: Path) -> dict:
    """Clean and split ``corpus`` into ``out_dir/{train,validation,test}/<source>.txt``.

    Writes ``out_dir/manifest.json`` with the layout, and per split the files, documents,
    words and a content hash. Returns the manifest.
    """
    splits, layout = find_splits(Path(corpus), cfg)
    if cfg.max_train_words is not None:
        total = sum(s.num_words for s in splits["train"])
        share = min(1.0, cfg.max_train_words / max(total, 1))
        splits["train"] = [take_head(s, int(s.num_words * share)) for s in splits["train"]]

    problems = [f"the {name} split is empty" for name in ("train", "validation") if
                not any(s.documents for s in splits[name])]
    if problems:
        raise CorpusError(f"{corpus}: {'; '.join(problems)} (layout: {layout}); add text or check the folder")

    manifest = {"corpus": str(corpus), "layout": layout, "splits": {}}
    for name in SPLITS:
        split_dir = out_dir / name
        split_dir.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        files = {}
        for source in tqdm(splits[name], desc=f"prepare {name}", unit="file", leave=False):
            if not source.documents:
                continue
            text = "\n\n".join(source.documents) + "\n"
            (split_dir / f"{source.name}.txt").write_text(text, encoding="utf-8")
            digest.update(source.name.encode() + b"\0" + text.encode("utf-8"))
            files[source.name] = {"documents": len(source.documents), "words": source.num_words}
        manifest["splits"][name] = {
            "files": files,
            "documents": sum(f["documents"] for f in files.values()),
            "words": sum(f["words"] for f in files.values()),
            "sha256": digest.hexdigest(),
        }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def read_manifest(data_dir: Path) -> dict:
    path = data_dir / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{data_dir}: no prepared corpus; run `babydistill prepare CONFIG` first")
    return json.loads(path.read_text(encoding="utf-8"))


def split_documents(data_dir: Path, split: str) -> list[str]:
    """The documents of one prepared split, in file order."""
    documents: list[str] = []
    for path in sorted((data_dir / split).glob("*.txt")):
        documents.extend(doc for doc in path.read_text(encoding="utf-8").split("\n\n") if doc.strip())
    return documents
