"""Quantised log-probabilities (``cache.logp_dtype: uint8``): one byte per stored log-probability.

A value ``x`` (a log-probability, <= 0) is stored as the uint8 code ``c = round(x / s) + 255``, clipped to
1..255, so code c reads back as ``x' = c s - 255 s``: the fixed range [-254 s, 0] in steps of s = ``QUANT_STEP``
(1/10 nat: a probability within 5% of its value). Code 0 is padding (``PAD_LOGP``): a slot with no id.
A real value below -254 s - s/2 would clip to code 1; the capture counts those entries, reports them, and
refuses a chunk where a head (top-k) entry would clip (``clip_problem``).

The codes are written through zarr's ``FixedScaleOffset`` filter (numcodecs: ``offset = -255 s``,
``scale = 1 / s``, float32 -> uint8), so plain zarr opens ``logp`` and ``tail_logp`` as float32
log-probabilities; it reads padding as the range's bottom ``-255 s`` (-25.5) where babydistill reads -1e4:
``logp > -255 s + s / 2`` is the mask of real slots in plain zarr (docs/store.md).
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch

PAD_LOGP = -1.0e4
QUANT_STEP = 0.1
"""The step of uint8 log-probabilities, chosen by measurement (docs/benchmarks/store_bytes.json)."""
QUANT_DTYPES = ("uint8",)
# zarr-python warns on every array whose metadata names a numcodecs codec ("not in the Zarr version 3
# specification"): it reads them all the same, and so does every zarr-python reader of these stores.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")


def offset(step: float) -> float:
    """The log-probability of code 0 (padding); code c is ``offset + c * step``."""
    return -255.0 * step


def quantize(values: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 codes, mask of the real entries that clipped) of log-probabilities ``values`` (PAD_LOGP = padding)."""
    values = np.asarray(values, dtype=np.float64)
    real = values > PAD_LOGP / 2
    codes = np.round(values / step) + 255
    clipped = real & (codes < 1)
    return np.where(real, np.clip(codes, 1, 255), 0).astype(np.uint8), clipped


@functools.lru_cache(maxsize=8)
def code_table(step: float) -> np.ndarray:
    """float32 [256]: the log-probability each code reads back as (what zarr's FixedScaleOffset decodes to), with
    code 0 (padding) read as PAD_LOGP."""
    import numcodecs

    codec = numcodecs.FixedScaleOffset(offset=offset(step), scale=1.0 / step, dtype="<f4", astype="u1")
    table = np.asarray(codec.decode(np.arange(256, dtype=np.uint8)), dtype=np.float32).copy()
    table[0] = PAD_LOGP
    return table


def dequantize(codes: np.ndarray, step: float) -> np.ndarray:
    """float32 log-probabilities of uint8 ``codes`` (padding -> PAD_LOGP), as the reader decodes them."""
    return code_table(step)[codes]


def snap(values: np.ndarray, step: float) -> tuple[np.ndarray, int]:
    """(the float32 values the store will read back, number of real entries that clipped): what a capture of
    ``logp_dtype: uint8`` keeps of ``values``."""
    codes, clipped = quantize(values, step)
    return dequantize(codes, step), int(clipped.sum())


def zarr_values(values: np.ndarray, step: float) -> np.ndarray:
    """The float32 values to hand to zarr so that its FixedScaleOffset filter writes exactly the codes of
    ``values``: padding as the range's bottom (code 0), the rest snapped to the grid."""
    codes, _ = quantize(values, step)
    return (offset(step) + codes.astype(np.float64) * step).astype(np.float32)


SNAP_BLOCK_ROWS = 1024
"""Rows snapped at once: the float64 working copy of [N, V] at V = 16,000 stays at 131 MB, not N / 1024 times that."""


def snap_torch(logp: torch.Tensor, step: float) -> torch.Tensor:
    """``logp`` (no padding) rounded to the grid as the store keeps it (clipped at the bottom code), float32."""
    snapped = torch.empty(logp.shape, dtype=torch.float32, device=logp.device)
    for start in range(0, logp.shape[0], SNAP_BLOCK_ROWS):
        # In place on a float64 copy of the block: the same operations as quantize's, at a third of the time.
        block = logp[start:start + SNAP_BLOCK_ROWS].to(torch.float64, copy=True)
        block.div_(step).round_().add_(255).clamp_(1, 255)
        snapped[start:start + SNAP_BLOCK_ROWS] = block.mul_(step).add_(offset(step))
    return snapped


def padded(values: np.ndarray, step: float) -> np.ndarray:
    """Values as plain zarr reads them (padding = the range's bottom) with padding set to PAD_LOGP, float32."""
    values = np.asarray(values, dtype=np.float32)
    return np.where(values < offset(step) + step / 2, np.float32(PAD_LOGP), values)


def zarr_filter(step: float):
    """The zarr v3 array-to-array codec of a uint8 array: float32 log-probabilities <-> uint8 codes."""
    from zarr.codecs.numcodecs import FixedScaleOffset

    return FixedScaleOffset(offset=offset(step), scale=1.0 / step, dtype="<f4", astype="|u1")


def clip_problem(where: str, head_clipped: int, tail_clipped: int) -> str | None:
    """The refusal of a capture whose head entries would clip (none would be read back as stored), or None."""
    if head_clipped:
        return (f"{where}: {head_clipped} head (top-k) log-probabilities lie below the uint8 range's bottom "
                f"({offset(QUANT_STEP) + QUANT_STEP:g} nats) and would clip ({tail_clipped} tail entries too); "
                f"capture this teacher with cache.logp_dtype float16")
    return None
