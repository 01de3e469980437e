"""Session fixtures shared by every stage's tests.

  tiny_model_dir  Path to the embedded reference model, data/tiny-llama
  smollm2_dir     Path to the real-model fixture data/smollm2 (SmolLM2-135M-Instruct; `make smollm2` builds it)
  prefs_dir       Path to data/prefs (train.jsonl, eval.jsonl)
  train_cache     Path to a finished cache: hf backend, float32, first 256 rows of train.jsonl
  eval_cache      Path to a finished cache: hf backend, float32, first 64 rows of eval.jsonl
  vllm_scorer     one vLLM engine (float32) per test session, for pipeline.precompute(..., scorer=...)

The caches are built once per session in a temporary directory; treat them as read-only.
"""

import os
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


@pytest.fixture(scope="session")
def vllm_scorer(tiny_model_dir):
    """One vLLM engine for the whole session (engine start costs ~15-60 s on CPU)."""
    from pipeline.backends import VLLMScorer

    scorer = VLLMScorer(tiny_model_dir, "float32", max_model_len=1024, gpu_memory_utilization=0.1)
    yield scorer
    scorer.close()
