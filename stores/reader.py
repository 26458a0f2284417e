"""Streaming reader of ``logits.zarr`` for the student: windows with their sparse teacher targets.

Order, for a given (seed, epoch): the chunks are shuffled, dealt to the DDP ranks
(``perm[rank::world_size]``) and then to the DataLoader workers of a rank (``[worker::num_workers]``);
each worker reads its chunks ``shuffle_buffer_chunks`` at a time, shuffles the windows within that
buffer and cuts them into batches, so each chunk is decompressed once per epoch and every window is
seen exactly once per epoch across all ranks and workers. A DataLoader (``batch_size=None``) takes
the workers' batches round-robin; ``start_batch`` (or ``load_state_dict``) resumes a rank from that
position, skipping whole buffers without reading them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from stores.logits import chunk_ranges, incomplete_reason, open_store
from stores.tokens import TokenStore

REBUILD = "rebuild it with `babydistill cache CONFIG --force`"


def _resume_roles(counts: list[int], start_batch: int) -> tuple[list[int], list[int]]:
    """Where a DataLoader stands after returning ``start_batch`` batches of workers yielding ``counts``.

    The DataLoader takes one batch from each worker in turn and drops a worker once it is exhausted;
    a new DataLoader starts again at worker 0. Returns (roles, done): resumed worker j plays original
    worker ``roles[j]`` (the ones with batches left, in the order the original would have continued;
    workers beyond them yield nothing), which has already yielded ``done[roles[j]]`` batches.
    """
    num = len(counts)
    done, nxt = [0] * num, 0
    for _ in range(start_batch):
        active = [w for w in (*range(nxt, num), *range(nxt)) if done[w] < counts[w]]
        if not active:
            break
        done[active[0]] += 1
        nxt = (active[0] + 1) % num
    roles = [w for w in (*range(nxt, num), *range(nxt)) if done[w] < counts[w]]
    return roles, done


class LogitStoreDataset(IterableDataset):
    """Batches of windows with their sparse targets, as dicts of tensors.

    Keys: ``input_ids`` int64 [B, S], ``labels`` int64 [B, S], ``target_ids`` int64 [B, S, K],
    ``target_logp`` float32 [B, S, K] (log-probabilities at T = 1; sample-mode padding slots hold
    -1e4, weight 0), ``c_T`` float32 [B, S] (only when ``temperature`` is one of the store's capture
    temperatures), ``window_ids`` int64 [B] (rows of the training window table).

    Use with ``DataLoader(dataset, batch_size=None, num_workers=N)``. The last batch of each worker
    may be smaller unless ``drop_last``.

    Examples
    --------
    >>> data = LogitStoreDataset("runs/demo/logits.zarr", "runs/demo/tokens.zarr", batch_size=16, seed=0,
    ...                          temperature=2.0)  # doctest: +SKIP
    >>> batch = next(iter(torch.utils.data.DataLoader(data, batch_size=None)))  # doctest: +SKIP
    >>> batch["target_logp"].shape  # doctest: +SKIP
    torch.Size([16, 128, 32])
    """

    def __init__(self, path: str | Path, tokens_path: str | Path, tokenizer_dir: str | Path | None = None, *,
                 batch_size: int, seed: int, epoch: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle_buffer_chunks: int = 4, temperature: float | None = None, start_batch: int = 0,
                 drop_last: bool = False):
        self.path, self.tokens_path = Path(path), Path(tokens_path)
        problems = []
        if batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            problems.append(f"rank must be in [0, world_size = {world_size}), got {rank}")
        if shuffle_buffer_chunks < 1:
            problems.append(f"shuffle_buffer_chunks must be >= 1, got {shuffle_buffer_chunks}")
        if start_batch < 0:
            problems.append(f"start_batch must be >= 0, got {start_batch}")
        if problems:
            raise ValueError("; ".join(problems))
        _, attrs = open_store(self.path)
        reason = incomplete_reason(self.path)
        if reason:
            raise ValueError(f"{self.path} is incomplete ({reason}); finish it with `babydistill cache CONFIG`")
        tokens = TokenStore(self.tokens_path)
        for key in ("tokenizer_hash", "tokens_hash", "windows_hash"):
            if attrs[key] != tokens.attrs[key]:
                raise ValueError(f"{self.path} was made from other tokens than {self.tokens_path} ({key} "
                                 f"{attrs[key][:12]} vs {tokens.attrs[key][:12]}); {REBUILD}")
        if tokenizer_dir is not None:
            tok = Path(tokenizer_dir) / "tokenizer.json"
            if not tok.is_file() or hashlib.sha256(tok.read_bytes()).hexdigest() != attrs["tokenizer_hash"]:
                raise ValueError(f"{self.path} was made with another tokenizer than {tok}; {REBUILD}")
        self.attrs = attrs
        self.batch_size, self.seed, self.epoch = batch_size, seed, epoch
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer_chunks, self.drop_last = shuffle_buffer_chunks, drop_last
        self.start_batch = start_batch
        self.ranges = chunk_ranges(attrs["num_windows"], attrs["chunk_windows"])
        self.c_T_column = next((i for i, t in enumerate(attrs["temperatures"])
                                if temperature is not None and abs(t - temperature) < 1e-9), None)
        self.temperature = temperature

    # --- order -------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start_batch = epoch, 0

    def worker_chunks(self, worker: int, num_workers: int, rank: int | None = None) -> list[int]:
        """Chunk indices of one DataLoader worker of this rank (or ``rank``), in reading order, this epoch."""
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.ranges))
        rank = self.rank if rank is None else rank
        return [int(c) for c in perm[rank::self.world_size][worker::num_workers]]

    def buffer_permutation(self, buffer: list[int]) -> np.ndarray:
        """The reading order of one shuffle buffer: a permutation of its chunks' windows, concatenated
        in chunk order, fixed by (seed, epoch, first chunk)."""
        size = sum(self.ranges[c][1] - self.ranges[c][0] for c in buffer)
        return np.random.default_rng([self.seed, self.epoch, buffer[0]]).permutation(size)

    def _num_worker_batches(self, chunks: list[int]) -> int:
        num = sum(self.ranges[c][1] - self.ranges[c][0] for c in chunks)
        return num // self.batch_size if self.drop_last else -(-num // self.batch_size)

    def num_batches(self, num_workers: int = 0, rank: int | None = None) -> int:
        """Batches this rank (or ``rank``) yields this epoch with ``num_workers`` DataLoader workers (0 = in-process).

        Ranks can differ by up to a chunk of windows; under DDP, stop every rank after
        ``min(num_batches(n, r) for r in range(world_size))`` batches so that none waits for the others.
        """
        n = max(1, num_workers)
        return sum(self._num_worker_batches(self.worker_chunks(w, n, rank)) for w in range(n))

    def __len__(self) -> int:
        return self.num_batches(0)

    # --- resume ------------------------------------------------------------------------------

    def state_dict(self, batches_done: int) -> dict:
        """Position after the trainer consumed ``batches_done`` batches of this epoch (from start_batch 0)."""
        return {"epoch": self.epoch, "start_batch": batches_done, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"reader state has seed {state['seed']}, this reader {self.seed}")
        self.epoch, self.start_batch = int(state["epoch"]), int(state["start_batch"])

    # --- iteration ---------------------------------------------------------------------------

    def _read(self, store: dict, chunks: list[int]) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {"tokens": [], "ids": [], "logp": [], "c_T": [], "window_ids": []}
        for c in chunks:
            start, stop = self.ranges[c]
            parts["tokens"].append(store["tokens"][start:stop])
            parts["ids"].append(store["ids"][start:stop])
            parts["logp"].append(store["logp"][start:stop])
            if self.c_T_column is not None:
                parts["c_T"].append(store["c_T"][start:stop, :, self.c_T_column])
            parts["window_ids"].append(np.arange(start, stop, dtype=np.int64))
        return {name: np.concatenate(p) for name, p in parts.items() if p}

    def make_batch(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Stored rows (``tokens``, ``ids``, ``logp``, optional ``c_T``, ``window_ids``) -> a batch of tensors."""
        tokens = torch.from_numpy(arrays["tokens"].astype(np.int64))
        batch = {
            "input_ids": tokens[:, :-1].contiguous(),
            "labels": tokens[:, 1:].contiguous(),
            "target_ids": torch.from_numpy(arrays["ids"].astype(np.int64)),
            "target_logp": torch.from_numpy(arrays["logp"].astype(np.float32)),
            "window_ids": torch.from_numpy(arrays["window_ids"]),
        }
        if "c_T" in arrays:
            batch["c_T"] = torch.from_numpy(arrays["c_T"].astype(np.float32))
        return batch

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        counts = [self._num_worker_batches(self.worker_chunks(w, num_workers)) for w in range(num_workers)]
        roles, done = _resume_roles(counts, self.start_batch)
        if worker >= len(roles):
            return
        role = roles[worker]
        chunks = self.worker_chunks(role, num_workers)
        skip, num_yield = done[role] * self.batch_size, counts[role] - done[role]
        group, _ = open_store(self.path)  # opened here: each worker process has its own handles
        store = {name: group[name] for name in ("tokens", "ids", "logp", "c_T")}
        pending: dict[str, np.ndarray] | None = None
        for b in range(0, len(chunks), self.shuffle_buffer_chunks):
            buffer = chunks[b:b + self.shuffle_buffer_chunks]
            size = sum(self.ranges[c][1] - self.ranges[c][0] for c in buffer)
            if skip >= size:  # a buffer wholly before the resume point is never read
                skip -= size
                continue
            order = self.buffer_permutation(buffer)[skip:]
            skip = 0
            arrays = {name: a[order] for name, a in self._read(store, buffer).items()}
            if pending is not None:
                arrays = {name: np.concatenate([pending[name], a]) for name, a in arrays.items()}
            start = 0
            while len(arrays["ids"]) - start >= self.batch_size and num_yield > 0:
                yield self.make_batch({n: a[start:start + self.batch_size] for n, a in arrays.items()})
                start += self.batch_size
                num_yield -= 1
            pending = {n: a[start:] for n, a in arrays.items()}
        if pending is not None and len(pending["ids"]) and num_yield > 0:
            yield self.make_batch(pending)
