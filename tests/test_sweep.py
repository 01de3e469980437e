"""`refcache sweep`: runs named by every setting that varies, comma lists for more than loss and beta, and a
finished (or started) run whose settings differ from the ones asked is refused, never shown as if it were new."""

import json
import types

import pyarrow.parquet as pq
from helpers import one_line_error

from dpo.config import SWEEP_FIELDS
from dpo.sweep import sweep_runs
from refcache.cli import main as cli_main

FLAGS = ["--steps", "2", "--batch-size", "4", "--probe-every", "0", "--probe-size", "4", "--threads", "1",
         "--no-progress"]


def _args(**given):
    """What argparse gives cmd_sweep: each sweep flag as typed text, or its (typed) default."""
    defaults = {f: None for f in SWEEP_FIELDS} | {"loss": "sigmoid", "lr": 1e-6, "seed": 0, "batch_size": 8,
                                                 "warmup": 0.0}
    return types.SimpleNamespace(**(defaults | given))


def test_names_carry_every_setting_that_varies():
    assert [n for n, _ in sweep_runs(_args(beta="0.1"))] == ["sigmoid-beta0.1"]
    runs = sweep_runs(_args(loss="sigmoid,ipo", beta="0.1", lr="1e-6,5e-7", seed="0,1"))
    assert [n for n, _ in runs] == [
        f"{loss}-beta0.1-lr{lr}-seed{seed}" for loss in ("sigmoid", "ipo") for lr in ("1e-06", "5e-07")
        for seed in (0, 1)]
    assert runs[1][1] == {"loss": "sigmoid", "beta": 0.1, "lr": 1e-6, "seed": 1, "batch_size": 8, "warmup": 0.0}
    # a setting given once is in every run's config, not in the names
    assert [n for n, _ in sweep_runs(_args(beta="0.1,0.2", lr="1e-5", label_smoothing="0.1"))] == [
        "sigmoid-beta0.1", "sigmoid-beta0.2"]
    # a loss parameter only for the losses that take it: 2 simpo runs and 1 sigmoid run, not 2 of each
    assert [n for n, _ in sweep_runs(_args(loss="sigmoid,simpo", beta="2", simpo_gamma="0.5,1"))] == [
        "sigmoid-beta2", "simpo-beta2-simpo-gamma0.5", "simpo-beta2-simpo-gamma1"]
    names = [n for n, _ in sweep_runs(_args(beta="0.1", label_smoothing="0,0.1", batch_size="4,8"))]
    assert names == ["sigmoid-beta0.1-label-smoothing0-batch-size4", "sigmoid-beta0.1-label-smoothing0-batch-size8",
                     "sigmoid-beta0.1-label-smoothing0.1-batch-size4", "sigmoid-beta0.1-label-smoothing0.1-batch-size8"]


def test_changed_lr_is_refused_not_shown_as_done(tmp_path, capsys, train_cache):
    base = ["sweep", "--cache", str(train_cache), "--out", str(tmp_path), "--beta", "0.1,0.2", *FLAGS]
    assert cli_main([*base, "--lr", "1e-4"]) == 0
    steps = {b: pq.read_table(tmp_path / f"sigmoid-beta{b}" / "steps.parquet").to_pylist() for b in ("0.1", "0.2")}
    capsys.readouterr()

    # the bug: this printed "already finished, skipped" and the lr=1e-4 results
    err = one_line_error(capsys, [*base, "--lr", "1e-5"])
    assert "sigmoid-beta0.1 was trained with other settings than asked (lr: 0.0001 then, 1e-05 now)" in err, err
    assert "(and 1 more of the 2 runs)" in err and "sweep into a new --out" in err
    for b in ("0.1", "0.2"):  # nothing trained, nothing removed
        assert pq.read_table(tmp_path / f"sigmoid-beta{b}" / "steps.parquet").to_pylist() == steps[b]

    # the same settings again: finished runs are skipped, and say why
    assert cli_main([*base, "--lr", "1e-4"]) == 0
    assert capsys.readouterr().out.count("already finished with these settings, skipped") == 2

    # a list of lrs names the runs by lr: new directories beside the old ones
    assert cli_main([*base[:-len(FLAGS)], "--beta", "0.1", *FLAGS, "--lr", "1e-4,1e-5"]) == 0
    for lr in (1e-4, 1e-5):
        cfg = json.loads((tmp_path / f"sigmoid-beta0.1-lr{lr:g}" / "config.json").read_text())
        assert cfg["lr"] == lr and cfg["beta"] == 0.1


def test_started_run_with_other_settings_is_refused_before_any_training(tmp_path, capsys, train_cache):
    """A run that has not finished is checked too, before the sweep trains anything (its resume would refuse it
    half-way through the sweep otherwise)."""
    out = tmp_path / "sigmoid-beta0.2"
    assert cli_main(["train", "--cache", str(train_cache), "--out", str(out), "--beta", "0.2", "--seed", "3",
                     *FLAGS]) == 0
    (out / "summary.json").unlink()  # as if killed after its last checkpoint
    capsys.readouterr()
    err = one_line_error(capsys, ["sweep", "--cache", str(train_cache), "--out", str(tmp_path), "--beta", "0.1,0.2",
                                  *FLAGS])
    assert "sigmoid-beta0.2 was trained with other settings than asked (seed: 3 then, 0 now)" in err, err
    assert not (tmp_path / "sigmoid-beta0.1").exists()


def test_bad_lists_are_one_line_errors(tmp_path, capsys, train_cache):
    base = ["sweep", "--cache", str(train_cache), "--out", str(tmp_path), *FLAGS]
    assert "--lr '1e-4,x': expected comma-separated numbers" in one_line_error(
        capsys, [*base, "--beta", "0.1", "--lr", "1e-4,x"])
    assert "--seed '1.5': expected comma-separated numbers like 1,2,3" in one_line_error(
        capsys, [*base, "--beta", "0.1", "--seed", "1.5"])
    assert "--beta ',': give at least one value" in one_line_error(capsys, [*base, "--beta", ","])
    assert "unknown loss 'dpo2'" in one_line_error(capsys, [*base, "--beta", "0.1", "--loss", "sigmoid,dpo2"])
    assert "--lr must be a number >= 0 (got -1.0)" in one_line_error(capsys, [*base, "--beta", "0.1", "--lr",
                                                                                      "1e-4,-1"])
    assert not any(tmp_path.iterdir())
