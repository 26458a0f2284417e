"""Stage `teacher`: a Llama trained from scratch with plain CE on the run's training windows.

``train_teacher`` checks its inputs, builds the model and the window source, and hands them to
the shared loop (:mod:`pipeline.training.loop`), which writes the Hugging Face checkpoint, metrics and
resume state into ``out_dir``. The CLI passes ``run_dir/teachers/NAME.partial`` and renames it
when this returns; nothing here renames anything.
"""

from __future__ import annotations

from pathlib import Path

from babydistill.pipeline.config import Config
from babydistill.pipeline.model import build_model
from babydistill.pipeline.tokenizer import tokenizer_hash
from babydistill.pipeline.training.loop import train_loop
from babydistill.pipeline.training.runtime import TrainingError
from babydistill.pipeline.training.windows import TokenWindows, ce_loss
from babydistill.stores.tokens import TokenStore


def train_teacher(config: Config, tokens_path: Path, tokenizer_dir: Path, out_dir: Path, *, seed: int,
                  resume: bool | str | Path = False) -> Path:
    """Train one teacher with seed ``seed`` (model init and data order) into ``out_dir``; returns ``out_dir``.

    ``resume``: False (refuse if checkpoints exist), True (must resume), "auto", or a ``step-N`` folder.
    """
    # --- check inputs ---
    tokens_path, tokenizer_dir = Path(tokens_path), Path(tokenizer_dir)
    problems = []
    if not (tokens_path / "zarr.json").is_file():
        problems.append(f"{tokens_path}: no token store; run `babydistill tokenize CONFIG` first")
    if not (tokenizer_dir / "tokenizer.json").is_file():
        problems.append(f"{tokenizer_dir}: no tokenizer; run `babydistill tokenizer CONFIG` first")
    if seed < 0:
        problems.append(f"seed must be >= 0, got {seed}")
    if problems:
        raise TrainingError("; ".join(problems))
    tokens = TokenStore(tokens_path)
    tokens.check_tokenizer(tokenizer_hash(tokenizer_dir), str(tokenizer_dir))
    if tokens.seq_len != config.data.seq_len:
        raise TrainingError(f"{tokens_path} has windows of {tokens.seq_len} tokens but data.seq_len is "
                            f"{config.data.seq_len}; re-run `babydistill tokenize CONFIG --force`")

    # --- model, data, loop ---
    model = build_model(config, tokens, seed)
    windows = TokenWindows(tokens, "train", seed=seed, random_offset=config.train.random_offset)
    return train_loop(config, model, windows, ce_loss, Path(out_dir), seed=seed, resume=resume, tokens=tokens,
                      tokenizer_dir=tokenizer_dir, extra_meta={"stage": "teacher"})
