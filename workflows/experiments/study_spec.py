"""`babydistill study STUDY.yaml`: a controlled comparison of student "arms" trained from the same teachers.

A study file names a base config, whose run holds the shared stages (data, tokenizer, tokens, the
teachers), the student seeds (the same for every arm, so that arms are compared seed by seed), a
reference arm and the arms themselves: online distillation, or offline from a logit store captured
with other cache settings. Each arm is a run of its own, ``<base run_dir>/study/<arm>/`` (``study`` unless the study file names another ``folder:``), whose
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

import dataclasses
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
STUDY_KEYS = ("base", "seeds", "reference", "set", "arms", "contrasts", "protocol", "margin", "primary", "secondary",
              "control", "folder")
ARM_KEYS = ("name", "online", "set", "seeds", "teachers", "capture")
CAPTURES = ("shared", "per_seed")
RESERVED_NAMES = ("report", "teachers", "logs")
RUN_FOLDERS = ("data", "tokenizer", "tokens.zarr", "teachers", "students", "logits.zarr", "logs", "report", "sweeps")
"""What a base run holds already: a study's ``folder`` must be none of them."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class StudyError(ValueError):
    """The study file or the command asks for something that cannot be done."""


@dataclass
class Arm:
    name: str
    online: bool
    """Distil online (teachers every step, no store); otherwise offline from the arm's own store(s)."""
    set: list[str]
    """The arm's overrides, applied after the study-wide ones."""
    config: Config
    """The base config with the study-wide and the arm's overrides (its teachers as ``teachers.seeds``),
    run_dir = ``<base run_dir>/study/<name>``."""
    overrides: list[str]
    """What ``--set`` must say to load ``config`` from the base config."""
    seeds: list[int]
    """The arm's student seeds (the study's ``seeds`` unless the arm lists its own)."""
    capture: str = "shared"
    _seed_configs: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    """shared: one store for every seed; per_seed: seed s reads its own store, captured with ``cache.seed`` = s
    in ``<arm>/seed<s>/`` (so the draws' randomness is inside the seed-to-seed variation)."""

    @property
    def run_path(self) -> Path:
        return self.config.run_path

    @property
    def ce_only(self) -> bool:
        """A CE-only control (``distill.alpha`` = 1): no store, no teacher."""
        return self.config.distill.ce_only

    @property
    def needs_store(self) -> bool:
        return not self.online and not self.ce_only

    @property
    def teacher_names(self) -> list[str]:
        return [] if self.ce_only else [model_name("teacher", s) for s in self.config.teachers.resolved_seeds()]

    def seed_overrides(self, seed: int) -> list[str]:
        if self.capture != "per_seed":
            return list(self.overrides)
        run_dir = self.run_path / f"seed{seed}"
        return [*self.overrides, f"cache.seed={seed}", f"run_dir={json.dumps(str(run_dir))}"]

    def seed_config(self, seed: int) -> Config:
        """The config of the arm's student ``seed`` (its own run dir and ``cache.seed`` under per_seed)."""
        if self.capture != "per_seed":
            return self.config
        if seed not in self._seed_configs:
            self._seed_configs[seed] = dataclasses.replace(
                self.config, run_dir=str(self.run_path / f"seed{seed}"),
                cache=dataclasses.replace(self.config.cache, seed=seed))
        return self._seed_configs[seed]

    def store_configs(self) -> list[Config]:
        """The configs whose capture stage makes the arm's stores (none for online and CE-only arms)."""
        if not self.needs_store:
            return []
        return [self.seed_config(s) for s in self.seeds] if self.capture == "per_seed" else [self.config]

    def student_name(self, seed: int) -> str:
        return model_name("online" if self.online else "student", seed)

    def student_path(self, seed: int) -> Path:
        return self.seed_config(seed).student_path(self.student_name(seed))


@dataclass
class Study:
    path: Path
    base_path: Path
    base: Config
    """The base config as it is: the shared stages run with it."""
    shared: Config
    """The base config with the study-wide ``set``: the teachers are evaluated with it."""
    seeds: list[int]
    """The study's default student seeds (an arm may list its own)."""
    reference: str
    set: list[str]
    arms: list[Arm]
    warnings: list[str]
    contrasts: list[tuple[str, str]]
    """Pairs of arms compared seed by seed besides the reference: each isolates one factor."""
    protocol: Path | None = None
    """The pre-registered protocol (``protocol:``, relative to the study file): its sha256 is recorded with
    every result, and the report gives no verdict unless the file is there with the recorded hash."""
    margin: float = 0.01
    """The equivalence margin of the primary comparisons (nats of validation CE)."""
    primary: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    """[offline, online] pairs tested for equivalence (TOST at ``margin``, or the pair's own) on validation CE."""
    primary_margins: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)
    """The primary pairs that name their own margin (``[arm, arm, margin]``); the others use ``margin``."""
    secondary: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    """Pairs reported with their 90% and 95% intervals, without a verdict (direction only)."""
    control: str | None = None
    """A CE-only arm every student arm is compared with (95% intervals)."""
    folder: str = "study"
    """The study's folder in the base run (``folder:``): studies that share a base run (and so its teachers) keep
    their arms, records and report apart by naming different folders."""

    @property
    def root(self) -> Path:
        return self.base.run_path / self.folder

    def primary_margin(self, first: str, second: str) -> float:
        """The margin the primary comparison ``first − second`` is judged at: its own, else the study's."""
        return self.primary_margins.get((first, second), self.margin)

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    def teacher_view(self, name: str) -> Path:
        return self.root / "teachers" / name

    @property
    def all_seeds(self) -> list[int]:
        """Every student seed of any arm, in order."""
        return sorted({*self.seeds, *(s for a in self.arms for s in a.seeds)})

    @property
    def teacher_seeds(self) -> list[int]:
        """The base config's teachers, then every other teacher an arm names: the base run trains them all."""
        return self.teacher_seeds_of(self.arms)

    def teacher_seeds_of(self, arms: list[Arm]) -> list[int]:
        """The base config's teachers, then every other teacher one of ``arms`` names (``--arms`` trains no more)."""
        seeds = list(self.base.teachers.resolved_seeds())
        for arm in arms:
            seeds += [] if arm.ce_only else [s for s in arm.config.teachers.resolved_seeds() if s not in seeds]
        return seeds

    @property
    def teacher_pairs(self) -> list[tuple[str, ...]]:
        """The distinct teacher ensembles the arms distil from (each is evaluated as an ensemble)."""
        return self.teacher_pairs_of(self.arms)

    def teacher_pairs_of(self, arms: list[Arm]) -> list[tuple[str, ...]]:
        """The distinct teacher ensembles ``arms`` distil from (the base config's when none does)."""
        pairs = [tuple(a.teacher_names) for a in arms if not a.ce_only]
        return list(dict.fromkeys(pairs or [tuple(model_name("teacher", s) for s in self.base.teachers.resolved_seeds())]))

    def overrides(self, arm: Arm | None, seed: int | None = None) -> list[str]:
        """What ``--set`` must say to load ``arm``'s config for ``seed`` (or the teachers' evaluation config)."""
        if arm is None:
            return list(self.set)
        return arm.overrides if seed is None else arm.seed_overrides(seed)


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
        if "seeds" in arm:
            _seeds(arm["seeds"], fail, f"{key}.seeds")
        teachers = arm.get("teachers")
        if teachers is not None and (not isinstance(teachers, list) or not teachers or len(set(teachers)) != len(teachers)
                                     or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 1
                                                for t in teachers)):
            fail(f"{key}.teachers", f"must be a list of distinct teacher seeds >= 1 (e.g. [3, 4]), got {teachers!r}")
        if arm.get("capture", "shared") not in CAPTURES:
            fail(f"{key}.capture", f"must be one of {', '.join(CAPTURES)}, got {arm['capture']!r}")
        for item in set_list(arm.get("set"), f"{key}.set"):
            if _section(item) in ARM_FIXED:
                fail(f"{key}.set", f"{item!r} changes `{_section(item)}`, which every arm must share (the comparison "
                                   "holds the data, tokenizer, model, teachers and evaluation fixed); change it in "
                                   "the base config, or for eval in the study-wide set")
    return names


def _arm_overrides(base: Config, folder: str, study_set: list[str], arm: dict) -> list[str]:
    """The --set list that loads an arm's config from the base: the study's set, the arm's, its teachers, run_dir."""
    run_dir = base.run_path / folder / arm["name"]
    teachers = arm.get("teachers")
    pair = [f"teachers.count={len(teachers)}", f"teachers.seeds={json.dumps(teachers)}"] if teachers else []
    return [*study_set, *(arm.get("set") or []), *pair, f"run_dir={json.dumps(str(run_dir))}"]  # JSON is YAML


def _load_arm_configs(path: Path, base_path: Path, folder: str, study_set: list[str], arms_raw: list[dict],
                      seeds: list[int]):
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
        overrides = _arm_overrides(base, folder, study_set, arm)
        try:
            config = load_config(base_path, overrides)
        except ValueError as exc:
            raise StudyError(f"{path}: arms[{i}] ({arm['name']}): {exc}") from None
        made = Arm(arm["name"], bool(arm.get("online", False)), list(arm.get("set") or []), config, overrides,
                   list(arm.get("seeds") or seeds), arm.get("capture", "shared"))
        if made.ce_only and (made.online or made.capture == "per_seed"):
            raise StudyError(f"{path}: arms[{i}] ({made.name}): distill.alpha = 1 makes a CE-only control, which "
                             "distils nothing: it takes neither online: true nor capture: per_seed")
        if made.online and made.capture == "per_seed":
            raise StudyError(f"{path}: arms[{i}].capture: per_seed is for offline arms (an online arm has no store)")
        arms.append(made)
    return base, shared, arms


def _folder(folder, fail) -> str:
    if not isinstance(folder, str) or not _NAME.fullmatch(folder) or folder in RUN_FOLDERS:
        fail("folder", f"must be a folder name (letters, digits, . _ -) other than the base run's own "
                       f"({', '.join(RUN_FOLDERS)}), got {folder!r}")
    return folder


def _seeds(seeds, fail, key: str = "seeds") -> list[int]:
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        fail(key, f"must be a list of integer student seeds, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        fail(key, f"repeats a seed: {seeds}")
    if len(seeds) < 2:
        fail(key, f"a paired comparison needs at least 2 seeds (3 or more for a useful interval), got {seeds}")
    return list(seeds)


def _contrasts(contrasts, names: list[str], fail, key: str = "contrasts") -> list[tuple[str, str]]:
    if not isinstance(contrasts, list) or not all(isinstance(c, list) and len(c) == 2 for c in contrasts):
        fail(key, f"must be a list of [arm, arm] pairs, got {contrasts!r}")
    for pair in contrasts:
        for name in pair:
            if name not in names:
                fail(key, f"{name!r} is not an arm ({', '.join(names)})")
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

    folder = _folder(raw.get("folder", "study"), fail)
    base, shared, arms = _load_arm_configs(path, base_path, folder, study_set, arms_raw, seeds)
    claim = _claim_keys(raw, path, names, [a for a in arms if a.ce_only], fail)

    warnings = []
    fewest = min(len(a.seeds) for a in arms)
    if fewest < 3:
        warnings.append(f"{path}: seeds: only {fewest} seeds; the 95% t-interval uses t = 12.7 at n = 2 "
                        "and is very wide: use 3 or more")
    return Study(path, base_path, base, shared, seeds, reference, study_set, arms, warnings, contrasts, **claim,
                 folder=folder)


def _claim_keys(raw: dict, path: Path, names: list[str], ce_only: list[Arm], fail) -> dict:
    """protocol, margin, primary, secondary and control: the pre-registered comparisons of a claim study."""
    protocol = raw.get("protocol")
    if protocol is not None and not isinstance(protocol, str):
        fail("protocol", f"must be the path of the protocol file (relative to the study file), got {protocol!r}")
    margin = raw.get("margin", 0.01)
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not margin > 0:
        fail("margin", f"must be a number > 0 (nats of validation CE), got {margin!r}")
    control = raw.get("control")
    if control is not None and control not in [a.name for a in ce_only]:
        fail("control", f"must name a CE-only arm (one whose set has distill.alpha=1), got {control!r}")
    primary, primary_margins = _primary(raw.get("primary") or [], names, fail)
    if primary and protocol is None:
        fail("primary", "a study with primary comparisons needs `protocol:`, the file that pre-registers them")
    return {"protocol": None if protocol is None else path.parent / protocol, "margin": float(margin),
            "primary": primary, "primary_margins": primary_margins,
            "secondary": _contrasts(raw.get("secondary") or [], names, fail, "secondary"), "control": control}


def _primary(entries, names: list[str], fail) -> tuple[list[tuple[str, str]], dict[tuple[str, str], float]]:
    """``primary``: [arm, arm] pairs, each optionally with its own margin as a third item, e.g. [u8, f16, 0.005]
    (a study that tests a format change at ±0.005 and a parity with online at ±0.01 in one set of runs)."""
    if not isinstance(entries, list) or not all(isinstance(e, list) and len(e) in (2, 3) for e in entries):
        fail("primary", f"must be a list of [arm, arm] or [arm, arm, margin] items, got {entries!r}")
    margins = {}
    pairs = [tuple(e[:2]) for e in entries]
    if len(set(pairs)) < len(pairs):
        fail("primary", "lists a pair of arms twice: each comparison once, with at most one margin")
    for entry in entries:
        if len(entry) == 3:
            margin = entry[2]
            if isinstance(margin, bool) or not isinstance(margin, int | float) or not margin > 0:
                fail("primary", f"the margin of {entry[:2]} must be a number > 0 (nats of validation CE), got {margin!r}")
            margins[(entry[0], entry[1])] = float(margin)
    return _contrasts([e[:2] for e in entries], names, fail, "primary"), margins


def select(study: Study, arms: list[str] | None, seeds: list[int] | None) -> tuple[list[Arm], list[int]]:
    """The arms and seeds of ``--arms`` / ``--seeds`` (default: all), in the study file's order."""
    names = [a.name for a in study.arms]
    for name in arms or []:
        if name not in names:
            raise StudyError(f"--arms: no arm named {name!r} in {study.path} (arms: {', '.join(names)})")
    for seed in seeds or []:
        if seed not in study.all_seeds:
            raise StudyError(f"--seeds: {seed} is not one of the study's seeds {study.all_seeds}")
    return ([a for a in study.arms if arms is None or a.name in arms],
            [s for s in study.all_seeds if seeds is None or s in seeds])
