"""`babydistill`: one verb per pipeline stage, all reading the same YAML config.

Every stage writes under the config's ``run_dir``; finished stages are skipped, stages whose
inputs changed are refused unless ``--force`` (the report excepted: it is rebuilt). Errors in what the user asked for print one
line (``babydistill: error: ...``) and exit with status 2; set BABYDISTILL_DEBUG=1 for a traceback.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import warnings
from pathlib import Path

from babydistill.pipeline.config import load_config
from babydistill.workflows.console import one_line_warning

VERBS = ["prepare", "tokenizer", "tokenize", "teacher", "capture", "distill", "evaluate", "report", "run", "status",
         "store", "bench", "study", "sweep"]
ALIASES = {"cache": "capture"}
"""Verbs kept under their earlier names: users' scripts call them."""


# --- runners: parsed flags -> stage functions -----------------------------------------------------


def _config(args):
    overrides = list(args.set or [])
    return load_config(args.config, overrides)


def _check_devices(config, *, capture: bool = False, train: bool = False, scheduler: str | None = None) -> None:
    """Refuse, before anything is written, a device, precision, GPU count or train.compile this host lacks."""
    from babydistill.pipeline import devices

    if capture and scheduler is None:
        device = devices.resolve_device(config.cache.device, "cache.device")
        devices.resolve_precision(config.cache.precision, device, "cache.precision", without_bf16=None)
        if device.type == "cuda" and config.cache.workers > 1:
            devices.check_gpu_workers(config.cache.workers)
    if train:
        from babydistill.pipeline.training.runtime import compile_problem

        device = devices.resolve_device(config.train.device, "train.device")
        devices.resolve_precision(config.train.precision, device, "train.precision")
        if config.train.compile and (problem := compile_problem()):
            raise ValueError(f"train.compile=true: {problem}; set train.compile=false")


def _logs(config):
    """Each stage's messages also go to RUN_DIR/logs/<stage>.log (workflows/console.py)."""
    return config.run_path / "logs"


def cmd_prepare(args):
    from babydistill.workflows.runner import prepare_stage, run_stage

    config = _config(args)
    run_stage(prepare_stage(config), force=args.force, log_dir=_logs(config))


def cmd_tokenizer(args):
    from babydistill.workflows.runner import run_stage, tokenizer_stage

    config = _config(args)
    run_stage(tokenizer_stage(config), force=args.force, log_dir=_logs(config))


def cmd_tokenize(args):
    from babydistill.workflows.runner import run_stage, tokenize_stage

    config = _config(args)
    run_stage(tokenize_stage(config), force=args.force, log_dir=_logs(config))


def _resume_value(text):
    if text is None:
        return False
    if text in ("", "true", "must"):
        return True
    return text  # "auto" or a checkpoint path


def cmd_teacher(args):
    from babydistill.workflows.runner import run_stage, teacher_stage

    config = _config(args)
    _check_devices(config, train=True)
    seed = args.seed if args.seed is not None else config.teachers.resolved_seeds()[0]
    run_stage(teacher_stage(config, seed, args.name, resume=_resume_value(args.resume)), force=args.force,
              log_dir=_logs(config))


def _names(text):
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def cmd_capture(args):
    from babydistill.workflows.runner import capture_stage, run_stage

    config = _config(args)  # --k and --workers are spellings of --set cache.k=K, cache.workers=N
    _check_devices(config, capture=True, scheduler=args.scheduler)
    run_stage(capture_stage(config, _names(args.teachers), scheduler=args.scheduler), force=args.force,
              log_dir=_logs(config))


def cmd_distill(args):
    from babydistill.workflows.runner import run_stage, student_stage

    config = _config(args)
    _check_devices(config, train=True)
    seed = args.seed if args.seed is not None else 1
    stage = student_stage(config, seed, args.name, resume=_resume_value(args.resume), online=args.online,
                          teacher_names=_names(args.teachers))
    run_stage(stage, force=args.force, log_dir=_logs(config))


def cmd_evaluate(args):
    from babydistill.workflows.runner import evaluate_stage, run_stage

    config = _config(args)
    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise ValueError(f"{model}: not a model checkpoint (no config.json); pass a teacher or student folder")
    run_stage(evaluate_stage(config, model), force=args.force, log_dir=_logs(config))
    print(f"wrote {model / 'eval.json'}")


def cmd_report(args):
    from babydistill.workflows.runner import report_stage, run_stage

    config = _config(args)
    run_stage(report_stage(config), force=True, log_dir=_logs(config))  # cheap, and always reflects the latest evaluations
    print(f"report: {config.report_path / 'report.md'}")


def cmd_run(args):
    from babydistill.workflows.runner import run_all

    config = _config(args)
    _check_devices(config, train=True, capture=True)
    run_all(config, force=args.force)


def cmd_status(args):
    from babydistill.workflows.runner import status_lines

    print("\n".join(status_lines(_config(args))))


def cmd_store(args):
    import json

    from babydistill.stores.logits import read_attrs, store_info, verify_store
    from babydistill.stores.tokens import FORMAT as TOKENS_FORMAT
    from babydistill.stores.tokens import verify_token_store

    is_tokens = (read_attrs(Path(args.path)) or {}).get("format") == TOKENS_FORMAT
    if args.action == "info":
        if is_tokens:
            raise ValueError(f"{args.path}: `store info` reads logit stores; this is a token store")
        print(json.dumps(store_info(Path(args.path)), indent=2, default=str))
        return 0
    if is_tokens:
        problems, fix = verify_token_store(Path(args.path)), "Re-run `babydistill tokenize CONFIG` to rebuild it"
    else:
        problems = verify_store(Path(args.path), Path(args.tokens) if args.tokens else None)
        fix = "Re-run `babydistill capture CONFIG` to rewrite the bad chunks"
    if problems:
        for problem in problems:
            print(f"FAIL {problem}")
        print(f"babydistill: error: {args.path}: {len(problems)} problem(s); first: {problems[0]}. {fix}",
              file=sys.stderr)
        return 1
    print(f"OK {args.path}: every chunk readable and consistent")
    return 0


def cmd_bench(args):
    out = Path(args.out) if args.out else None
    if args.what == "kernels":
        from babydistill.workflows.benchmarks.bench_kernels import bench_kernels

        bench_kernels(out, quick=args.quick)
    elif args.what == "loader":
        from babydistill.workflows.benchmarks.bench_loader import bench_loader

        bench_loader(out, quick=args.quick)
    elif args.what == "gpu":
        from babydistill.workflows.benchmarks.bench_gpu import bench_gpu

        bench_gpu(out)
    elif args.what == "precision":
        from babydistill.workflows.benchmarks.bench_precision import bench_precision

        bench_precision(Path(args.config), out)
    else:
        from babydistill.workflows.benchmarks.bench_step import bench_step

        bench_step(Path(args.config), out, mode=args.mode)


def cmd_study(args):
    from babydistill.workflows.experiments.study_carry import load_carried
    from babydistill.workflows.experiments.study_execute import run_study
    from babydistill.workflows.experiments.study_report import study_command, write_study_report
    from babydistill.workflows.experiments.study_results import collect_results
    from babydistill.workflows.experiments.study_spec import load_study, select

    study = load_study(args.study)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds else None
    except ValueError:
        raise ValueError(f"--seeds: expected comma-separated integers, e.g. 1,2; got {args.seeds!r}") from None
    arms, seeds = select(study, _names(args.arms), seeds)
    carried = load_carried(args.carry, study) if args.carry else None
    if not args.report_only:
        run_study(study, arms, seeds, jobs=args.jobs, carried=carried)
    out = Path(args.out) if args.out else study.root / "report"
    command = study_command(args.study, args.arms, args.seeds, args.jobs, args.report_only, args.out, args.carry)
    print(f"report: {write_study_report(collect_results(study, carried), out, command=command)}")


def cmd_sweep(args):
    from babydistill.workflows.experiments.sweep import open_existing, run_sweep
    from babydistill.workflows.experiments.sweep_report import write_sweep_report

    config = _config(args)
    if not args.report:
        run_sweep(config, args.name, trials=args.trials, workers=args.workers, scheduler=args.scheduler,
                  storage_url=args.storage, force=args.force)
    study, _, sweep_dir = open_existing(config, args.name, args.storage)
    command = shlex.join(["babydistill", "sweep", args.config, "--name", args.name]
                         + ["--trials", str(args.trials)] * (args.trials is not None)
                         + ["--workers", str(args.workers)] * (args.workers is not None)
                         + [arg for item in args.set or [] for arg in ("--set", item)])
    print(f"report: {write_sweep_report(study, config, sweep_dir, config_path=args.config, command=command)}")


COMMANDS = {
    "prepare": cmd_prepare, "tokenizer": cmd_tokenizer, "tokenize": cmd_tokenize, "teacher": cmd_teacher,
    "capture": cmd_capture, "distill": cmd_distill, "evaluate": cmd_evaluate, "report": cmd_report, "run": cmd_run,
    "status": cmd_status, "store": cmd_store, "bench": cmd_bench, "study": cmd_study, "sweep": cmd_sweep,
}
assert list(COMMANDS) == VERBS, "the command table and the documented verbs must agree"


# --- parser -----------------------------------------------------------------------------------


def _add_config(p: argparse.ArgumentParser, force: bool = True) -> None:
    p.add_argument("config", help="the run's YAML config (e.g. configs/demo.yaml)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable; the value is YAML, e.g. cache.temperatures=[1,2])")
    if force:
        p.add_argument("--force", action="store_true",
                       help="rebuild even if the output exists or its inputs changed (default: off)")


class _SetKey(argparse.Action):
    """A flag that is another spelling of ``--set KEY=VALUE``: one way to set the key, whichever is typed (the
    later of the two wins, as between two --set)."""

    def __init__(self, option_strings, dest, key: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.key = key

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.set = [*(namespace.set or []), f"{self.key}={values}"]


def _add_resume(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="auto|PATH",
                   help="continue from the newest complete checkpoint; `--resume auto` starts fresh when there "
                        "is none; a path resumes that checkpoint (default: start fresh, refusing to overwrite "
                        "checkpoints)")


def _add_data_verbs(sub) -> None:
    p = sub.add_parser("prepare", help="clean and split the corpus -> run_dir/data/{train,validation,test}/")
    _add_config(p)
    p = sub.add_parser("tokenizer", help="train byte-level BPE on the train split -> run_dir/tokenizer/")
    _add_config(p)
    p = sub.add_parser("tokenize", help="encode the splits -> run_dir/tokens.zarr (token streams, windows)")
    _add_config(p)


def _add_teacher_verb(sub) -> None:
    p = sub.add_parser("teacher", help="pretrain one teacher with CE -> run_dir/teachers/NAME/")
    _add_config(p)
    p.add_argument("--seed", type=int, help="training seed (default: the first of teachers.seeds, i.e. 1)")
    p.add_argument("--name", help="folder name under teachers/ (default: t<seed>)")
    _add_resume(p)


def _add_capture_verbs(sub) -> None:
    """``capture``, and ``cache``: its earlier name, kept for users' scripts."""
    for verb, help_text in (("capture", "run the teacher ensemble once -> run_dir/logits.zarr (the logit store)"),
                            ("cache", "alias of `capture` (its earlier name)")):
        p = sub.add_parser(verb, help=help_text, description=help_text)
        _add_config(p)
        p.add_argument("--teachers", help="comma-separated teacher names (default: t<seed> for teachers.seeds)")
        p.add_argument("--k", action=_SetKey, key="cache.k", type=int, metavar="K",
                       help="top-k ids kept per position: the same as --set cache.k=K (default: cache.k)")
        p.add_argument("--workers", action=_SetKey, key="cache.workers", type=int, metavar="N",
                       help="dask workers, 1 = synchronous: the same as --set cache.workers=N "
                            "(default: cache.workers)")
        p.add_argument("--scheduler", help="address of a running dask.distributed scheduler (default: none, local)")


def _add_distill_verb(sub) -> None:
    p = sub.add_parser("distill", help="train one student from the logit store -> run_dir/students/NAME/")
    _add_config(p)
    p.add_argument("--seed", type=int, help="training seed (default: 1)")
    p.add_argument("--name", help="folder name under students/ (default: s<seed>, or o<seed> with --online)")
    p.add_argument("--online", action="store_true",
                   help="the paper's released method: run the teachers every step, dense KL (default: off)")
    p.add_argument("--teachers", help="with --online: comma-separated teacher names (default: teachers.seeds)")
    _add_resume(p)


def _add_run_verbs(sub) -> None:
    p = sub.add_parser("evaluate", help="validation/test CE and BLiMP of a checkpoint -> PATH/eval.json")
    _add_config(p)
    p.add_argument("--model", required=True, help="a teacher or student folder (Hugging Face checkpoint)")
    p = sub.add_parser("report", help="tables and plots of every model -> run_dir/report/")
    _add_config(p, force=False)
    p = sub.add_parser("run", help="every stage in order; finished stages are skipped")
    _add_config(p)
    p = sub.add_parser("status", help="what is done, what is not, and why")
    _add_config(p, force=False)


def _add_store_verb(sub) -> None:
    p = sub.add_parser("store", help="inspect a logit store; verify also checks a tokens.zarr")
    p.add_argument("action", choices=["info", "verify"], help="info: shapes, sizes, teachers; verify: check every chunk")
    p.add_argument("path", help="a logits.zarr folder")
    p.add_argument("--tokens", help="verify: also check the hashes against this tokens.zarr (default: none)")


def _add_bench_verb(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks that write JSON (ratios measured side by side)",
                       description="kernels: the loss kernels (CPU; CUDA when present). loader: the store reader and "
                                   "capture. step: one training step per mode. precision: how far a bf16 teacher "
                                   "forward moves the stored targets (needs the config's teachers). gpu: every GPU "
                                   "path checked and measured on the first CUDA device, sized for at most 8 minutes on "
                                   "one H100, not yet timed on one (exit 2 without CUDA); see the README's GPU section.")
    p.add_argument("what", choices=["kernels", "loader", "step", "precision", "gpu"])
    p.add_argument("--out", help="JSON file to write (default: print only)")
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a fast look (default: off)")
    p.add_argument("--mode", default="all", help="bench step: ce | offline | online | all (default: all)")
    p.add_argument("--config", default="configs/demo.yaml",
                   help="bench step / precision: the run's config (default: configs/demo.yaml)")


def _add_study_verb(sub) -> None:
    p = sub.add_parser("study", help="a controlled comparison of student arms (online, offline stores) over seeds "
                                     "-> run_dir/study/")
    p.add_argument("study", help="the study file (e.g. configs/offline-study.yaml): base config, seeds, reference, arms")
    p.add_argument("--arms", help="comma-separated arm names to run (default: all; the report covers every arm)")
    p.add_argument("--seeds", help="comma-separated seeds to run, a subset of the study's (default: all)")
    p.add_argument("--jobs", type=int, default=1,
                   help="models trained/evaluated at once, as subprocesses with train.num_threads = cores // jobs "
                        "(default: 1, in this process)")
    p.add_argument("--report-only", action="store_true",
                   help="only aggregate what is finished; missing cells are shown as - (default: off)")
    p.add_argument("--out", help="folder for report.md, results.json and the plot (default: <base run_dir>/<folder>/report, "
                                 "folder: study unless the study file names one)")
    p.add_argument("--carry", metavar="RESULTS_JSON",
                   help="a results.json an earlier run of this study wrote (e.g. docs/results/claim/results.json): "
                        "its finished cells made from the same settings are not trained again, and the report "
                        "includes them, marked carried; how a study outlives a machine (default: none)")


def _add_sweep_verb(sub) -> None:
    p = sub.add_parser("sweep", help="Optuna over student hyperparameters (the config's sweep section), every trial a "
                                     "student trained from the store -> run_dir/sweeps/NAME/")
    _add_config(p, force=False)
    p.add_argument("--force", action="store_true", help="discard an existing sweep of that name (its study and "
                                                        "trial folders) and start over (default: off)")
    p.add_argument("--name", default="default", help="the sweep's name and folder under sweeps/ (default: default)")
    p.add_argument("--trials", type=int, help="stop at this many completed or pruned trials (default: sweep.trials)")
    p.add_argument("--workers", type=int,
                   help="trial processes sharing the study, each with train.num_threads = cores // W (default: 1, "
                        "in this process; with --scheduler: one per dask worker)")
    p.add_argument("--scheduler", help="address of a dask.distributed scheduler: the trials run as tasks on its "
                                       "workers (default: none, this machine)")
    p.add_argument("--storage", help="an Optuna RDB URL for the study, e.g. postgresql://user:pass@host/db for "
                                     "workers on several hosts (default: sqlite file run_dir/sweeps/NAME/study.db)")
    p.add_argument("--report", action="store_true",
                   help="only write sweeps/NAME/report.md from the study as it is (default: off; a sweep writes "
                        "it when it ends)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="babydistill",
        description="Offline ensemble distillation (BabyLlama-2): teachers run once into a Zarr logit store; "
                    "students train from it with a fused sparse KL + CE loss.",
        epilog="Quick start: babydistill run configs/demo.yaml   (then: babydistill status configs/demo.yaml)")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add_verbs in (_add_data_verbs, _add_teacher_verb, _add_capture_verbs, _add_distill_verb, _add_run_verbs,
                      _add_store_verb, _add_bench_verb, _add_study_verb, _add_sweep_verb):
        add_verbs(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = one_line_warning  # a warning is one line on the console, not two
    try:
        code = COMMANDS[ALIASES.get(args.verb, args.verb)](args)
        return int(code or 0)
    except KeyboardInterrupt:
        print("babydistill: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        if os.environ.get("BABYDISTILL_DEBUG"):
            raise
        message = " ".join(str(exc).split())
        print(f"babydistill: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
