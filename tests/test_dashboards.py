"""--report-to: TensorBoard event files and an offline W&B run under the run directory, read back and compared
with steps.parquet / evals.parquet (the source of truth) under TRL's names; a resumed run adds no step twice."""

import glob
import os
import struct
import sys

import pyarrow.parquet as pq
import pytest

from dpo.train import TrainConfig, train
from refcache import UserError
from refcache.cli import main as cli_main
from refcache_base.runlog_schema import TRL_METRICS

EVAL_NAMES = [n for n, col, _ in TRL_METRICS if col not in ("grad_norm", "lr")]


def _config(train_cache, eval_cache, out, **kw):
    return TrainConfig(cache=str(train_cache), eval_cache=str(eval_cache), out=str(out), steps=8, batch_size=4,
                       lr=1e-3, eval_every=3, probe_every=0, probe_size=4, checkpoint_every=4, progress=False,
                       threads=1, save_final=False, **kw)


def _interrupt_after_checkpoint(out):
    """What a run killed after checkpointing step 4 but before its final checkpoint leaves: every step's log
    points written, the last checkpoint at step 4."""
    os.remove(os.path.join(out, "checkpoints", "step-00000008.pt"))
    os.remove(os.path.join(out, "summary.json"))


def _parquet_points(out) -> dict:
    """{tag: {step: value}} from steps.parquet and evals.parquet, named as the dashboards name them."""
    want = {}
    for row in pq.read_table(os.path.join(out, "steps.parquet")).to_pylist():
        for name, col, _ in TRL_METRICS:
            want.setdefault(f"train/{name}", {})[row["step"]] = row[col]
    for row in pq.read_table(os.path.join(out, "evals.parquet")).to_pylist():
        for name in EVAL_NAMES:
            col = next(c for n, c, _ in TRL_METRICS if n == name)
            want.setdefault(f"eval/{name}", {})[row["step"]] = row[col]
    return want


def _assert_same(points: dict, want: dict, rel=1e-6):
    assert set(points) == set(want)
    for tag, by_step in want.items():
        got = points[tag]
        assert sorted(got) == sorted(by_step), tag
        for step, v in by_step.items():
            assert got[step] == pytest.approx(v, rel=rel, abs=1e-7), (tag, step)


# ---- TensorBoard -----------------------------------------------------------------------------------------------


def _tensorboard_points(out) -> dict:
    """{tag: {step: value}} as TensorBoard shows the run; a step shown twice fails."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(out, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    points = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), (tag, steps)
        points[tag] = {e.step: e.value for e in events}
    return points


def test_tensorboard_curves_equal_the_parquet_logs_and_resume_adds_no_step_twice(tmp_path, train_cache,
                                                                                    eval_cache):
    out = tmp_path / "run"
    train(_config(train_cache, eval_cache, out, report_to=("tensorboard",)))
    want = _parquet_points(out)
    assert set(want) == {f"train/{n}" for n, _, _ in TRL_METRICS} | {f"eval/{n}" for n in EVAL_NAMES}
    assert sorted(want["train/loss"]) == list(range(8)) and sorted(want["eval/loss"]) == [0, 3, 6, 8]
    _assert_same(_tensorboard_points(out), want)  # float32 in the event file

    _interrupt_after_checkpoint(out)
    train(_config(train_cache, eval_cache, out, report_to=("tensorboard",), resume=True))
    assert len(glob.glob(str(out / "tensorboard" / "events.*"))) == 2  # the old file is kept, its tail purged
    _assert_same(_tensorboard_points(out), _parquet_points(out))
    assert pq.read_table(out / "evals.parquet").column("step").to_pylist() == [0, 3, 6, 8]

    # resumed from its final checkpoint (which holds the last eval pass), the run redoes that pass once
    os.remove(out / "summary.json")
    train(_config(train_cache, eval_cache, out, report_to=("tensorboard",), resume=True))
    assert pq.read_table(out / "evals.parquet").column("step").to_pylist() == [0, 3, 6, 8]
    _assert_same(_tensorboard_points(out), _parquet_points(out))


def test_tensorboard_added_on_resume_gets_the_earlier_steps(tmp_path, train_cache, eval_cache):
    out = tmp_path / "run"
    train(_config(train_cache, eval_cache, out))
    assert not (out / "tensorboard").exists()
    _interrupt_after_checkpoint(out)
    train(_config(train_cache, eval_cache, out, report_to="tensorboard", resume=True))  # how it logs may change
    _assert_same(_tensorboard_points(out), _parquet_points(out))


# ---- W&B (offline) ---------------------------------------------------------------------------------------------


def _wandb_records(path):
    """The records of a .wandb file (a LevelDB-style log of protobuf records after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", path
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # full, or the last piece
            rec = pb.Record()
            rec.ParseFromString(pending)
            yield rec


def _wandb_points(out) -> dict:
    """{tag: {step: value}} over every offline run W&B wrote under out/wandb; a step sent twice fails."""
    import json

    points = {}
    files = sorted(glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb")))
    for path in files:
        for rec in _wandb_records(path):
            if rec.WhichOneof("record_type") != "history":
                continue
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            step = items.pop("_step")
            for tag, v in items.items():
                if not tag.startswith("_"):
                    assert step not in points.get(tag, {}), (tag, step, path)
                    points.setdefault(tag, {})[step] = v
    return points, files


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    """No W&B credentials and no network: HOME and NETRC point at empty places."""
    home = tmp_path / "home"
    home.mkdir()
    for k in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_wandb_offline_run_equals_the_parquet_logs_and_resume_adds_no_step_twice(tmp_path, train_cache, eval_cache,
                                                                                no_wandb_login):
    pytest.importorskip("wandb")
    from dpo.dashboards import logged_in

    assert not logged_in()
    out = tmp_path / "run"
    train(_config(train_cache, eval_cache, out, report_to=("wandb",)))
    points, files = _wandb_points(out)
    assert len(files) == 1 and files[0].endswith(f"run-{_run_id(out)}.wandb")  # offline, under the run's id
    _assert_same(points, _parquet_points(out), rel=1e-12)

    _interrupt_after_checkpoint(out)
    train(_config(train_cache, eval_cache, out, report_to=("wandb",), resume=True))
    points, files = _wandb_points(out)
    assert len(files) == 2
    _assert_same(points, _parquet_points(out), rel=1e-12)


def _run_id(out):
    import json

    return json.loads((out / "config.json").read_text())["run_id"]


# ---- flags -----------------------------------------------------------------------------------------------------


def test_report_to_flag_errors_are_one_line(capsys, tmp_path, train_cache, monkeypatch):
    def error(*flags):
        rc = cli_main(["train", "--cache", str(train_cache), "--out", str(tmp_path / "r"), "--steps", "1", *flags])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "\n" not in err and "Traceback" not in err, err
        return err

    assert "'mlflow' is not one of: tensorboard, wandb, none" in error("--report-to", "mlflow")
    assert "none means no dashboard" in error("--report-to", "none,tensorboard")
    for k in ("WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_MODE", "online")  # asked to go online without a login
    assert "WANDB_MODE=online but there is no W&B login" in error("--report-to", "wandb")
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed
    assert "pip install 'refcache[wandb]'" in error("--report-to", "tensorboard", "wandb")
    assert not (tmp_path / "r").exists()  # refused before anything was written
    with pytest.raises(UserError, match=r"refcache\[wandb\]"):
        train(TrainConfig(cache=str(train_cache), out=str(tmp_path / "r"), report_to=["wandb"]))


def test_one_metric_table():
    """The report's step curves and the dashboards read the same TRL-name table."""
    from dpo import dashboards
    from queries import report

    assert report.TRL_METRICS is TRL_METRICS
    row = {col: float(i) for i, (_, col, _) in enumerate(TRL_METRICS)}
    assert dashboards.step_tags(row) == {f"train/{n}": float(i) for i, (n, _, _) in enumerate(TRL_METRICS)}
    assert set(dashboards.eval_tags(row)) == {f"eval/{n}" for n in EVAL_NAMES}
