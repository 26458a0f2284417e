"""Independent (multinomial) vs systematic tail draws of a hybrid store: the distillation gradient's bias
and spread at a uniform student (as in the fidelity report), on 64 positions of the cpu-experiment teachers.

    .venv/bin/python analysis/offline-study/systematic_draws.py    (from the repo root, after make experiment)

The offline-study README quotes its output: systematic draws reduce the spread by 2-7% only.
"""
import math

import numpy as np
import torch

from babydistill.pipeline.capture_targets import ensemble_logp, sample_targets, stored_target
from babydistill.pipeline.model import load_model
from babydistill.stores.tokens import TokenStore

torch.set_num_threads(1)
tok = TokenStore("runs/cpu-experiment/tokens.zarr")
stream = tok.stream("train")
starts = tok.starts("train")
ts = [load_model(f"runs/cpu-experiment/teachers/t{i}").eval() for i in (1, 2)]
rng = np.random.default_rng(0)
w = rng.choice(len(starts), 4, replace=False)
x = torch.from_numpy(np.stack([stream[s:s+128] for s in starts[w]]).astype(np.int64))
with torch.no_grad():
    logp = ensemble_logp([t(x).logits.float() for t in ts], "logits").reshape(-1, tok.vocab_size)
pos = logp[torch.from_numpy(rng.choice(logp.shape[0], 64, replace=False))]
V = logp.shape[1]

def systematic(logp_NV, samples, slots, gen, head_ids):
    N = logp_NV.shape[0]
    probs = logp_NV.exp().double()
    head = torch.zeros(N, V, dtype=torch.bool).scatter_(1, head_ids, True)
    tail = probs.masked_fill(head, 0.0)
    r = tail.sum(1, keepdim=True)
    t = tail / r
    # sort tail by probability (descending) so the heavy tokens get near-deterministic counts
    order = t.argsort(dim=1, descending=True)
    cdf = t.gather(1, order).cumsum(1)
    u = (torch.rand(N, 1, generator=gen, dtype=torch.float64) + torch.arange(samples, dtype=torch.float64)) / samples
    idx = torch.searchsorted(cdf, u.clamp(max=cdf[:, -1:] - 1e-12))
    draws = order.gather(1, idx)
    counts = torch.zeros(N, V, dtype=torch.int32).scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.int32))
    key = counts * (V + 1) + (V - torch.arange(V, dtype=torch.int32))
    key = key.masked_fill(head, -1)
    tail_ids = key.topk(slots - head_ids.shape[1], dim=-1).indices
    picked = counts.gather(1, tail_ids).double()
    head_logp = logp_NV.gather(1, head_ids).double()
    tl = torch.log(r) + torch.log(picked / samples)
    tl = torch.where(picked > 0, tl, torch.full_like(tl, -60000.0))
    return torch.cat([head_ids, tail_ids], 1), torch.cat([head_logp, tl], 1)

def stats(fn, k, S, redraws=200):
    g = torch.Generator().manual_seed(1)
    bias, spread, norm, uniq = [], [], [], []
    for row in pos:
        p = row.double().exp().numpy()
        p /= p.sum()
        rows = row.expand(redraws, V).contiguous()
        head = rows.topk(k, dim=-1).indices
        ids, lp = fn(rows, S, k + S, g, head)
        T = np.stack([stored_target(ids[i].numpy(), lp[i].numpy(), V, "hybrid") for i in range(redraws)])
        m = T.mean(0)
        sp = ((T - m) ** 2).sum(1).mean()
        bias.append(math.sqrt(max(((m - p) ** 2).sum() - sp / (redraws - 1), 0)))
        spread.append(math.sqrt(sp))
        norm.append(np.linalg.norm(1 / V - p))
        uniq.append(float((lp[:, k:] > -1000).sum(1).double().mean()))
    b, s, n = map(np.array, (bias, spread, norm))
    return dict(bias_rel=float((b / n).mean()), spread_rel=float((s / n).mean()), uniq_tail=float(np.mean(uniq)))

for k, S in [(8, 8), (8, 24), (16, 16), (24, 8)]:
    print(k, S, "multinomial", stats(sample_targets, k, S))
    print(k, S, "systematic ", stats(systematic, k, S))
