"""The typed headers of the two stores: what a store's group attributes say, read and validated once, here.

Every stage that reads a store asks its header (``TokenStore.header``, ``LogitStoreReader.header``,
``stores.logits.open_store``) instead of looking keys up in the raw attributes, so that a key's type, its
default in stores written before it existed, and each rule on it are written in one place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LOGITS_FORMAT = "babydistill.logits"
LOGITS_FORMAT_VERSION = 2
# Stores of quantised log-probabilities (logp_dtype uint8): a reader of version 2 would take their padding for
# probabilities, so they carry version 3, which it refuses; float16 and float32 stores stay version 2.
LOGITS_QUANT_FORMAT_VERSION = 3
LOGITS_FORMAT_VERSIONS = (LOGITS_FORMAT_VERSION, LOGITS_QUANT_FORMAT_VERSION)
LOGP_DTYPES = ("float16", "float32", "uint8")
TOKENS_FORMAT = "babydistill.tokens"
TOKENS_FORMAT_VERSION = 1

MODES = ("topk", "sample", "hybrid")
ORDERS = ("shuffled", "corpus")
# Modes whose slot weights sum to 1 by construction (draws): no tail; weights at T = 1 (`temperature_refusal`).
SAMPLED_MODES = ("sample", "hybrid")
REBUILD_STORE = "rebuild the store with `babydistill capture CONFIG --force` (the old one is moved aside)"


class HeaderError(ValueError):
    """A store's header that this babydistill cannot read; the message names the store and the fix."""


# A top-k store asked for an uncaptured T (c_T from a uniform tail), against a recapture at T, on the demo run's
# teachers: the gradient's bias over the dense gradient's norm (docs/results/tempered-targets/tempered_targets.json);
# and in students (docs/results/store-study/retemper/): top-32 at T = 2, approximated minus recaptured, 3 seeds.
RETEMPERING_BIAS = ("at T = 2 the approximate gradient's bias is 1.7x (top-8) and 1.5x (top-32) the dense gradient's "
                    "norm; top-32 students at T = 2 end +0.0004 nats of validation CE from a recapture's, 90% interval "
                    "[-0.020, +0.020], and either trails online T = 2 students by about 0.06: a hybrid store with "
                    "tail_logp captured at T is the tempered design")


def temperature_refusal(mode: str, temperature: float, temperatures=(1.0,), tail_logp: bool = False,
                        approximate: bool = False) -> str | None:
    """Why a store of ``mode`` captured at ``temperatures`` (with or without the tail draws' probabilities,
    ``tail_logp``) cannot serve a student at ``temperature``, or None. The one statement of the rule:

    - topk serves its captured temperatures; an uncaptured one only through the uniform-tail approximation, asked
      for with ``approximate`` (distill.use_exact_c_T false), since its error is larger than the gradient itself
      (``RETEMPERING_BIAS``);
    - sampled weights estimate p at T = 1; a hybrid store whose draws keep their exact probabilities p_j serves
      every captured T too: the head exactly (p_i^(1/T) e^-c_T), each draw re-weighted by importance,
      w_j p_j^(1/T - 1) e^-c_T (unbiased for p_T,j; `kernels.targets.prepare_targets`), which needs p_j and
      the exact c_T of T; a sample store keeps no p_j (a hybrid store with its head is the tempered design);
    - so an uncaptured T, or a store without p_j, is refused, with the capture that would serve it.
    """
    captured = any(abs(float(t) - temperature) < 1e-9 for t in temperatures)
    if temperature == 1.0 or (mode not in SAMPLED_MODES and (captured or approximate)):
        return None
    wanted = f"--set cache.temperatures=[{','.join(f'{t:g}' for t in sorted({1.0, *temperatures, temperature}))}]"
    rebuild = f"`babydistill capture CONFIG --force --set cache.mode=hybrid --set cache.tail_logp=true {wanted}`"
    if mode not in SAMPLED_MODES:
        return (f"topk targets serve the captured temperatures {[float(t) for t in temperatures]} (got {temperature:g}; "
                f"the uniform-tail approximation of an uncaptured one: {RETEMPERING_BIAS}): rebuild the store with "
                f"{rebuild}, or as top-k at that T with `babydistill capture CONFIG --force {wanted}`, or set "
                f"distill.use_exact_c_T=false to use the approximation anyway")
    if mode == "sample" or not tail_logp:
        kept = "sample targets keep" if mode == "sample" else "hybrid targets without tail_logp keep"
        return (f"{kept} no exact probabilities of their draws, so they serve distill.temperature 1 only "
                f"(got {temperature:g}): rebuild the store with {rebuild}")
    if not captured:
        return (f"hybrid targets serve the captured temperatures {[float(t) for t in temperatures]} only (got "
                f"{temperature:g}: its exact c_T was not captured): rebuild the store with {rebuild}")
    return None


def logits_format_version(logp_dtype: str) -> int:
    """The format version of a logit store whose log-probabilities are ``logp_dtype``."""
    return LOGITS_QUANT_FORMAT_VERSION if logp_dtype == "uint8" else LOGITS_FORMAT_VERSION


def _check_format(attrs: dict, where: str, kind: str, expected: tuple[str, int | tuple[int, ...]], fix: str) -> None:
    """HeaderError unless ``attrs`` are the header of a ``kind`` store of this format and version (or versions)."""
    if attrs.get("format") != expected[0]:
        raise HeaderError(f"{where}: not a babydistill {kind} store (format {attrs.get('format')!r})")
    versions = expected[1] if isinstance(expected[1], tuple) else (expected[1],)
    if attrs.get("format_version") not in versions:
        raise HeaderError(f"{where}: {kind} store format version {attrs.get('format_version')}, this babydistill "
                          f"reads {' or '.join(map(str, versions))}{fix}")


@dataclass(frozen=True)
class MadeFromTokens:
    """What both stores record of the token windows they hold: a logit store is read only with the token store
    (and tokenizer) it was made from."""

    seq_len: int
    vocab_size: int
    tokenizer_hash: str
    tokens_hash: str
    windows_hash: str


@dataclass(frozen=True)
class LogitStoreHeader(MadeFromTokens):
    """The header of ``logits.zarr`` (its group attributes), typed. ``identity`` keeps every key as recorded, for
    comparing a store with what a config would capture."""

    mode: str
    slots: int
    num_windows: int
    chunk_windows: int
    temperatures: tuple[float, ...]
    logp_dtype: str
    k: int | None = None
    samples: int | None = None
    order: str = "shuffled"
    seed: int = 0
    tail_logp: bool = False   # absent from stores written before the control variate
    draw_sets: int = 1        # absent from stores written before draw sets
    ensemble: str = "logits"
    teachers: tuple[dict, ...] = ()
    codec: dict | None = None
    logp_step: float | None = None   # logp_dtype uint8: the step of the codes (stores.quant)
    fidelity: dict | None = None
    capture: dict | None = None
    identity: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_attrs(cls, attrs: dict, where: str) -> LogitStoreHeader:
        """The header of the store at ``where`` from its attributes; HeaderError when it is not a logit store of
        this format version."""
        _check_format(attrs, where, "logit", (LOGITS_FORMAT, LOGITS_FORMAT_VERSIONS),
                      f" (rows in a global shuffle, for well-mixed batches); {REBUILD_STORE}")
        header = cls.from_identity(attrs, where)
        if attrs.get("format_version") != logits_format_version(header.logp_dtype):
            raise HeaderError(f"{where}: logp_dtype {header.logp_dtype} in a store of format version "
                              f"{attrs.get('format_version')}; {REBUILD_STORE}")
        return header

    @classmethod
    def from_identity(cls, attrs: dict, where: str) -> LogitStoreHeader:
        """The header that attributes ``attrs`` describe (a store being created has no format key yet)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"identity"}
        values = {key: value for key, value in attrs.items() if key in known}
        try:
            header = cls(**values, identity=dict(attrs))
        except TypeError as exc:
            raise HeaderError(f"{where}: the store's header lacks a key ({exc}); {REBUILD_STORE}") from None
        # Lists in JSON; tuples here, so that a header is hashable and compares by value.
        object.__setattr__(header, "temperatures", tuple(float(t) for t in header.temperatures))
        object.__setattr__(header, "teachers", tuple(header.teachers or ()))
        if header.mode not in MODES or header.order not in ORDERS or header.logp_dtype not in LOGP_DTYPES:
            raise HeaderError(f"{where}: unknown mode {header.mode!r}, order {header.order!r} or logp_dtype "
                              f"{header.logp_dtype!r}; {REBUILD_STORE}")
        if (header.logp_dtype == "uint8") != (header.logp_step is not None):
            raise HeaderError(f"{where}: logp_step {header.logp_step} with logp_dtype {header.logp_dtype}; "
                              f"{REBUILD_STORE}")
        return header

    @property
    def targets_are_complete(self) -> bool:
        """True for stores whose slot weights sum to 1 by construction (sample, hybrid): no tail."""
        return self.mode in SAMPLED_MODES

    @property
    def head(self) -> int:
        """Slots kept exactly (the top k) before the tail draws: k for hybrid stores, 0 for sampled ones."""
        return int(self.k) if self.mode == "hybrid" else 0

    @property
    def array_names(self) -> tuple[str, ...]:
        """The arrays the store holds (hybrid stores captured with ``cache.tail_logp`` also keep the tail draws'
        exact log-probabilities)."""
        return ("ids", "logp", "c_T", "tokens", "window_ids") + (("tail_logp",) if self.tail_logp else ())

    @property
    def logp_array_dtype(self) -> str:
        """The zarr data type of ``logp`` and ``tail_logp``: what plain zarr returns (uint8 codes decode to float32
        through their FixedScaleOffset filter, stores.quant)."""
        return "float32" if self.logp_dtype == "uint8" else self.logp_dtype

    def array_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Each array's (shape, dtype), as the header fixes them."""
        rows = (self.num_windows, self.seq_len)
        shapes = {"ids": ((*rows, self.slots), "uint16"),
                  "logp": ((*rows, self.slots), self.logp_array_dtype),
                  "c_T": ((*rows, len(self.temperatures)), "float32"),
                  "tokens": ((self.num_windows, self.seq_len + 1), "uint16"),
                  "window_ids": ((self.num_windows,), "uint32")}
        if self.tail_logp:
            shapes["tail_logp"] = ((*rows, self.slots - int(self.k)), self.logp_array_dtype)
        return shapes

    def draw_set_columns(self, draw_set: int) -> np.ndarray:
        """The slot columns of draw set ``draw_set`` (taken mod the store's draw sets): the head, then the set's
        tail. All slots for a store of one draw set."""
        if self.draw_sets == 1:
            return np.arange(self.slots)
        k = int(self.k)
        width = (self.slots - k) // self.draw_sets
        first = k + (draw_set % self.draw_sets) * width
        return np.concatenate([np.arange(k), np.arange(first, first + width)])

    def temperature_column(self, temperature: float | None) -> int | None:
        """The column of ``c_T`` captured at ``temperature``, or None when it was not captured."""
        return next((i for i, t in enumerate(self.temperatures)
                     if temperature is not None and abs(t - temperature) < 1e-9), None)

    def describe_targets(self, controlled: bool) -> str:
        """'hybrid targets of 8 exact ids + 12 draws', with what keeps the student from a control variate on them
        when not ``controlled``."""
        ids = f"{self.k} exact ids + " if self.mode == "hybrid" else ""
        plain = ("" if controlled else " with their probabilities unused (distill.control_variate=never)"
                 if self.tail_logp else " without their probabilities")
        return f"{self.mode} targets of {ids}{self.samples} draws{plain}"

    def with_values(self, **values: Any) -> LogitStoreHeader:
        return dataclasses.replace(self, **values, identity={**self.identity, **values})


@dataclass(frozen=True)
class TokenStoreHeader(MadeFromTokens):
    """The header of ``tokens.zarr`` (its group attributes), typed."""

    splits: dict
    corpus_hashes: dict | None = None
    bos_id: int | None = None
    eod_id: int | None = None
    pad_id: int | None = None
    chunk_crc32: dict | None = None   # absent from stores written before chunk checksums

    @classmethod
    def from_attrs(cls, attrs: dict, where: str) -> TokenStoreHeader:
        _check_format(attrs, where, "token", (TOKENS_FORMAT, TOKENS_FORMAT_VERSION),
                      "; re-run `babydistill tokenize CONFIG --force`")
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{key: value for key, value in attrs.items() if key in known})
        except TypeError as exc:
            raise HeaderError(f"{where}: the token store's header lacks a key ({exc}); re-run "
                              f"`babydistill tokenize CONFIG --force`") from None

    def num_windows(self, split: str) -> int:
        return int(self.splits[split]["num_windows"])
