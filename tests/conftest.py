"""Session fixtures shared by every stage's tests.

  tiny_model_dir  Path to the embedded reference model, data/tiny-llama
  smollm2_dir     Path to the real-model fixture data/smollm2 (SmolLM2-135M-Instruct; `make smollm2` builds it)
  prefs_dir       Path to data/prefs (train.jsonl, eval.jsonl)
  train_cache     Path to a finished cache: hf backend, float32, first 256 rows of train.jsonl
  eval_cache      Path to a finished cache: hf backend, float32, first 64 rows of eval.jsonl
  vllm_scorer     one vLLM engine (tiny model, float32) per test module, for precompute(..., scorer=...)
  start_vllm      a function: (model_dir, **settings) -> (float32 VLLMScorer, what starting it printed)

The caches are built once per session in a temporary directory; treat them as read-only.
"""

import os
import sys
from pathlib import Path

# The suite runs on 2 shared cores. Two torch threads thrash when other processes compete for them (measured
# 5-10x slower than one thread on the tiny model); one thread is about as fast when the cores are free.
# Set before torch is imported so subprocesses inherit it too. Override: REFCACHE_TEST_THREADS=2.
THREADS = os.environ.setdefault("REFCACHE_TEST_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", THREADS)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(int(THREADS))
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    d = ROOT / "data" / "tiny-llama"
    assert (d / "config.json").exists(), f"{d} is missing: rebuild it with data/build_model.py"
    return d


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    d = ROOT / "data" / "smollm2"
    if not (d / "config.json").exists():
        pytest.fail(f"{d} is missing: build it with `make smollm2` (make test does it)", pytrace=False)
    return d


@pytest.fixture(scope="session")
def prefs_dir() -> Path:
    d = ROOT / "data" / "prefs"
    assert (d / "train.jsonl").exists(), f"{d}/train.jsonl is missing: rebuild it with data/build_prefs.py"
    return d


def _build_cache(data, model, out, limit):
    from pipeline.precompute import precompute

    precompute(data, model, out, backend="hf", dtype="float32", limit=limit, progress=False)
    return out


@pytest.fixture(scope="session")
def train_cache(tmp_path_factory, tiny_model_dir, prefs_dir) -> Path:
    return _build_cache(prefs_dir / "train.jsonl", tiny_model_dir, tmp_path_factory.mktemp("cache") / "train", 256)


@pytest.fixture(scope="session")
def eval_cache(tmp_path_factory, tiny_model_dir, prefs_dir) -> Path:
    return _build_cache(prefs_dir / "eval.jsonl", tiny_model_dir, tmp_path_factory.mktemp("cache") / "eval", 64)


def _start_vllm(model_dir, **settings):
    """A float32 VLLMScorer, and what its start printed on this process's stdout/stderr (sys.stdout/sys.stderr and
    file descriptors 1 and 2, so the engine's child processes count too); the text is passed on to stderr."""
    import contextlib
    import tempfile

    from pipeline.backends import VLLMScorer

    with tempfile.TemporaryFile("w+") as f:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                scorer = VLLMScorer(model_dir, "float32", **settings)
        finally:
            f.flush()
            for fd, old in zip((1, 2), saved):
                os.dup2(old, fd)
                os.close(old)
            f.seek(0)
            printed = f.read()
            sys.stderr.write(printed)
    return scorer, printed


@pytest.fixture(scope="session")
def start_vllm():
    return _start_vllm


@pytest.fixture(scope="module")
def vllm_scorer(tiny_model_dir):
    """One vLLM engine per test module that asks for it (tiny model, float32, KV cache sized by the scorer),
    closed before the next module starts its own: one engine at a time. `start_output`: what starting it printed."""
    scorer, scorer.start_output = _start_vllm(tiny_model_dir, max_model_len=1024)
    yield scorer
    scorer.close()
