"""What a study trains and evaluates (a unit: one model), the commands that do it, and what a stale output
means inside a study.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from babydistill.pipeline.config import Config
from babydistill.workflows.experiments.study_spec import Arm, Study, StudyError
from babydistill.workflows.runner import default_teacher_names, evaluate_stage, student_stage
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


def teacher_units(study: Study) -> list[Unit]:
    return [Unit(f"teacher {name}", None, None, study.teacher_view(name), study.shared,
                 study.root / "logs" / f"eval-{name}.log") for name in default_teacher_names(study.base)]


def arm_units(arm: Arm, seeds: list[int]) -> list[Unit]:
    return [Unit(f"{arm.name} seed {seed}", arm, seed, arm.student_path(seed), arm.config,
                 arm.run_path / "logs" / f"{arm.student_name(seed)}.log") for seed in seeds]


def unit_done(unit: Unit) -> bool:
    return ((unit.arm is None or stage_status(unit.student())[0] == "done")
            and stage_status(unit.evaluation())[0] == "done")


def unit_commands(study: Study, unit: Unit, num_threads: int) -> list[list[str]]:
    """The `babydistill` argv (without the program) that train and evaluate ``unit`` in a subprocess."""
    sets = [arg for item in [*study.overrides(unit.arm), f"train.num_threads={num_threads}"] for arg in ("--set", item)]
    commands = []
    if unit.arm is not None:
        commands.append(["distill", str(study.base_path), *sets, "--seed", str(unit.seed),
                         "--name", unit.arm.student_name(unit.seed), "--resume", "auto",
                         *(["--online"] if unit.arm.online else [])])
    commands.append(["evaluate", str(study.base_path), *sets, "--model", str(unit.model_dir)])
    return commands
