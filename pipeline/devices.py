"""Devices and precisions of the stages that run models (teachers, the cache, students), and one GPU per dask worker.

A device name is ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; a precision is ``auto``,
``fp32``, ``bf16`` or ``fp16``. What cannot run here is refused with one line naming the config key and the
fix (a ``ValueError``: the CLI prints it and exits 2 before anything is written).
"""

from __future__ import annotations

import os

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str, key: str, local_rank: int = 0) -> torch.device:
    """The device ``name`` means here (``key`` names the config key in errors); ``cuda`` is ``cuda:local_rank``."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{key}={name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{key}={name}: only cpu and cuda are supported; use {key}=auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key}={name}: CUDA is not available here (torch {torch.__version__}); use {key}=auto "
                         f"or cpu, or install a CUDA build of torch into .venv")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def resolve_precision(precision: str, device: torch.device, key: str,
                      without_bf16: torch.dtype | None = torch.float16) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``, or None for plain fp32.

    ``auto``: fp32 on the CPU, bf16 on CUDA (``without_bf16`` on a GPU that lacks it: fp16 for training, which
    runs it with a grad scaler). An explicit low precision that the device lacks is refused.
    """
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if bf16_supported(device) else without_bf16
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"{key}=fp16 needs a CUDA device (this one is {device}); use {key}=auto (fp32 on the CPU) "
                         f"or bf16")
    if precision == "fp16" and torch.cuda.get_device_capability(device) < (5, 3):
        raise ValueError(f"{key}=fp16: {torch.cuda.get_device_name(device)} has no fast fp16; use {key}=fp32")
    if precision == "bf16" and device.type == "cuda" and not bf16_supported(device):
        raise ValueError(f"{key}=bf16: {torch.cuda.get_device_name(device)} has no bf16 (it needs compute "
                         f"capability 8.0 or newer); use {key}=fp16 or fp32")
    return DTYPES[precision]


def bf16_supported(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0)


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


# --- one GPU per dask worker -------------------------------------------------------------------


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries (its own list when it has one, so
    that a worker given GPUs 2,3 hands out 2 and 3, not 0 and 1)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]


def check_gpu_workers(workers: int, key: str = "--workers") -> list[str]:
    """The GPU of each of ``workers`` workers; more workers than visible GPUs is refused."""
    gpus = visible_gpus()
    if workers > len(gpus):
        raise ValueError(f"{key} {workers}: this host has {len(gpus)} visible GPU(s) and a capture runs one worker "
                         f"per GPU; use {key} {len(gpus)} or fewer (or cache.device=cpu for CPU workers)")
    return gpus[:workers]


def gpu_cluster(gpus: list[str], **worker_options):
    """A local dask cluster of one worker process per GPU, each seeing that GPU alone as ``cuda:0``
    (``CUDA_VISIBLE_DEVICES`` set in the worker's environment before it starts, as dask-cuda does)."""
    from distributed import Nanny, Scheduler, SpecCluster

    workers = {f"gpu-{gpu}": {"cls": Nanny, "options": {"nthreads": 1, "env": {"CUDA_VISIBLE_DEVICES": gpu},
                                                         **worker_options}}
               for gpu in gpus}
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": None}}
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=40)
