"""BabyLM zero-shot suites from local files (BLiMP and its supplement, EWoK, entity tracking).

We read the data files of the BabyLM evaluation pipeline 2025 and score them with its rule for
causal models (``babylm/evaluation-pipeline-2025``, ``evaluation_pipeline/sentence_zero_shot/``:
``read_files.py`` turns an item into candidate strings, ``dataset.py`` picks the scored tokens,
``compute_results.py`` ranks the candidates, ``run.py`` averages), so the numbers are theirs.

An item is a list of candidate texts, the first one correct, and for each the character where its
scored *completion* starts:

- ``blimp``: ``[sentence_good, sentence_bad]``, the whole sentence scored. The subset is the
  line's ``UID``, or, in files without ``field``/``UID`` (the supplement), the file stem.
- ``ewok``: ``[Context1 + " " + Target1, Context1 + " " + Target2]``, only ``" " + Target`` scored
  (the pipeline's default; ``Context2`` is read by it but does not enter the causal score).
  The subset is ``Domain``.
- ``entity_tracking``: ``[input_prefix + option for option in options]``, only the option scored.
  The subset is ``<file stem>_<numops>_ops``.

Scoring: the score of a candidate is the **sum** (not the mean) of the log-probabilities of the
tokens that overlap its completion, i.e. whose character span ends after the completion's first
character (a token straddling the boundary counts), conditioned on ``<s>`` and everything before
it. The prediction is the arg-max over candidates with ties going to the first (``torch.max``),
so an item is right when the first candidate's score is >= every other's.

Averages (as the pipeline's ``run.py``): a subset's accuracy is the share of its items that are
right; a task's overall accuracy is the mean over subsets (macro), except entity tracking, whose
overall is the mean over its splits ``regular``, ``ambiref``, ``move_contents`` of the mean over the
subsets whose name starts with the split (a subset that starts with none of them is a split of its
own; the pipeline would leave it out). BLiMP also reports accuracy per ``field``, pooled over its
items as the pipeline does (the supplement's field is ``supplement``). Accuracies are fractions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TASKS = ("blimp", "ewok", "entity_tracking")
REQUIRED = {"blimp": ("sentence_good", "sentence_bad"),
            "ewok": ("Context1", "Target1", "Target2", "Domain"),
            "entity_tracking": ("input_prefix", "options", "numops")}
TEXT_FIELDS = {"blimp": ("sentence_good", "sentence_bad"), "ewok": ("Context1", "Target1", "Target2"),
               "entity_tracking": ("input_prefix",)}
ENTITY_TRACKING_SPLITS = ("regular", "ambiref", "move_contents")


class ZeroShotDataError(ValueError):
    """A zero-shot data file is missing, empty or not in its task's format."""


@dataclass(frozen=True)
class Item:
    subset: str
    candidates: tuple[str, ...]
    """Full texts; the first is the correct one."""
    starts: tuple[int, ...]
    """Per candidate, the character where its scored completion starts (0 = the whole text)."""
    group: str = ""
    """BLiMP's field (``supplement`` without one); empty for the other tasks."""
    where: str = field(default="", compare=False)
    """``file:line``, for messages."""


# --- reading ------------------------------------------------------------------------------


def _jsonl_files(path: Path) -> list[Path]:
    """A .jsonl file, or the *.jsonl files directly inside a folder (as the pipeline reads its data_path)."""
    if not path.exists():
        raise ZeroShotDataError(f"{path}: no such file or folder; fix the path in eval.zero_shot")
    if path.is_file():
        if path.suffix != ".jsonl":
            raise ZeroShotDataError(f"{path}: not a .jsonl file; point eval.zero_shot at a *.jsonl file or a "
                                    f"folder of them")
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix == ".jsonl" and p.is_file() and not p.name.startswith("."))
    if not files:
        raise ZeroShotDataError(f"{path}: no *.jsonl files in this folder; point eval.zero_shot at the folder "
                                f"that holds the task's *.jsonl files")
    return files


def _decode(task: str, row: dict, file: Path, where: str) -> Item:
    if task == "blimp":
        good, bad = row["sentence_good"], row["sentence_bad"]
        # the supplement's files have no field/UID: the file stem names the paradigm
        subset = row.get("UID", file.stem) if "field" in row else file.stem
        group = row["field"] if "field" in row else "supplement"
        if group == "syntax_semantics":  # the pipeline standardises this field's spelling
            group = "syntax/semantics"
        return Item(subset, (good, bad), (0, 0), group, where)
    if task == "ewok":
        context = row["Context1"]
        texts = (f"{context} {row['Target1']}", f"{context} {row['Target2']}")
        return Item(str(row["Domain"]), texts, (len(context), len(context)), "", where)
    prefix, options = row["input_prefix"], row["options"]
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
        raise ZeroShotDataError(f"{where}: `options` must be a list of at least two strings (the first is "
                                f"correct), got {options!r}")
    return Item(f"{file.stem}_{row['numops']}_ops", tuple(prefix + o for o in options),
                tuple(len(prefix) for _ in options), "", where)


def load_suite(task: str, path: Path | str) -> list[Item]:
    """Every item of the task's *.jsonl file(s) at ``path``, in file order (files sorted by name)."""
    if task not in TASKS:
        raise ZeroShotDataError(f"unknown zero-shot task {task!r}; use one of {', '.join(TASKS)}")
    path = Path(path)
    items = []
    for file in _jsonl_files(path):
        with file.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{file}:{number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ZeroShotDataError(f"{where}: not a JSON line ({exc.msg}); each line of a {task} file "
                                            f"must be one JSON object") from None
                if not isinstance(row, dict):
                    raise ZeroShotDataError(f"{where}: a JSON {type(row).__name__}, not an object; each line of "
                                            f"a {task} file must be one JSON object")
                lacking = [key for key in REQUIRED[task] if key not in row]
                if lacking:
                    raise ZeroShotDataError(
                        f"{file}: line {number} lacks {', '.join(lacking)}, so it is not in the {task} format "
                        f"(needs {', '.join(REQUIRED[task])}); check the file or its task in eval.zero_shot")
                not_text = [key for key in TEXT_FIELDS[task] if not isinstance(row[key], str)]
                if not_text:
                    raise ZeroShotDataError(f"{where}: {', '.join(not_text)} must be text (a JSON string), got "
                                            f"{', '.join(repr(row[key]) for key in not_text)}")
                items.append(_decode(task, row, file, where))
    if not items:
        raise ZeroShotDataError(f"{path}: its *.jsonl files hold no items")
    return items


# --- accuracies ---------------------------------------------------------------------------


def _share(flags: list[bool]) -> float:
    return sum(flags) / len(flags)


def accuracy(task: str, items: list[Item], correct: list[bool]) -> dict:
    """``overall``, ``subsets`` and, for BLiMP, ``fields`` / for entity tracking, ``splits``."""
    by_subset: dict[str, list[bool]] = {}
    for item, ok in zip(items, correct, strict=True):
        by_subset.setdefault(item.subset, []).append(bool(ok))
    subsets = {name: _share(flags) for name, flags in sorted(by_subset.items())}
    result: dict = {}
    if task == "entity_tracking":
        splits: dict[str, list[float]] = {}
        for name, acc in subsets.items():
            split = next((s for s in ENTITY_TRACKING_SPLITS if name.startswith(s)), name.rsplit("_", 2)[0])
            splits.setdefault(split, []).append(acc)
        result["splits"] = {split: float(np.mean(accs)) for split, accs in splits.items()}
        result["overall"] = float(np.mean(list(result["splits"].values())))
    else:
        result["overall"] = float(np.mean(list(subsets.values())))
    if task == "blimp":
        by_field: dict[str, list[bool]] = {}
        for item, ok in zip(items, correct, strict=True):
            by_field.setdefault(item.group, []).append(bool(ok))
        result["fields"] = {name: _share(flags) for name, flags in sorted(by_field.items())}
    result["subsets"] = subsets
    return result
