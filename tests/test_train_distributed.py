"""Two processes with torch distributed (torchrun, gloo on CPU) give the same per-step losses as one process at
the same global batch, and only rank 0 writes logs, dashboards and checkpoints."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

ARGS = ["--steps", "6", "--batch-size", "8", "--lr", "1e-4", "--warmup", "2", "--probe-every", "3",
        "--probe-size", "4", "--checkpoint-every", "3", "--threads", "1", "--no-progress", "--report-to", "tensorboard"]


def _train(cmd, cache, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*cmd, "train", "--cache", str(cache), "--out", str(out), *ARGS],
                       capture_output=True, text=True, env=env, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    return pq.read_table(out / "steps.parquet").to_pydict()


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="no torchrun")
def test_two_gloo_processes_equal_one(train_cache, tmp_path):
    one = _train([sys.executable, "-m", "refcache.cli"], train_cache, tmp_path / "one")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    two = _train([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "refcache.cli"], train_cache,
                 tmp_path / "two")
    assert one["step"] == two["step"] == list(range(6))
    # Same global batch of 8 pairs, split 4+4: only the fp32 reduction order differs.
    np.testing.assert_allclose(two["loss"], one["loss"], atol=1e-5, rtol=0)
    # Adam amplifies the reduction-order noise in near-zero gradient entries a little over steps.
    np.testing.assert_allclose(two["grad_norm"], one["grad_norm"], rtol=1e-3)
    assert abs(one["loss"][0] - np.log(2)) < 1e-5
    # Rank 0 alone writes: the same files, the same number of example rows, one set of checkpoints.
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))
    assert pq.read_table(tmp_path / "two" / "examples").num_rows == pq.read_table(tmp_path / "one" / "examples").num_rows
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == sorted(os.listdir(tmp_path / "one" / "checkpoints"))
    assert len(os.listdir(tmp_path / "two" / "tensorboard")) == 1  # one event file: rank 0's
