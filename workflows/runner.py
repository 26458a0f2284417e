"""The stages of a run, in data-flow order, and `run` and `status` over them.

Each ``*_stage`` function declares one stage (``workflows/stage.py``): its output, the command that runs it
alone, and its fingerprint: the identity of the config sections it reads (which ones: ``pipeline/stages.py``)
and its inputs' fingerprints. A fingerprint recorded in finished outputs must not change with the code that
makes it: ``tests/test_identity.py`` pins them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from babydistill.pipeline.config import Config, identity, model_name, parse_model_name
from babydistill.pipeline.stages import STAGE_SECTIONS, recipe, section_values
from babydistill.stores.files import file_sha256, json_digest
from babydistill.workflows.markers import output_fingerprint
from babydistill.workflows.stage import Stage, run_stage, say, stage_status


def fingerprint(*parts: Any) -> str:
    """A stage's fingerprint: the digest of its parts (its name, config values, its inputs' fingerprints)."""
    return json_digest(parts)


def _corpus_listing(corpus: Path) -> list:
    """Names, sizes and mtimes: the corpus's identity in prepare fingerprints made before 2026-11-27."""
    if not corpus.is_dir():
        return [str(corpus), "missing"]
    return sorted((str(p.relative_to(corpus)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in corpus.rglob("*") if p.is_file())


def _corpus_content(corpus: Path) -> list:
    """Every corpus file's name (relative to the corpus), size and sha256: what the corpus holds, wherever it
    lies and whatever its mtimes, so that a run directory moved or copied with its corpus stays up to date."""
    if not corpus.is_dir():
        return ["missing"]
    return sorted((str(p.relative_to(corpus)), p.stat().st_size, file_sha256(p)) for p in corpus.rglob("*")
                  if p.is_file())


def build_token_run(config: Config) -> Config:
    """prepare, tokenizer and tokenize straight into ``config.run_dir``, without stage markers: the tokens that a
    benchmark or a test needs in a throwaway run of its own (a real run goes through the stages). Returns ``config``."""
    from babydistill.pipeline.encode import tokenize_corpus
    from babydistill.pipeline.prepare import prepare_corpus
    from babydistill.pipeline.tokenizer import train_tokenizer

    prepare_corpus(config.data, config.corpus_path, config.data_path)
    train_tokenizer(config.tokenizer, config.data_path / "train", config.tokenizer_path)
    tokenize_corpus(config.data, config.data_path, config.tokenizer_path, config.tokens_path)
    return config


def model_fingerprint(model_dir: Path) -> str | None:
    """A finished model's fingerprint; for a checkpoint made elsewhere, one from its weights file."""
    fp = output_fingerprint(model_dir)
    weights = model_dir / "model.safetensors"
    if fp is None and weights.is_file() and not model_dir.name.endswith(".partial"):
        stat = weights.stat()
        fp = fingerprint(str(model_dir.resolve()), stat.st_size, stat.st_mtime_ns)
    return fp


def _upstream(path: Path, what: str, is_file: bool = False) -> tuple[str | None, str | None]:
    fp = output_fingerprint(path, is_file)
    return fp, (None if fp else what)


def prepare_stage(config: Config) -> Stage:
    from babydistill.pipeline.prepare import prepare_corpus

    data = config.data
    # Every identity field of its sections but two: seq_len is the tokenize stage's, and the corpus enters as its
    # contents (before: as its resolved path and file listing).
    values = [value for name in STAGE_SECTIONS["prepare"] for key, value in identity(getattr(config, name)).items()
              if key not in ("corpus", "seq_len")]
    fp = fingerprint("prepare-content", *values, _corpus_content(config.corpus_path))
    # Before: the corpus's absolute path and its files' mtimes, which a moved or copied run does not keep.
    earlier = fingerprint("prepare", str(config.corpus_path.resolve()), *values, _corpus_listing(config.corpus_path))
    return Stage("prepare", config.data_path, fp,
                 lambda work: _summary_prepare(prepare_corpus(data, config.corpus_path, work)),
                 "babydistill prepare CONFIG", earlier_fingerprints=(earlier,), rebuilt_when_damaged=True)


def _summary_prepare(manifest: dict) -> dict:
    return {split: {"words": s["words"], "documents": s["documents"]} for split, s in manifest["splits"].items()}


def tokenizer_stage(config: Config) -> Stage:
    from babydistill.pipeline.tokenizer import train_tokenizer

    up, waiting = _upstream(config.data_path, "`babydistill prepare CONFIG`")
    fp = fingerprint("tokenizer", config.section_hash(*STAGE_SECTIONS["tokenizer"]), up) if up else None

    def build(work: Path):
        train_tokenizer(config.tokenizer, config.data_path / "train", work)

    return Stage("tokenizer", config.tokenizer_path, fp, build, "babydistill tokenizer CONFIG", waiting_for=waiting,
                 rebuilt_when_damaged=True)


def tokenize_stage(config: Config) -> Stage:
    from babydistill.pipeline.encode import tokenize_corpus
    from babydistill.stores.tokens import incomplete_reason

    up, waiting = _upstream(config.tokenizer_path, "`babydistill tokenizer CONFIG`")
    fp = fingerprint("tokenize", config.data.seq_len, up) if up else None
    return Stage("tokenize", config.tokens_path, fp,
                 lambda work: tokenize_corpus(config.data, config.data_path, config.tokenizer_path, work),
                 "babydistill tokenize CONFIG", waiting_for=waiting, incomplete=incomplete_reason, store=True,
                 rebuilt_when_damaged=True)


def teacher_stage(config: Config, seed: int, name: str | None = None, resume: Any = False) -> Stage:
    from babydistill.pipeline.teacher import train_teacher

    name = name or model_name("teacher", seed)
    up, waiting = _upstream(config.tokens_path, "`babydistill tokenize CONFIG`")
    fp = fingerprint("teacher", config.section_hash(*STAGE_SECTIONS["teacher"]), seed, up) if up else None

    def build(work: Path):
        train_teacher(config, config.tokens_path, config.tokenizer_path, work, seed=seed, resume=resume)

    return Stage(f"teacher {name}", config.teacher_path(name), fp, build,
                 f"babydistill teacher CONFIG --seed {seed} --name {name}", waiting_for=waiting,
                 recipe=recipe(config, "teacher", seed=seed, tokens=up), resume=resume)


def teacher_command(name: str) -> str:
    parsed = parse_model_name(name)
    seed = parsed[1] if parsed and parsed[0] == "teacher" else "S"
    return f"`babydistill teacher CONFIG --seed {seed}" + ("`" if seed != "S" else f" --name {name}`")


def default_teacher_names(config: Config) -> list[str]:
    return [model_name("teacher", seed) for seed in config.teachers.resolved_seeds()]


def _teachers(config: Config, names: list[str]) -> tuple[list[Path], list[str | None], list[str]]:
    """The teachers' folders, their fingerprints, and the commands that make the missing ones."""
    dirs = [config.teacher_path(name) for name in names]
    fps = [model_fingerprint(path) for path in dirs]
    return dirs, fps, [teacher_command(name) for name, fp in zip(names, fps) if fp is None]


def capture_stage(config: Config, teacher_names: list[str] | None = None, scheduler: str | None = None) -> Stage:
    """The teacher ensemble run once over the tokens into the logit store (``cache`` section, ``logits.zarr``)."""
    from babydistill.pipeline.capture import capture_logits
    from babydistill.stores.logits import incomplete_reason

    names = teacher_names or default_teacher_names(config)
    teacher_dirs, ups, missing = _teachers(config, names)
    tokens_fp = output_fingerprint(config.tokens_path)
    if tokens_fp is None:
        missing.insert(0, "`babydistill tokenize CONFIG`")
    # "cache": the stage's name when the first stores were made, kept in the hash so that they stay done.
    values = section_values(config, *STAGE_SECTIONS["capture"])
    fp = None if missing else fingerprint("cache", *values, names, ups, tokens_fp)

    def build(work: Path):
        return capture_logits(config.cache, config.tokens_path, config.tokenizer_path, teacher_dirs, work,
                              scheduler=scheduler)

    return Stage("capture", config.logits_path, fp, build,
                 f"babydistill capture CONFIG --teachers {','.join(names)}",
                 waiting_for=", ".join(missing) or None, in_place=True, incomplete=incomplete_reason, store=True)


def student_stage(config: Config, seed: int, name: str | None = None, resume: Any = False,
                  online: bool = False, teacher_names: list[str] | None = None,
                  store_fingerprint: str | None = None) -> Stage:
    """``store_fingerprint``: the logit store's, for a store not on disk (yet): the fingerprint the student would
    have once its store is captured, which is what a study needs to match a cell carried from another machine."""
    from babydistill.pipeline.distill import student_config, train_student

    name = name or model_name("online" if online else "student", seed)
    names = teacher_names or default_teacher_names(config)
    teacher_dirs, ups, missing = _teachers(config, names)
    if config.distill.ce_only:  # alpha = 1: the labels alone, from the token windows (no store, no teacher)
        source, missing = ["ce-only"], []
    elif online:
        source = ["online", names, ups]
        if config.cache.ensemble != "logits":  # the rule online students average with; under the default
            source.append(config.cache.ensemble)  # the fingerprint is the one students were made with before
    else:
        up = store_fingerprint or output_fingerprint(config.logits_path)
        missing = [] if up else ["`babydistill capture CONFIG`"]
        source = ["offline", up]
    trained = student_config(config)
    # Hashed as the first students were: the sections a teacher has too by their hash, distill by its values.
    *shared, own = STAGE_SECTIONS["student"]
    fp = None if missing else fingerprint("student", trained.section_hash(*shared), *section_values(trained, own),
                                          seed, source)

    def build(work: Path):
        train_student(config, config.tokens_path, config.tokenizer_path, config.logits_path, work, seed=seed,
                      resume=resume, online=online, teacher_dirs=teacher_dirs if online else None)

    command = f"babydistill distill CONFIG --seed {seed} --name {name}" + (" --online" if online else "")
    return Stage(f"student {name}", config.student_path(name), fp, build, command,
                 waiting_for=", ".join(missing) or None, resume=resume,
                 recipe=recipe(trained, "student", seed=seed, source=source))


def evaluate_stage(config: Config, model_dir: Path) -> Stage:
    from babydistill.pipeline.evaluate import evaluate_model

    model_fp = model_fingerprint(model_dir)
    tokens_fp = output_fingerprint(config.tokens_path)
    missing = ([] if model_fp else [f"the stage that trains {model_dir} (`babydistill run CONFIG`)"])
    missing += [] if tokens_fp else ["`babydistill tokenize CONFIG`"]
    fp = None if missing else fingerprint("evaluate", config.section_hash(*STAGE_SECTIONS["evaluate"]), model_fp,
                                          tokens_fp)
    out = model_dir / "eval.json"

    def build(work: Path):
        if config.train.num_threads is not None:
            import torch

            torch.set_num_threads(config.train.num_threads)
        result = evaluate_model(config.eval, model_dir, config.tokens_path, config.tokenizer_path, out=out)
        return {"loss": result["loss"], "blimp_overall": result["blimp"]["overall"]}

    return Stage(f"evaluate {model_dir.name}", out, fp, build, f"babydistill evaluate CONFIG --model {model_dir}",
                 waiting_for=", ".join(missing) or None, is_file=True, rebuilt_when_damaged=True)


def model_dirs(config: Config) -> list[Path]:
    """Every teacher and student of the config, in report order."""
    names = default_teacher_names(config)
    dirs = [config.teacher_path(n) for n in names]
    dirs += [config.student_path(model_name("student", seed)) for seed in config.distill.resolved_seeds()]
    dirs += [config.student_path(model_name("online", seed)) for seed in range(1, config.distill.online_students + 1)]
    return dirs


def report_stage(config: Config) -> Stage:
    from babydistill.pipeline.report import write_report

    evals = [output_fingerprint(d / "eval.json", is_file=True) for d in model_dirs(config)]
    missing = [f"`babydistill evaluate CONFIG --model {d}`" for d, fp in zip(model_dirs(config), evals) if fp is None]
    fp = None if missing else fingerprint("report", evals)

    def build(work: Path):
        write_report(config, work)

    return Stage("report", config.report_path, fp, build, "babydistill report CONFIG", derived=True,
                 waiting_for=", ".join(missing[:2]) + (" ..." if len(missing) > 2 else "") or None)


def pipeline_stages(config: Config) -> list[Callable[[], Stage]]:
    """The whole pipeline in order, as thunks: a stage's fingerprint depends on the ones before it."""
    thunks: list[Callable[[], Stage]] = [lambda: prepare_stage(config), lambda: tokenizer_stage(config),
                                         lambda: tokenize_stage(config)]
    for seed in config.teachers.resolved_seeds():
        thunks.append(lambda seed=seed: teacher_stage(config, seed, resume="auto"))
    if config.distill.students:
        thunks.append(lambda: capture_stage(config))
    for seed in config.distill.resolved_seeds():
        thunks.append(lambda seed=seed: student_stage(config, seed, resume="auto"))
    for seed in range(1, config.distill.online_students + 1):
        thunks.append(lambda seed=seed: student_stage(config, seed, resume="auto", online=True))
    for model_dir in model_dirs(config):
        thunks.append(lambda model_dir=model_dir: evaluate_stage(config, model_dir))
    thunks.append(lambda: report_stage(config))
    return thunks


def run_all(config: Config, *, force: bool = False) -> int:
    """Run every stage in order, skipping finished ones. Returns how many ran."""
    started = time.time()
    if config.eval.zero_shot:
        from babydistill.pipeline.evaluate import load_zero_shot_suites

        load_zero_shot_suites(config.eval)  # a bad data file stops the run now, not after hours of training
    ran = 0
    for thunk in pipeline_stages(config):
        ran += run_stage(thunk(), force=force, log_dir=config.run_path / "logs", quiet=True)
    report = config.report_path / "report.md"
    if ran == 0:
        say(f"Everything is up to date: nothing to do. Report: {report}")
    else:
        say(f"Ran {ran} stage(s) in {time.time() - started:.0f} s. Report: {report}")
    return ran


def status_lines(config: Config) -> list[str]:
    lines = [f"run_dir: {config.run_path}"]
    for thunk in pipeline_stages(config):
        try:
            stage = thunk()
        except ImportError as exc:  # a stage module that this install does not have
            lines.append(f"  {'unavailable':<11} {exc}")
            continue
        state, why = stage_status(stage)
        lines.append(f"  {state:<11} {stage.name:<18} {why}")
    return lines
