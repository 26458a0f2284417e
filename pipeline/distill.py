"""Stage `distill`: pretrain a student from the teachers' ensemble.

Offline (default): batches come from ``logits.zarr`` (input ids, labels, sparse targets, ``c_T``)
and the loss is the fused sparse KL + CE on the student's final hidden states and LM-head weight,
so the ``N x vocab`` student logits are never materialised. No teacher is loaded.

Online (``--online``, the paper's released method): the teachers are loaded and run every step,
their logits averaged (``cache.ensemble``), and the loss is the full-vocabulary KL + CE.

Both go through the teachers' training loop (``pipeline.train.train_loop``): same optimizer,
schedule, checkpoints, exact resume, DDP and logging; only the batches and the loss differ.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from kernels import dense_distill_loss, fused_linear_sparse_distill_loss
from pipeline.config import Config, DistillConfig
from pipeline.model import build_model, ensemble_logits, load_teachers
from pipeline.tokenizer import tokenizer_hash
from pipeline.train import Batch, TokenWindows, TrainingError, train_loop
from stores.logits import targets_are_complete
from stores.reader import LogitStoreReader
from stores.tokens import TokenStore

# Tail draws below which a sampled store is flagged under sequence normalisation (docs/results/offline-study).
SEQUENCE_SAMPLES = 24

# --- losses ---------------------------------------------------------------------------------------


def offline_loss(dcfg: DistillConfig, use_c_T: bool, tail: str):
    """Fused sparse KL + CE on the final hidden states: the logits are never materialised."""

    def loss_fn(model: torch.nn.Module, batch: Batch):
        # Through the (possibly DDP-wrapped) forward, keeping one position's logits only.
        out = model(input_ids=batch["input_ids"], output_hidden_states=True, logits_to_keep=1)
        hidden_BTH = out.hidden_states[-1]
        raw = model.module if hasattr(model, "module") else model
        num_sequences, seq_len, k = batch["target_ids"].shape
        loss, ce, kl = fused_linear_sparse_distill_loss(
            hidden_BTH.flatten(0, 1), raw.lm_head.weight, batch["labels"].flatten(),
            batch["target_ids"].reshape(-1, k), batch["target_logp"].reshape(-1, k),
            alpha=dcfg.alpha, temperature=dcfg.temperature, tail=tail, normalization=dcfg.normalization,
            c_T=batch["c_T"].flatten() if use_c_T and "c_T" in batch else None, num_sequences=num_sequences)
        return loss, {"ce": ce, "kl": kl}

    return loss_fn


def online_loss(dcfg: DistillConfig, teachers: list[torch.nn.Module], ensemble: str):
    """The paper's released method: teachers forward every step, dense full-vocabulary KL + CE."""

    def loss_fn(model: torch.nn.Module, batch: Batch):
        input_ids = batch["input_ids"]
        with torch.no_grad():
            logits = [t.to(input_ids.device)(input_ids=input_ids).logits.float() for t in teachers]
            teacher_BTV = ensemble_logits(logits, ensemble)  # the rule the cache stage uses
        student_BTV = model(input_ids=input_ids).logits
        loss, ce, kl = dense_distill_loss(
            student_BTV.flatten(0, 1), batch["labels"].flatten(), teacher_BTV.flatten(0, 1),
            alpha=dcfg.alpha, temperature=dcfg.temperature, normalization=dcfg.normalization,
            num_sequences=input_ids.shape[0])
        return loss, {"ce": ce, "kl": kl}

    return loss_fn


# --- stage ----------------------------------------------------------------------------------------


def open_offline_source(config: Config, tokens_path: Path, tokenizer_dir: Path, logits_path: Path,
                        seed: int) -> tuple[LogitStoreReader, bool, str]:
    """The store as a batch source, checked against this run; whether exact c_T is used; the tail mode."""
    if not (Path(logits_path) / "zarr.json").is_file():
        raise TrainingError(f"{logits_path}: no logit store; run `babydistill cache CONFIG` first")
    dcfg = config.distill
    reader = LogitStoreReader(logits_path, tokens_path, tokenizer_dir, seed=seed, temperature=dcfg.temperature)
    attrs = reader.attrs
    if int(attrs["seq_len"]) != config.data.seq_len:
        raise TrainingError(f"{logits_path} holds windows of {attrs['seq_len']} tokens but data.seq_len is "
                            f"{config.data.seq_len}; rebuild it with `babydistill cache CONFIG --force`")
    if targets_are_complete(attrs):
        # Sampled weights estimate p at T = 1; p^(1/T) cannot be recovered from them.
        if dcfg.temperature != 1.0:
            raise TrainingError(f"{logits_path} holds {attrs['mode']} targets, which serve distill.temperature 1 "
                                f"only (got {dcfg.temperature}); set distill.temperature=1 or rebuild the store "
                                f"with `babydistill cache CONFIG --force --set cache.mode=topk`")
        if dcfg.normalization == "sequence" and int(attrs.get("samples", 0)) < SEQUENCE_SAMPLES:
            warnings.warn(f"{logits_path} holds {attrs['mode']} targets from {attrs.get('samples')} draws: under "
                          f"distill.normalization=sequence the KL carries their noise (students from 8 draws fell "
                          f"0.048 nats behind online ones, from 24 0.021, from 64 0.014: docs/results/offline-study); "
                          f"capture at least the default's draws for sequence normalisation: "
                          f"`babydistill cache CONFIG --force --set cache.samples={SEQUENCE_SAMPLES}`", stacklevel=2)
        # Their weights sum to 1 by construction: renormalising removes float16 rounding, not a tail.
        return reader, False, "renorm"
    use_c_T = dcfg.use_exact_c_T and reader.c_T_column is not None
    if not use_c_T and dcfg.temperature != 1.0:
        reason = ("distill.use_exact_c_T is false" if not dcfg.use_exact_c_T else
                  f"temperature {dcfg.temperature} was not captured (store has {attrs['temperatures']})")
        warnings.warn(f"{reason}: tempered teacher probabilities use the uniform-tail approximation", stacklevel=2)
    return reader, use_c_T, dcfg.tail


def train_student(config: Config, tokens_path: Path, tokenizer_dir: Path, logits_path: Path, out_dir: Path, *,
                  seed: int, resume=False, online: bool = False, teacher_dirs: list[Path] | None = None,
                  on_validation=None) -> Path:
    """Train one student into ``out_dir`` (the runner renames it when done); returns ``out_dir``.

    ``resume`` as for teachers: False, True (must), "auto", or a checkpoint folder. ``on_validation(step,
    val_loss)``: see :func:`pipeline.train.train_loop` (a sweep's pruner).
    """
    tokens_path, tokenizer_dir = Path(tokens_path), Path(tokenizer_dir)
    if not (tokens_path / "zarr.json").is_file():
        raise TrainingError(f"{tokens_path}: no token store; run `babydistill tokenize CONFIG` first")
    tokens = TokenStore(tokens_path)
    tokens.check_tokenizer(tokenizer_hash(tokenizer_dir), str(tokenizer_dir))
    if tokens.seq_len != config.data.seq_len:
        raise TrainingError(f"{tokens_path} has windows of {tokens.seq_len} tokens but data.seq_len is "
                            f"{config.data.seq_len}; re-run `babydistill tokenize CONFIG --force`")
    dcfg = config.distill

    if online:
        if not teacher_dirs:
            raise TrainingError("--online needs teachers: train them with `babydistill teacher CONFIG --seed S` "
                                "or name them with --teachers t1,t2")
        teachers = load_teachers([Path(p) for p in teacher_dirs], tokens.vocab_size)
        batches = TokenWindows(tokens, "train", seed=seed)
        loss_fn = online_loss(dcfg, teachers, config.cache.ensemble)
        meta = {"stage": "student", "online": True, "teachers": [str(p) for p in teacher_dirs]}
    else:
        batches, use_c_T, tail = open_offline_source(config, tokens_path, tokenizer_dir, logits_path, seed)
        loss_fn = offline_loss(dcfg, use_c_T, tail)
        meta = {"stage": "student", "online": False, "logits": str(logits_path), "exact_c_T": use_c_T,
                "tail": tail, "store_mode": batches.attrs["mode"], "store_order": batches.attrs["order"],
                "store_teachers": batches.attrs.get("teachers")}

    model = build_model(config, tokens, seed)
    return train_loop(config, model, batches, loss_fn, Path(out_dir), seed=seed, resume=resume, tokens=tokens,
                      tokenizer_dir=tokenizer_dir, extra_meta=meta, on_validation=on_validation)
