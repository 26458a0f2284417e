"""Stage `evaluate`: held-out loss and zero-shot BLiMP of one checkpoint -> ``MODEL/eval.json``.

Loss: mean token cross-entropy (nats) and perplexity on the validation and test splits of the
token store, over the first ``eval.max_windows`` windows of each split (or all), so every model
of a run is scored on the same tokens.

BLiMP: a minimal pair is right when the grammatical sentence gets the higher total
log-probability, summed over its tokens with the first token conditioned on ``<s>`` (the
begin-of-document token every document in the token store starts with). Accuracy per paradigm
(keyed by UID, the jsonl file name), per field (mean over its paradigms) and overall (mean over
paradigms, as the BLiMP paper and BabyLM report it). Sentences are sorted by length and scored in
right-padded batches; right padding keeps the position ids of real tokens at 0..n-1, and the
causal mask means no real token ever sees a pad, so batched scores equal unpadded ones.

eval.json (format ``babydistill.eval``, version 1)::

    {"format", "format_version", "model", "created", "num_parameters", "tokenizer_hash", "tokens_hash",
     "eval_config": {...EvalConfig...},
     "loss": {"validation": {"ce", "perplexity", "num_windows", "num_tokens"}, "test": {...}},
     "blimp": {"source", "overall", "fields": {field: acc}, "paradigms": {uid: acc},
               "num_pairs", "num_paradigms", "max_pairs_per_paradigm", "seed"},
     "zero_shot": {name: {"task", "path", "overall", "subsets": {subset: acc}, "fields" (blimp) | "splits"
                          (entity_tracking), "num_items", "num_subsets"}},   # only with eval.zero_shot
     "seconds": {"load", "loss", "blimp", "zero_shot", "total"}}

Accuracies are fractions in [0, 1]. ``zero_shot``: the BabyLM evaluation pipeline 2025's suites from
local files, scored by its rule (see pipeline/zero_shot.py); the bundled BLiMP above is scored as before.
"""

from __future__ import annotations

import json
import math
import random
import time
import zipfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoConfig

from babydistill.pipeline import zero_shot
from babydistill.pipeline.config import BUNDLED_BLIMP, EvalConfig
from babydistill.pipeline.model import autocast_context, load_model
from babydistill.pipeline.tokenizer import load_tokenizer, tokenizer_hash
from babydistill.stores.files import atomic_write_json
from babydistill.stores.tokens import TokenStore

FORMAT = "babydistill.eval"
FORMAT_VERSION = 1
FIELDS = ("morphology", "syntax", "semantics", "syntax_semantics")
LOSS_SPLITS = ("validation", "test")


# --- BLiMP data -------------------------------------------------------------------------


@dataclass(frozen=True)
class BlimpPair:
    uid: str
    """Paradigm, the jsonl file name (e.g. ``adjunct_island``)."""
    field: str
    """One of FIELDS (the data's ``syntax/semantics`` is spelled ``syntax_semantics``)."""
    term: str
    pair_id: str
    good: str
    bad: str


def _paradigm_files(path: Path) -> dict[str, list[str]]:
    """UID -> the paradigm's jsonl lines, from a folder (searched recursively) or a zip."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(".jsonl") and not n.split("/")[-1].startswith(".")]
            items = [(Path(n).stem, archive.read(n).decode("utf-8")) for n in names]
    elif path.is_dir():
        items = [(p.stem, p.read_text(encoding="utf-8")) for p in path.rglob("*.jsonl") if not p.name.startswith(".")]
    else:
        raise ValueError(f"{path}: BLiMP must be a folder of *.jsonl files or a zip of them")
    if not items:
        raise ValueError(f"{path}: no *.jsonl files (expected BLiMP's 67 paradigm files)")
    uids = [uid for uid, _ in items]
    duplicates = sorted({uid for uid in uids if uids.count(uid) > 1})
    if duplicates:
        raise ValueError(f"{path}: paradigm files found twice: {', '.join(duplicates)}")
    return {uid: [line for line in text.splitlines() if line.strip()] for uid, text in sorted(items)}


def load_blimp(path: Path | str | None = None, max_pairs: int | None = None, seed: int = 0) -> list[BlimpPair]:
    """Minimal pairs of every paradigm (sorted by UID, file order within one).

    With ``max_pairs``, each paradigm keeps a fixed random subset of that size, drawn with a
    generator seeded by ``seed`` and the UID, so it does not depend on the other paradigms.
    """
    path = Path(path) if path is not None else BUNDLED_BLIMP
    pairs = []
    for uid, lines in _paradigm_files(path).items():
        keep = range(len(lines))
        if max_pairs is not None and max_pairs < len(lines):
            keep = sorted(random.Random(f"{seed}/{uid}").sample(range(len(lines)), max_pairs))
        for i in keep:
            row = json.loads(lines[i])
            pairs.append(BlimpPair(uid=uid, field=row["field"].replace("/", "_"), term=row.get("linguistics_term", ""),
                                   pair_id=str(row.get("pairID", i)), good=row["sentence_good"],
                                   bad=row["sentence_bad"]))
    return pairs


# --- scoring ----------------------------------------------------------------------------


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def sentence_logprobs(model, tokenizer, sentences: list[str], batch_size: int, *,
                      progress: bool = False) -> torch.Tensor:
    """Total log-probability of each sentence given ``<s>``, float64 [num_sentences]."""
    return completion_logprobs(model, tokenizer, sentences, [0] * len(sentences), batch_size, progress=progress)


@torch.inference_mode()
def completion_logprobs(model, tokenizer, texts: list[str], starts: list[int], batch_size: int, *,
                        progress: bool = False, desc: str = "blimp") -> torch.Tensor:
    """Summed log-probability of the tokens of each text that overlap its completion, float64 [num_texts].

    The completion of ``texts[i]`` starts at character ``starts[i]``; a token counts when its
    character span ends after that (the BabyLM pipeline's phrase mask), so ``starts[i] = 0`` scores
    the whole text. Every text is conditioned on ``<s>``.
    """
    bos_id = tokenizer.bos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    ids = [[bos_id, *e.ids] for e in encodings]
    # scored_i[j]: whether token j of ids[i] (j >= 1) is part of the completion
    scored = [[False] + [end > start for _, end in e.offsets] for e, start in zip(encodings, starts, strict=True)]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch: little padding
    device = _device(model)
    out = torch.zeros(len(ids), dtype=torch.float64)
    batches = range(0, len(order), batch_size)
    for begin in tqdm(batches, desc=desc, unit="batch", leave=False, disable=not progress):
        rows = order[begin:begin + batch_size]
        lengths = torch.tensor([len(ids[i]) for i in rows])
        T = int(lengths.max())
        input_ids_BT = torch.full((len(rows), T), pad_id, dtype=torch.long)
        scored_BT = torch.zeros((len(rows), T), dtype=torch.bool)
        for r, i in enumerate(rows):
            input_ids_BT[r, :len(ids[i])] = torch.tensor(ids[i])
            scored_BT[r, :len(ids[i])] = torch.tensor(scored[i])
        mask_BT = torch.arange(T)[None, :] < lengths[:, None]
        position_ids_BT = torch.arange(T)[None, :].expand(len(rows), T)
        logits_BTV = model(input_ids=input_ids_BT.to(device), attention_mask=mask_BT.long().to(device),
                           position_ids=position_ids_BT.to(device)).logits.float()
        # position t predicts token t+1; padded targets and tokens before the completion are left out
        logp_BT = (logits_BTV[:, :-1].gather(-1, input_ids_BT[:, 1:, None].to(device)).squeeze(-1)
                   - torch.logsumexp(logits_BTV[:, :-1], dim=-1))
        logp_BT = logp_BT.double().cpu() * scored_BT[:, 1:]
        out[rows] = logp_BT.sum(dim=1)
    return out


def score_blimp(model, tokenizer, pairs: list[BlimpPair], batch_size: int, *,
                progress: bool = False) -> torch.Tensor:
    """Log-probabilities of each pair's sentences, float64 [num_pairs, 2] (grammatical, ungrammatical).

    A pair is right when column 0 > column 1.
    """
    sentences = [p.good for p in pairs] + [p.bad for p in pairs]
    logp = sentence_logprobs(model, tokenizer, sentences, batch_size, progress=progress)
    return torch.stack([logp[:len(pairs)], logp[len(pairs):]], dim=1)


def blimp_accuracy(pairs: list[BlimpPair], correct) -> dict:
    """Accuracy per paradigm, per field (mean over its paradigms) and overall (mean over paradigms)."""
    hits: dict[str, list[bool]] = {}
    field_of: dict[str, str] = {}
    for pair, ok in zip(pairs, correct, strict=True):
        hits.setdefault(pair.uid, []).append(bool(ok))
        field_of[pair.uid] = pair.field
    paradigms = {uid: sum(h) / len(h) for uid, h in hits.items()}
    fields = {}
    for field in sorted(set(field_of.values()), key=lambda f: (FIELDS.index(f) if f in FIELDS else len(FIELDS), f)):
        fields[field] = float(np.mean([acc for uid, acc in paradigms.items() if field_of[uid] == field]))
    return {"overall": float(np.mean(list(paradigms.values()))), "fields": fields, "paradigms": paradigms}


@torch.no_grad()
def heldout_ce_totals(model, store: TokenStore, split: str, window_ids: np.ndarray, batch_size: int, *,
                      amp_dtype: torch.dtype | None = None, progress: bool = False) -> torch.Tensor:
    """Token CE summed over windows ``window_ids`` of ``split``, and the token count: float64 [2] on the
    model's device. Sums, so that the training loop can add up its ranks' shares before dividing; both
    the training loop's validation loss and ``split_loss`` are this."""
    device = _device(model)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # CE sum, token count
    for begin in tqdm(range(0, len(window_ids), batch_size), desc=f"loss {split}", unit="batch", leave=False,
                      disable=not progress):
        windows_BT1 = torch.from_numpy(store.windows(split, window_ids[begin:begin + batch_size])).to(device)
        with autocast_context(device, amp_dtype):
            logits_BTV = model(input_ids=windows_BT1[:, :-1]).logits
        labels_BT = windows_BT1[:, 1:]
        ce = F.cross_entropy(logits_BTV.float().flatten(0, 1), labels_BT.flatten(), reduction="sum")
        totals += torch.stack([ce.double(), torch.tensor(labels_BT.numel(), device=device).double()])
    return totals


def split_loss(model, store: TokenStore, split: str, max_windows: int | None, batch_size: int, *,
               progress: bool = False) -> dict:
    """Mean token CE (nats) and perplexity over the first ``max_windows`` windows of ``split``."""
    num_windows = store.num_windows(split)
    if max_windows is not None:
        num_windows = min(num_windows, max_windows)
    if num_windows == 0:
        raise ValueError(f"{store.path}: split {split!r} has no windows to evaluate")
    totals = heldout_ce_totals(model, store, split, np.arange(num_windows), batch_size, progress=progress)
    ce = (totals[0] / totals[1]).item()
    return {"ce": ce, "perplexity": math.exp(ce), "num_windows": num_windows, "num_tokens": int(totals[1].item())}


# --- BabyLM zero-shot suites (eval.zero_shot; data and rules in pipeline/zero_shot.py) ----


def load_zero_shot_suites(cfg: EvalConfig) -> dict[str, tuple[dict, list[zero_shot.Item]]]:
    """name -> (its eval.zero_shot entry, its items), every file read and checked before any scoring."""
    return {entry.get("name", entry["task"]): (entry, zero_shot.load_suite(entry["task"], entry["path"]))
            for entry in cfg.zero_shot}


def score_zero_shot(model, tokenizer, items: list[zero_shot.Item], batch_size: int, *, progress: bool = False,
                    desc: str = "zero-shot") -> list[bool]:
    """Whether each item is right: its first candidate scores >= every other (ties go to the first)."""
    texts = [text for item in items for text in item.candidates]
    starts = [start for item in items for start in item.starts]
    scores = completion_logprobs(model, tokenizer, texts, starts, batch_size, progress=progress, desc=desc).tolist()
    correct, offset = [], 0
    for item in items:
        mine = scores[offset:offset + len(item.candidates)]
        correct.append(mine[0] >= max(mine[1:]))
        offset += len(item.candidates)
    return correct


def zero_shot_results(model, tokenizer, suites: dict, batch_size: int, *, progress: bool = False) -> dict:
    """name -> {"task", "path", "overall", "subsets", ("fields" | "splits"), "num_items", "num_subsets"}."""
    results = {}
    for name, (entry, items) in suites.items():
        correct = score_zero_shot(model, tokenizer, items, batch_size, progress=progress, desc=name)
        acc = zero_shot.accuracy(entry["task"], items, correct)
        results[name] = {"task": entry["task"], "path": str(entry["path"]), **acc, "num_items": len(items),
                         "num_subsets": len(acc["subsets"])}
    return results


# --- entry point ------------------------------------------------------------------------


def check_model(model_dir: Path, store: TokenStore, tokenizer_dir: Path) -> str:
    """Refuse a model made with another tokenizer or vocabulary than the run's; returns the tokenizer hash."""
    run_hash = tokenizer_hash(tokenizer_dir)
    store.check_tokenizer(run_hash, f"tokenizer {tokenizer_dir}")
    model_tokenizer = model_dir / "tokenizer.json"
    if not model_tokenizer.is_file():
        raise ValueError(f"{model_dir}: no tokenizer.json, so it cannot be checked against the run's "
                         f"tokenizer {tokenizer_dir}; copy the tokenizer files the model was trained with")
    model_hash = tokenizer_hash(model_dir)
    if model_hash != run_hash:
        raise ValueError(f"{model_dir} was trained with another tokenizer than {tokenizer_dir} "
                         f"({model_hash[:12]} vs {run_hash[:12]}); evaluate it with its own run's config")
    vocab_size = AutoConfig.from_pretrained(model_dir).vocab_size
    if vocab_size != store.vocab_size:
        raise ValueError(f"{model_dir} has vocab size {vocab_size} but {store.path} has {store.vocab_size}; "
                         f"evaluate it with its own run's config")
    return run_hash


def evaluate_model(cfg: EvalConfig, model_dir: Path, tokens_path: Path, tokenizer_dir: Path, *,
                   out: Path | None = None) -> dict:
    """Validation/test loss and BLiMP of the checkpoint in ``model_dir``; writes ``out`` (default MODEL/eval.json)."""
    model_dir, tokenizer_dir = Path(model_dir), Path(tokenizer_dir)
    out = Path(out) if out is not None else model_dir / "eval.json"
    start = time.perf_counter()
    store = TokenStore(tokens_path)
    run_hash = check_model(model_dir, store, tokenizer_dir)
    blimp_path = Path(cfg.blimp) if cfg.blimp else BUNDLED_BLIMP
    pairs = load_blimp(blimp_path, cfg.max_pairs_per_paradigm, cfg.seed)
    suites = load_zero_shot_suites(cfg)  # bad data files stop here, before the model loads or anything is written

    # --- setup
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(tokenizer_dir)
    model = load_model(model_dir, device).to(device).eval()
    seconds = {"load": time.perf_counter() - start}

    # --- held-out loss
    t0 = time.perf_counter()
    loss = {split: split_loss(model, store, split, cfg.max_windows, cfg.batch_size, progress=True)
            for split in LOSS_SPLITS}
    seconds["loss"] = time.perf_counter() - t0

    # --- BLiMP
    t0 = time.perf_counter()
    scores = score_blimp(model, tokenizer, pairs, cfg.batch_size, progress=True)
    blimp = blimp_accuracy(pairs, (scores[:, 0] > scores[:, 1]).tolist())
    seconds["blimp"] = time.perf_counter() - t0

    # --- BabyLM zero-shot suites
    t0 = time.perf_counter()
    zero_shot_acc = zero_shot_results(model, tokenizer, suites, cfg.batch_size, progress=True)
    if suites:
        seconds["zero_shot"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - start

    # --- summary
    result = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": str(model_dir),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer_hash": run_hash,
        "tokens_hash": store.tokens_hash,
        "eval_config": asdict(cfg),
        "loss": loss,
        "blimp": {"source": str(blimp_path), **blimp, "num_pairs": len(pairs), "num_paradigms": len(blimp["paradigms"]),
                  "max_pairs_per_paradigm": cfg.max_pairs_per_paradigm, "seed": cfg.seed},
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    if suites:
        result["zero_shot"] = zero_shot_acc
    atomic_write_json(out, result)
    suites_text = "".join(f", {name} {100 * r['overall']:.1f}%" for name, r in zero_shot_acc.items())
    print(f"{model_dir}: val CE {loss['validation']['ce']:.4f}, test CE {loss['test']['ce']:.4f}, "
          f"BLiMP {100 * blimp['overall']:.1f}% on {len(pairs)} pairs{suites_text} "
          f"(loss {seconds['loss']:.1f}s, BLiMP {seconds['blimp']:.1f}s) -> {out}")
    return result


class _Ensemble(torch.nn.Module):
    """Teachers as one model whose logits are their ensemble (``pipeline.model.ensemble_logits``)."""

    def __init__(self, teachers: list[torch.nn.Module], rule: str):
        super().__init__()
        self.teachers, self.rule = torch.nn.ModuleList(teachers), rule

    def forward(self, input_ids: torch.Tensor):
        from types import SimpleNamespace

        from babydistill.pipeline.model import ensemble_logits

        return SimpleNamespace(logits=ensemble_logits([t(input_ids=input_ids).logits.float() for t in self.teachers],
                                                      self.rule))


def evaluate_ensemble(cfg: EvalConfig, teacher_dirs: list[Path], tokens_path: Path, tokenizer_dir: Path, *,
                      out: Path, rule: str = "logits") -> dict:
    """Validation and test CE of the teachers' ensemble (the rule the capture and the online students use) over
    the same windows as ``evaluate_model``; writes ``out`` (format ``babydistill.eval-ensemble``: no BLiMP)."""
    from babydistill.pipeline.model import load_teachers

    start = time.perf_counter()
    store = TokenStore(tokens_path)
    for path in teacher_dirs:
        check_model(Path(path), store, Path(tokenizer_dir))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = _Ensemble(load_teachers([Path(p) for p in teacher_dirs], store.vocab_size, device=device), rule)
    loss = {split: split_loss(model, store, split, cfg.max_windows, cfg.batch_size) for split in LOSS_SPLITS}
    result = {"format": "babydistill.eval-ensemble", "format_version": 1, "teachers": [str(p) for p in teacher_dirs],
              "rule": rule, "created": datetime.now(UTC).isoformat(timespec="seconds"), "tokens_hash": store.tokens_hash,
              "eval_config": asdict(cfg), "loss": loss, "seconds": {"total": round(time.perf_counter() - start, 3)}}
    atomic_write_json(Path(out), result)
    print(f"ensemble of {', '.join(Path(p).name for p in teacher_dirs)}: val CE {loss['validation']['ce']:.4f}, "
          f"test CE {loss['test']['ce']:.4f} -> {out}")
    return result
