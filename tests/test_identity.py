"""Stage identity comes from one declaration: every config field is in a fingerprint unless marked execution-only."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

from babydistill.pipeline.capture import store_identity
from babydistill.pipeline.config import EXECUTION_ONLY, SECTIONS, Config, identity, load_config
from babydistill.workflows.markers import MARKER, write_marker
from babydistill.workflows.runner import model_dirs, pipeline_stages


def finished_run(config: Config) -> Config:
    """Mark every stage output of ``config`` finished, so that every stage has a fingerprint."""
    outputs = [config.data_path, config.tokenizer_path, config.tokens_path, config.logits_path, *model_dirs(config)]
    for out in outputs:
        write_marker(out / MARKER, {"fingerprint": f"made-{out.name}"})
    for model_dir in model_dirs(config):
        write_marker(model_dir / "eval.json.stage.json", {"fingerprint": f"eval-{model_dir.name}"})
    return config


def fingerprints(config: Config) -> dict[str, str]:
    stages = [thunk() for thunk in pipeline_stages(config)]
    assert all(stage.fingerprint for stage in stages), [s.name for s in stages if not s.fingerprint]
    return {stage.name: stage.fingerprint for stage in stages}


def with_new_field(config: Config, section: str, *, execution_only: bool) -> Config:
    """``config`` whose ``section`` has one more field (at its default), as a later change would add it."""
    value = getattr(config, section)
    spec = dataclasses.field(default=0, metadata=EXECUTION_ONLY if execution_only else {})
    grown = dataclasses.make_dataclass(f"Grown{type(value).__name__}", [("new_field", int, spec)],
                                       bases=(type(value),))
    return dataclasses.replace(config, **{section: grown(**dataclasses.asdict(value))})


@pytest.fixture
def run_config(tiny_config_path: Path) -> Config:
    return finished_run(load_config(tiny_config_path, ["distill.online_students=1"]))


# sweep: no stage reads it (a sweep checks its own study against it: workflows/experiments/sweep_optuna.py, signature)
SECTION_NAMES = [name for name in SECTIONS if name not in ("run_dir", "sweep")]


@pytest.mark.parametrize("section", SECTION_NAMES)
def test_a_new_field_changes_a_fingerprint_unless_it_is_execution_only(run_config, section):
    before = fingerprints(run_config)
    grown = fingerprints(with_new_field(run_config, section, execution_only=False))
    assert [name for name in before if grown[name] != before[name]], f"a new {section} field changed no fingerprint"
    assert fingerprints(with_new_field(run_config, section, execution_only=True)) == before


@pytest.mark.parametrize("section", SECTION_NAMES)
def test_changing_an_execution_only_field_changes_no_fingerprint(run_config, section):
    before = fingerprints(run_config)
    value = getattr(run_config, section)
    for f in dataclasses.fields(value):
        if f.metadata.get("execution_only") and f.name not in ("count", "students", "seeds", "online_students"):
            other = 3 if getattr(value, f.name) != 3 else 4  # the others change which stages a run has: below
            if f.name == "trackers":
                other = ["tensorboard"]
            changed = dataclasses.replace(run_config, **{section: dataclasses.replace(value, **{f.name: other})})
            assert fingerprints(changed) == before, f"{section}.{f.name}"


def test_more_students_leave_the_existing_stages_as_they_are(run_config):
    before = fingerprints(run_config)
    more = finished_run(dataclasses.replace(run_config, distill=dataclasses.replace(run_config.distill, students=2)))
    after = fingerprints(more)
    assert {name: fp for name, fp in after.items() if name in before and name != "report"} == \
        {name: fp for name, fp in before.items() if name != "report"}


def test_the_store_identity_holds_every_identity_field_of_the_cache_section(tiny_config):
    tokens = SimpleNamespace(vocab_size=400, seq_len=32, num_windows=lambda split: 10, tokenizer_hash="a",
                             tokens_hash="b", windows_hash="c")
    grown = with_new_field(tiny_config, "cache", execution_only=False).cache
    assert "new_field" in store_identity(grown, tokens, [])
    assert set(identity(tiny_config.cache)) <= set(store_identity(tiny_config.cache, tokens, []))
    skipped = with_new_field(tiny_config, "cache", execution_only=True).cache
    assert "new_field" not in store_identity(skipped, tokens, [])


def test_a_key_whose_default_changed_leaves_earlier_stores_done_at_their_value_and_stale_at_the_new_default():
    """cache.tail_logp came after stores without it (false): at false it is left out of the identity, so those
    stores keep their fingerprint; the new default (true, hybrid) enters it, so they go stale; the modes
    without tail draws ignore it."""
    from babydistill.pipeline.config import CacheConfig

    earlier = identity(CacheConfig(samples=12))
    earlier.pop("tail_logp")                                      # what a store made before the key had
    assert identity(CacheConfig(samples=12, tail_logp=False)) == earlier
    assert identity(CacheConfig(samples=12))["tail_logp"] is True  # the default: hybrid with the probabilities
    assert CacheConfig(mode="topk", tail_logp=True).tail_logp is False
    assert "tail_logp" not in identity(CacheConfig(mode="topk", k=32))


def test_draw_sets_enter_the_identity_only_when_more_than_one():
    """cache.draw_sets came after every store (one set): at 1 it is left out, so those stores stay done."""
    from babydistill.pipeline.config import CacheConfig

    assert "draw_sets" not in identity(CacheConfig())
    assert identity(CacheConfig(draw_sets=6))["draw_sets"] == 6


# Today's fingerprint and recipe digest of every stage of the fixed run below (finished upstream markers, the
# conftest corpus): a change to how a stage is hashed would make every user's finished stage look changed.
PINNED = {
    "prepare": ["25a101dd6ec4adf5", None],
    "tokenizer": ["db7d33df20647a6d", None],
    "tokenize": ["4fd799f4af916c78", None],
    "teacher t1": ["e106484ecbbaa109", "5c98b28bbb4d32f6"],
    "teacher t2": ["41ebcaebe21ddffc", "2873769a461eb498"],
    "capture": ["253aa3df66d3988f", None],  # named "cache" when pinned: the name is not in the hash
    "student s1": ["48fcb59b987ba198", "3a8bc257458a503e"],
    "student o1": ["32f9e5ba7214f571", "15f6f7431ce20d0c"],
    "evaluate t1": ["3988d25c626f1db1", None],
    "evaluate t2": ["9cde4480fb9b30a3", None],
    "evaluate s1": ["bbc77524d14fcf9b", None],
    "evaluate o1": ["351d05c063bc01c6", None],
    "report": ["669d0335c64375d2", None],
}


def test_the_fingerprints_and_recipes_of_finished_stages_do_not_change(run_config):
    from babydistill.stores.files import json_digest

    stages = [thunk() for thunk in pipeline_stages(run_config)]
    found = {stage.name: [stage.fingerprint, json_digest(stage.recipe) if stage.recipe else None]
             for stage in stages}
    assert found == PINNED


def test_the_stage_map_gives_the_sections_hashed_elsewhere():
    """What a training checkpoint, a sweep's signature and a study's shared stages hash, from the one map."""
    from babydistill.pipeline.stages import STAGE_SECTIONS, sections_of

    assert set(STAGE_SECTIONS["checkpoint"]) == {"model", "tokenizer", "data"}  # pipeline/training/loop.py
    assert sections_of("prepare", "tokenizer", "student") == ("data", "tokenizer", "model", "train", "distill")
    shared = tuple(s for s in sections_of("prepare", "tokenizer", "tokenize", "teacher") if s != "train")
    assert shared == ("data", "tokenizer", "model", "teachers")  # workflows/experiments/study_spec.py's SHARED_SECTIONS
    assert set(sections_of(*STAGE_SECTIONS)) <= set(SECTIONS)
