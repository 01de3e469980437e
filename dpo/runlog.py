"""A run's logs (schemas in refcache_base/runlog_schema.py): steps.parquet, evals.parquet, examples/ and summary.json.

`RunLog` holds the step rows, the eval rows and the buffered example rows; it flushes them (steps.parquet and
evals.parquet rewritten whole, examples/ one new part per flush, all atomic), hands its rows to each checkpoint
(dpo/checkpoint.py) and takes them back on resume, dropping the example rows a resumed run will redo, and writes
summary.json. The same rows go to the dashboards of --report-to (dpo/dashboards.py: tensorboard/, wandb/).
The directory itself and its rules: dpo/rundir.py.

Only rank 0 writes.
"""

import glob
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dpo import checkpoint, dashboards
from dpo.parallel import World
from dpo.step import Scores, StepResult
from refcache_base.files import atomic_write, write_json
from refcache_base.runlog_schema import EVALS_SCHEMA, EXAMPLES_SCHEMA, STEPS_SCHEMA


class RunLog:
    def __init__(self, out: str, run_id: str, world: World, steps_per_epoch: int, cfg, lock=None):
        self.out, self.run_id, self.world, self.lock = out, run_id, world, lock
        self.steps_per_epoch = steps_per_epoch
        self.batch_size = cfg.batch_size
        self.keep, self.flush_seconds = cfg.keep_checkpoints, cfg.flush_seconds
        self.steps: list[dict] = []  # steps.parquet rows, all of them (rewritten whole)
        self.evals: list[dict] = []  # evals.parquet rows, all of them
        self.examples: list[dict] = []  # column dicts not yet written to examples/
        self.part = 0  # number of the next examples/ part
        self.last_probe: dict = {}  # split -> the latest probe's means
        self.seconds = {"train": 0.0, "probe": 0.0, "eval": 0.0, "log": 0.0, "checkpoint": 0.0}
        self.last_flush = time.perf_counter()
        self.boards = []  # TensorBoard / W&B writers (rank 0), from start_dashboards

    def start_dashboards(self, names, config: dict, start_step: int):
        """Open the --report-to dashboards (rank 0), giving them the rows restored from a checkpoint."""
        if self.world.master and names:
            restored = [(r["step"], dashboards.step_tags(r)) for r in self.steps] + \
                [(r["step"], dashboards.eval_tags(r)) for r in self.evals]
            self.boards = dashboards.open_dashboards(names, self.out, self.run_id, config, start_step,
                                                     sorted(restored, key=lambda x: x[0]))

    # -- rows --

    def _example_columns(self, step, source, split, pairs, s: Scores) -> dict:
        n = len(s)
        return {
            "run_id": [self.run_id] * n,
            "step": np.full(n, step, np.int64),
            "epoch": np.full(n, step / self.steps_per_epoch),
            "source": [source] * n,
            "split": [split] * n,
            "pair_id": pairs.pair_id[s.idx].tolist(),
            "policy_chosen_logp": s.policy_chosen,
            "policy_rejected_logp": s.policy_rejected,
            "ref_chosen_logp": s.ref_chosen,
            "ref_rejected_logp": s.ref_rejected,
            "chosen_reward": s.reward_chosen,
            "rejected_reward": s.reward_rejected,
            "margin": s.margin,
            "loss": s.loss,
            "chosen_len": pairs.chosen_len[s.idx].astype(np.int32),
            "rejected_len": pairs.rejected_len[s.idx].astype(np.int32),
        }

    def add_step(self, step: int, r: StepResult, pairs) -> dict:
        """Log optimizer step `step`: its steps.parquet row (returned) and one examples row per pair."""
        self.seconds["train"] += r.seconds
        t0 = time.perf_counter()
        row = {"run_id": self.run_id, "step": step, "epoch": step / self.steps_per_epoch, "lr": r.lr,
               "grad_norm": r.grad_norm, **r.scores.means(), "tokens": int(r.tokens), "seconds": r.seconds,
               "samples_per_s": self.batch_size / r.seconds}
        if self.world.master:
            self.steps.append(row)
            self.examples.append(self._example_columns(step, "train", "train", pairs, r.scores))
            for board in self.boards:
                board.log(step, dashboards.step_tags(row))
        self.seconds["log"] += time.perf_counter() - t0
        return row

    def add_probes(self, step: int, probes: list, seconds: float):
        """Log the probe pairs scored after `step` updates: probes = [(split, pairs, Scores)]."""
        self.seconds["probe"] += seconds
        for split, pairs, s in probes:
            m = s.means()
            self.last_probe[split] = {"step": step, "reward_accuracy": m["reward_accuracy"],
                                      "reward_margin": m["reward_margin"], "loss": m["loss"]}
            if self.world.master:
                self.examples.append(self._example_columns(step, "probe", split, pairs, s))

    def add_eval(self, step: int, s: Scores, seconds: float):
        """Log the eval pass after `step` updates (one evals.parquet row)."""
        self.seconds["eval"] += seconds
        row = {"run_id": self.run_id, "step": step, "epoch": step / self.steps_per_epoch, "split": "eval",
               "pairs": len(s), **s.means(), "seconds": seconds}
        self.evals.append(row)
        for board in self.boards:
            board.log(step, dashboards.eval_tags(row))

    # -- files --

    def flush(self):
        """Rewrite steps.parquet (and evals.parquet) and write the buffered example rows as a new part, all
        atomically. Rank 0."""
        t0 = time.perf_counter()
        _write_parquet(pa.Table.from_pylist(self.steps, schema=STEPS_SCHEMA), os.path.join(self.out, "steps.parquet"))
        if self.evals:
            _write_parquet(pa.Table.from_pylist(self.evals, schema=EVALS_SCHEMA),
                           os.path.join(self.out, "evals.parquet"))
        if self.examples:
            cols = {k: np.concatenate([np.asarray(b[k]) for b in self.examples]) for k in EXAMPLES_SCHEMA.names}
            path = os.path.join(self.out, "examples", f"part-{self.part:06d}.parquet")
            _write_parquet(pa.table(cols, schema=EXAMPLES_SCHEMA), path)
            self.part += 1
            self.examples.clear()
        for board in self.boards:
            board.flush()
        self.last_flush = time.perf_counter()
        self.seconds["log"] += self.last_flush - t0

    def maybe_flush(self):
        if self.world.master and time.perf_counter() - self.last_flush > self.flush_seconds:
            self.flush()

    def checkpoint(self, run, step: int):
        """Logs first (all rows < step), then the checkpoint (dpo/checkpoint.py): a crash between the two resumes
        from the older one."""
        if self.world.master:
            self.flush()
        t0 = time.perf_counter()
        checkpoint.save(run, step, self._rows(), self.keep)
        self.seconds["checkpoint"] += time.perf_counter() - t0

    def _rows(self) -> dict:
        """What a checkpoint keeps of the log: the rows it rewrites whole, so a resume writes them again."""
        return {"steps_rows": list(self.steps), "eval_rows": list(self.evals), "run_id": self.run_id}

    def resume(self, run) -> int:
        """Restore the newest readable checkpoint (dpo/checkpoint.py) and these rows; drop the example rows
        written after it. Returns its step. The final checkpoint holds the last eval pass: a resume redoes it."""
        state = checkpoint.resume(run)
        self.steps = list(state["steps_rows"])
        self.evals = [r for r in state.get("eval_rows", []) if r["step"] < state["step"]]
        if self.world.master:
            self.part = _truncate_examples(os.path.join(self.out, "examples"), state["step"])
        return state["step"]

    def finish(self, run, wall: float, peak_rss: list, shards: list) -> dict:
        """Write summary.json (rank 0) and return the summary."""
        steps_s = [r["seconds"] for r in self.steps]
        sec = self.seconds
        last_eval = self.evals[-1] if self.evals else None
        summary = {
            "run_id": self.run_id,
            "run_dir": os.path.abspath(self.out),
            "loss": run.cfg.loss,
            "loss_params": run.loss_params,
            "steps": len(self.steps),
            "epochs": len(self.steps) / self.steps_per_epoch,
            "train_pairs": len(run.train_pairs),
            "eval_pairs": len(run.eval_pairs) if run.eval_pairs is not None else 0,
            "first_loss": self.steps[0]["loss"] if self.steps else None,
            "final_loss": self.steps[-1]["loss"] if self.steps else None,
            "final_train_reward_accuracy": self.steps[-1]["reward_accuracy"] if self.steps else None,
            "shared_prompt": run.share_prompt,
            "probe": self.last_probe,
            "eval": {k: v for k, v in last_eval.items() if k not in ("run_id", "split")} if last_eval else None,
            "parallel": run.parallel,
            "world_size": self.world.size,
            "wall_seconds": wall,
            "step_seconds_median": float(np.median(steps_s)) if steps_s else None,
            "samples_per_s": self.batch_size * len(steps_s) / sum(steps_s) if steps_s else None,
            "train_seconds": sec["train"],
            "probe_seconds": sec["probe"],
            "eval_seconds": sec["eval"],
            "logging_seconds": sec["log"],
            "checkpoint_seconds": sec["checkpoint"],
            "logging_share_of_step_time": sec["log"] / sec["train"] if sec["train"] else None,
            "peak_rss_bytes": peak_rss[0],  # rank 0's process peak up to the end of the training loop
            "peak_rss_bytes_per_rank": peak_rss,
            "shards_per_rank": shards,  # elements each process holds: parameters, optimizer state
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(self.world.device)
            if self.world.device.type == "cuda" else None,
            "final_model": os.path.abspath(os.path.join(self.out, "final")) if run.cfg.save_final else None,
        }
        if self.world.master:
            write_json(os.path.join(self.out, "summary.json"), summary)
        return summary

    def close(self):
        boards, self.boards = self.boards, []
        for board in boards:
            board.close()
        if self.lock:
            self.lock.release()
            self.lock = None


def _truncate_examples(ex_dir, step):
    """Drop example rows with step >= `step` (written after the checkpoint we resume from). Returns the next
    part number."""
    last = -1
    for path in sorted(glob.glob(os.path.join(glob.escape(ex_dir), "part-*.parquet"))):
        steps = pq.read_table(path, columns=["step"]).column("step").to_numpy()
        if len(steps) == 0 or steps.min() >= step:
            os.remove(path)
            continue
        if steps.max() >= step:
            t = pq.read_table(path)
            _write_parquet(t.filter(pa.compute.less(t.column("step"), step)), path)
        last = max(last, int(os.path.basename(path)[5:11]))
    for tmp in glob.glob(os.path.join(glob.escape(ex_dir), ".*.tmp")):
        os.remove(tmp)
    return last + 1


def _write_parquet(table, path):
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def _write_parquet(table, path):
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
