"""What the analysis scripts of this folder (control_variate.py, control_beta.py) share: 8 seeded validation
windows of the cpu-experiment run and the log-probabilities of an ensemble of models on them."""
from pathlib import Path

import numpy as np
import torch

from babydistill.pipeline.capture_targets import ensemble_logp
from babydistill.stores.tokens import TokenStore

RUN = Path("runs/cpu-experiment")


def validation_windows(rng: np.random.Generator) -> tuple[TokenStore, torch.Tensor]:
    """The run's token store and 8 validation windows of 128 tokens drawn with ``rng`` ([8, 128] int64)."""
    tokens = TokenStore(RUN / "tokens.zarr")
    stream, starts = tokens.stream("validation"), tokens.starts("validation")
    picked = starts[rng.choice(len(starts), 8, replace=False)]
    return tokens, torch.from_numpy(np.stack([stream[s:s + 128] for s in picked]).astype(np.int64))


def logp_of(models: list[torch.nn.Module], windows: torch.Tensor) -> torch.Tensor:
    """log-softmax of the models' averaged logits (the cache's rule) at every position: [positions, V] float64."""
    with torch.no_grad():
        logits = [m(windows).logits.float() for m in models]
    return ensemble_logp(logits, "logits").reshape(-1, logits[0].shape[-1]).double()


def teacher_positions(count: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The windows (seed 0), ``count`` positions picked among them (flat indices) and the teachers' ensemble
    probabilities there, renormalised in float64: ([8, 128], [count], [count, V])."""
    from babydistill.pipeline.model import load_model

    rng = np.random.default_rng(0)
    _, windows = validation_windows(rng)
    p_logp = logp_of([load_model(RUN / "teachers" / t).eval() for t in ("t1", "t2")], windows)
    picked = torch.from_numpy(rng.choice(p_logp.shape[0], count, replace=False))
    p = p_logp[picked].exp()
    return windows, picked, p / p.sum(1, keepdim=True)
