"""What a study trains and evaluates (a unit: one model), the commands that do it, and what a stale output
means inside a study.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from babydistill.pipeline.config import Config, model_name
from babydistill.workflows.experiments.study_spec import Arm, Study, StudyError
from babydistill.workflows.markers import output_fingerprint
from babydistill.workflows.runner import evaluate_stage, fingerprint, model_fingerprint, student_stage
from babydistill.workflows.stage import Stage, run_stage, stage_status

# What a stale output means inside a study. Not run_stage's advice (the stage's command with --force): that
# command lacks the arm's sets, and --force on a shared stage would redo finished work of the other arms.
STALE_IN_STUDY = "was made from other inputs or settings than the study now asks for"


def refuse_stale(stage: Stage) -> None:
    if stage_status(stage)[0] == "stale":
        raise StudyError(f"{stage.name}: {stage.out} {STALE_IN_STUDY} (did the base config or an arm's set "
                         "change?); move it away to redo it, or give the arm a new name")


def run_in_study(stage: Stage, *, rebuild_stale: bool = False) -> bool:
    """run_stage, with the study's answer to a stale output: rebuild it (evaluations) or refuse (the rest)."""
    if rebuild_stale and stage_status(stage)[0] == "stale":
        return run_stage(stage, force=True)
    refuse_stale(stage)
    return run_stage(stage)


@dataclass
class Unit:
    """One model to train (unless it is a teacher) and evaluate."""
    label: str
    arm: Arm | None
    """None for a teacher."""
    seed: int | None
    model_dir: Path
    config: Config
    log: Path

    def student(self) -> Stage:
        return student_stage(self.config, self.seed, self.arm.student_name(self.seed), resume="auto",
                             online=self.arm.online)

    def evaluation(self) -> Stage:
        return evaluate_stage(self.config, self.model_dir)


def teacher_units(study: Study, arms: list[Arm] | None = None) -> list[Unit]:
    """The teachers' evaluations: every teacher of the study, or those the base run and ``arms`` need."""
    seeds = study.teacher_seeds if arms is None else study.teacher_seeds_of(arms)
    return [Unit(f"teacher {name}", None, None, study.teacher_view(name), study.shared,
                 study.root / "logs" / f"eval-{name}.log")
            for name in (model_name("teacher", s) for s in seeds)]


def arm_units(arm: Arm, seeds: list[int] | None = None) -> list[Unit]:
    """The arm's students among ``seeds`` (default: all of the arm's seeds)."""
    return [Unit(f"{arm.name} seed {seed}", arm, seed, arm.student_path(seed), arm.seed_config(seed),
                 arm.run_path / "logs" / f"{arm.student_name(seed)}.log")
            for seed in arm.seeds if seeds is None or seed in seeds]


def ensemble_name(names: tuple[str, ...] | list[str]) -> str:
    """``ensemble-t1-t2``: the folder of a teacher ensemble's evaluation under ``study/teachers/``."""
    return "ensemble-" + "-".join(names)


def ensemble_stage(study: Study, names: tuple[str, ...] | list[str]) -> Stage:
    """Validation and test CE of the teachers' ensemble (the capture's rule, ``cache.ensemble``), in
    ``study/teachers/ensemble-.../eval.json``; waits for the teachers."""
    from babydistill.pipeline.evaluate import evaluate_ensemble

    config = study.shared
    dirs = [study.base.teacher_path(n) for n in names]
    fps = [model_fingerprint(d) for d in dirs]
    tokens_fp = output_fingerprint(config.tokens_path)
    missing = [f"teacher {n}" for n, fp in zip(names, fps) if fp is None] + ([] if tokens_fp else ["tokenize"])
    fp = None if missing else fingerprint("evaluate-ensemble", config.section_hash("eval"), config.cache.ensemble,
                                          list(names), fps, tokens_fp)
    out = study.teacher_view(ensemble_name(names)) / "eval.json"

    def build(work: Path):
        work.parent.mkdir(parents=True, exist_ok=True)
        result = evaluate_ensemble(config.eval, dirs, config.tokens_path, config.tokenizer_path, out=work,
                                   rule=config.cache.ensemble)
        return {"loss": result["loss"]}

    return Stage(f"evaluate {ensemble_name(names)}", out, fp, build, f"babydistill study {study.path}",
                 waiting_for=", ".join(missing) or None, is_file=True, rebuilt_when_damaged=True)


def unit_done(unit: Unit) -> bool:
    return ((unit.arm is None or stage_status(unit.student())[0] == "done")
            and stage_status(unit.evaluation())[0] == "done")


def unit_commands(study: Study, unit: Unit, num_threads: int) -> list[list[str]]:
    """The `babydistill` argv (without the program) that train and evaluate ``unit`` in a subprocess."""
    sets = [arg for item in [*study.overrides(unit.arm, unit.seed), f"train.num_threads={num_threads}"]
            for arg in ("--set", item)]
    commands = []
    if unit.arm is not None:
        commands.append(["distill", str(study.base_path), *sets, "--seed", str(unit.seed),
                         "--name", unit.arm.student_name(unit.seed), "--resume", "auto",
                         *(["--online"] if unit.arm.online else [])])
    commands.append(["evaluate", str(study.base_path), *sets, "--model", str(unit.model_dir)])
    return commands
