"""`babydistill study STUDY.yaml`: a controlled comparison of student "arms" trained from the same teachers.

A study file names a base config, whose run holds the shared stages (data, tokenizer, tokens, the
teachers), the student seeds (the same for every arm, so that arms are compared seed by seed), a
reference arm and the arms themselves: online distillation, or offline from a logit store captured
with other cache settings. Each arm is a run of its own, ``<base run_dir>/study/<arm>/``, whose
``data``, ``tokenizer``, ``tokens.zarr`` and ``teachers`` are relative symlinks to the base run's.
Every arm therefore sees the same inputs (with the same fingerprints), and only what its ``set``
changes differs. All the work goes through the ordinary stages (workflows.runner), so finished
work is skipped and an interrupted study resumes.

The teachers are evaluated with the study's evaluation settings in
``<base run_dir>/study/teachers/NAME/``, a folder of symlinks to the teacher's files. The base run's
own ``eval.json`` may have been made with other settings and is left alone.

Report (``report.md``, ``results.json``, ``test_ce_vs_bytes.png``): for each arm, the mean ± std
over seeds of validation and test CE, the paired difference to the reference arm with a 95%
t-interval, BLiMP, the store's bytes per token, the capture time and the student step time.

This module reads and checks the study file; study_execute runs it, study_results collects the numbers,
study_report writes the report.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from babydistill.pipeline.config import Config, load_config, model_name
from babydistill.pipeline.stages import sections_of

# The shared stages run from the base config alone, so `train` (which arms vary for their students) is not theirs.
SHARED_SECTIONS = tuple(s for s in sections_of("prepare", "tokenizer", "tokenize", "teacher") if s != "train")
"""Sections that the shared stages (the base run) fix: neither the study nor an arm may change them."""
ARM_FIXED = (*SHARED_SECTIONS, "eval", "run_dir")
"""An arm also keeps the evaluation (every arm is scored the same way) and its run_dir (the study sets it)."""
SHARED_LINKS = ("data", "tokenizer", "tokens.zarr", "teachers")
STUDY_KEYS = ("base", "seeds", "reference", "set", "arms", "contrasts")
ARM_KEYS = ("name", "online", "set")
RESERVED_NAMES = ("report", "teachers", "logs")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class StudyError(ValueError):
    """The study file or the command asks for something that cannot be done."""


@dataclass
class Arm:
    name: str
    online: bool
    """Distil online (teachers every step, no store); otherwise offline from the arm's own store."""
    set: list[str]
    """The arm's overrides, applied after the study-wide ones."""
    config: Config
    """The base config with the study-wide and the arm's overrides, run_dir = ``<base run_dir>/study/<name>``."""

    @property
    def run_path(self) -> Path:
        return self.config.run_path

    def student_name(self, seed: int) -> str:
        return model_name("online" if self.online else "student", seed)

    def student_path(self, seed: int) -> Path:
        return self.config.student_path(self.student_name(seed))


@dataclass
class Study:
    path: Path
    base_path: Path
    base: Config
    """The base config as it is: the shared stages run with it."""
    shared: Config
    """The base config with the study-wide ``set``: the teachers are evaluated with it."""
    seeds: list[int]
    reference: str
    set: list[str]
    arms: list[Arm]
    warnings: list[str]
    contrasts: list[tuple[str, str]]
    """Pairs of arms compared seed by seed besides the reference: each isolates one factor."""

    @property
    def root(self) -> Path:
        return self.base.run_path / "study"

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    def teacher_view(self, name: str) -> Path:
        return self.root / "teachers" / name

    def overrides(self, arm: Arm | None) -> list[str]:
        """What ``--set`` must say to load ``arm``'s config (or the teachers' evaluation config) from the base."""
        if arm is None:
            return list(self.set)
        return [*self.set, *arm.set, f"run_dir={json.dumps(str(arm.run_path))}"]  # JSON strings are YAML


def _section(item: str) -> str:
    return item.split("=", 1)[0].strip().split(".")[0]


def _arm_names(arms_raw, fail, set_list) -> list[str]:
    """Check the study file's arms (keys, names, what their set may change); their names, in order."""
    if not isinstance(arms_raw, list) or not arms_raw:
        fail("arms", "must be a non-empty list of arms, each with a name and optionally online: true and a set list")
    names: list[str] = []
    for i, arm in enumerate(arms_raw):
        key = f"arms[{i}]"
        if not isinstance(arm, dict):
            fail(key, f"must be a mapping with the keys {', '.join(ARM_KEYS)}, got {arm!r}")
        for k in arm:
            if k not in ARM_KEYS:
                fail(f"{key}.{k}", f"unknown key (known keys: {', '.join(ARM_KEYS)})")
        name = arm.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name in RESERVED_NAMES:
            fail(f"{key}.name", f"must be a folder name (letters, digits, . _ -) other than "
                                f"{', '.join(RESERVED_NAMES)}, got {name!r}")
        if name in names:
            fail(f"{key}.name", f"duplicate arm name {name!r}: every arm needs its own name (and folder)")
        names.append(name)
        if not isinstance(arm.get("online", False), bool):
            fail(f"{key}.online", f"must be true or false, got {arm['online']!r}")
        for item in set_list(arm.get("set"), f"{key}.set"):
            if _section(item) in ARM_FIXED:
                fail(f"{key}.set", f"{item!r} changes `{_section(item)}`, which every arm must share (the comparison "
                                   "holds the data, tokenizer, model, teachers and evaluation fixed); change it in "
                                   "the base config, or for eval in the study-wide set")
    return names


def _load_arm_configs(path: Path, base_path: Path, study_set: list[str], arms_raw: list[dict]):
    """(base config, base config with the study-wide set, the arms): load_config names any unknown key or bad value."""
    try:
        base = load_config(base_path)
    except ValueError as exc:
        raise StudyError(f"{path}: base: {exc}") from None
    try:
        shared = load_config(base_path, study_set)
    except ValueError as exc:
        raise StudyError(f"{path}: set: {exc}") from None
    arms = []
    for i, arm in enumerate(arms_raw):
        arm_set = list(arm.get("set") or [])
        run_dir = base.run_path / "study" / arm["name"]
        try:
            config = load_config(base_path, [*study_set, *arm_set, f"run_dir={json.dumps(str(run_dir))}"])
        except ValueError as exc:
            raise StudyError(f"{path}: arms[{i}] ({arm['name']}): {exc}") from None
        arms.append(Arm(arm["name"], bool(arm.get("online", False)), arm_set, config))
    return base, shared, arms


def _seeds(seeds, fail) -> list[int]:
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        fail("seeds", f"must be a list of integer student seeds (the same for every arm), got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        fail("seeds", f"repeats a seed: {seeds}")
    if len(seeds) < 2:
        fail("seeds", f"a paired comparison needs at least 2 seeds (3 or more for a useful interval), got {seeds}")
    return list(seeds)


def _contrasts(contrasts, names: list[str], fail) -> list[tuple[str, str]]:
    if not isinstance(contrasts, list) or not all(isinstance(c, list) and len(c) == 2 for c in contrasts):
        fail("contrasts", f"must be a list of [arm, arm] pairs, got {contrasts!r}")
    for pair in contrasts:
        for name in pair:
            if name not in names:
                fail("contrasts", f"{name!r} is not an arm ({', '.join(names)})")
    return [tuple(c) for c in contrasts]


def load_study(path: str | Path) -> Study:
    """Read and check a study file and every arm's config; writes nothing. Raises StudyError (one line)."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"{path}: study file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise StudyError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: must be a YAML mapping with the keys {', '.join(STUDY_KEYS)}")

    def fail(key: str, message: str):
        raise StudyError(f"{path}: {key}: {message}")

    def set_list(value, key: str) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            fail(key, f'must be a list of "section.key=value" strings, got {value!r}')
        return list(value)

    for key in raw:
        if key not in STUDY_KEYS:
            fail(key, f"unknown key (known keys: {', '.join(STUDY_KEYS)})")
    if not isinstance(raw.get("base"), str):
        fail("base", "missing: the babydistill config every arm starts from (a path relative to the study file)")
    base_path = path.parent / raw["base"]

    seeds = _seeds(raw.get("seeds"), fail)

    study_set = set_list(raw.get("set"), "set")
    for item in study_set:
        if _section(item) in (*SHARED_SECTIONS, "run_dir"):
            fail("set", f"{item!r} changes `{_section(item)}`, which the base run's shared stages fix "
                        f"(data, tokenizer, model, teachers); change it in the base config {base_path}")

    arms_raw = raw.get("arms")
    names = _arm_names(arms_raw, fail, set_list)

    reference = raw.get("reference")
    if reference not in names:
        fail("reference", f"must name one of the arms ({', '.join(names)}): the arm every other arm is compared "
                          f"with, got {reference!r}")

    contrasts = _contrasts(raw.get("contrasts") or [], names, fail)

    base, shared, arms = _load_arm_configs(path, base_path, study_set, arms_raw)

    warnings = []
    if len(seeds) < 3:
        warnings.append(f"{path}: seeds: only {len(seeds)} seeds; the 95% t-interval uses t = 12.7 at n = 2 "
                        "and is very wide: use 3 or more")
    return Study(path, base_path, base, shared, seeds, reference, study_set, arms, warnings, contrasts)


def select(study: Study, arms: list[str] | None, seeds: list[int] | None) -> tuple[list[Arm], list[int]]:
    """The arms and seeds of ``--arms`` / ``--seeds`` (default: all), in the study file's order."""
    names = [a.name for a in study.arms]
    for name in arms or []:
        if name not in names:
            raise StudyError(f"--arms: no arm named {name!r} in {study.path} (arms: {', '.join(names)})")
    for seed in seeds or []:
        if seed not in study.seeds:
            raise StudyError(f"--seeds: {seed} is not one of the study's seeds {study.seeds}")
    return ([a for a in study.arms if arms is None or a.name in arms],
            [s for s in study.seeds if seeds is None or s in seeds])
