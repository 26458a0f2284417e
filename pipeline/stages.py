"""Which config sections each stage's identity hashes: one declaration for every fingerprint and recipe.

A stage's fingerprint (``workflows/runner.py``) hashes the identity fields (``pipeline.config.identity``: every
field but those marked execution-only) of the sections named here, with its inputs' fingerprints; so do a
training checkpoint's fingerprint and a sweep's signature. Adding a section to a stage here makes its finished
outputs stale: that is a decision, taken here.
"""

from __future__ import annotations

from typing import Any

from babydistill.pipeline.config import Config, identity

STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "prepare": ("data",),  # all of data but seq_len (tokenize's) and corpus (hashed by its contents)
    "tokenizer": ("tokenizer",),
    "tokenize": ("data",),  # data.seq_len alone: the rest is prepare's
    "teacher": ("model", "train", "teachers"),
    "capture": ("cache",),
    "student": ("model", "train", "distill"),
    "evaluate": ("eval",),
    # A training checkpoint, a teacher's or a student's: what its weights mean (the architecture, the tokens).
    "checkpoint": ("model", "tokenizer", "data"),
}


def sections_of(*kinds: str) -> tuple[str, ...]:
    """The sections of several stages, each once, in the order named: ``sections_of("prepare", "student")``."""
    return tuple(dict.fromkeys(section for kind in kinds for section in STAGE_SECTIONS[kind]))


def section_values(config: Config, *sections: str) -> list[Any]:
    """The identity values of ``sections``, in field order: how the capture and student fingerprints hash a
    section (the others hash ``Config.section_hash``)."""
    return [value for name in sections for value in identity(getattr(config, name)).values()]


def recipe(config: Config, kind: str, **inputs: Any) -> dict:
    """``{"train.lr": 0.003, ..., "input.tokens": "ab12..."}``: what a stage of ``kind`` is made from, key by
    key (a training stage records it in its partial folder, so that a change can be named key by key)."""
    flat = {f"{name}.{key}": value for name in STAGE_SECTIONS[kind]
            for key, value in identity(getattr(config, name)).items()}
    return {**flat, **{f"input.{key}": value for key, value in inputs.items()}}
