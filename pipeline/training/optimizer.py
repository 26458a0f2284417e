"""The optimizer and its learning-rate schedule.

The learning rate is a pure function of the step, so a resume needs no schedule state.
"""

from __future__ import annotations

import math

import torch

from babydistill.pipeline.config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; like HF's Trainer, 1-D parameters (norm weights, biases) get no weight decay,
    matrices and embeddings do."""
    params = [p for p in model.parameters() if p.requires_grad]
    # A scaled output layer gets a group of its own (at scale 1 the groups, and so checkpoints, are as before).
    head = model.get_output_embeddings().weight if cfg.head_lr_scale != 1.0 else None
    decay = [p for p in params if p.dim() >= 2 and p is not head]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if head is not None:
        groups.append({"params": [head], "weight_decay": cfg.weight_decay, "lr_scale": cfg.head_lr_scale})
    # On CUDA the fused AdamW (one kernel for every parameter) is what a GPU user expects; it is not on the CPU.
    fused = all(p.device.type == "cuda" for p in params) or None
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def head_lr_scale(param_groups: list[dict]) -> float:
    """The output layer's learning-rate scale of an optimizer's groups (1 when it has no group of its own)."""
    return next((float(g["lr_scale"]) for g in param_groups if "lr_scale" in g), 1.0)


def lr_at(step: int, cfg: TrainConfig, num_steps: int) -> float:
    """Linear warm-up over warmup_steps, then cosine from lr down to lr x min_lr_ratio at num_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, num_steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """``lr`` for every group, times the group's ``lr_scale`` (the output layer's: train.head_lr_scale)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
