"""bench/gpu_check.sh --dry-run: the GPU check's whole code path (random-init Llama, hf scorer, FSDP2 training
steps with bf16 mixed precision and activation checkpointing, ln 2 on the embedded model) at toy size on the
CPU, so the script a lent GPU runs is known to work."""

import json
import math
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "figures.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("OUT", None)
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--work", str(tmp_path / "w"),
                        "--json", str(out)], capture_output=True, text=True, env=env, timeout=900, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    for what in ("stage1 (hf scorer", "stage2 (train_step, bf16 FSDP2", "tokens/s", "MFU", "peak GPU memory",
                 "step-0 loss - ln 2 on the embedded model"):
        assert what in r.stdout, (what, r.stdout)
    fig = json.loads(out.read_text())
    assert fig["dry_run"] and fig["params"] > 0
    for stage in ("stage1", "stage2"):
        assert fig[stage]["tokens_per_s"] > 0 and fig[stage]["mfu"] > 0
    assert len(fig["stage2"]["losses"]) == 2 and all(math.isfinite(x) for x in fig["stage2"]["losses"])
    assert abs(fig["step0_loss_minus_ln2"]["float32"]) < 1e-5  # fp32 cache, fp32 policy: ln 2
    assert abs(fig["step0_loss_minus_ln2"]["bfloat16"]) < 0.05  # bf16 weights: close, not exact
