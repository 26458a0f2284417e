"""The config's sections, one dataclass per stage (``data``, ``tokenizer``, ``model``, ``train``,
``teachers``, ``cache``, ``distill``, ``eval``, ``sweep``), each checking its own keys on construction.

Checks across sections (``cache.k`` against the vocabulary, ...) are ``Config``'s, in ``pipeline/config.py``,
which also loads a YAML file into these sections; import the sections from there.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from babydistill.pipeline.config_fields import ADDED_LATER, EXECUTION_ONLY, added_later, check, coerce

UINT16_VOCAB_LIMIT = 65536  # token ids are stored as uint16


class _NamedBySeed:
    """A section of models named by seed (teachers t1, t2; students s1, s2): its ``seeds``, or 1..N when it lists
    none, N being its field ``COUNT_FIELD``."""

    SECTION: ClassVar[str]
    COUNT_FIELD: ClassVar[str]

    def _check_seeds(self) -> None:
        count = getattr(self, self.COUNT_FIELD)
        check(self.seeds is None or len(self.seeds) == count, f"{self.SECTION}.seeds",
              f"must list {self.SECTION}.{self.COUNT_FIELD} ({count}) seeds, got {self.seeds}")

    def resolved_seeds(self) -> list[int]:
        count = getattr(self, self.COUNT_FIELD)
        return list(self.seeds) if self.seeds is not None else list(range(1, count + 1))


@dataclass
class DataConfig:
    corpus: str | None = None
    """Corpus folder (BabyLM 2024/2023 layout, train/validation/test folders, or *.txt); None = bundled."""
    seq_len: int = 128
    """Tokens per training window (the model sees seq_len inputs and predicts seq_len labels)."""
    validation_fraction: float = 0.05
    """Share of each training source's words (its tail, whole paragraphs) held out for validation,
    when the corpus has no validation folder of its own."""
    test_fraction: float = 0.05
    """Share held out for test, only when the corpus has no test (or dev) folder."""
    max_train_words: int | None = None
    """Keep about this many training words, the same share from the head of every source
    (quick runs and demos); None = all."""

    def __post_init__(self):
        check(self.seq_len >= 2, "data.seq_len", f"must be >= 2, got {self.seq_len}")
        check(0.0 < self.validation_fraction < 0.5, "data.validation_fraction",
              f"must be in (0, 0.5), got {self.validation_fraction}")
        check(0.0 <= self.test_fraction < 0.5, "data.test_fraction",
              f"must be in [0, 0.5), got {self.test_fraction}")
        check(self.max_train_words is None or self.max_train_words >= 1, "data.max_train_words",
              f"must be >= 1, got {self.max_train_words}")


@dataclass
class TokenizerConfig:
    vocab_size: int = 16000
    """BPE vocabulary size including the special tokens (16000 in the paper)."""
    min_frequency: int = 2
    """A merge must occur at least this often in the train split."""

    def __post_init__(self):
        check(self.vocab_size >= 300, "tokenizer.vocab_size",
              f"must be >= 300 (256 bytes + specials + merges), got {self.vocab_size}")
        check(self.vocab_size <= UINT16_VOCAB_LIMIT, "tokenizer.vocab_size",
              f"must be <= {UINT16_VOCAB_LIMIT} because token ids are stored as uint16, got {self.vocab_size}")
        check(self.min_frequency >= 1, "tokenizer.min_frequency", f"must be >= 1, got {self.min_frequency}")


@dataclass
class ModelConfig:
    hidden_size: int = 256
    intermediate_size: int = 1024
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 8
    """Grouped-query attention: key/value heads (must divide num_heads)."""
    tie_embeddings: bool = False
    """The paper unties the input embedding and the LM head."""
    rope_theta: float = 10000.0
    max_position_embeddings: int | None = None
    """None = data.seq_len (checked to be >= seq_len when set)."""

    def __post_init__(self):
        for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            check(getattr(self, key) >= 1, f"model.{key}", f"must be >= 1, got {getattr(self, key)}")
        check(self.hidden_size % self.num_heads == 0, "model.num_heads",
              f"must divide model.hidden_size ({self.hidden_size}), got {self.num_heads}")
        check(self.num_heads % self.num_kv_heads == 0, "model.num_kv_heads",
              f"must divide model.num_heads ({self.num_heads}), got {self.num_kv_heads}")
        check(self.rope_theta > 0, "model.rope_theta", f"must be > 0, got {self.rope_theta}")


@dataclass
class TrainConfig:
    lr: float = 7e-4
    epochs: int = 8
    batch_size: int = 32
    """Windows per optimizer step per process, before accumulation (global batch = batch_size x grad_accum)."""
    grad_accum: int = 4
    warmup_steps: int = 600
    weight_decay: float = 5.0
    """As published (sic): the paper's config has weight_decay 5."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    head_lr_scale: float = field(default=1.0, metadata=ADDED_LATER)
    """The output layer's (lm_head's; with ``model.tie_embeddings`` the shared matrix's) learning rate, as a
    multiple of ``lr``; AdamW's decoupled weight decay of that layer scales with it. At 4, under
    ``distill.normalization: sequence``, online and offline students of the CPU study both gained about
    0.01 nats (docs/results/offline-study, "What the tail noise does to the optimizer");
    ``distill.head_lr_scale`` sets it for the students alone."""
    min_lr_ratio: float = 0.0
    """Cosine decays to lr x min_lr_ratio."""
    seed: int = 0
    max_steps: int | None = None
    """Stop after this many optimizer steps (smoke runs); None = epochs x steps per epoch."""
    save_every: int = field(default=500, metadata=EXECUTION_ONLY)
    """Checkpoint every this many optimizer steps (and at every epoch end)."""
    log_every: int = field(default=10, metadata=EXECUTION_ONLY)
    eval_every: int | None = None
    """Validation loss every this many steps, besides every epoch end."""
    eval_windows: int | None = None
    """Cap on validation windows used during training (None = all)."""
    keep_best: bool = False
    """Export the best-by-validation weights instead of the final ones."""
    random_offset: bool = False
    """Shift each window by a random offset every epoch, like the paper's dataset (teachers only:
    the offline cache fixes the windows)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto = bf16 autocast on CUDA when supported (else fp16), fp32 on CPU."""
    device: str = "auto"
    compile: bool = field(default=False, metadata=EXECUTION_ONLY)
    """torch.compile the model for training (CUDA: fewer, fused kernels). Execution-only: the same model and
    math, rounded in another order, as with more threads; refused in one line where this torch cannot compile."""
    num_threads: int | None = field(default=None, metadata=EXECUTION_ONLY)
    """torch.set_num_threads on CPU; None = torch's default."""
    keep_checkpoints: int = field(default=2, metadata=EXECUTION_ONLY)
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = field(default_factory=list, metadata=EXECUTION_ONLY)
    """Experiment trackers that get the metrics.jsonl records too (pipeline/trackers.py; each needs its
    extra, e.g. pip install -e ".[tensorboard]"); metrics.jsonl is always written."""

    def __post_init__(self):
        check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        check(len(set(self.trackers)) == len(self.trackers), "train.trackers",
              f"lists a tracker twice: {self.trackers}")
        check(self.epochs >= 1, "train.epochs", f"must be >= 1, got {self.epochs}")
        check(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {self.grad_accum}")
        check(self.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas",
              f"must be two numbers in [0, 1), got {self.betas}")
        check(self.eps > 0, "train.eps", f"must be > 0, got {self.eps}")
        check(self.max_grad_norm > 0, "train.max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        check(self.head_lr_scale > 0, "train.head_lr_scale", f"must be > 0, got {self.head_lr_scale}")
        check(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        check(self.max_steps is None or self.max_steps >= 1, "train.max_steps", f"must be >= 1, got {self.max_steps}")
        check(self.save_every >= 1, "train.save_every", f"must be >= 1, got {self.save_every}")
        check(self.log_every >= 1, "train.log_every", f"must be >= 1, got {self.log_every}")
        check(self.eval_every is None or self.eval_every >= 1, "train.eval_every",
              f"must be >= 1, got {self.eval_every}")
        check(self.eval_windows is None or self.eval_windows >= 1, "train.eval_windows",
              f"must be >= 1, got {self.eval_windows}")
        check(self.keep_checkpoints >= 2, "train.keep_checkpoints",
              f"must be >= 2 (the newest may still be writing), got {self.keep_checkpoints}")


@dataclass
class TeachersConfig(_NamedBySeed):
    SECTION, COUNT_FIELD = "teachers", "count"
    count: int = field(default=2, metadata=EXECUTION_ONLY)
    """Teachers in the ensemble (the paper: 2). Which teachers form the ensemble is the cache's identity."""
    seeds: list[int] | None = field(default=None, metadata=EXECUTION_ONLY)
    """Teacher seeds; None = 1..count. Teacher i is named t<seed>."""

    def __post_init__(self):
        check(self.count >= 1, "teachers.count", f"must be >= 1, got {self.count}")
        self._check_seeds()


@dataclass
class CacheConfig:
    mode: Literal["topk", "sample", "hybrid"] = "hybrid"
    """hybrid = the top k exactly plus draws from the rest (unbiased; every captured T with tail_logp); topk = the k most probable
    ids (biased: the tail's shape is lost; any T); sample = ids drawn from the ensemble (unbiased; T = 1 only).
    See stores/logits.py. Default chosen by docs/results/offline-study/ (hybrid k = 8, S = 12 with the draws'
    probabilities, ``tail_logp``, 60 bytes per token: under sequence normalisation its students, with the
    student's tail as a control variate, beat those of 24 plain draws at the same bytes by 0.007 nats
    [0.003, 0.010] on validation; under token normalisation every unbiased store came within 0.01 of online
    distillation; top-32 fell behind under both, 0.02 and 0.10 nats, at 83 bytes). Under sequence normalisation
    the default k and samples are bigger: ``SEQUENCE_CACHE_DEFAULTS`` (pipeline/config.py)."""
    k: int = 8
    """Top-k ids kept per position (modes topk and hybrid). 32 when ``distill.normalization`` is sequence and a
    config file leaves it out (``SEQUENCE_CACHE_DEFAULTS``)."""
    samples: int = 12
    """Draws per position from the ensemble (mode sample) or from its tail beyond the top k (mode hybrid). 64
    when ``distill.normalization`` is sequence and a config file leaves it out (``SEQUENCE_CACHE_DEFAULTS``)."""
    tail_logp: bool = field(default=True, metadata=added_later(False))
    """Mode hybrid: also keep each tail draw's exact teacher log-probability (array ``tail_logp``), which lets
    the student use a control variate on the tail (``distill.control_variate``); about 1.5 bytes per draw.
    The other modes have no tail draws: for them it is false whatever the config says."""
    draw_sets: int = field(default=1, metadata=ADDED_LATER)
    """Mode hybrid: independent sets of ``samples`` tail draws per position; the student reads set
    epoch mod draw_sets, so each of the first draw_sets epochs sees fresh draws. The tail's bytes grow
    with it. Measured no better than 1 (docs/results/offline-study, arms ``hybrid8-*x6-*``): what
    counts is the draws one step reads, not how many a position gets over training."""
    order: Literal["shuffled", "corpus"] = "shuffled"
    """Row order of the store: a global permutation of the windows (well-mixed batches from a streaming
    reader) or corpus order (poorly mixed; kept to measure the difference)."""
    temperatures: list[float] = field(default_factory=lambda: [1.0])
    """Capture temperatures: the store keeps the exact correction c_T for each, and serves a student at each of them
    (mode topk; mode hybrid with ``tail_logp``; mode sample at T = 1 only). An uncaptured one is refused
    (`stores.header.temperature_refusal`)."""
    ensemble: Literal["logits", "probs"] = "logits"
    """logits = mean of raw logits (the paper); probs = mean of probabilities."""
    chunk_windows: int = 64
    """Windows per Zarr chunk (one capture task each)."""
    batch_size: int = field(default=16, metadata=EXECUTION_ONLY)
    """Windows per teacher forward pass."""
    workers: int = field(default=1, metadata=EXECUTION_ONLY)
    """Dask workers (1 = synchronous scheduler). On CUDA one worker per GPU, each seeing its GPU alone; more
    workers than visible GPUs is refused."""
    device: str = field(default="auto", metadata=EXECUTION_ONLY)
    """Where the teachers run: auto (CUDA when available), cpu, cuda. The ensemble, log-softmax, top-k and draws run
    in fp32 on the same device; only the sparse targets cross to the host."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field(default="auto", metadata=EXECUTION_ONLY)
    """The teachers' forward: auto = bf16 autocast on CUDA (fp32 on a GPU without bf16), fp32 on the CPU.
    Execution-only: a bf16 store counts as the same store as an fp32 one (the store records which it was, per
    chunk); measured at the demo size, bf16 moves the stored targets far less than the draws' own noise
    (docs/benchmarks/precision.json, `python -m babydistill.workflows.benchmarks.bench_precision`)."""
    logp_dtype: Literal["float16", "float32", "uint8"] = "float16"
    """How stored log-probabilities (``logp``, ``tail_logp``) are kept: float16, float32, or uint8 codes in the log
    domain over the fixed range [-25.4, 0] in steps of 0.1 nat (``stores/quant.py``; plain zarr reads them as
    float32 through a FixedScaleOffset filter). uint8 halves those arrays' bytes for an error far below the draws'
    own noise (docs/benchmarks/store_bytes.json); a capture where a top-k entry would fall below the range is
    refused, tail entries that do are counted in the header (``capture.clipped``)."""
    fidelity_positions: int = field(default=2048, metadata=EXECUTION_ONLY)
    """Positions sampled for the capture-time fidelity report. Execution-only: it picks what the capture
    reports on, not the targets students read."""
    seed: int = 0
    """Seed for sampled targets and the fidelity sample."""

    def __post_init__(self):
        check(self.mode in ("topk", "sample", "hybrid"), "cache.mode",
              f"must be topk, sample or hybrid, got {self.mode!r}")
        check(self.order in ("shuffled", "corpus"), "cache.order", f"must be shuffled or corpus, got {self.order!r}")
        check(self.k >= 1, "cache.k", f"must be >= 1, got {self.k}")
        check(self.samples >= 1, "cache.samples", f"must be >= 1, got {self.samples}")
        check(self.draw_sets >= 1, "cache.draw_sets", f"must be >= 1, got {self.draw_sets}")
        if self.mode != "hybrid":
            check(self.draw_sets == 1, "cache.draw_sets",
                  f"only mode hybrid has tail draws to repeat; got {self.draw_sets} with mode {self.mode}")
            self.tail_logp = False  # no tail draws: unused, and so left out of the store's fingerprint
        check(len(self.temperatures) >= 1 and all(t > 0 for t in self.temperatures), "cache.temperatures",
              f"must be a non-empty list of temperatures > 0, got {self.temperatures}")
        check(self.chunk_windows >= 1, "cache.chunk_windows", f"must be >= 1, got {self.chunk_windows}")
        check(self.batch_size >= 1, "cache.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.workers >= 1, "cache.workers", f"must be >= 1, got {self.workers}")
        check(self.fidelity_positions >= 0, "cache.fidelity_positions",
              f"must be >= 0, got {self.fidelity_positions}")


@dataclass
class DistillConfig(_NamedBySeed):
    SECTION, COUNT_FIELD = "distill", "students"
    alpha: float = 0.5
    """Weight of the CE term; 1 - alpha weighs the KL term."""
    temperature: float = 1.0
    tail: Literal["bucket", "renorm", "uniform"] = "bucket"
    normalization: Literal["token", "sequence", "sum"] = "token"
    """token = CE and KL averaged over tokens; sequence = the paper's released trainer (KL batchmean). A config file
    that sets sequence and leaves out ``cache.k`` / ``cache.samples`` gets a bigger store: ``SEQUENCE_CACHE_DEFAULTS``."""
    use_exact_c_T: bool = True
    """Use the store's exact temperature correction (top-k stores). False asks for the uniform-tail approximation
    instead, which also lets a top-k store serve an uncaptured temperature (refused otherwise: its gradient bias at
    T = 2 exceeds the gradient's norm, docs/loss.md)."""
    control_variate: Literal["auto", "required", "never"] = field(default="auto", metadata=ADDED_LATER)
    """Offline students from a hybrid store with ``tail_logp``: use the student's own tail as a control
    variate for the sampled tail (unbiased, far less noisy once the student nears the teacher; see
    `pipeline.distill.control_coefficients`). auto = when the store has it; required = refuse a store without it; never."""
    control_min_beta: float = field(default=0.0, metadata=ADDED_LATER)
    """A control-variate coefficient estimated below this is used as 0 (plain draws). Early in training the
    estimate overshoots the optimum, which is near 0 there, but 0.2 was measured no better than 0
    (docs/results/offline-study)."""
    head_lr_scale: float | None = field(default=None, metadata=ADDED_LATER)
    """The students' ``train.head_lr_scale`` (their output layer's learning rate as a multiple of ``train.lr``),
    leaving the teachers' as it is; None = ``train.head_lr_scale``."""
    students: int = field(default=1, metadata=EXECUTION_ONLY)
    """Offline students distilled from the one cache."""
    seeds: list[int] | None = field(default=None, metadata=EXECUTION_ONLY)
    """Student seeds; None = 1..students. Student i is named s<seed>."""
    online_students: int = field(default=0, metadata=EXECUTION_ONLY)
    """Students distilled online (teachers run every step: the paper's released method), named o<seed>."""

    def __post_init__(self):
        check(0.0 <= self.alpha <= 1.0, "distill.alpha", f"must be in [0, 1], got {self.alpha}")
        check(self.temperature > 0, "distill.temperature", f"must be > 0, got {self.temperature}")
        check(self.students >= 0, "distill.students", f"must be >= 0, got {self.students}")
        check(0.0 <= self.control_min_beta <= 1.0, "distill.control_min_beta",
              f"must be in [0, 1], got {self.control_min_beta}")
        check(self.head_lr_scale is None or self.head_lr_scale > 0, "distill.head_lr_scale",
              f"must be > 0 (or null: train.head_lr_scale), got {self.head_lr_scale}")
        check(self.online_students >= 0, "distill.online_students", f"must be >= 0, got {self.online_students}")
        self._check_seeds()

    @property
    def ce_only(self) -> bool:
        """alpha = 1 (under token or sequence normalisation, where the CE is a mean over tokens): the student learns
        from the labels alone, a CE-only control with the students' recipe; it reads no store and no teacher."""
        return self.alpha == 1.0 and self.normalization != "sum"


@dataclass
class EvalConfig:
    blimp: str | None = None
    """BLiMP folder of *.jsonl or a zip of them; None = the bundled copy."""
    max_pairs_per_paradigm: int | None = None
    """Seeded subset of pairs per paradigm (None = all 1000)."""
    batch_size: int = field(default=64, metadata=EXECUTION_ONLY)
    max_windows: int | None = None
    """Cap on validation/test windows for the loss evaluation (None = all)."""
    seed: int = 0
    zero_shot: list[dict[str, str]] = field(default_factory=list, metadata=ADDED_LATER)
    """BabyLM zero-shot suites from local files, scored as the BabyLM evaluation pipeline 2025 does
    (pipeline/zero_shot.py): a list of ``{task, path}`` (task: blimp, ewok or entity_tracking; path: a
    *.jsonl file or a folder of them), with an optional ``name`` (default: the task) that keys the
    results and the report column; give it when a task appears twice (BLiMP and its supplement)."""

    def __post_init__(self):
        from babydistill.pipeline.zero_shot import (
            TASKS,  # not at the top: zero_shot imports nothing from here
        )

        names = []
        for i, entry in enumerate(self.zero_shot):
            key = f"eval.zero_shot[{i}]"
            unknown = sorted(set(entry) - {"task", "path", "name"})
            check(not unknown, f"{key}.{unknown[0] if unknown else ''}", "unknown key (known keys: name, path, task)")
            check("task" in entry and "path" in entry, key,
                  f"needs `task` and `path`, e.g. {{task: blimp, path: evaluation_data/blimp_filtered}}; got {entry}")
            check(entry["task"] in TASKS, f"{key}.task", f"must be one of {', '.join(TASKS)}; got {entry['task']!r}")
            check(entry["path"] != "", f"{key}.path", "must not be empty")
            name = entry.get("name", entry["task"])
            check(name not in names, key, f"a second suite named {name!r}; give each a distinct `name` "
                                          f"(e.g. name: supplement)")
            names.append(name)
        check(self.max_pairs_per_paradigm is None or self.max_pairs_per_paradigm >= 1,
              "eval.max_pairs_per_paradigm", f"must be >= 1, got {self.max_pairs_per_paradigm}")
        check(self.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.max_windows is None or self.max_windows >= 1, "eval.max_windows",
              f"must be >= 1, got {self.max_windows}")


SWEEP_SECTIONS = ("distill", "train")
"""The sections a sweep searches over: the student's training. Everything else is fixed by the run's store."""
SWEEP_FIXED_KEYS = {"distill.students", "distill.seeds", "distill.online_students", "train.seed", "train.device",
                    "train.compile",
                    "train.num_threads", "train.eval_every", "train.eval_windows", "train.log_every",
                    "train.save_every", "train.keep_checkpoints", "train.keep_best"}
"""Keys of those sections that are not a student's hyperparameters: which students the run trains, how the
trial is measured (the objective must be the same for every trial), and how it runs."""
SWEEP_SPEC_KEYS = ("low", "high", "log", "step", "choices")


@dataclass
class SweepConfig:
    """`babydistill sweep`: Optuna over student hyperparameters, trials trained from the run's store."""

    space: dict[str, dict] = field(default_factory=dict)
    """The search space, ``section.key: spec`` over ``distill.*`` and ``train.*`` keys. A spec is a range
    ``{low: L, high: H}`` (``log: true`` for a log scale, ``step: S`` for a grid; an int key gives ints) or
    ``{choices: [...]}``."""
    trials: int = 16
    """Trials to finish (completed or pruned); the command-line --trials overrides it."""
    objective: str = "validation"
    """What is minimised: validation = the trial's validation CE at its last step (train.eval_windows
    windows). The test split is never used to choose."""
    sampler: Literal["tpe", "random"] = "tpe"
    """tpe = Optuna's TPESampler (with the Hyperband pruner, the BOHB of the paper); random = RandomSampler."""
    startup_trials: int = 10
    """TPE samples at random for this many trials before it models the results."""
    pruner: Literal["hyperband", "median", "none"] = "hyperband"
    """hyperband = HyperbandPruner; median = MedianPruner; none = every trial runs to the end."""
    min_steps: int | None = None
    """Hyperband's min_resource and the median pruner's warm-up, in optimizer steps; None = train.eval_every."""
    reduction_factor: int = 3
    """Hyperband's reduction factor: about 1 trial in this many goes on at each rung."""
    student_seed: int = 1
    """Every trial trains with this seed (1, like the default student s1), so trials differ only by their
    parameters."""
    seed: int = 0
    """The sampler's seed (one worker: the same parameters in the same order)."""
    heartbeat_seconds: int = 10
    """A running trial writes a heartbeat this often; one silent for 3x as long is marked failed (its process
    died) and retried once, resuming from its checkpoints."""

    def __post_init__(self):
        check(self.trials >= 1, "sweep.trials", f"must be >= 1, got {self.trials}")
        check(self.objective != "test", "sweep.objective",
              "the test split is never used to choose (it would no longer measure the chosen student); use validation")
        check(self.objective == "validation", "sweep.objective", f"must be validation, got {self.objective!r}")
        check(self.startup_trials >= 0, "sweep.startup_trials", f"must be >= 0, got {self.startup_trials}")
        check(self.min_steps is None or self.min_steps >= 1, "sweep.min_steps", f"must be >= 1, got {self.min_steps}")
        check(self.reduction_factor >= 2, "sweep.reduction_factor", f"must be >= 2, got {self.reduction_factor}")
        check(self.heartbeat_seconds >= 1, "sweep.heartbeat_seconds", f"must be >= 1, got {self.heartbeat_seconds}")
        self.space = {key: _check_space_entry(key, spec) for key, spec in self.space.items()}


def _check_space_entry(key: str, spec: Any) -> dict:
    """The spec with its values coerced to the key's type; one line naming ``sweep.space.<key>`` for a key the
    sweep cannot search or a spec that is empty or malformed."""
    name = f"sweep.space.{key}"
    section, _, field_name = key.partition(".")
    check(section != "cache", name, "changes the store, and every trial trains from the run's one store; "
                                    "compare stores with `babydistill study` (or capture another store in another run)")
    check(section in SWEEP_SECTIONS and "." not in field_name, name,
          f"a sweep searches over student keys only ({', '.join(s + '.*' for s in SWEEP_SECTIONS)})")
    hints = typing.get_type_hints({"distill": DistillConfig, "train": TrainConfig}[section])
    check(field_name in hints, name, f"unknown key (known keys: {', '.join(sorted(hints))})")
    check(key not in SWEEP_FIXED_KEYS, name, "is not a student hyperparameter (it fixes which students run, how a "
                                              "trial is measured or how it runs); set it in the config instead")
    check(isinstance(spec, dict) and spec, name, f"must be {{low: L, high: H}} or {{choices: [...]}}, got {spec!r}")
    for k in spec:
        check(k in SWEEP_SPEC_KEYS, f"{name}.{k}", f"unknown key (known keys: {', '.join(SWEEP_SPEC_KEYS)})")
    if "choices" in spec:
        check(not set(spec) - {"choices"}, name, "choices cannot be combined with low/high/log/step")
        choices = spec["choices"]
        check(isinstance(choices, list) and len(choices) >= 1, name, f"choices must be a non-empty list, got {choices!r}")
        choices = [coerce(c, hints[field_name], f"{name}.choices[{i}]") for i, c in enumerate(choices)]
        check(len({json.dumps(c) for c in choices}) == len(choices), name, f"choices repeat a value: {choices}")
        return {"choices": choices}
    annotation = hints[field_name]
    non_none = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    numeric = non_none[0] in (int, float)
    check(numeric, name, "is not a number: give {choices: [...]} (e.g. {choices: [true, false]})")
    check("low" in spec and "high" in spec, name, f"a range needs low and high, got {spec}")
    low, high = (coerce(spec[b], non_none[0], f"{name}.{b}") for b in ("low", "high"))
    check(low < high, name, f"empty range: low ({low}) must be < high ({high})")
    log = spec.get("log", False)
    check(isinstance(log, bool), f"{name}.log", f"must be true or false, got {log!r}")
    check(not log or low > 0, name, f"log scale needs low > 0, got {low}")
    out = {"low": low, "high": high, "log": log}
    if "step" in spec:
        out["step"] = coerce(spec["step"], non_none[0], f"{name}.step")
        check(out["step"] > 0 and not log, f"{name}.step", f"must be > 0 and without log: true, got {out['step']}")
    return out

