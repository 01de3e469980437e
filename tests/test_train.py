"""Stage-2 trainer end to end on the tiny model and the session caches: ln 2 at step 0, cached == live
reference, SIGKILL + resume == uninterrupted, manifest checks, one-line CLI errors, every loss trains."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import one_line_error

from dpo import losses as L
from dpo.train import TrainConfig, train
from refcache import UserError
from refcache.cli import main as cli_main
from refcache_base.runlog_schema import EXAMPLES_SCHEMA, STEPS_SCHEMA

FAST = {"batch_size": 4, "lr": 1e-4, "warmup": 2, "probe_size": 8, "progress": False, "threads": 1}


def _steps(run):
    return pq.read_table(os.path.join(run, "steps.parquet"))


def _examples(run):
    return pq.read_table(os.path.join(run, "examples"))


@pytest.fixture(scope="module")
def caches(train_cache, eval_cache):
    return str(train_cache), str(eval_cache)


@pytest.fixture(scope="module")
def pair_of_runs(tmp_path_factory, caches):
    """The same 50-step fp32 config, with the cached reference and with --live-ref (both shared-prompt rows, as
    the hf backend scored the cache, so the runs can be compared step by step: Adam turns last-bit differences
    into visible ones within a few steps)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, live in (("cached", False), ("live", True)):
        cfg = TrainConfig(
            cache=caches[0],
            eval_cache=caches[1],
            out=str(root / name),
            steps=50,
            live_ref=live,
            probe_every=25,
            checkpoint_every=20,
            **FAST,
        )
        out[name] = (cfg.out, train(cfg))
    return out


def test_step0_is_ln2_and_rewards_zero(pair_of_runs):
    run, summary = pair_of_runs["cached"]
    steps = _steps(run).to_pylist()
    print(f"step-0 loss - ln 2 = {steps[0]['loss'] - math.log(2):.3e}")
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-5
    assert summary["first_loss"] == steps[0]["loss"]
    ex = _examples(run).to_pandas()
    at0 = ex[ex.step == 0]
    assert set(at0.source) == {"train", "probe"} and set(at0.split) == {"train", "eval"}
    assert len(at0[at0.source == "train"]) == 4 and len(at0[at0.source == "probe"]) == 16
    assert np.abs(at0[["chosen_reward", "rejected_reward", "margin"]].to_numpy()).max() < 1e-5
    assert np.abs(at0.loss - math.log(2)).max() < 1e-5
    # and training moved it: the last steps fit the training pairs better than chance
    assert np.mean([r["loss"] for r in steps[-10:]]) < math.log(2)


def test_cached_equals_live_reference(pair_of_runs):
    cached, live = (_steps(pair_of_runs[k][0]) for k in ("cached", "live"))
    a, b = (np.asarray(t.column("loss").to_pylist()) for t in (cached, live))
    assert len(a) == len(b) == 50
    print(f"cached vs live reference, max |loss difference| over 50 steps = {np.abs(a - b).max():.3e}")
    assert np.abs(a - b).max() < 1e-5
    for col in ("ref_chosen_logp", "ref_rejected_logp", "reward_margin"):
        assert np.abs(np.asarray(cached.column(col)) - np.asarray(live.column(col))).max() < 1e-4


def test_run_directory_contract(pair_of_runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, summary = pair_of_runs["cached"]
    assert _steps(run).schema.equals(STEPS_SCHEMA)
    ex = _examples(run)
    assert ex.schema.remove_metadata().equals(EXAMPLES_SCHEMA)
    df = ex.to_pandas()
    train_rows = df[df.source == "train"]
    assert len(train_rows) == 50 * 4 and train_rows.groupby("step").size().eq(4).all()
    assert sorted(df[df.source == "probe"].step.unique().tolist()) == [0, 25, 50]
    assert (df.run_id == summary["run_id"]).all()
    np.testing.assert_allclose(df.margin, df.chosen_reward - df.rejected_reward, atol=1e-12)
    with open(os.path.join(run, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["cache_fingerprint"]["model"]["sha256"] and cfg["loss_params"] == {
        "beta": 0.1,
        "label_smoothing": 0.0,
    }
    assert cfg["total_steps"] == 50 and cfg["run_id"] == summary["run_id"]
    with open(os.path.join(run, "summary.json")) as f:
        assert json.load(f)["final_loss"] == _steps(run).column("loss")[-1].as_py()
    model = AutoModelForCausalLM.from_pretrained(summary["final_model"])
    assert AutoTokenizer.from_pretrained(summary["final_model"]).chat_template
    ckpts = sorted(os.listdir(os.path.join(run, "checkpoints")))
    assert ckpts == ["step-00000040.pt", "step-00000050.pt"]
    final_ckpt = torch.load(os.path.join(run, "checkpoints", ckpts[-1]), weights_only=False)
    for name, p in model.named_parameters():
        assert torch.equal(p, final_ckpt["model"][name])


def _cli_train(run, cache, extra=()):
    return [
        sys.executable,
        "-m",
        "refcache.cli",
        "train",
        "--cache",
        cache,
        "--out",
        run,
        "--steps",
        "24",
        "--batch-size",
        "4",
        "--lr",
        "1e-4",
        "--warmup",
        "3",
        "--probe-every",
        "7",
        "--probe-size",
        "4",
        "--checkpoint-every",
        "5",
        "--threads",
        "1",
        "--no-progress",
        *extra,
    ]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, caches):
    train_cache = caches[0]
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    env = dict(os.environ)
    subprocess.run(_cli_train(full, train_cache), check=True, env=env, capture_output=True)
    slow = dict(env, REFCACHE_STEP_DELAY="0.25")
    proc = subprocess.Popen(
        _cli_train(killed, train_cache), env=slow, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    target = os.path.join(killed, "checkpoints", "step-00000010.pt")
    deadline = time.time() + 120
    while not os.path.exists(target) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(
        0.4
    )  # let it get into step 11-12: rows past the checkpoint exist only in memory or later parts
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.exists(target) and not os.path.exists(os.path.join(killed, "summary.json"))
    r = subprocess.run(
        _cli_train(killed, train_cache, ["--resume"]), env=env, capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stderr

    a, b = _steps(full).to_pylist(), _steps(killed).to_pylist()
    assert [x["step"] for x in b] == list(range(24))
    for x, y in zip(a, b):
        for k in ("loss", "grad_norm", "lr", "reward_margin", "policy_chosen_logp"):
            assert x[k] == y[k], (x["step"], k)
    ea, eb = (
        _examples(r).to_pandas().sort_values(["step", "source", "split", "pair_id"]) for r in (full, killed)
    )
    assert len(ea) == len(eb) and eb.groupby(["step", "source", "split", "pair_id"]).size().max() == 1
    np.testing.assert_array_equal(ea.loss.to_numpy(), eb.loss.to_numpy())
    from safetensors.torch import load_file

    wa, wb = (load_file(os.path.join(r, "final", "model.safetensors")) for r in (full, killed))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    with open(os.path.join(full, "summary.json")) as f1, open(os.path.join(killed, "summary.json")) as f2:
        assert json.load(f1)["final_loss"] == json.load(f2)["final_loss"]


def _copy_model(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_manifest_mismatch_refused(tmp_path, tiny_model_dir, caches):
    train_cache = caches[0]
    from safetensors.torch import load_file, save_file

    other = _copy_model(tiny_model_dir, tmp_path / "other")
    w = load_file(os.path.join(other, "model.safetensors"))
    name = next(iter(w))
    w[name] = w[name] + 1e-3
    save_file(w, os.path.join(other, "model.safetensors"), metadata={"format": "pt"})
    cfg = TrainConfig(
        cache=train_cache,
        out=str(tmp_path / "run"),
        model=other,
        steps=2,
        probe_every=0,
        save_final=False,
        **{k: v for k, v in FAST.items()},
    )
    with pytest.raises(UserError, match=r"model sha256.*--allow-mismatch"):
        train(cfg)
    cfg.allow_mismatch = True
    s = train(cfg)
    assert abs(s["first_loss"] - math.log(2)) > 1e-5  # a different policy does not start at the reference

    tok = _copy_model(tiny_model_dir, tmp_path / "tok")
    with open(os.path.join(tok, "tokenizer_config.json")) as f:
        tc = json.load(f)
    tc["chat_template"] = (tc.get("chat_template") or "") + "{# changed #}"
    with open(os.path.join(tok, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f)
    with pytest.raises(UserError, match="tokenizer"):
        train(TrainConfig(cache=train_cache, out=str(tmp_path / "run2"), model=tok, steps=1, **FAST))


def test_cli_one_line_errors(capsys, tmp_path, caches):
    train_cache = caches[0]
    not_cache = tmp_path / "not-a-cache"
    not_cache.mkdir()
    assert "not a cache directory" in one_line_error(
        capsys, ["train", "--cache", str(not_cache), "--out", str(tmp_path / "r")]
    )
    assert "no such directory" in one_line_error(
        capsys, ["train", "--cache", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]
    )
    assert "unknown loss 'dpo2'" in one_line_error(
        capsys, ["train", "--cache", train_cache, "--out", str(tmp_path / "r"), "--loss", "dpo2"]
    )
    assert "exo_pair" in one_line_error(
        capsys,
        [
            "train",
            "--cache",
            train_cache,
            "--out",
            str(tmp_path / "r"),
            "--loss",
            "exo_pair",
            "--label-smoothing",
            "0",
        ],
    )
    assert "multiple" in one_line_error(
        capsys,
        [
            "train",
            "--cache",
            train_cache,
            "--out",
            str(tmp_path / "r"),
            "--batch-size",
            "6",
            "--grad-accum",
            "4",
        ],
    )
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    assert "--resume" in one_line_error(
        capsys, ["train", "--cache", train_cache, "--out", str(busy), "--steps", "1"]
    )
    assert "comma-separated" in one_line_error(
        capsys, ["sweep", "--cache", train_cache, "--out", str(tmp_path / "s"), "--beta", "0.1,abc"]
    )
    assert not (tmp_path / "r").exists()


def test_sweep_trains_every_loss(tmp_path, capsys, caches):
    """One sweep over all registered losses (2 steps each) from the one cache, compared side by side by the
    stage-3 `compare` diagnostic; then a re-run skips them all."""
    train_cache = caches[0]
    names = ",".join(L.LOSSES)
    argv = [
        "sweep",
        "--cache",
        train_cache,
        "--out",
        str(tmp_path),
        "--loss",
        names,
        "--beta",
        "0.1",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--lr",
        "1e-4",
        "--probe-every",
        "0",
        "--probe-size",
        "4",
        "--threads",
        "1",
        "--no-progress",
    ]
    assert cli_main(argv) == 0
    for name in L.LOSSES:
        run = tmp_path / f"{name}-beta0.1"
        steps = _steps(str(run)).to_pylist()
        assert len(steps) == 2 and all(
            math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in steps
        )
        assert steps[0]["grad_norm"] > 0
        with open(run / "config.json") as f:
            assert json.load(f)["loss"] == name
        if name in ("sigmoid", "sigmoid_norm", "dpop", "aot", "aot_unpaired", "robust"):
            assert abs(steps[0]["loss"] - math.log(2)) < 1e-5, name  # all equal ln 2 when policy == reference
    compared = capsys.readouterr().out.split("refcache query compare")[0]
    for name in L.LOSSES:
        assert f"{name}-beta0.1" in compared, name
    assert cli_main(argv) == 0
    assert capsys.readouterr().out.count("already finished") == len(L.LOSSES)


def test_grad_accum_lora_bf16_checkpointing(tmp_path, caches):
    train_cache = caches[0]
    base = dict(cache=train_cache, steps=3, probe_every=0, save_final=False, **FAST)
    ref = train(TrainConfig(out=str(tmp_path / "ref"), **base))
    ref_losses = _steps(str(tmp_path / "ref")).column("loss").to_pylist()
    # the same global batch in 2 micro-batches, in one-pair pieces (--max-tokens 1), with activation
    # checkpointing: same numbers. Two rows per pair instead of a shared prompt: the same up to float noise
    # (which Adam's first steps magnify, hence the looser bound).
    for name, extra, tol in (
        ("accum", {"grad_accum": 2}, 1e-6),
        ("pieces", {"max_tokens": 1}, 1e-6),
        ("ckpt", {"grad_checkpointing": True}, 1e-6),
        ("two-rows", {"share_prompt": False}, 1e-4),
    ):
        s = train(TrainConfig(out=str(tmp_path / name), **base, **extra))
        assert s["shared_prompt"] == extra.get("share_prompt", True)
        got = _steps(str(tmp_path / name)).column("loss").to_pylist()
        assert abs(got[0] - math.log(2)) < 1e-6, name
        assert np.abs(np.asarray(got) - ref_losses).max() < tol, name
    # LoRA starts at the reference (B = 0) and saves a merged, loadable model
    lora = train(TrainConfig(out=str(tmp_path / "lora"), **dict(base, save_final=True), lora=4))
    assert abs(lora["first_loss"] - math.log(2)) < 1e-5
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(lora["final_model"])
    # bf16 autocast: close to ln 2 (the cache is fp32), not exact; on a CPU without bf16 instructions it
    # computes in fp32 (pipeline.logps.bf16_matmul_native), so exactly the fp32 run
    from pipeline.logps import bf16_matmul_native

    bf = train(TrainConfig(out=str(tmp_path / "bf16"), **base, dtype="bfloat16"))
    assert abs(bf["first_loss"] - math.log(2)) < 0.05
    if bf16_matmul_native(torch.device("cpu")):
        assert ref["final_loss"] != bf["final_loss"]
    else:
        assert ref["final_loss"] == bf["final_loss"]



def test_bf16_without_bf16_instructions_trains_in_fp32(tmp_path, caches, capsys, monkeypatch):
    """On a CPU without bf16 instructions (oneDNN capped at AVX2, as on such a CPU) bf16 autocast would run every
    matmul on the slow path (SmolLM2 forward + backward: 151 s against 12.4 s in fp32), so --dtype bfloat16
    trains in fp32 there, says so, and reproduces the fp32 run."""
    base = dict(cache=caches[0], steps=3, probe_every=0, save_final=False, **FAST)
    train(TrainConfig(out=str(tmp_path / "fp32"), **base))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    capsys.readouterr()
    train(TrainConfig(out=str(tmp_path / "bf16"), **base, dtype="bfloat16"))
    assert "no bf16 instructions" in capsys.readouterr().out
    ref = _steps(str(tmp_path / "fp32")).column("loss").to_pylist()
    assert _steps(str(tmp_path / "bf16")).column("loss").to_pylist() == ref
