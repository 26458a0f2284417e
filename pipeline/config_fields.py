"""What a config field is: the error a bad value raises, the check of a value against its field's type,
and the field metadata that decides which fields make a stage's identity.

A stage's fingerprint (workflows/runner.py), a logit store's identity (pipeline/capture.py) and a
training checkpoint's fingerprint (pipeline/training/loop.py) are built from the sections a stage reads,
field by field. Every field counts, except the few marked with this metadata, so a new field
cannot be left out of a fingerprint by accident: leaving one out is a decision, written here.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from typing import Any, Literal


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""


def check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


# --- which fields make a stage's identity -------------------------------------------------

EXECUTION_ONLY = {"execution_only": True}
"""Field metadata: the field changes how a stage runs (threads, batch of a forward pass, logging and
checkpoint cadence) or which stages a run has (how many students), not what one stage computes."""


ADDED_LATER = {"left_out_at_default": True}
"""Field metadata: a key added after runs were made; left out of fingerprints while at its default, so
that adding it does not make every finished stage stale."""


def added_later(earlier_value: Any) -> dict:
    """Field metadata: a key added after runs were made, whose default is not what those runs did
    (``earlier_value``); left out of fingerprints while it has that earlier value, so that finished
    stages stay done when it does, and go stale when the new default changes what they compute."""
    return {"left_out_at": earlier_value}


def earlier_value(f: dataclasses.Field) -> Any:
    """What a key added later (``ADDED_LATER``, ``added_later``) meant before it existed: it is left out of
    fingerprints at this value, so an identity without it has it. ``dataclasses.MISSING`` for other keys."""
    if "left_out_at" in f.metadata:
        return f.metadata["left_out_at"]
    if f.metadata.get("left_out_at_default"):
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return dataclasses.MISSING


def identity(section: Any) -> dict[str, Any]:
    """The fields of a config section that fix what its stages compute, in declaration order."""
    return {f.name: copy.deepcopy(getattr(section, f.name)) for f in dataclasses.fields(section)
            if not f.metadata.get("execution_only")
            and not ((earlier := earlier_value(f)) is not dataclasses.MISSING and getattr(section, f.name) == earlier)}


# --- a value against its field's type -------------------------------------------------------


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return coerce(value, non_none[0], key)
    if origin is Literal:
        check(value in args, key, f"must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is dict:
        check(isinstance(value, dict), key, f"must be a mapping, got {value!r}")
        if args[1] is dict:  # sweep.space: its entries are checked by the section itself
            return dict(value)
        return {str(k): coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        check(isinstance(value, list), key, f"must be a list, got {value!r}")
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        check(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"must be a number, got {value!r}")
        return float(value)
    if annotation is int:
        check(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}")
        return value
    if annotation is bool:
        check(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if annotation is str:
        check(isinstance(value, (str, int, float)) and not isinstance(value, bool), key,
              f"must be a string, got {value!r}")
        return str(value)
    raise AssertionError(f"unsupported annotation {annotation} for {key}")
