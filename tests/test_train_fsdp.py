"""FSDP2 (`--parallel fsdp`) on CPU with gloo under torchrun: 2 sharded processes give the per-step losses and eval
metrics of 1 process at the same global batch; each holds half of the weights and AdamW state; a run killed
mid-way resumes exactly from its sharded checkpoint, also on another number of processes; LoRA, bf16 mixed
precision and activation checkpointing train."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
pytestmark = pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="no torchrun")

STEPS = 10
ARGS = ["--steps", str(STEPS), "--batch-size", "8", "--lr", "1e-4", "--warmup", "2", "--probe-every", "5",
        "--probe-size", "4", "--eval-every", "5", "--checkpoint-every", "4", "--threads", "1", "--no-progress"]
ONE = [sys.executable, "-m", "refcache.cli"]
TWO = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "refcache.cli"]


def _cmd(launcher, caches, out, extra=()):
    return [*launcher, "train", "--cache", str(caches[0]), "--eval-cache", str(caches[1]), "--out", str(out), *ARGS,
            *extra]


def _train(launcher, caches, out, extra=(), env=None):
    r = subprocess.run(_cmd(launcher, caches, out, extra), capture_output=True, text=True, timeout=900, check=False,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _steps(run):
    return pq.read_table(os.path.join(run, "steps.parquet")).to_pydict()


def _summary(run):
    with open(os.path.join(run, "summary.json")) as f:
        return json.load(f)


def _weights(run):
    return load_file(os.path.join(run, "final", "model.safetensors"))


def _descendants(pid):
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(c) for c in f.read().split()]
    return kids + [d for k in kids for d in _descendants(k)]


def _kill_workers(proc):
    """SIGKILL torchrun's workers (they run in sessions of their own: killing torchrun's process group would leave
    them training), then let torchrun reap them and exit, as it does when its workers die."""
    workers = _descendants(proc.pid)
    assert workers
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def caches(train_cache, eval_cache):
    return train_cache, eval_cache


@pytest.fixture(scope="module")
def runs(tmp_path_factory, caches):
    """One process (no sharding), two DDP processes and two FSDP processes: the same run."""
    root = tmp_path_factory.mktemp("fsdp")
    _train(ONE, caches, root / "one")
    _train(TWO, caches, root / "ddp2")
    _train(TWO, caches, root / "fsdp2", ["--parallel", "fsdp"])
    return root


def test_two_fsdp_processes_equal_one(runs):
    one, two = _steps(runs / "one"), _steps(runs / "fsdp2")
    assert one["step"] == two["step"] == list(range(STEPS))
    diff = np.abs(np.asarray(one["loss"]) - np.asarray(two["loss"])).max()
    print(f"FSDP 2 processes vs 1 process: max |loss diff| over {STEPS} fp32 steps = {diff:.2e}")
    assert diff < 1e-5
    assert abs(one["loss"][0] - np.log(2)) < 1e-5 and abs(two["loss"][0] - np.log(2)) < 1e-5
    np.testing.assert_allclose(two["grad_norm"], one["grad_norm"], rtol=1e-3)
    # the eval pass: every eval pair scored, split over the processes and gathered
    e1, e2 = (pq.read_table(runs / r / "evals.parquet").to_pydict() for r in ("one", "fsdp2"))
    assert e1["step"] == e2["step"] == [0, 5, 10] and e2["pairs"] == [64] * 3
    # logps are sums over ~100 tokens (~ -13 nats): the two layouts reduce in another order, ~1e-6 relative apart
    for k in ("loss", "reward_margin", "reward_accuracy", "policy_chosen_logp"):
        np.testing.assert_allclose(e2[k], e1[k], atol=1e-5, rtol=2e-6)
    assert _summary(runs / "fsdp2")["eval"]["pairs"] == 64
    # rank 0 writes the logs: as many example rows; sharded checkpoints are directories
    assert pq.read_table(runs / "fsdp2" / "examples").num_rows == pq.read_table(runs / "one" / "examples").num_rows
    assert sorted(os.listdir(runs / "fsdp2" / "checkpoints")) == ["step-00000008", "step-00000010"]
    wa, wb = _weights(runs / "one"), _weights(runs / "fsdp2")
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-3  # consolidated into one HF directory


def test_eval_pass_under_ddp(runs):
    """DDP (the default for several processes) splits the eval pairs over the processes too."""
    e1, e2 = (pq.read_table(runs / r / "evals.parquet").to_pydict() for r in ("one", "ddp2"))
    assert e2["step"] == [0, 5, 10] and e2["pairs"] == [64] * 3
    for k in ("loss", "reward_margin", "reward_accuracy", "ref_rejected_logp"):
        np.testing.assert_allclose(e2[k], e1[k], atol=1e-5, rtol=0)
    s = _summary(runs / "ddp2")
    assert s["parallel"] == "ddp" and s["shards_per_rank"] == _summary(runs / "one")["shards_per_rank"] * 2


def test_each_rank_holds_half(runs):
    full = _summary(runs / "one")["shards_per_rank"]
    shards = _summary(runs / "fsdp2")["shards_per_rank"]
    n = full[0]["param_elements"]
    assert len(full) == 1 and full[0]["optimizer_elements"] == 2 * n  # AdamW: two moments per weight
    assert len(shards) == 2
    for s in shards:
        print(f"rank holds {s['param_elements']:,} of {n:,} weights, {s['optimizer_elements']:,} optimizer values")
        # dim 0 of each tensor is cut in two (padded to even): half, up to one row per tensor
        assert n / 2 <= s["param_elements"] <= n / 2 + 0.01 * n
        assert s["optimizer_elements"] == 2 * s["param_elements"]


def test_kill_and_resume_under_fsdp(runs, caches, tmp_path):
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(TWO, caches, killed, ["--parallel", "fsdp"]),
                            env={**os.environ, "OMP_NUM_THREADS": "1", "REFCACHE_STEP_DELAY": "0.5"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = killed / "checkpoints" / "step-00000004"
    deadline = time.time() + 300
    while not target.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # into step 5-6: rows past the checkpoint exist in memory or in later parts
    _kill_workers(proc)
    assert target.is_dir() and not (killed / "summary.json").exists()
    other = tmp_path / "on-one-process"
    shutil.copytree(killed, other)

    _train(TWO, caches, killed, ["--parallel", "fsdp", "--resume"])
    full, again = _steps(runs / "fsdp2"), _steps(killed)
    assert again["step"] == list(range(STEPS))
    assert again["loss"] == full["loss"] and again["grad_norm"] == full["grad_norm"]  # bit for bit
    wa, wb = _weights(runs / "fsdp2"), _weights(killed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ea, eb = (pq.read_table(r / "examples").to_pandas().sort_values(["step", "source", "split", "pair_id"])
              for r in (runs / "fsdp2", killed))
    assert len(ea) == len(eb) and eb.groupby(["step", "source", "split", "pair_id"]).size().max() == 1
    np.testing.assert_array_equal(ea.loss.to_numpy(), eb.loss.to_numpy())

    # the same checkpoint on one process: DCP reshards the weights and AdamW state
    r = _train(ONE, caches, other, ["--parallel", "fsdp", "--resume"])
    assert "stale lock" in r.stderr
    moved = _steps(other)
    diff = np.abs(np.asarray(moved["loss"]) - np.asarray(full["loss"])).max()
    print(f"resumed on 1 process from a 2-process checkpoint: max |loss diff| {diff:.2e}")
    assert moved["loss"][:4] == full["loss"][:4] and diff < 1e-5
    wc = _weights(other)
    assert max(float((wa[k] - wc[k]).abs().max()) for k in wa) < 1e-4


def test_resume_across_checkpoint_formats_refused(runs, caches, capsys, tmp_path):
    """A sharded checkpoint needs --parallel fsdp to resume, and a whole-model one needs no sharding."""
    from refcache.cli import main as cli_main

    for src, extra, was in (("fsdp2", [], "--parallel fsdp"), ("one", ["--parallel", "fsdp"], "one process")):
        run = tmp_path / src
        shutil.copytree(runs / src, run)
        argv = _cmd([], caches, run, [*extra, "--resume"])
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert was in err and "resume it the same way" in err and "\n" not in err, err


def test_lora_bf16_grad_checkpointing_under_fsdp(caches, tmp_path, tiny_model_dir):
    out = tmp_path / "lora"
    _train(TWO, caches, out, ["--parallel", "fsdp", "--lora", "4", "--dtype", "bfloat16", "--grad-checkpointing",
                              "--steps", "3", "--eval-every", "0", "--probe-every", "0", "--lr", "1e-3"])
    losses = _steps(out)["loss"]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert abs(losses[0] - np.log(2)) < 0.05  # bf16 weights against an fp32 cache: close to ln 2, not exact
    base, trained = load_file(os.path.join(tiny_model_dir, "model.safetensors")), _weights(out)
    assert trained.keys() == base.keys()  # LoRA merged into a plain Hugging Face model
    assert any(not torch.equal(base[k], trained[k]) for k in base)
