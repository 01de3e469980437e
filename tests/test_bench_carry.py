"""bench/run.py run in pieces: figures it did not measure are kept from the committed file, dated, never
passed off as new; and the queries benchmark's synthetic caches carry CHES so every diagnostic runs."""

import importlib.util
import sys
from pathlib import Path

from synth import make_cache, make_run

import queries  # the package, imported before bench/ is on the path (bench/queries.py has the same name)

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name, file):
    """A bench script as a module, leaving sys.path as it was (bench/run.py puts bench/ first)."""
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / file)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path[:] = saved


run = _load("bench_run", "run.py")
bench_queries = _load("bench_queries", "queries.py")


def test_carry_keeps_unmeasured_figures_with_their_dates():
    old = {"stage1_best_bf16_mfu": 0.615, "query_10m_max_s": 2.0, "sweep_trl_over_refcache_s": 2.47,
           "vllm_ches_cost_ratio": 1.69, "finished": "2026-11-25 20:15",
           "carried": {"vllm_ches_cost_ratio": "2026-12-03"},
           "pieces": {"sweep_trl": {"ok": True, "seconds": 929.0}, "stage1": {"ok": True, "seconds": 1.0}},
           "raw": {"sweep": {"trl": {"total_s": 929.0}}, "stage1": ["old row"]}}
    report = {"figures": {"stage1_best_bf16_mfu": 0.595, "query_10m_max_s": None}, "targets": {},
              "pieces": {"stage1": {"ok": True, "seconds": 2288.0}}, "raw": {"stage1": ["new row"], "sweep": {}}}
    run.carry(report, old)
    f = report["figures"]
    assert f["stage1_best_bf16_mfu"] == 0.595 and report["raw"]["stage1"] == ["new row"]  # measured: kept new
    assert f["query_10m_max_s"] == 2.0 and f["sweep_trl_over_refcache_s"] == 2.47  # not measured: carried
    assert report["carried"] == {"query_10m_max_s": "2026-11-25 20:15", "sweep_trl_over_refcache_s": "2026-11-25 20:15",
                                 "vllm_ches_cost_ratio": "2026-12-03"}
    assert "stage1_best_bf16_mfu" not in report["carried"]
    assert report["targets"]["query_10m_max_s"]["met"] is False  # 2.0 > 1.5, judged on the carried value
    assert report["targets"]["stage1_best_bf16_mfu"]["met"] is False
    assert report["pieces"]["sweep_trl"]["carried"] and report["pieces"]["sweep_trl"]["measured"] == "2026-11-25 20:15"
    assert report["pieces"]["stage1"]["seconds"] == 2288.0
    assert report["raw"]["sweep"] == {"trl": {"total_s": 929.0}}


def test_synthetic_cache_with_ches_runs_every_diagnostic(tmp_path):
    train = make_cache(tmp_path / "cache", 300, seed=1, ches=True)
    ev = make_cache(tmp_path / "eval", 120, seed=2, ches=True)
    assert train.column("ln_ches").null_count == 0
    make_run(tmp_path / "run", train, ev, beta=0.1, steps=20, batch_size=8, probe_every=10, n_probe=64, seed=0,
             cache_paths=(tmp_path / "cache", tmp_path / "eval"))
    con = queries.connect(tmp_path / "run")
    # as bench/queries.py runs them; none refuses (CHES present, slices has a column)
    out = {q.name: queries.run_query(con, q.name, bench_queries.PARAMS.get(q.name)) for q in queries.list_queries()}
    assert out["displacement_risk"].height > 0


def test_alternated_stage1_runs_pair_by_repeat():
    """bench/stage1.py --repeats: each backend's ratio to the plain loop is taken within a repeat (runs minutes
    apart), a repeat where either side failed is left out, and a configuration's row is its median run."""
    stage1 = _load("bench_stage1", "stage1.py")
    runs = [{"backend": b, "dtype": d, "repeat": r, "pairs_per_s": v} for b, d, r, v in [
        ("hf+compile", "float32", 0, 10.0), ("plain", "float32", 0, 5.0),
        ("plain", "float32", 1, 2.0), ("hf+compile", "float32", 1, 8.0),  # B A: a slow spell hits both sides
        ("hf+compile", "float32", 2, 9.0),  # its plain run failed: no ratio for repeat 2
        ("hf+compile", "bfloat16", 0, 30.0), ("plain", "bfloat16", 0, 10.0)]]
    assert stage1.vs_plain(runs) == {"float32": {"hf+compile": [2.0, 4.0]}, "bfloat16": {"hf+compile": [3.0]}}
    hf32 = [r for r in runs if (r["backend"], r["dtype"]) == ("hf+compile", "float32")]
    assert stage1.median_run(hf32)["pairs_per_s"] == 9.0
    assert stage1.median_run(hf32[:2])["pairs_per_s"] == 8.0  # an even count: the lower middle run
