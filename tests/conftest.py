"""Shared fixtures: a tiny hermetic corpus and run (vocab ~400, 2-layer Llama), no network."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
import yaml

from babydistill.pipeline.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
_FOLDERS = ("pipeline", "kernels", "stores", "workflows")


def repo_modules_under_bare_names() -> list[str]:
    """Modules of this checkout imported as `pipeline...`, `kernels...` (not `babydistill....`): one module under
    two names. Hugging Face's own `kernels` (a dependency of transformers) lives elsewhere and is fine."""
    folders = tuple(os.path.realpath(ROOT / folder) + os.sep for folder in _FOLDERS)
    found = []
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] not in _FOLDERS or module is None:
            continue
        places = [getattr(module, "__file__", None) or "", *list(getattr(module, "__path__", []) or [])]
        if any(place and (os.path.realpath(place) + os.sep).startswith(folders) for place in places):
            found.append(name)
    return found


@pytest.fixture(autouse=True)
def _one_name_per_module():
    yield
    assert repo_modules_under_bare_names() == [], "import it as babydistill.<folder>..., never by the bare folder"


_NOUNS = ["cat", "dog", "girl", "boy", "king", "queen", "bird", "fox", "wolf", "rabbit", "garden", "house",
          "tree", "river", "mother", "father", "princess", "giant", "mouse", "horse"]
_VERBS = ["saw", "liked", "found", "chased", "helped", "called", "followed", "loved", "met", "heard"]
_ADJS = ["little", "old", "happy", "big", "green", "kind", "clever", "small", "dark", "bright"]
_STARTS = ["Once upon a time", "One day", "In the morning", "Then", "After that", "At night"]


def make_sentence(rng: random.Random) -> str:
    return (f"{rng.choice(_STARTS)} the {rng.choice(_ADJS)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} "
            f"the {rng.choice(_ADJS)} {rng.choice(_NOUNS)}.")


def write_corpus(folder: Path, num_files: int = 3, paragraphs: int = 60, seed: int = 0) -> Path:
    """A plain corpus of *.txt files: paragraphs of simple sentences separated by blank lines."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(num_files):
        paras = [" ".join(make_sentence(rng) for _ in range(rng.randint(2, 5))) for _ in range(paragraphs)]
        (folder / f"source{i}.txt").write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return folder


TINY_CONFIG = {
    "data": {"seq_len": 32, "validation_fraction": 0.1, "test_fraction": 0.1},
    "tokenizer": {"vocab_size": 400, "min_frequency": 1},
    "model": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2},
    "train": {"lr": 3e-3, "epochs": 1, "batch_size": 8, "grad_accum": 1, "warmup_steps": 2, "weight_decay": 0.0,
              "save_every": 5, "log_every": 1, "seed": 0, "num_threads": 1},
    "teachers": {"count": 2},
    "cache": {"mode": "topk", "k": 8, "chunk_windows": 4, "batch_size": 4, "temperatures": [1.0, 2.0], "fidelity_positions": 64},
    "distill": {"students": 1},
    "eval": {"max_pairs_per_paradigm": 5, "batch_size": 8, "max_windows": 8},
}


def write_config(tmp_path: Path, overrides: dict | None = None, name: str = "tiny") -> Path:
    """Write a tiny YAML config whose corpus and run_dir live under tmp_path."""
    raw = {section: dict(values) for section, values in TINY_CONFIG.items()}
    raw["run_dir"] = str(tmp_path / "run")
    raw["data"]["corpus"] = str(tmp_path / "corpus")
    for section, values in (overrides or {}).items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.fixture
def tiny_config_path(tmp_path: Path) -> Path:
    write_corpus(tmp_path / "corpus")
    return write_config(tmp_path)


@pytest.fixture
def tiny_config(tiny_config_path: Path) -> Config:
    return load_config(tiny_config_path)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Config:
    """A run with prepare, tokenizer and tokenize done: read-only for tests (copy it to modify)."""
    from babydistill.workflows.runner import build_token_run

    root = tmp_path_factory.mktemp("tiny_run")
    write_corpus(root / "corpus", num_files=3, paragraphs=120)
    return build_token_run(load_config(write_config(root)))
