"""Stage 1 on Ray (issue 18): `precompute --ray` writes the cache one process writes (the same part sha256s and
manifest), also when an actor's process is killed mid-job (Ray restarts it and its parts are done again); SIGTERM
on the driver keeps the parts written, releases the lock and a re-run resumes; bad input is one line.

The in-process builds share one local Ray cluster (`local_ray`: ray.init(num_cpus=2), as `--ray` reuses the Ray
this process is connected to); the command-line ones start their own (`--ray` alone, RAY_ADDRESS unset).
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import one_line_error, rows_of

from pipeline.cache import load_table, read_manifest
from pipeline.distributed import ACTOR_PREFIX, actor_plan, cpus_per_actor
from pipeline.precompute import precompute
from refcache import UserError

ROOT = Path(__file__).resolve().parents[1]
ROWS = 200
PART = 32  # 7 parts
SMALL_PART = 8  # 25 parts: the job is still running when an actor is killed or the driver stopped
KW = {"backend": "hf", "dtype": "float32", "progress": False}


@pytest.fixture(scope="module")
def data(tmp_path_factory, prefs_dir):
    return rows_of(prefs_dir / "train.jsonl", tmp_path_factory.mktemp("ray") / "pairs.jsonl", stop=ROWS)


@pytest.fixture(scope="module")
def scorer(tiny_model_dir):
    from pipeline.backends import HFScorer

    return HFScorer(tiny_model_dir, "float32")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data, tiny_model_dir, scorer):
    """Single-process caches of the same rows, by part size."""
    made = {}

    def build(part_size):
        if part_size not in made:
            made[part_size] = tmp_path_factory.mktemp("ray") / f"single-{part_size}"
            precompute(data, tiny_model_dir, made[part_size], scorer=scorer, part_size=part_size, **KW)
        return made[part_size]

    return build


@pytest.fixture(scope="module")
def ray_installed():
    return pytest.importorskip("ray", reason="pip install 'refcache[ray]' (make test installs it)")


@pytest.fixture(scope="module")
def local_ray(ray_installed):
    ray = ray_installed
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def ray_cli(*args, **popen):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # --ray alone: a new local cluster
    return subprocess.Popen([sys.executable, "-m", "refcache.cli", "precompute", *map(str, args)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def assert_same_cache(a, b):
    """Every part byte for byte (sha256), the same manifest but its date, the same rows."""
    ma, mb = read_manifest(a), read_manifest(b)
    assert ma["shards"] == mb["shards"] and len(ma["shards"]) > 1
    assert {k: v for k, v in ma.items() if k != "created"} == {k: v for k, v in mb.items() if k != "created"}
    assert load_table(a).equals(load_table(b))
    assert not list(Path(a).glob(".refcache-lock*"))


def written_by(out) -> dict:
    """{pid: parts logged}: each actor process's write log (__refcache__/_written-ray-PID-TAG.jsonl)."""
    logs = {}
    for f in (Path(out) / "__refcache__").glob("_written-ray-*.jsonl"):
        pid = int(f.name.split("-")[2])
        logs[pid] = logs.get(pid, 0) + len(f.read_text().splitlines())
    return logs


def no_actors_left(ray, timeout=30) -> bool:
    """Whether the run's actors are gone (ray.kill is asynchronous: allow it a moment)."""
    deadline = time.time() + timeout
    while [n for n in ray.util.list_named_actors() if n.startswith(ACTOR_PREFIX)]:
        if time.time() > deadline:
            return False
        time.sleep(0.1)
    return True


def wait_for_part(out, alive, what, timeout=240):
    deadline = time.time() + timeout
    while not written_by(out) or not list(Path(out).glob("part-*.parquet")):
        assert alive(), what()
        assert time.time() < deadline, "no part written in time"
        time.sleep(0.02)


def test_two_actors_write_the_cache_one_process_writes(tmp_path, ray_installed, data, tiny_model_dir, reference):
    out = tmp_path / "cache"
    p = ray_cli(data, "--model", tiny_model_dir, "--out", out, "--backend", "hf", "--part-size", PART, "--ray",
                "--ray-actors", 2, "--json", "--no-progress")
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout)
    assert summary["complete"] and summary["ray"]["actors"] == 2 and summary["ray"]["cpus_per_actor"] == 1
    assert summary["parts_written"] == 7 and summary["rows_read"] == ROWS
    assert_same_cache(out, reference(PART))
    assert sum(written_by(out).values()) == 7  # every part on an actor's own write log


def test_a_killed_actor_is_replaced_and_the_cache_is_the_same(tmp_path, local_ray, data, tiny_model_dir, reference):
    out, result = tmp_path / "cache", {}

    def run():
        try:
            result["summary"] = precompute(data, tiny_model_dir, out, part_size=SMALL_PART, ray="auto",
                                           ray_actors=2, **KW)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            result["error"] = e

    job = threading.Thread(target=run)
    job.start()
    wait_for_part(out, job.is_alive, lambda: result)
    victim = next(iter(written_by(out)))  # an actor process that has written a part, so it holds the next
    parts_then = len(list(out.glob("part-*.parquet")))
    os.kill(victim, signal.SIGKILL)
    job.join(timeout=300)
    assert not job.is_alive() and "error" not in result, result
    assert parts_then < 25  # killed mid-job
    assert result["summary"]["ray"]["restarts"] >= 1 and result["summary"]["parts_written"] == 25
    assert_same_cache(out, reference(SMALL_PART))
    assert len(written_by(out)) >= 2 and victim in written_by(out)
    assert no_actors_left(local_ray)


def test_sigterm_on_the_driver_keeps_the_parts_and_a_rerun_resumes(tmp_path, local_ray, data, tiny_model_dir,
                                                                   reference):
    out = tmp_path / "cache"
    p = ray_cli(data, "--model", tiny_model_dir, "--out", out, "--backend", "hf", "--part-size", SMALL_PART,
                "--ray", "--no-progress")  # one actor: the default
    wait_for_part(out, lambda: p.poll() is None, lambda: p.communicate()[1][-3000:])
    p.send_signal(signal.SIGTERM)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 143, stderr[-3000:]
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    assert not list(out.glob(".refcache-lock*")) and not (out / "__refcache__" / "manifest.json").exists()
    kept = len(list(out.glob("part-*.parquet")))
    s = precompute(data, tiny_model_dir, out, part_size=SMALL_PART, ray="auto", **KW)
    assert s["parts_skipped"] >= kept >= 1 and s["parts_skipped"] + s["parts_written"] == 25
    assert_same_cache(out, reference(SMALL_PART))


def test_a_node_that_does_not_see_the_files_stops_the_run_in_one_line(tmp_path, monkeypatch, local_ray, data,
                                                                     tiny_model_dir):
    from pipeline import distributed

    ship = distributed._for_actors

    def other_tokenizer(job):  # as if the actors' node had another model at the same path
        job, lengths = ship(job)
        return replace(job, identity={**job.identity, "tokenizer": {"sha256": "another"}}), lengths

    monkeypatch.setattr(distributed, "_for_actors", other_tokenizer)
    out = tmp_path / "cache"
    with pytest.raises(UserError, match=r"--model .* is missing or another model on Ray node .*; put it on storage"):
        precompute(data, tiny_model_dir, out, part_size=PART, ray="auto", **KW)
    assert not list(out.glob(".refcache-lock*")) and not list(out.glob("part-*"))
    assert no_actors_left(local_ray)


def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch, data, tiny_model_dir):
    args = ["precompute", data, "--model", tiny_model_dir, "--out", tmp_path / "c", "--backend", "hf"]
    assert "--ray and --shard: use one" in one_line_error(capsys, [*args, "--ray", "--shard", "0/2"])
    assert "--ray-actors 0: must be" in one_line_error(capsys, [*args, "--ray", "--ray-actors", "0"])
    assert "--ray-actors 2 applies with --ray" in one_line_error(capsys, [*args, "--ray-actors", "2"])
    line = one_line_error(capsys, [*args, "--ray", "127.0.0.1:1"])
    assert "--ray 127.0.0.1:1: nothing answers at 127.0.0.1:1" in line
    assert "not HOST:PORT" in one_line_error(capsys, [*args, "--ray", "somewhere"])
    with pytest.raises(UserError, match="ray= and scorer="):
        precompute(data, tiny_model_dir, tmp_path / "c", ray="auto", scorer=object(), **KW)
    monkeypatch.setitem(sys.modules, "ray", None)  # not installed
    assert "pip install 'refcache[ray]'" in one_line_error(capsys, [*args, "--ray"])


def test_actors_per_cluster():
    assert cpus_per_actor([2], 2) == (1, 2)
    assert cpus_per_actor([2], 1) == (2, 1)
    assert cpus_per_actor([16, 16], 1) == (16, 2)  # an actor lives on one node
    assert cpus_per_actor([16, 16], 3) == (8, 4)
    assert cpus_per_actor([2], 4) == (0.5, 4)  # more actors than CPUs: they share them
    plan = actor_plan([{"CPU": 2}], "hf", {}, 2)
    assert (plan.count, plan.options, plan.threads) == (2, {"num_cpus": 1}, 1)
    plan = actor_plan([{"CPU": 32, "GPU": 4}, {"CPU": 32, "GPU": 4}], "vllm", {"tensor_parallel_size": 2}, None)
    assert (plan.count, plan.options["num_gpus"], plan.threads) == (4, 2, None)
    assert actor_plan([{"CPU": 8, "GPU": 2}], "hf", {}, None).count == 2
    with pytest.raises(UserError, match="no node of the Ray cluster has 8 GPUs"):
        actor_plan([{"CPU": 8, "GPU": 4}], "vllm", {"tensor_parallel_size": 8}, None)
    with pytest.raises(UserError, match="no GPUs"):
        actor_plan([{"CPU": 8}], "vllm", {}, None)
