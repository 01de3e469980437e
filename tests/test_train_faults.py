"""Stage-2 faults and bad input (issue 10): values out of range are refused with one line before any work;
`--out` never deletes what refcache did not write; a half-created run resumes; a second writer is refused."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from helpers import one_line_error, tree_digest

from dpo import losses as L
from dpo.config import TrainConfig, validate
from dpo.rundir import RUN_KIND, read_run_config
from dpo.train import train
from refcache import UserError
from refcache.cli import main as cli_main

FAST = ["--steps", "2", "--batch-size", "4", "--lr", "1e-4", "--probe-every", "0", "--probe-size", "4",
        "--threads", "1", "--no-progress"]

# flag, value, what the one-line message must say (the flag and the allowed range)
BAD_VALUES = [
    ("--beta", "nan", "--beta must be > 0"),
    ("--beta", "inf", "--beta must be > 0"),
    ("--beta", "-0.1", "--beta must be > 0"),
    ("--epochs", "0", "--epochs must be a number > 0"),
    ("--epochs", "nan", "--epochs must be a number > 0"),
    ("--lr", "nan", "--lr must be a number >= 0"),
    ("--lr", "-1", "--lr must be a number >= 0"),
    ("--batch-size", "0", "--batch-size must be an integer >= 1"),
    ("--grad-accum", "0", "--grad-accum must be an integer >= 1"),
    ("--warmup", "nan", "--warmup must be a number >= 0"),
    ("--probe-size", "-3", "--probe-size must be an integer >= 0"),
    ("--lora", "-2", "--lora must be an integer >= 0"),
    ("--label-smoothing", "nan", "--label-smoothing must be in [0, 0.5)"),
    ("--rdpo-alpha", "inf", "--rdpo-alpha must be a finite number"),
    ("--max-grad-norm", "-1", "--max-grad-norm must be a number >= 0"),
    ("--eval-every", "-1", "--eval-every must be an integer >= 0"),
    ("--keep-checkpoints", "0", "--keep-checkpoints must be an integer >= 1"),
]


@pytest.mark.parametrize("flag,value,message", BAD_VALUES)
def test_bad_value_refused_before_any_work(capsys, tmp_path, train_cache, flag, value, message):
    out = tmp_path / "run"
    args = FAST[2:] if flag == "--epochs" else FAST  # --steps and --epochs exclude each other
    err = one_line_error(capsys, ["train", "--cache", str(train_cache), "--out", str(out), *args, flag, value])
    assert message in err, err
    assert not out.exists()  # refused before the run directory was made
    # the Python API says the same
    field = flag[2:].replace("-", "_")
    number = float(value) if "." in value or value in ("nan", "inf") else int(value)
    with pytest.raises(UserError, match=re.escape(message)):
        train(TrainConfig(cache=str(train_cache), out=str(out), **{field: number}))
    assert not out.exists()


def test_python_api_types_and_combinations(train_cache, tmp_path):
    base = {"cache": str(train_cache), "out": str(tmp_path / "r")}
    for kw, message in (({"batch_size": 2.5}, "--batch-size must be an integer"),
                        ({"steps": True}, "--steps must be an integer"),
                        ({"steps": 3, "epochs": 1.0}, "not both"),
                        ({"dtype": "fp8"}, "--dtype 'fp8' is not one of"),
                        ({"parallel": "zero3"}, "--parallel 'zero3' is not one of"),
                        ({"adam_betas": (0.9, 1.5)}, "--adam-betas must be two numbers"),
                        ({"eval_every": 5}, "--eval-every .*--eval-cache"),
                        ({"beta": "0.1"}, "--beta must be > 0")):
        with pytest.raises(UserError, match=message):
            validate(TrainConfig(**base, **kw))


def test_loss_parameters_have_one_source():
    """Every loss parameter is a TrainConfig field, a flag with the signature's default in its help, and is
    range-checked from the one table."""
    from dpo.cli import add_commands

    fields = {f for f in TrainConfig.__dataclass_fields__}
    assert set(L.PARAMS) <= fields
    import argparse

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    helps = parser._subparsers._group_actions[0].choices["train"].format_help().replace("\n", " ")
    helps = " ".join(helps.split())
    for name in L.PARAMS:
        assert "--" + name.replace("_", "-") in helps
    assert "rdpo: length penalty per token of length difference (default 0.01)" in helps
    assert L.param_defaults("rdpo_alpha") == {"rdpo": 0.01}
    assert L.param_defaults("beta")["simpo"] == 2.0


@pytest.mark.parametrize("resume", [True, False])
def test_out_pointing_at_a_model_directory_is_refused_untouched(capsys, tmp_path, train_cache, tiny_model_dir,
                                                                 resume):
    """`--out SOME_MODEL_DIR --resume` used to delete the model and put a run there (exit 0)."""
    model = tmp_path / "my-model"
    shutil.copytree(tiny_model_dir, model)
    before = tree_digest(model)
    err = one_line_error(capsys, ["train", "--cache", str(train_cache), "--out", str(model), *FAST,
                                  *(["--resume"] if resume else [])])
    assert "not a refcache run" in err and "--resume" in err
    assert tree_digest(model) == before and sorted(os.listdir(model)) == sorted(os.listdir(tiny_model_dir))


def test_half_created_run_resumes(capsys, tmp_path, train_cache):
    """A run killed before its config.json (an older version made examples/ first) starts cleanly with --resume;
    a run killed after its config.json but before its first checkpoint restarts, and only refcache's own files
    are replaced."""
    out = tmp_path / "run"
    (out / "examples").mkdir(parents=True)
    (out / "config.json.tmp").write_text("{")
    argv = ["train", "--cache", str(train_cache), "--out", str(out), *FAST, "--resume"]
    assert cli_main(argv) == 0, capsys.readouterr().err
    cfg = read_run_config(str(out))
    assert cfg["kind"] == RUN_KIND and pq.read_table(out / "steps.parquet").num_rows == 2

    # killed before the first checkpoint: config.json and some logs, no checkpoints/
    shutil.rmtree(out / "checkpoints")
    (out / "summary.json").unlink()
    (out / "notes.txt").write_text("mine")
    assert cli_main(argv) == 0, capsys.readouterr().err
    assert read_run_config(str(out))["run_id"] != cfg["run_id"]  # a new start
    assert (out / "notes.txt").read_text() == "mine"
    assert pq.read_table(out / "steps.parquet").column("step").to_pylist() == [0, 1]


def test_config_json_is_written_first(tmp_path, train_cache, monkeypatch):
    """The marker comes before any other file: a failure right after it leaves a directory --resume accepts."""
    from dpo import rundir

    seen = []
    real = rundir.write_json

    def spy(path, obj):
        seen.append(sorted(n for n in os.listdir(os.path.dirname(path)) if not n.startswith(".refcache-lock")))
        real(path, obj)
        raise KeyboardInterrupt  # killed right after the marker

    monkeypatch.setattr(rundir, "write_json", spy)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(cache=str(train_cache), out=str(tmp_path / "run"), steps=1, batch_size=4, progress=False))
    assert seen == [[]]
    assert read_run_config(str(tmp_path / "run"))["kind"] == RUN_KIND
    assert not (tmp_path / "run" / ".refcache-lock").exists()  # released on the way out
    monkeypatch.undo()
    s = train(TrainConfig(cache=str(train_cache), out=str(tmp_path / "run"), steps=1, batch_size=4, progress=False,
                          probe_size=0, resume=True, save_final=False))
    assert abs(s["first_loss"] - math.log(2)) < 1e-5


def test_second_writer_refused(capsys, tmp_path, train_cache):
    """While a run writes its directory, a second `train --resume` into it is refused with one line."""
    out = tmp_path / "run"
    slow = dict(os.environ, REFCACHE_STEP_DELAY="1")
    first = subprocess.Popen([sys.executable, "-m", "refcache.cli", "train", "--cache", str(train_cache), "--out",
                              str(out), *FAST[:1], "30", *FAST[2:]], env=slow, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "steps.parquet").exists() and not (out / "examples").exists() and time.time() < deadline:
            time.sleep(0.1)
        assert first.poll() is None
        err = one_line_error(capsys, ["train", "--cache", str(train_cache), "--out", str(out), *FAST, "--resume"])
        assert "being written by another refcache train" in err and str(first.pid) in err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the killed writer's lock is stale now: taken over with a note, and the run goes on
    r = subprocess.run([sys.executable, "-m", "refcache.cli", "train", "--cache", str(train_cache), "--out", str(out),
                        *FAST[:1], "30", *FAST[2:], "--resume"], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert "stale lock" in r.stderr


FULL_DISK = """
import io, json, os, subprocess, sys
from contextlib import redirect_stderr
from pathlib import Path
from refcache.cli import main

cache, mnt, fast = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
mnt.mkdir()
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", str(mnt)], check=True)
filler = mnt / "filler"
vfs = os.statvfs(mnt)
filler.write_bytes(b"x" * (vfs.f_bavail * vfs.f_frsize - 1024 * 1024))  # 1 MiB left: logs fit, a checkpoint not
runs = []
for _ in range(2):
    err = io.StringIO()
    with redirect_stderr(err):
        rc = main(["train", "--cache", cache, "--out", str(mnt / "run"), *fast, "--resume"])
    runs.append({"rc": rc, "err": err.getvalue(), "tmp": sorted(str(p) for p in mnt.rglob("*.tmp"))})
    filler.unlink(missing_ok=True)  # free space, then re-run the same command
runs.append({"final": (mnt / "run" / "final" / "config.json").exists()})
print(json.dumps(runs))
"""


def test_full_disk_in_training_is_one_line_and_resumes(tmp_path, train_cache):
    """A checkpoint that does not fit (torch.save reports it as a RuntimeError) ends with refcache's one line
    about the disk, leaves no half-written file, and the same command resumes once space is free."""
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           check=False, capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no private tmpfs on this machine (unshare -rm)")
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(["unshare", "-rm", sys.executable, str(script), str(train_cache), str(tmp_path / "mnt"),
                        *FAST], cwd=root, env={**os.environ, "PYTHONPATH": root}, check=False, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    full, resumed, end = json.loads(r.stdout.strip().splitlines()[-1])
    assert full["rc"] == 2 and full["err"].count("\n") == 1 and "Traceback" not in full["err"], full["err"]
    assert "disk full writing " in full["err"] and "re-run to resume" in full["err"], full["err"]
    assert full["tmp"] == []
    assert resumed["rc"] == 0, resumed["err"]
    assert end["final"]
