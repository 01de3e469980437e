"""TRL 1.16.0 side of the benchmark: DPOTrainer on the same model, pairs, batch, dtype and optimizer as refcache.

One configuration per process, so that peak RSS (getrusage ru_maxrss of the process) belongs to it alone:

    # (a)+(c) precompute_ref_log_probs=True: the precompute pass timed on its own, then training steps
    .venv/bin/python bench/trl_side.py run --mode precompute --model M --pairs P.jsonl --steps 12 --json out.json
    # (b) a live reference model
    .venv/bin/python bench/trl_side.py run --mode live --model M --pairs P.jsonl --steps 12 --json out.json
    # (d) a 4-point beta sweep: four TRL runs, each in a fresh process, total wall time
    .venv/bin/python bench/trl_side.py sweep --model M --pairs P.jsonl --betas 0.05,0.1,0.2,0.5 --steps 16 --json out.json

Settings kept equal to refcache's: per-device batch 8 (no accumulation), AdamW (torch, betas 0.9/0.999,
no weight decay), linear decay without warmup, clip 1.0, sigmoid loss, max_length 1000 (no
pair reaches it), fp32 weights with bf16 autocast for `--dtype bfloat16`. TRL keeps its own choices where
refcache differs by design: random (not length-grouped) batches, its fused LM-head log-probs, its metrics.

Timing: step seconds from a TrainerCallback (on_step_begin .. on_step_end: forward, backward, optimizer),
median after --warmup steps. The precompute pass is DPOTrainer._precompute_ref_logps, timed by a subclass;
its throughput counts prompt + chosen + rejected tokens as TRL tokenized them (and pairs/s).
Sweep variants: by default every run recomputes its reference log-probs (in-memory dataset: TRL writes them
to a temporary datasets cache that dies with the process); `--dataset-cache DIR` loads the JSONL through
`datasets.load_dataset` with a cache shared by the runs, so TRL's fingerprinted cache can serve runs 2-4.
"""

import time

T_PROCESS = time.perf_counter()

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import typing
from pathlib import Path


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def write_json(path, obj):
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(json.dumps(obj, indent=1))
        os.replace(tmp, path)


def cmd_run(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import datasets

    try:
        import trl
    except ImportError:
        sys.exit("bench/trl_side.py: TRL is not installed; run `.venv/bin/pip install trl==1.16.0 --no-deps` "
                 "(its other dependencies are already in the venv) or `make bench`")
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()
    t_imports = time.perf_counter() - T_PROCESS
    out = {"tool": "trl", "trl": trl.__version__, "mode": args.mode, "dtype": args.dtype, "beta": args.beta,
           "batch_size": args.batch_size, "lr": args.lr, "steps": args.steps, "warmup": args.warmup,
           "model": args.model, "pairs_path": args.pairs, "threads": torch.get_num_threads(),
           "dataset_cache": args.dataset_cache, "import_s": t_imports}

    class TimedDPOTrainer(DPOTrainer):
        """DPOTrainer whose reference precompute pass is timed (it runs inside __init__)."""

        precompute: typing.ClassVar[list] = []

        def _precompute_ref_logps(self, dataset, name, batch_size):
            lens = [len(p) + len(c) + len(r) for p, c, r in
                    zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])]
            t0 = time.perf_counter()
            result = super()._precompute_ref_logps(dataset, name, batch_size)
            self.precompute.append({"split": name, "seconds": time.perf_counter() - t0, "pairs": len(lens),
                                    "tokens": sum(lens), "batch_size": batch_size})
            return result

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)
            print(f"  trl {args.mode} {args.dtype} step {len(self.times)}/{args.steps}: "
                  f"{self.times[-1]:.2f} s", flush=True)

    t0 = time.perf_counter()
    if args.dataset_cache:
        train = datasets.load_dataset("json", data_files=args.pairs, split="train", cache_dir=args.dataset_cache)
    else:
        with open(args.pairs) as f:
            train = datasets.Dataset.from_list([json.loads(line) for line in f if line.strip()])
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    out["load_s"] = time.perf_counter() - t0
    out["rss_after_load_bytes"] = rss_bytes()

    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=args.lr, beta=args.beta,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        loss_type=["sigmoid"], max_length=args.max_length, precompute_ref_log_probs=args.mode == "precompute",
        bf16=args.dtype == "bfloat16", fp16=False, use_cpu=True, seed=args.seed, data_seed=args.seed,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, gradient_checkpointing=False)
    timer = StepTimer()
    t0 = time.perf_counter()
    trainer = TimedDPOTrainer(model=model, args=config, train_dataset=train, processing_class=tok, callbacks=[timer])
    out["init_s"] = time.perf_counter() - t0
    out["rss_after_init_bytes"] = rss_bytes()
    out["live_ref_model"] = trainer.ref_model is not None
    if TimedDPOTrainer.precompute:
        p = TimedDPOTrainer.precompute[0]
        out |= {"precompute_s": p["seconds"], "precompute_pairs": p["pairs"], "precompute_tokens": p["tokens"],
                "precompute_batch_size": p["batch_size"], "precompute_tokens_per_s": p["tokens"] / p["seconds"],
                "precompute_pairs_per_s": p["pairs"] / p["seconds"]}
        print(f"  trl precompute pass ({args.dtype}): {p['pairs']} pairs, {p['tokens']:,} tokens in "
              f"{p['seconds']:.1f} s = {p['tokens'] / p['seconds']:,.0f} tokens/s", flush=True)
    ds = trainer.train_dataset
    out["dataset_tokens"] = sum(len(p) + len(c) + len(r) for p, c, r in
                                zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]))

    t0 = time.perf_counter()
    result = trainer.train()
    out["train_s"] = time.perf_counter() - t0
    steady = timer.times[args.warmup:] or timer.times
    out |= {"step_s": timer.times, "median_step_s": statistics.median(steady) if steady else None,
            "mean_step_s": statistics.mean(steady) if steady else None,
            "train_loss": result.training_loss, "peak_rss_bytes": peak_rss_bytes(),
            "wall_s": time.perf_counter() - T_PROCESS}
    print(f"trl {args.mode} {args.dtype}: median {out['median_step_s']:.3f} s/step over {len(steady)} steps, "
          f"peak RSS {out['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    write_json(args.json, out)
    return 0


def run_child(argv, log_path=None):
    """Run one configuration in a child process; returns (wall seconds, the child's peak RSS from wait4)."""
    t0 = time.perf_counter()
    with open(log_path or os.devnull, "w") as log:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv], stdout=log if log_path else None,
                                stderr=subprocess.STDOUT if log_path else None)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        tail = Path(log_path).read_text().strip().splitlines()[-1:] if log_path else []
        raise RuntimeError(f"trl_side.py {' '.join(argv[:3])} exited {rc}: {tail[0] if tail else ''}")
    return wall, usage.ru_maxrss * 1024


def cmd_sweep(args):
    betas = [float(b) for b in args.betas.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="trl-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = None
    if args.dataset_cache:
        cache = work / "datasets-cache"
        if cache.exists():
            import shutil

            shutil.rmtree(cache)  # a fresh cache: run 1 pays for the precompute, runs 2-4 may reuse it
    runs, total = [], 0.0
    for i, b in enumerate(betas):
        j = work / f"beta{i}.json"
        argv = ["run", "--mode", args.mode, "--model", args.model, "--pairs", args.pairs, "--beta", str(b),
                "--steps", str(args.steps), "--warmup", "0", "--batch-size", str(args.batch_size),
                "--lr", str(args.lr), "--dtype", args.dtype, "--max-length", str(args.max_length), "--json", str(j)]
        if args.threads:
            argv += ["--threads", str(args.threads)]
        if cache:
            argv += ["--dataset-cache", str(cache)]
        wall, peak = run_child(argv, work / f"beta{i}.log")
        rec = json.loads(j.read_text())
        total += wall
        runs.append({"beta": b, "wall_s": wall, "peak_rss_bytes": peak, "precompute_s": rec.get("precompute_s"),
                     "median_step_s": rec.get("median_step_s"), "train_s": rec.get("train_s")})
        print(f"trl sweep run {i + 1}/{len(betas)} beta={b}: {wall:.1f} s (precompute "
              f"{rec.get('precompute_s') or 0:.1f} s)", flush=True)
    out = {"tool": "trl", "mode": args.mode, "dtype": args.dtype, "betas": betas, "steps": args.steps,
           "batch_size": args.batch_size, "pairs_path": args.pairs, "dataset_cache": bool(cache),
           "runs": runs, "total_s": total}
    print(f"trl sweep ({len(betas)} runs x {args.steps} steps, {args.mode}): {total:.1f} s", flush=True)
    write_json(args.json, out)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("--model", required=True)
        p.add_argument("--pairs", required=True, help="explicit-prompt JSONL (prompt, chosen, rejected)")
        p.add_argument("--mode", choices=["live", "precompute"], default="precompute")
        p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
        p.add_argument("--steps", type=int, default=12)
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--lr", type=float, default=1e-6)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--max-length", type=int, default=1000, help="prompt+completion tokens (no pair reaches it)")
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--json", default=None)

    r = sub.add_parser("run", help="one configuration in this process")
    common(r)
    r.add_argument("--beta", type=float, default=0.1)
    r.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    r.add_argument("--dataset-cache", default=None, help="load through datasets.load_dataset with this cache_dir")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("sweep", help="one TRL run per beta, each in a fresh process; total wall time")
    common(s)
    s.add_argument("--betas", default="0.05,0.1,0.2,0.5")
    s.add_argument("--work", default=None, help="folder for per-run JSON and logs")
    s.add_argument("--dataset-cache", action="store_true", help="share a datasets cache between the runs")
    s.set_defaults(func=cmd_sweep)
    args = ap.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
