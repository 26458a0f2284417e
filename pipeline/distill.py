"""Stage `distill`: pretrain a student from the teachers' ensemble.

Offline (default): batches come from ``logits.zarr`` (input ids, labels, sparse targets, ``c_T``)
and the loss is the fused sparse KL + CE on the student's final hidden states and LM-head weight,
so the ``N x vocab`` student logits are never materialised. No teacher is loaded.

Online (``--online``, the paper's released method): the teachers are loaded and run every step,
their logits averaged (``cache.ensemble``), and the loss is the full-vocabulary KL + CE.

Both go through the teachers' training loop (``pipeline.training.loop.train_loop``): same optimizer,
schedule, checkpoints, exact resume, DDP and logging; only the batches and the loss differ.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from babydistill.kernels.losses import dense_distill_loss, fused_linear_sparse_distill_loss
from babydistill.kernels.targets import tempered_slot_logp
from babydistill.pipeline import devices
from babydistill.pipeline.config import SEQUENCE_CACHE_DEFAULTS, Config, DistillConfig
from babydistill.pipeline.model import build_model, ensemble_logits, load_teachers
from babydistill.pipeline.tokenizer import tokenizer_hash
from babydistill.pipeline.training.loop import train_loop
from babydistill.pipeline.training.runtime import TrainingError, resolve_device
from babydistill.pipeline.training.windows import Batch, TokenWindows, ce_loss
from babydistill.stores.files import file_sha256
from babydistill.stores.header import RETEMPERING_BIAS, LogitStoreHeader, temperature_refusal
from babydistill.stores.reader import LogitStoreReader
from babydistill.stores.tokens import TokenStore

# Rows of each half of a batch from which the other half's control-variate coefficient is estimated.
CONTROL_ROWS = 256


def control_sums(logits_nV: torch.Tensor, target_ids: torch.Tensor, target_logp: torch.Tensor,
                 tail_logp: torch.Tensor, k: int, temperature: float = 1.0, c_T: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """(sum B, sum C) over these rows, float64 [2]: the tail noise of the control-variate target is
    (A - 2 beta B + beta^2 C) / S per row (see `control_beta`). At T != 1 (``c_T`` [n] then needed) the student
    is softmax(z / T) and the target the tempered one (`kernels.targets.tempered_slot_logp`)."""
    # The [n, V] work in the logits' precision, the [n, K] sums in float64.
    T = float(temperature)
    z = logits_nV if T == 1.0 else logits_nV / T
    q = (z.gather(1, target_ids) - torch.logsumexp(z, 1, keepdim=True)).double().exp()
    w = target_logp.double().exp()                                   # 0 on padding (-1e4)
    p_tail = tail_logp.double().exp()
    ratio = torch.where(p_tail > 0, q[:, k:] / p_tail.clamp_min(1e-300), 0.0)
    w_tail, q_tail = w[:, k:], q[:, k:]
    r = w_tail.sum(1)
    C = r * (w_tail * ratio ** 2).sum(1) - (w_tail * q_tail * ratio).sum(1)
    if T == 1.0:
        Q_tail = (1 - q[:, :k].sum(1)).clamp_min(0)
        B = r * Q_tail - (w_tail * q_tail).sum(1)
    else:
        # B = r sum_tail (p_T,j / p_j) q_j - sum_tail p_T,j q_j, both estimated from the draws: the tempered
        # weight w_T,j = w_j p_T,j / p_j stands for p_T,j as w_j stands for p_j.
        slot_logp = torch.cat([target_logp[:, :k], tail_logp], dim=1)
        w_T = tempered_slot_logp(target_logp.double(), slot_logp.double(), T, c_T.double()).exp()[:, k:]
        B = r * (w_T * ratio).sum(1) - (w_T * q_tail).sum(1)
    return torch.stack([B.sum(), C.sum()])


def _beta(sums: torch.Tensor, min_beta: float = 0.0) -> torch.Tensor:
    """sum B / sum C in [0, 1] (0 when C is not positive or the ratio is below ``min_beta``), as a 0-d
    tensor: no host sync on a GPU."""
    beta = torch.where(sums[1] > 0, sums[0] / sums[1].clamp_min(1e-300), 0.0).clamp(0, 1)
    return torch.where(beta >= min_beta, beta, 0.0)


def control_beta(logits_nV: torch.Tensor, target_ids: torch.Tensor, target_logp: torch.Tensor,
                 tail_logp: torch.Tensor, k: int) -> float:
    """The control-variate coefficient that minimises the tail noise summed over these rows, in [0, 1].

    Rows of a hybrid store: head slots ``[:, :k]`` exact, tail slots the draws with stored weights w_j and
    exact teacher probabilities p_j (``tail_logp``). Per row the noise of the tail estimate
    beta q_tail + (1/S) sum_s (p_j - beta q_j) / pi_j e_j, as a function of beta, is (A - 2 beta B + beta^2 C) / S
    with B = r Q_tail - sum_tail p q and C = r sum_tail q^2 / p - ||q_tail||^2 (r the teacher's tail mass, Q_tail
    the student's): minimised at sum B / sum C. The tail sums are estimated from the draws themselves
    (E[sum_s w_j f_j] = sum_tail p_j f_j), which is unbiased; the coefficient is then used on other rows,
    whose draws are independent of these, so their targets stay unbiased.
    """
    return float(_beta(control_sums(logits_nV, target_ids, target_logp, tail_logp, k)))


def _spaced(start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Up to CONTROL_ROWS row indices of start..stop-1, evenly spaced, on ``device``."""
    count = min(CONTROL_ROWS, stop - start)
    if count == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.linspace(start, stop - 1, count, device=device).long()


def control_coefficients(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, target_ids: torch.Tensor,
                         target_logp: torch.Tensor, tail_logp: torch.Tensor, k: int, min_beta: float = 0.0,
                         temperature: float = 1.0, c_T: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Control-variate coefficients a [N, K] for `kernels.losses.sparse_distill_loss` (``control``), and the mean beta
    (a 0-d tensor).

    a = beta on the head slots and beta w_j / p_j on the tail draws (0 on padding): the KL's gradient then
    uses the target p_head + beta q_tail + (1/S) sum_s (p_j - beta q_j) / pi_j e_j, the student's own tail
    corrected by the draws. Each half of the batch gets the beta estimated (`control_beta`) on up to
    ``CONTROL_ROWS`` rows of the other half: a beta that saw a row's own draws would bias that row. Under
    DDP the halves are the two halves of the ranks (each rank's rows lie in one), so that two processes
    compute what one process with their global batch computes. A beta below ``min_beta`` is used as 0.

    At temperature T the coefficients are the same (the student's tail softmax(z / T) is estimated from the same
    draws, drawn from p_j / r: its weights are again w_j / p_j, and the kernels apply them to softmax(z / T)); only
    beta changes, estimated against the tempered target (`control_sums` with ``temperature`` and ``c_T`` [N]).
    """
    N, device = target_ids.shape[0], hidden_NH.device
    w = target_logp.float().exp()
    p_tail = tail_logp.float().exp()
    a = torch.cat([torch.ones_like(w[:, :k]) * (target_logp[:, :k] > -1e3),
                   torch.where(p_tail > 0, w[:, k:] / p_tail.clamp_min(1e-30), 0.0)], dim=1)
    weight = weight_VH.float()  # once: the rows' logits in float32 (autocast off below), whatever the model's dtype

    def sums_of(rows: torch.Tensor) -> torch.Tensor:
        if len(rows) == 0:
            return torch.zeros(2, dtype=torch.float64, device=device)
        with torch.autocast(device.type, enabled=False):
            logits = hidden_NH[rows].float() @ weight.T
        return control_sums(logits, target_ids[rows], target_logp[rows], tail_logp[rows], k, temperature,
                            None if c_T is None else c_T[rows])

    with torch.no_grad():
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world, rank = dist.get_world_size(), dist.get_rank()
            gathered = [torch.zeros(2, dtype=torch.float64, device=device) for _ in range(world)]
            dist.all_gather(gathered, sums_of(_spaced(0, N, device)))
            my_half = rank >= world // 2
            beta = _beta(sum(g for r, g in enumerate(gathered) if (r >= world // 2) != my_half), min_beta)
            return a * beta.float(), beta
        half = N // 2
        beta_first = _beta(sums_of(_spaced(half, N, device)), min_beta)   # for rows 0..half-1, from the other half
        beta_second = _beta(sums_of(_spaced(0, half, device)), min_beta)
        a[:half] *= beta_first.float()
        a[half:] *= beta_second.float()
    return a, (beta_first + beta_second) / 2


# --- losses ---------------------------------------------------------------------------------------


def offline_loss(dcfg: DistillConfig, use_c_T: bool, tail: str, control_head: int | None = None):
    """Fused sparse KL + CE on the final hidden states: the logits are never materialised.

    ``control_head``: the store's k, to use the tail control variate (`control_coefficients`); None = off."""

    def loss_fn(model: torch.nn.Module, batch: Batch):
        # Through the (possibly DDP-wrapped) forward, keeping one position's logits only.
        out = model(input_ids=batch["input_ids"], output_hidden_states=True, logits_to_keep=1)
        hidden_BTH = out.hidden_states[-1]
        raw = model.module if hasattr(model, "module") else model
        num_sequences, seq_len, slots = batch["target_ids"].shape
        ids, logp = batch["target_ids"].reshape(-1, slots), batch["target_logp"].reshape(-1, slots)
        hidden = hidden_BTH.flatten(0, 1)
        control, metrics = None, {}
        c_T = batch["c_T"].flatten() if use_c_T and "c_T" in batch else None
        tail_logp = batch["tail_logp"].reshape(ids.shape[0], -1) if "tail_logp" in batch else None
        if control_head is not None:
            control, beta = control_coefficients(hidden.detach(), raw.lm_head.weight.detach(), ids, logp,
                                                 tail_logp, control_head, dcfg.control_min_beta,
                                                 temperature=dcfg.temperature, c_T=c_T)
            metrics["control_beta"] = beta
        loss, ce, kl = fused_linear_sparse_distill_loss(
            hidden, raw.lm_head.weight, batch["labels"].flatten(), ids, logp,
            alpha=dcfg.alpha, temperature=dcfg.temperature, tail=tail, normalization=dcfg.normalization,
            c_T=c_T, num_sequences=num_sequences, control=control,
            slot_logp=slot_logp_of(logp, tail_logp, dcfg.temperature))
        return loss, {"ce": ce, "kl": kl, **metrics}

    return loss_fn


def slot_logp_of(logp: torch.Tensor, tail_logp: torch.Tensor | None, temperature: float) -> torch.Tensor | None:
    """Each slot's exact teacher log-probability [N, K] for tempered hybrid targets (T != 1): the head's stored
    values, then the draws' ``tail_logp``; None at T = 1 or without ``tail_logp`` (then only topk at T != 1)."""
    if temperature == 1.0 or tail_logp is None:
        return None
    return torch.cat([logp[:, :logp.shape[1] - tail_logp.shape[1]], tail_logp], dim=1)


def online_loss(dcfg: DistillConfig, teachers: list[torch.nn.Module], ensemble: str):
    """The paper's released method: teachers forward every step, dense full-vocabulary KL + CE."""

    def loss_fn(model: torch.nn.Module, batch: Batch):
        input_ids = batch["input_ids"]
        with torch.no_grad():
            logits = [t(input_ids=input_ids).logits.float() for t in teachers]
            teacher_BTV = ensemble_logits(logits, ensemble)  # the rule the cache stage uses
        student_BTV = model(input_ids=input_ids).logits
        loss, ce, kl = dense_distill_loss(
            student_BTV.flatten(0, 1), batch["labels"].flatten(), teacher_BTV.flatten(0, 1),
            alpha=dcfg.alpha, temperature=dcfg.temperature, normalization=dcfg.normalization,
            num_sequences=input_ids.shape[0])
        return loss, {"ce": ce, "kl": kl}

    return loss_fn


# --- stage ----------------------------------------------------------------------------------------


def teacher_dtype(device: torch.device) -> torch.dtype:
    """The online teachers' weights: bf16 on a GPU that has it (half the memory and time of a forward that
    produces no gradient), fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" and devices.bf16_supported(device) else torch.float32


def online_teachers(teacher_dirs: list[Path], vocab_size: int, device_name: str) -> list[torch.nn.Module]:
    """The online student's teachers, on the student's device (``train.device``, this rank's GPU under torchrun)."""
    device = resolve_device(device_name, int(os.environ.get("LOCAL_RANK", "0")))
    return [t.to(dtype=teacher_dtype(device)) for t in load_teachers(teacher_dirs, vocab_size, device=device)]



def open_offline_source(config: Config, tokens_path: Path, tokenizer_dir: Path, logits_path: Path,
                        seed: int) -> tuple[LogitStoreReader, bool, str]:
    """The store as a batch source, checked against this run; whether exact c_T is used; the tail mode.
    (Whether the tail control variate is used: `use_control_variate`.)"""
    if not (Path(logits_path) / "zarr.json").is_file():
        raise TrainingError(f"{logits_path}: no logit store; run `babydistill capture CONFIG` first")
    dcfg = config.distill
    # The tail draws' probabilities serve the control variate, and tempered hybrid targets (T != 1).
    reader = LogitStoreReader(logits_path, tokens_path, tokenizer_dir, seed=seed, temperature=dcfg.temperature,
                              tail_logp=dcfg.control_variate != "never" or dcfg.temperature != 1.0)
    header = reader.header
    if header.seq_len != config.data.seq_len:
        raise TrainingError(f"{logits_path} holds windows of {header.seq_len} tokens but data.seq_len is "
                            f"{config.data.seq_len}; rebuild it with `babydistill capture CONFIG --force`")
    if refusal := temperature_refusal(header.mode, dcfg.temperature, header.temperatures, header.tail_logp,
                                      approximate=not dcfg.use_exact_c_T):
        raise TrainingError(f"{logits_path}: {refusal}")
    if header.targets_are_complete:
        controlled = use_control_variate(dcfg, header, logits_path)
        if dcfg.normalization == "sequence" and thinner_than_sequence_default(header, controlled):
            warn_sequence_noise(header, controlled, logits_path)
        # At T = 1 their weights sum to 1 by construction: renormalising removes float16 rounding, not a tail. At a
        # captured T != 1 they are re-weighted with the exact c_T (`kernels.targets.tempered_slot_logp`).
        return reader, dcfg.temperature != 1.0, "renorm"
    use_c_T = dcfg.use_exact_c_T and reader.c_T_column is not None
    if not use_c_T and dcfg.temperature != 1.0:
        reason = ("distill.use_exact_c_T is false" if not dcfg.use_exact_c_T else
                  f"temperature {dcfg.temperature} was not captured (store has {list(header.temperatures)})")
        warnings.warn(f"{reason}: tempered teacher probabilities use the uniform-tail approximation "
                      f"({RETEMPERING_BIAS})", stacklevel=2)
    return reader, use_c_T, dcfg.tail


def warn_sequence_noise(header: LogitStoreHeader, controlled: bool, logits_path: Path) -> None:
    """Under sequence normalisation the KL carries the draws' noise: say so, with the measured cost and the fix."""
    k, samples = SEQUENCE_CACHE_DEFAULTS["k"], SEQUENCE_CACHE_DEFAULTS["samples"]
    # a store that has the probabilities and is big enough lacks only the control variate
    only_unused = header.tail_logp and not thinner_than_sequence_default(header, True)
    fix = ("set distill.control_variate=auto" if only_unused else
           f"capture the sequence default: `babydistill capture CONFIG --force --set cache.mode=hybrid "
           f"--set cache.k={k} --set cache.samples={samples} --set cache.tail_logp=true`")
    warnings.warn(f"{logits_path} holds {header.describe_targets(controlled)}: under distill.normalization="
                  f"sequence the KL carries the draws' noise (at the CPU study's scale, students from 8 draws "
                  f"without their probabilities fell 0.048 nats behind online ones, from 8 ids + 12 draws with "
                  f"them 0.014, from 32 + 64 0.004: docs/results/offline-study); {fix}", stacklevel=3)


def thinner_than_sequence_default(header: LogitStoreHeader, controlled: bool) -> bool:
    """Whether a sampled store's targets are noisier than ``SEQUENCE_CACHE_DEFAULTS`` (fewer exact ids or draws, or
    draws the student cannot use a control variate on)."""
    return (not controlled or header.head < SEQUENCE_CACHE_DEFAULTS["k"]
            or int(header.samples or 0) < SEQUENCE_CACHE_DEFAULTS["samples"])


def use_control_variate(dcfg: DistillConfig, header: LogitStoreHeader, logits_path: Path) -> bool:
    """Whether the student uses the tail control variate (``distill.control_variate``) with this store."""
    if dcfg.control_variate == "required" and not header.tail_logp:
        raise TrainingError(f"{logits_path} holds no tail probabilities (mode {header.mode}, no tail_logp), which "
                            f"distill.control_variate=required needs; rebuild it with `babydistill capture CONFIG "
                            f"--force --set cache.mode=hybrid --set cache.tail_logp=true` or set "
                            f"distill.control_variate=auto")
    return header.tail_logp and dcfg.control_variate != "never"


def store_loss(dcfg: DistillConfig, reader: LogitStoreReader, use_c_T: bool, tail: str, logits_path: Path):
    """The offline loss for this store (`open_offline_source`'s results), with the control variate if used."""
    control = use_control_variate(dcfg, reader.header, logits_path)
    return offline_loss(dcfg, use_c_T, tail, reader.header.k if control else None), control


def student_config(config: Config) -> Config:
    """The config a student trains with: ``distill.head_lr_scale``, when set, is its ``train.head_lr_scale``
    (so that either spelling of one student is one student, with one fingerprint)."""
    if config.distill.head_lr_scale is None:
        return config
    return dataclasses.replace(config, train=dataclasses.replace(config.train, head_lr_scale=config.distill.head_lr_scale),
                               distill=dataclasses.replace(config.distill, head_lr_scale=None))


def train_student(config: Config, tokens_path: Path, tokenizer_dir: Path, logits_path: Path, out_dir: Path, *,
                  seed: int, resume=False, online: bool = False, teacher_dirs: list[Path] | None = None,
                  on_validation=None) -> Path:
    """Train one student into ``out_dir`` (the runner renames it when done); returns ``out_dir``.

    ``resume`` as for teachers: False, True (must), "auto", or a checkpoint folder. ``on_validation(step,
    val_loss)``: see :func:`pipeline.training.loop.train_loop` (a sweep's pruner).
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

    if dcfg.ce_only:  # alpha = 1: the KL weighs nothing, so no store or teacher is read (a CE-only control)
        batches = TokenWindows(tokens, "train", seed=seed)
        loss_fn, meta = ce_loss, {"stage": "student", "online": False, "ce_only": True}
    elif online:
        if not teacher_dirs:
            raise TrainingError("--online needs teachers: train them with `babydistill teacher CONFIG --seed S` "
                                "or name them with --teachers t1,t2")
        teachers = online_teachers([Path(p) for p in teacher_dirs], tokens.vocab_size, config.train.device)
        batches = TokenWindows(tokens, "train", seed=seed)
        loss_fn = online_loss(dcfg, teachers, config.cache.ensemble)
        meta = {"stage": "student", "online": True, "teachers": [str(p) for p in teacher_dirs],
                # the weights it learned from, as a store's header records them for an offline student
                "teacher_weights": [{"path": str(Path(p).resolve()),
                                     "sha256": file_sha256(Path(p) / "model.safetensors")} for p in teacher_dirs]}
    else:
        batches, use_c_T, tail = open_offline_source(config, tokens_path, tokenizer_dir, logits_path, seed)
        loss_fn, control = store_loss(dcfg, batches, use_c_T, tail, logits_path)
        meta = {"stage": "student", "online": False, "logits": str(logits_path), "exact_c_T": use_c_T,
                "tail": tail, "store_mode": batches.header.mode, "store_order": batches.header.order,
                "store_teachers": list(batches.header.teachers), "control_variate": control}

    config = student_config(config)
    model = build_model(config, tokens, seed)
    return train_loop(config, model, batches, loss_fn, Path(out_dir), seed=seed, resume=resume, tokens=tokens,
                      tokenizer_dir=tokenizer_dir, extra_meta=meta, on_validation=on_validation)
