"""Where a training run runs: its device and precision, its processes (DDP under torchrun) and torch.compile.

Named ``runtime`` rather than ``setup`` (the name of a setuptools script to every Python reader) or
``devices`` (``pipeline/devices.py`` resolves device and precision names for every stage that runs a model;
this module wraps it for the ``train.*`` keys and adds what only training has: processes and compilation).
"""

from __future__ import annotations

import importlib
import os
import random
import shutil
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from babydistill.pipeline import devices


class TrainingError(ValueError):
    """Training cannot start or go on as asked (no checkpoint to resume, NaN loss, ...)."""


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    try:
        return devices.resolve_device(name, "train.device", local_rank)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32 (auto: bf16 on CUDA, fp16 on a GPU without bf16, fp32 on CPU)."""
    try:
        return devices.resolve_precision(precision, device, "train.precision")
    except ValueError as exc:
        raise TrainingError(str(exc)) from None


def setup_distributed(device: torch.device) -> Dist:
    """Join the process group when launched by torchrun (RANK / WORLD_SIZE set)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    initialized_here = not dist.is_initialized()
    if initialized_here:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world_size, local_rank, initialized_here)


def barrier(ddp: Dist) -> None:
    if ddp.world_size > 1:
        dist.barrier()


def leave_distributed(ddp: Dist) -> None:
    """Wait for every rank, then leave the process group if this run joined it."""
    barrier(ddp)
    if ddp.initialized_here:
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def compile_model(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """``torch.compile(model)`` when ``train.compile`` asks for it; refused in one line where this torch cannot
    compile (no C++ compiler on the CPU, an unsupported Python, ...)."""
    if not enabled:
        return model
    problem = compile_problem()
    if problem:
        raise TrainingError(f"train.compile=true: {problem}; set train.compile=false")
    return torch.compile(model)


def compile_problem() -> str | None:
    """Why torch.compile cannot run here, or None."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if sys.platform == "win32":
        return "torch.compile is not supported on Windows by this torch"
    try:
        importlib.import_module("torch._dynamo")
        importlib.import_module("torch._inductor")
    except ImportError as exc:
        return f"torch {torch.__version__} cannot compile ({exc})"
    if not torch.cuda.is_available() and not any(shutil.which(cc) for cc in ("cc", "gcc", "clang", "g++")):
        return "torch.compile on the CPU needs a C++ compiler (cc/gcc/clang), and none is on PATH"
    return None


def parallel_model(model: torch.nn.Module, *, compiled: bool, device: torch.device,
                   ddp: Dist) -> torch.nn.Module:
    """The module the steps run: ``model`` compiled and/or wrapped in DDP as asked. It shares the parameters
    of ``model``, which is what checkpoints save."""
    train_model = compile_model(model, compiled)
    if ddp.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    return train_model
