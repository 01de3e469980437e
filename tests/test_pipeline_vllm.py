"""vLLM backend: per-token parity with the hf backend (fp32: 1e-4 + 1e-5 |log p| nats) and CHES parity (1e-4 of
each score's scale) on the embedded data; --no-ches; its KV cache sized from the workload on a CPU; one line on the
terminal while it starts; the backend registry."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import one_line_error
from oracles import ches_diff

import queries
from pipeline.backends import (
    BACKENDS,
    HFScorer,
    Scorer,
    VLLMScorer,
    backend_settings,
    check_settings,
    make_scorer,
)
from pipeline.backends.vllm import cpu_kv_cache_bytes, kv_bytes_per_token
from pipeline.cache import load_table, read_manifest
from pipeline.precompute import format_summary, precompute
from pipeline.verify import TOLERANCE, compare
from refcache import UserError
from refcache.cli import main as cli_main
from refcache_base.cache_schema import CHES_COMPUTED, CHES_SKIPPED
from refcache_base.progress import SECONDS_ENV


def per_token_diff(vllm_cache, hf_cache):
    """verify.compare of two caches of the same pairs (hf the reference), under the fp32 tolerance."""
    ta, tb = load_table(vllm_cache), load_table(hf_cache)
    assert ta.column("pair_id").to_pylist() == tb.column("pair_id").to_pylist()
    for col in ("prompt_ids", "chosen_ids", "rejected_ids", "truncated"):
        assert ta.column(col).equals(tb.column(col)), col

    def token_logps(t):
        return [np.asarray(x, np.float64) for pair in zip(t.column("ref_chosen_token_logps").to_pylist(),
                                                          t.column("ref_rejected_token_logps").to_pylist())
                for x in pair]

    return compare(token_logps(tb), token_logps(ta), *TOLERANCE["float32"], beta=0.1)


def engine_processes() -> list:
    """This process's children that vLLM's engines started and that are still there, running or defunct (exited
    but never waited for): after close(), none."""
    import psutil

    out = []
    for c in psutil.Process().children():
        try:
            if c.name().startswith("VLLM"):
                out.append((c.pid, c.name(), c.status()))
        except psutil.NoSuchProcess:  # gone meanwhile
            pass
    return out


# --- backend interface and registry (no engine) ---

def test_registry_feeds_the_cli_and_refuses_a_wrong_setting(tmp_path, tiny_model_dir, prefs_dir, capsys):
    assert set(BACKENDS) == {"hf", "vllm"}
    assert backend_settings("hf") == ("batch_size", "device", "compile", "verbose")
    assert {"kv_cache_gib", "gpu_memory_utilization", "enforce_eager"} <= set(backend_settings("vllm"))
    assert check_settings("vllm", {"compile": None, "batch_size": 8, "kv_cache_gib": None}) == {"batch_size": 8}
    assert check_settings("vllm", {"compile": False}) == {}  # unset flags of other backends pass
    with pytest.raises(UserError, match=r"^--compile applies to the hf backend, not vllm"):
        check_settings("vllm", {"compile": True})
    with pytest.raises(UserError, match=r"^--kv-cache-gib applies to the vllm backend, not hf"):
        make_scorer("hf", tiny_model_dir, kv_cache_gib=1.0)
    with pytest.raises(UserError, match=r"^'kv_cache_gbi' is not a setting of the vllm backend \(it takes: "):
        check_settings("vllm", {"kv_cache_gbi": 1.0})
    with pytest.raises(UserError, match=r"^--backend tpu: use auto, hf, vllm"):
        make_scorer("tpu", tiny_model_dir)

    # the CLI: choices come from the registry; a flag for the other backend is one line, before any work
    data, out = str(prefs_dir / "eval.jsonl"), str(tmp_path / "c")
    with pytest.raises(SystemExit):
        cli_main(["precompute", data, "--model", str(tiny_model_dir), "--out", out, "--backend", "tpu"])
    assert "choose from 'auto', 'hf', 'vllm'" in capsys.readouterr().err
    assert cli_main(["precompute", data, "--model", str(tiny_model_dir), "--out", out, "--backend", "hf",
                     "--kv-cache-gib", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--kv-cache-gib applies to the vllm backend, not hf" in err
    assert not (tmp_path / "c" / "__refcache__" / "manifest.json").exists()

    hf = make_scorer("hf", tiny_model_dir, batch_size=4)
    assert isinstance(hf, Scorer) and hf.settings()["batch_size"] == 4
    hf.close()


def test_kv_cache_is_sized_from_the_model_and_the_workload(tiny_model_dir, smollm2_dir):
    # 2 (K, V) x layers x kv heads x head dim x 4 bytes, from config.json
    assert kv_bytes_per_token(tiny_model_dir, "float32") == 2 * 4 * 4 * 64 * 4
    assert kv_bytes_per_token(smollm2_dir, "float32") == 2 * 30 * 3 * 64 * 4
    assert kv_bytes_per_token(smollm2_dir, "bfloat16") == 2 * 30 * 3 * 64 * 2
    # in flight: 2 x ceil(4096 / max_model_len) + 1 full-length sequences, at most max_num_seqs
    assert cpu_kv_cache_bytes(smollm2_dir, "float32", 1025, 256, 4096) == 1025 * 9 * 46080
    assert cpu_kv_cache_bytes(tiny_model_dir, "float32", 1024, 256, 4096) == 1024 * 9 * 8192
    assert cpu_kv_cache_bytes(smollm2_dir, "float32", 8192, 256, 4096) == 8192 * 3 * 46080
    assert cpu_kv_cache_bytes(smollm2_dir, "float32", 1025, 2, 4096) == 1025 * 2 * 46080
    assert cpu_kv_cache_bytes(tiny_model_dir, "float32", 64, 4, 4096) == 64 << 20  # the floor
    # more than half the free memory is refused before any engine starts, naming what to change
    with pytest.raises(UserError, match="KV cache .* lower --max-length or --batch-size, or set --kv-cache-gib"):
        VLLMScorer(smollm2_dir, "float32", max_model_len=1 << 24)


def test_verify_judges_each_token_against_atol_plus_rtol_log_p():
    """The case that made `refcache verify` say FAILED on a sound fp32 vLLM cache: 1.62e-4 nats on a token of
    log p -12.8 is fp32 noise (bound 1e-4 + 1e-5 * 12.8 = 2.28e-4); the same error on a likely token is not."""
    fresh = [np.array([-12.8, -0.5, -2.0]), np.array([-1.0, -3.0])]  # chosen, rejected of one pair
    noisy = [fresh[0] + [1.62e-4, 0, 0], fresh[1].copy()]
    r = compare(fresh, noisy, *TOLERANCE["float32"], beta=0.1)
    assert r["passed"] and r["worst_ratio"] == pytest.approx(1.62e-4 / 2.28e-4, rel=1e-3)
    assert r["worst_logp"] == -12.8 and r["max_abs_diff"] == pytest.approx(1.62e-4)
    assert r["reward_error_max"] == pytest.approx(0.1 * 1.62e-4) and r["margin_error_max"] == pytest.approx(1.62e-5)
    bad = [fresh[0] + [0, 1.62e-4, 0], fresh[1] - [0, 1e-4]]  # 1.62e-4 at log p -0.5: bound 1.05e-4
    r = compare(fresh, bad, *TOLERANCE["float32"], beta=0.1)
    assert not r["passed"] and r["tokens_over"] == 1 and r["worst_logp"] == -0.5
    assert r["margin_error_max"] == pytest.approx(0.1 * 2.62e-4)  # errors of opposite sign add up in the margin


def test_a_failed_engine_start_is_one_line_with_its_cause(tiny_model_dir):
    """A KV cache bigger than the machine: vLLM's own refusal, on one line, with the log kept for the rest.
    (Before the session's engine starts: one engine at a time.)"""
    with pytest.raises(UserError) as e:
        VLLMScorer(tiny_model_dir, "float32", max_model_len=1024, kv_cache_gib=1 << 16)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("the vLLM engine did not start: ")
    assert "less than requested memory for kv" in msg and "(engine log: " in msg
    log = Path(msg.rsplit("(engine log: ", 1)[1].rstrip(")"))
    assert "Traceback" in log.read_text()
    log.unlink()
    assert not engine_processes()


def test_no_ches_starts_one_engine_and_says_why_the_cache_has_none(tmp_path, tiny_model_dir, prefs_dir, capsys):
    """`refcache precompute --backend vllm --no-ches`: no second engine, no cost line, null ches/ln_ches, and the
    manifest and summary say why; CHES is part of the settings, so a run with it refuses this cache (before any
    engine starts). (Before the session's engines start: one run of engines at a time.)"""
    out, data = tmp_path / "noches", prefs_dir / "eval.jsonl"
    argv = ["precompute", str(data), "--model", str(tiny_model_dir), "--out", str(out), "--backend", "vllm",
            "--limit", "16", "--no-progress"]
    capsys.readouterr()
    assert cli_main([*argv, "--no-ches"]) == 0
    assert not engine_processes()  # the engine closed, and its process was waited for
    printed = capsys.readouterr()
    assert "starting the vLLM engine (tiny-llama" in printed.err and "second one for CHES" not in printed.err
    why = "no CHES in this cache: built with the vllm backend and --no-ches; rebuild without --no-ches"
    assert f"CHES displacement scores (ches, ln_ches): {why}" in printed.out and "CHES cost" not in printed.out
    m = read_manifest(out)
    assert m["backend"]["settings"]["ches"] == CHES_SKIPPED and m["backend"]["settings"]["ches_method"] is None
    assert m["settings"]["ches"] is False
    t = load_table(out)
    assert t.column("ches").null_count == t.column("ln_ches").null_count == t.num_rows == 16
    line = one_line_error(capsys, argv)  # CHES on (the default) into the --no-ches cache
    assert "was made with different settings (ches differ" in line


# --- one engine on the tiny model (conftest's vllm_scorer), and its second one for CHES ---

def test_engine_start_prints_one_line_and_sizes_its_kv_cache(vllm_scorer, tiny_model_dir):
    out = vllm_scorer.start_output
    assert out.count("\n") == 1 and out.startswith("starting the vLLM engine (tiny-llama, float32, KV cache 0.07 GiB)")
    # vLLM's own output (its logs, warnings, loading bars, from every process) went to the engine log instead
    assert "Loading safetensors checkpoint shards" in Path(vllm_scorer.log).read_text()
    assert "then a second one for CHES (--no-ches skips it)" in out
    kv = cpu_kv_cache_bytes(tiny_model_dir, "float32", 1024, 256, 4096)
    assert vllm_scorer.settings()["kv_cache_bytes"] == kv
    for engine in (vllm_scorer.llm, vllm_scorer.pool):  # the same KV cache for each
        assert engine.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes == kv
    assert vllm_scorer.pool.llm_engine.vllm_config.model_config.runner_type == "pooling"
    assert isinstance(vllm_scorer, Scorer)


def test_vllm_matches_hf_per_token_fp32(tmp_path, vllm_scorer, eval_cache, tiny_model_dir, prefs_dir, capsys):
    out = tmp_path / "vllm_eval"
    s = precompute(prefs_dir / "eval.jsonl", tiny_model_dir, out, dtype="float32", limit=64, progress=False,
                   scorer=vllm_scorer)
    assert s["complete"] and s["backend"] == "vllm"
    m = read_manifest(out)
    assert m["backend"]["name"] == "vllm" and m["backend"]["version"].startswith("vllm")
    assert m["backend"]["settings"]["kv_cache_bytes"] == vllm_scorer.kv_cache_bytes
    # same tokens, same pairs as the hf cache; the values agree per token within 1e-4 + 1e-5 |log p|
    r = per_token_diff(out, eval_cache)
    with capsys.disabled():
        print(f"\nvLLM vs hf, fp32, eval[:64]: {r['tokens']} tokens, per-token |diff| max {r['max_abs_diff']:.3g}, "
              f"mean {r['mean_abs_diff']:.3g}; worst at {r['worst_ratio']:.2f} of its bound; margin error at beta "
              f"0.1 max {r['margin_error_max']:.3g}")
    assert r["passed"] and r["margin_error_max"] < 1e-4
    assert read_manifest(eval_cache)["fingerprint"] != m["fingerprint"]  # backend is part of the fingerprint
    # CHES from the second engine: every pair has it, equal to hf's within 1e-4 of each score's scale (the size
    # of the two dot products that cancel in it, tests/oracles.direct_ches)
    assert s["ches"] == CHES_COMPUTED and m["backend"]["settings"]["ches"] == CHES_COMPUTED
    assert m["backend"]["settings"]["ches_method"].startswith("second pass: a vLLM pooling engine")
    assert m["settings"]["ches"] is True
    rows = load_table(out, ["prompt_ids", "chosen_ids", "rejected_ids", "ches", "ln_ches"]).to_pylist()
    assert all(np.isfinite(r["ches"]) and np.isfinite(r["ln_ches"]) for r in rows) and len(rows) == s["rows_kept"]
    hf_rows = load_table(eval_cache, ["prompt_ids", "chosen_ids", "rejected_ids", "ches", "ln_ches"]).to_pylist()
    worst = ches_diff(HFScorer(tiny_model_dir, "float32").model, rows, hf_rows)
    assert s["ches_seconds"] > 0 and s["ches_load_seconds"] == round(vllm_scorer.ches_start_seconds, 3) > 0
    cost = next(x for x in format_summary(s).splitlines() if x.startswith("CHES cost (vllm"))
    with capsys.disabled():
        print(f"\nvLLM vs hf CHES, fp32, eval[:64]: max |diff| / scale: ches {worst['ches']:.2g}, ln_ches "
              f"{worst['ln_ches']:.2g}\n{cost}")
    assert worst["ches"] <= 1e-4 and worst["ln_ches"] <= 1e-4
    assert len(queries.run_query(queries.connect(caches=[out]), "displacement_risk")) > 0
    # a scorer started with CHES cannot build a cache without it (or the other way round)
    with pytest.raises(UserError, match=r"^the given scorer was started with ches=True, not ches=False$"):
        precompute(prefs_dir / "eval.jsonl", tiny_model_dir, tmp_path / "x", limit=4, progress=False,
                   scorer=vllm_scorer, ches=False)

    # every row format (explicit, conversational, implicit text and chat) through both backends
    imp = tmp_path / "vllm_implicit"
    precompute(prefs_dir / "implicit_sample.jsonl", tiny_model_dir, imp, dtype="float32", progress=False,
               scorer=vllm_scorer)
    ref = tmp_path / "hf_implicit"
    precompute(prefs_dir / "implicit_sample.jsonl", tiny_model_dir, ref, backend="hf", progress=False)
    r2 = per_token_diff(imp, ref)
    assert r2["passed"] and r2["tokens"] > 0

    capsys.readouterr()
    # `refcache verify` re-scores the vLLM cache with hf and reports the same agreement
    assert cli_main(["verify", str(out), "--sample", "64", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["passed"] and r["cache_backend"] == "vllm" and r["worst_ratio"] <= 1
    with capsys.disabled():
        print(f"refcache verify (vllm cache): max {r['max_abs_diff']:.3g} mean {r['mean_abs_diff']:.3g} "
              f"over {r['tokens']} tokens; implied margin error at beta 0.1: {r['margin_error_max']:.3g}")


def test_progress_moves_as_requests_finish(tmp_path, vllm_scorer, tiny_model_dir, prefs_dir, monkeypatch, capsys):
    """64 pairs are one scoring call (pairs_per_call 1024) of two passes (log-probs, then CHES) over 128 sequences:
    the progress lines move as vLLM finishes requests, in whole pairs, not once at the end of the call."""
    monkeypatch.setenv(SECONDS_ENV, "0")
    capsys.readouterr()
    precompute(prefs_dir / "eval.jsonl", tiny_model_dir, tmp_path / "p", limit=64, scorer=vllm_scorer)
    err = capsys.readouterr().err
    counts = [int(m[1]) for m in re.finditer(r"^precompute: (\d+)/64 pairs", err, re.MULTILINE)]
    assert len(counts) >= 4 and counts == sorted(set(counts)) and counts[-1] == 64, err
    assert min(counts) <= 32  # moved during the first pass already
