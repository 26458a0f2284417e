"""Run configuration: one dataclass per stage, loaded from YAML and validated on load.

A config file has a top-level ``run_dir`` and one section per stage (``data``,
``tokenizer``, ``model``, ``train``, ``teachers``, ``cache``, ``distill``, ``eval``, ``sweep``).
Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` with a
one-line message that names the key, e.g. ``train.lr: must be > 0, got -1``.

Any value can be overridden with ``--set section.key=value`` (the value is parsed as YAML,
so ``--set cache.temperatures=[1,2,4]`` works).

This module holds the whole (``Config``: the checks across sections and the paths every stage shares), the
loading and the model names; the sections are in ``pipeline/config_sections.py`` and what a field is (its
checks, and whether it counts in a stage's identity) in ``pipeline/config_fields.py``. Import all of them
from here.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from babydistill.pipeline.config_fields import (
    ADDED_LATER,
    EXECUTION_ONLY,
    ConfigError,
    added_later,
    check,
    coerce,
    earlier_value,
    identity,
)
from babydistill.pipeline.config_sections import (
    UINT16_VOCAB_LIMIT,
    CacheConfig,
    DataConfig,
    DistillConfig,
    EvalConfig,
    ModelConfig,
    SweepConfig,
    TeachersConfig,
    TokenizerConfig,
    TrainConfig,
)
from babydistill.stores.files import json_digest
from babydistill.stores.header import temperature_refusal

__all__ = [
    "ADDED_LATER", "BUNDLED_BLIMP", "BUNDLED_CORPUS", "EXECUTION_ONLY", "PROJECT_ROOT", "SECTIONS",
    "SEQUENCE_CACHE_DEFAULTS", "UINT16_VOCAB_LIMIT", "CacheConfig", "Config", "ConfigError", "DataConfig",
    "DistillConfig", "EvalConfig", "ModelConfig", "SweepConfig", "TeachersConfig", "TokenizerConfig",
    "TrainConfig", "added_later", "apply_overrides", "config_from_dict", "earlier_value", "identity",
    "load_config", "model_name", "parse_model_name", "save_config", "sequence_cache_defaults",
]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_CORPUS = PROJECT_ROOT / "data" / "corpus"
BUNDLED_BLIMP = PROJECT_ROOT / "data" / "blimp.zip"


# --- the whole config -------------------------------------------------------------------

SEQUENCE_CACHE_DEFAULTS = {"k": 32, "samples": 64}
"""``cache.k`` and ``cache.samples`` of a config file that sets ``distill.normalization: sequence`` and leaves them
out. That normalisation weighs the KL seq_len times the CE, so the student learns from the targets almost alone
and the tail draws' noise costs. At the CPU study's scale (docs/results/offline-study/), behind online students:
the token default (8 ids + 12 draws, 60 bytes per token) 0.014 nats of test CE; 8 + 48 (149 bytes) 0.010;
32 + 64 (253 bytes) 0.004 [-0.007, +0.016], as the dense store (10.9 kB) 0.004 [-0.003, +0.012]. The pick, on
validation: the smallest store measured within 0.01 of online there (8 + 48: 0.011; 32 + 64: 0.007)."""


def sequence_cache_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` (a config mapping) with ``SEQUENCE_CACHE_DEFAULTS`` for the cache keys it leaves out, if its
    distill section sets sequence normalisation; otherwise ``raw`` itself."""
    distill, cache = raw.get("distill"), raw.get("cache")
    if not (isinstance(distill, dict) and distill.get("normalization") == "sequence"):
        return raw
    if cache is not None and not isinstance(cache, dict):
        return raw  # not a mapping: building the section names the problem
    return {**raw, "cache": {**SEQUENCE_CACHE_DEFAULTS, **(cache or {})}}


def _in_run(relative: str) -> property:
    """A path inside the run directory: ``RUN_DIR/relative``."""
    return property(lambda config: config.run_path / relative, doc=f"RUN_DIR/{relative}")


@dataclass
class Config:
    run_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self):
        mpe = self.model.max_position_embeddings
        check(mpe is None or mpe >= self.data.seq_len, "model.max_position_embeddings",
              f"must be >= data.seq_len ({self.data.seq_len}), got {mpe}")
        vocab, cache = self.tokenizer.vocab_size, self.cache
        if cache.mode in ("topk", "hybrid"):
            limit = vocab - 1 if cache.mode == "hybrid" else vocab  # hybrid needs a tail to sample from
            check(cache.k <= limit, "cache.k",
                  f"must be in 1..{limit} for mode {cache.mode} at vocab {vocab}, got {cache.k}")
        if cache.mode in ("sample", "hybrid"):
            check(cache.samples <= vocab, "cache.samples",
                  f"must be in 1..{vocab} (the vocab size), got {cache.samples}")
        refusal = temperature_refusal(cache.mode, self.distill.temperature, cache.temperatures, cache.tail_logp,
                                      approximate=not self.distill.use_exact_c_T)
        check(refusal is None, "distill.temperature", f"cannot be served by cache.mode {cache.mode}: {refusal}")

    # --- derived paths (one place, so every stage agrees) ---
    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)

    @property
    def corpus_path(self) -> Path:
        return Path(self.data.corpus) if self.data.corpus else BUNDLED_CORPUS

    # Where each stage's output lies in the run directory (one place, so every stage agrees).
    data_path = _in_run("data")
    tokenizer_path = _in_run("tokenizer")
    tokens_path = _in_run("tokens.zarr")
    logits_path = _in_run("logits.zarr")
    report_path = _in_run("report")

    def teacher_path(self, name: str) -> Path:
        return self.run_path / "teachers" / name

    def student_path(self, name: str) -> Path:
        return self.run_path / "students" / name

    def sweep_path(self, name: str) -> Path:
        return self.run_path / "sweeps" / name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """Stable hash of the identity fields of some sections (see ``identity``), for fingerprints.

        Execution-only fields are left out, so changing them does not make a finished stage stale. A
        section with no identity field adds nothing (``teachers`` today), so naming it costs nothing
        until it has one.
        """
        payload = {}
        for name in sections:
            value = getattr(self, name)
            if dataclasses.is_dataclass(value):
                value = identity(value)
                if not value:
                    continue
            payload[name] = value
        return json_digest(payload)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


# --- model names ------------------------------------------------------------------------

MODEL_PREFIXES = {"teacher": "t", "student": "s", "online": "o"}


def model_name(kind: str, seed: int) -> str:
    """The default folder name of a model: ``t<seed>`` (teacher), ``s<seed>`` (offline student) or
    ``o<seed>`` (online student)."""
    return f"{MODEL_PREFIXES[kind]}{seed}"


def parse_model_name(name: str) -> tuple[str, int] | None:
    """(kind, seed) of a default model name (``"o3"`` -> ``("online", 3)``); None for a name of the user's own."""
    for kind, prefix in MODEL_PREFIXES.items():
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return kind, int(name[len(prefix):])
    return None


# --- loading ----------------------------------------------------------------------------


def _build_section(cls: type, values: Any, section: str):
    check(isinstance(values, dict), section, f"must be a mapping of keys to values, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"{section}.{key}: unknown key (known keys: {', '.join(sorted(known))})")
    kwargs = {key: coerce(value, hints[key], f"{section}.{key}") for key, value in values.items()}
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any]) -> Config:
    check(isinstance(raw, dict), "config", "must be a YAML mapping")
    for key in raw:
        if key not in SECTIONS:
            raise ConfigError(f"{key}: unknown key (known top-level keys: {', '.join(SECTIONS)})")
    hints = typing.get_type_hints(Config)
    kwargs: dict[str, Any] = {}
    for name, value in sequence_cache_defaults(raw).items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build_section(annotation, value if value is not None else {}, name)
        else:
            kwargs[name] = coerce(value, annotation, name)
    return Config(**kwargs)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a raw config mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected section.key=value")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item}: the value is not valid YAML ({exc.problem})") from None
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            check(isinstance(node, dict), dotted, "is not a section")
        node[parts[-1]] = value
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load and validate a YAML config; ``run_dir`` defaults to ``runs/<config name>``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a YAML mapping of sections")
    raw.setdefault("run_dir", f"runs/{path.stem}")
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw)


def save_config(config: Config, path: Path) -> None:
    path.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
