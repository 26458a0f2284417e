"""The Optuna side of `babydistill sweep`: the search space, the signature a study is continued under, the RDB
storage with heartbeats, the sampler and pruner, and the study's trial counts.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from babydistill.pipeline.config import Config, ConfigError, SweepConfig, config_from_dict, identity
from babydistill.pipeline.stages import sections_of
from babydistill.stores.files import json_digest

COUNTED = ("COMPLETE", "PRUNED")
"""Trial states that count towards ``trials``."""
STUDY_FILE = "study.db"


class SweepError(ValueError):
    """The sweep cannot run as asked (no store, a storage Optuna cannot open, a changed study, ...)."""


def with_values(config: Config, values: dict) -> Config:
    """``config`` with ``section.key: value`` applied, validated like a loaded config."""
    raw = config.to_dict()
    for key, value in values.items():
        section, name = key.split(".", 1)
        raw[section][name] = value
    return config_from_dict(raw)


def check_space(config: Config) -> None:
    """Every end of every range and every choice must give a valid run config (e.g. a temperature other
    than 1 with a sampled store is refused here, naming the key, rather than in trial 7)."""
    for key, spec in config.sweep.space.items():
        values = spec["choices"] if "choices" in spec else [spec["low"], spec["high"]]
        for value in values:
            try:
                with_values(config, {key: value})
            except ConfigError as exc:
                raise ConfigError(f"sweep.space.{key}: {value!r} gives an invalid run config ({exc})") from None


def suggest(trial, space: dict[str, dict]) -> dict:
    """The trial's parameters, drawn by Optuna's sampler from ``space`` (names are the config keys)."""
    params = {}
    for key, spec in space.items():
        if "choices" in spec:
            params[key] = trial.suggest_categorical(key, spec["choices"])
        elif isinstance(spec["low"], int):
            params[key] = trial.suggest_int(key, spec["low"], spec["high"], step=spec.get("step", 1), log=spec["log"])
        else:
            params[key] = trial.suggest_float(key, spec["low"], spec["high"], step=spec.get("step"), log=spec["log"])
    return params


def config_point(config: Config) -> dict | None:
    """The config's own values of the space's keys, or None when one of them lies outside the space."""
    point = {}
    for key, spec in config.sweep.space.items():
        section, name = key.split(".", 1)
        value = getattr(getattr(config, section), name)
        inside = value in spec["choices"] if "choices" in spec else spec["low"] <= value <= spec["high"]
        if not inside:
            return None
        point[key] = value
    return point


# What a student is made from (data, tokenizer, model, train, distill): their identity fields, from the stage map.
SIGNED_SECTIONS = sections_of("prepare", "tokenizer", "student")


def signature(config: Config, store_attrs: dict) -> dict:
    """What makes trials comparable: a study made with another signature cannot be continued."""
    varied = {section: identity(getattr(config, section)) for section in SIGNED_SECTIONS}
    return {"space": config.sweep.space, "objective": config.sweep.objective, "student_seed": config.sweep.student_seed,
            "config": json_digest(varied), "store": json_digest(store_attrs)}


def default_storage_url(sweep_dir: Path) -> str:
    return f"sqlite:///{(sweep_dir / STUDY_FILE).resolve()}"


def open_storage(url: str, heartbeat_seconds: int):
    """An Optuna RDB storage with heartbeats; a stale trial is retried once, inheriting its reported values."""
    import optuna

    engine_kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else None  # writers queue, not fail
    try:
        with warnings.catch_warnings():  # heartbeats and the retry callback are marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_seconds,
                grace_period=3 * heartbeat_seconds,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=1, inherit_intermediate_values=True))
    except Exception as exc:  # the URL's scheme, driver, host or file: Optuna/SQLAlchemy raise many kinds
        why = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise SweepError(f"--storage {url}: Optuna cannot open it ({why}); give an RDB URL such as "
                         f"sqlite:////abs/path/study.db or postgresql://user:pass@host/db") from None


def make_sampler(cfg: SweepConfig, offset: int = 0):
    """``offset`` shifts the seed: a resumed sweep or a second worker must not redraw the same random trials."""
    import optuna

    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed + offset)
    return optuna.samplers.TPESampler(seed=cfg.seed + offset, n_startup_trials=cfg.startup_trials)


def make_pruner(cfg: SweepConfig, eval_every: int):
    import optuna

    min_steps = cfg.min_steps or eval_every
    if cfg.pruner == "hyperband":  # max_resource "auto": the first completed trial's last step
        return optuna.pruners.HyperbandPruner(min_resource=min_steps, reduction_factor=cfg.reduction_factor)
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials // 2 or 1, n_warmup_steps=min_steps)
    return optuna.pruners.NopPruner()


def load_study(config: Config, name: str, storage, *, create: bool):
    import optuna

    cfg = config.sweep
    kwargs = dict(study_name=name, storage=storage, sampler=make_sampler(cfg),
                  pruner=make_pruner(cfg, config.train.eval_every or 1))
    if create:
        return optuna.create_study(direction="minimize", load_if_exists=True, **kwargs)
    return optuna.load_study(**kwargs)


def state_counts(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def num_counted(study) -> int:
    counts = state_counts(study)
    return sum(counts.get(s, 0) for s in COUNTED)
