"""Subprocess entry point for the training tests (plain `python` and `torchrun`).

    python tests/_train_run.py CONFIG.json OUT_DIR --seed 1 [--stage teacher|student] [--resume auto]
                               [--kill-at-step N]

``--stage student`` trains an offline student from the config's logit store. ``--kill-at-step N``
sends SIGKILL to this process inside the loss of optimizer step N (grad_accum must be 1): a crash
at an arbitrary point, nothing flushed or cleaned up.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import babydistill.pipeline.distill as distill
import babydistill.pipeline.teacher as teacher
from babydistill.pipeline.config import config_from_dict


def kill_at(step: int, loss_fn):
    calls = 0

    def wrapped(model, batch):
        nonlocal calls
        calls += 1
        if calls == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return loss_fn(model, batch)

    return wrapped


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--stage", choices=["teacher", "student"], default="teacher")
    p.add_argument("--resume", default="false")
    p.add_argument("--kill-at-step", type=int)
    args = p.parse_args()
    config = config_from_dict(json.loads(Path(args.config).read_text(encoding="utf-8")))
    resume = {"false": False, "true": True}.get(args.resume, args.resume)
    if args.stage == "teacher":
        if args.kill_at_step is not None:
            teacher.ce_loss = kill_at(args.kill_at_step, teacher.ce_loss)
        teacher.train_teacher(config, config.tokens_path, config.tokenizer_path, Path(args.out), seed=args.seed,
                              resume=resume)
    else:
        if args.kill_at_step is not None:
            make_loss = distill.offline_loss
            distill.offline_loss = lambda *a, **kw: kill_at(args.kill_at_step, make_loss(*a, **kw))
        distill.train_student(config, config.tokens_path, config.tokenizer_path, config.logits_path,
                              Path(args.out), seed=args.seed, resume=resume)


if __name__ == "__main__":
    main()
