"""The Llama model of every stage, built from the config with transformers; teachers and their ensemble."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from babydistill.pipeline.config import Config
from babydistill.stores.checksum import changed_files
from babydistill.stores.tokens import TokenStore


def attention_implementation(num_heads: int, num_kv_heads: int, device: str | torch.device | None = None) -> str:
    """SDPA, except for grouped-query attention on the CPU, where PyTorch's SDPA is ~25x slower
    than the eager path (measured: 5 s vs 0.2 s per demo training step); eager gives the same values."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and num_kv_heads not in (1, num_heads):
        return "eager"
    return "sdpa"


def load_model(path: str | Path, device: str | torch.device | None = None) -> torch.nn.Module:
    """A Hugging Face checkpoint in fp32, with the attention implementation that is fast on ``device``.
    A model exported by babydistill is checked against its ``checksums.json`` first."""
    check_model_files(path)
    hf_config = AutoConfig.from_pretrained(str(path))
    heads = getattr(hf_config, "num_attention_heads", 1)
    attention = attention_implementation(heads, getattr(hf_config, "num_key_value_heads", None) or heads, device)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation=attention)
    return model.to(device) if device is not None else model


def check_model_files(path: str | Path) -> None:
    """Refuse, in one line, a model folder whose files differ from the checksums written at its export."""
    records_path = Path(path) / "checksums.json"
    if not records_path.is_file():
        return  # a checkpoint made elsewhere, or before babydistill wrote checksums
    try:
        records = json.loads(records_path.read_text(encoding="utf-8"))
        changed = changed_files(Path(path), records)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        changed = [f"checksums.json unreadable ({type(exc).__name__})"]
    if changed:
        raise ValueError(f"{path}: {', '.join(changed[:3])} changed after the model was exported; rebuild it with "
                         f"the stage that made it and --force (`babydistill status CONFIG` names it)")


def llama_config(config: Config, tokens: TokenStore) -> LlamaConfig:
    """A LlamaConfig for this run: sizes from ``model.*``, vocab and special ids from the token store."""
    model = config.model
    device = None if config.train.device == "auto" else config.train.device
    return LlamaConfig(
        attn_implementation=attention_implementation(model.num_heads, model.num_kv_heads, device),
        vocab_size=tokens.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_heads,
        num_key_value_heads=model.num_kv_heads,
        max_position_embeddings=model.max_position_embeddings or tokens.seq_len,
        rope_theta=model.rope_theta,
        tie_word_embeddings=model.tie_embeddings,
        bos_token_id=tokens.header.bos_id,
        eos_token_id=tokens.header.eod_id,
        pad_token_id=tokens.header.pad_id,
        attention_dropout=0.0,
    )


def build_model(config: Config, tokens: TokenStore, seed: int) -> LlamaForCausalLM:
    """A freshly initialised Llama; the seed fixes the initial weights."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(config, tokens))


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``, or nothing for plain fp32 (``dtype`` None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --- teachers -------------------------------------------------------------------------------------


def load_teachers(teacher_dirs: list[Path], vocab_size: int | None = None, device: torch.device | None = None
                  ) -> list[torch.nn.Module]:
    """The teachers of an ensemble on ``device`` (default the CPU), frozen in eval mode; ``vocab_size``, when
    given, is the run's and must match.

    The cache stage (once per worker process) and the online student (once per run) load them here.
    """
    teachers = []
    for path in map(Path, teacher_dirs):
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: not a teacher checkpoint; run `babydistill teacher CONFIG --name {path.name}`")
        teacher = load_model(path, device)
        if vocab_size is not None and teacher.config.vocab_size != vocab_size:
            raise ValueError(f"{path} has vocab {teacher.config.vocab_size}, the run's tokens {vocab_size}")
        teachers.append(teacher.eval().requires_grad_(False))
    return teachers


def ensemble_logits(logits: list[torch.Tensor], rule: str) -> torch.Tensor:
    """Unnormalised ensemble logits zbar: the mean of the logits (``logits``, the paper) or the log of the mean
    of the probabilities (``probs``). The ensemble's log-probabilities are zbar - LSE(zbar)."""
    if rule == "logits":
        zbar = logits[0] + logits[1] if len(logits) > 1 else logits[0].clone()
        for z in logits[2:]:
            zbar += z
        return zbar.div_(len(logits))
    logp = torch.stack([torch.log_softmax(z, dim=-1) for z in logits])
    return torch.logsumexp(logp, dim=0) - math.log(len(logits))
