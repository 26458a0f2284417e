"""Subprocess entry point for the student kill-and-resume test.

    python tests/_distill_run.py CONFIG.json OUT_DIR --seed 1 [--resume auto] [--kill-at-step N]

``--kill-at-step N`` sends SIGKILL to this process inside the loss of optimizer step N
(grad_accum must be 1): a crash at an arbitrary point, nothing flushed or cleaned up.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipeline.distill as distill  # noqa: E402
from pipeline.config import config_from_dict  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--resume", default="false")
    p.add_argument("--kill-at-step", type=int)
    args = p.parse_args()
    config = config_from_dict(json.loads(Path(args.config).read_text(encoding="utf-8")))
    resume = {"false": False, "true": True}.get(args.resume, args.resume)
    if args.kill_at_step is not None:
        make_loss = distill.offline_loss

        def offline_loss_then_kill(*a, **kw):
            loss_fn, calls = make_loss(*a, **kw), [0]

            def wrapped(model, batch):
                calls[0] += 1
                if calls[0] == args.kill_at_step:
                    os.kill(os.getpid(), signal.SIGKILL)
                return loss_fn(model, batch)

            return wrapped

        distill.offline_loss = offline_loss_then_kill
    distill.train_student(config, config.tokens_path, config.tokenizer_path, config.logits_path, Path(args.out),
                          seed=args.seed, resume=resume)


if __name__ == "__main__":
    main()
