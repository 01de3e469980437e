"""The run directory (schemas in dpo/runlog_schema.py): what a run writes, and the rules that keep it safe.

- A run is recognised by its config.json, written first and atomically, which carries `"kind": "refcache-run"`.
  refcache writes only into a new or empty directory or one of its own runs, and removes only files it wrote:
  a directory holding anything else (a Hugging Face model, say) is refused, with or without --resume.
- A lock file (refcache.lock.DirLock) keeps a second writer out while a run writes the directory.
- `RunLog` holds the step rows, the eval rows and the buffered example rows; it flushes them (steps.parquet and
  evals.parquet rewritten whole, examples/ one new part per flush, all atomic), writes checkpoints, drops the
  rows a resumed run will redo, and writes summary.json. The same rows go to the dashboards of --report-to
  (dpo/dashboards.py: tensorboard/, wandb/).

Only rank 0 writes, except sharded (FSDP) checkpoints, of which every process writes its own shards.
"""

import contextlib
import dataclasses
import errno
import glob
import json
import os
import random
import shutil
import sys
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dpo import dashboards as DB
from dpo import model as M
from dpo import parallel as P
from dpo.config import RESUME_FREE, TrainConfig
from dpo.runlog_schema import EVALS_SCHEMA, EXAMPLES_SCHEMA, STEPS_SCHEMA
from refcache import UserError
from refcache.lock import LOCK_PREFIX, DirLock

RUN_KIND = "refcache-run"
OWN_ENTRIES = ("config.json", "steps.parquet", "evals.parquet", "summary.json", "examples", "checkpoints",
               "final", "final.tmp", "tensorboard", "wandb")


# ---- per-pair results ---------------------------------------------------------------------------------------


@dataclass
class Scores:
    """Per-pair results of forward passes: float64 arrays aligned with `idx`, the pairs' rows in their cache."""

    idx: np.ndarray
    policy_chosen: np.ndarray  # summed completion log-probs under the policy
    policy_rejected: np.ndarray
    ref_chosen: np.ndarray  # the same under the reference (cached, or live)
    ref_rejected: np.ndarray
    loss: np.ndarray  # per-example loss
    reward_chosen: np.ndarray  # beta * (policy - ref)
    reward_rejected: np.ndarray

    @classmethod
    def of(cls, idx, **tensors) -> "Scores":
        return cls(idx=np.asarray(idx), **{k: t.detach().double().cpu().numpy() for k, t in tensors.items()})

    @classmethod
    def cat(cls, parts) -> "Scores":
        parts = list(parts)
        return cls(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in cls.__dataclass_fields__})

    @property
    def margin(self) -> np.ndarray:
        return self.reward_chosen - self.reward_rejected

    def __len__(self):
        return len(self.idx)

    def means(self) -> dict:
        """TRL's metrics over these pairs: loss, rewards (chosen, rejected, margin, accuracy), log-probs."""
        return {
            "loss": float(self.loss.mean()),
            "reward_chosen": float(self.reward_chosen.mean()),
            "reward_rejected": float(self.reward_rejected.mean()),
            "reward_margin": float(self.margin.mean()),
            "reward_accuracy": float((self.margin > 0).mean()),
            "policy_chosen_logp": float(self.policy_chosen.mean()),
            "policy_rejected_logp": float(self.policy_rejected.mean()),
            "ref_chosen_logp": float(self.ref_chosen.mean()),
            "ref_rejected_logp": float(self.ref_rejected.mean()),
        }


@dataclass
class StepResult:
    """One optimizer step: every pair of its batch (from all processes) and the step's own numbers."""

    scores: Scores
    lr: float  # the learning rate the update used
    grad_norm: float  # before clipping
    tokens: int  # non-pad tokens in the step's forward passes
    seconds: float


# ---- the run directory --------------------------------------------------------------------------------------


def read_run_config(out: str) -> dict | None:
    """The run config in `out`, or None when `out` holds no config.json written by refcache train."""
    try:
        with open(os.path.join(out, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    legacy = "run_id" in cfg and "cache_fingerprint" in cfg  # runs from before the marker
    return cfg if cfg.get("kind") == RUN_KIND or legacy else None


def _state(out: str) -> str:
    """'new' (missing or empty), 'half' (what a run killed before its config.json leaves), 'run', or 'foreign'."""
    if not os.path.exists(out):
        return "new"
    if not os.path.isdir(out):
        return "foreign"
    names = {n for n in os.listdir(out) if not n.startswith(LOCK_PREFIX)}
    if not names:
        return "new"
    if read_run_config(out) is not None:
        return "run"
    examples = os.path.join(out, "examples")
    if names <= {"config.json.tmp", "examples"} and not (os.path.isdir(examples) and os.listdir(examples)):
        return "half"
    return "foreign"


def checkpoints(out: str) -> list:
    """Complete checkpoints, oldest first: checkpoints/step-NNNNNNNN.pt (one file) or step-NNNNNNNN/ (shards)."""
    found = []
    for p in glob.glob(os.path.join(glob.escape(out), "checkpoints", "step-*")):
        name = os.path.basename(p)
        if (name.endswith(".pt") and len(name) == 16) or (len(name) == 13 and os.path.isdir(p)):
            found.append((name[5:13], p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(out: str) -> str | None:
    found = checkpoints(out)
    return found[-1] if found else None


def _remove_own(out: str):
    """Remove what refcache train writes into a run directory, and nothing else."""
    for name in OWN_ENTRIES + ("config.json.tmp",):
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


# A path says where a cache or model is today; what it is is recorded beside it and decides on resume, so the
# same cache through another spelling, a symlink, a copy or another mount resumes (config.json then records
# the new path).
IDENTIFIED_BY = {"cache": "cache_fingerprint", "eval_cache": "eval_cache_fingerprint", "model": "model_sha256"}


def _same(key: str, old, new) -> bool:
    """Whether a setting is the same for a resume: caches by their content identity (pipeline.cache.content_id;
    the manifest file's sha256 for runs that recorded no content id), the --where subset by the pair ids it
    kept (its counts for runs that recorded no hash), everything else by value."""
    if key.endswith("cache_fingerprint") and isinstance(old, dict) and isinstance(new, dict):
        by = "content_sha256" if old.get("content_sha256") else "manifest_sha256"
        return old.get(by) == new.get(by)
    if key == "where_pairs" and isinstance(old, dict) and isinstance(new, dict) and "pair_ids_sha256" not in old:
        new = {k: v for k, v in new.items() if k in old}
    return _norm(old) == _norm(new)


def _changed(old: dict, new: dict) -> list:
    """Settings that differ; a setting an older version did not record ran with today's default."""
    skip = RESUME_FREE | {"run_id", "versions", "kind", "sharded"}
    skip |= {k for k, by in IDENTIFIED_BY.items() if old.get(by) is not None and new.get(by) is not None}
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)} | {"sharded": False}
    return [k for k in new if k not in skip and not _same(k, old.get(k, defaults.get(k)), new[k])]


def settings_changed(out: str, cfg: TrainConfig) -> list:
    """[(setting, value in out's config.json, value in cfg)] for the settings of a validated `cfg` that differ from
    the run in `out`, by the rule a resume applies (_changed). Settings training derives when cfg leaves them
    open (model, ref_model, device) count as the run's; the caches count by their fingerprints."""
    from dpo.config import loss_params
    from pipeline.cache import read_manifest

    old = read_run_config(out)
    new = {k: v for k, v in dataclasses.asdict(cfg).items()
           if not (k in ("model", "ref_model") and v is None) and not (k == "device" and v == "auto")}
    new["loss_params"] = loss_params(cfg)
    new["cache_fingerprint"] = M.cache_fingerprint(cfg.cache, read_manifest(cfg.cache))
    if cfg.eval_cache:
        new["eval_cache_fingerprint"] = M.cache_fingerprint(cfg.eval_cache, read_manifest(cfg.eval_cache))
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return [(k, old.get(k, defaults.get(k)), new[k]) for k in _changed(old, new)]


def _refuse_foreign(out: str) -> str:
    """The state of `out` (see _state); a UserError if it holds what refcache did not write."""
    state = _state(out)
    if state == "foreign":
        raise UserError(f"{out} already exists and is not a refcache run (no refcache config.json), so neither a "
                        "new run nor --resume may write there; choose a new --out")
    return state


def _prepare(out: str, resolved: dict, resume: bool) -> tuple[str, str | None]:
    """Check `out` (under its lock) and make it ready: returns (run_id, checkpoint to resume from or None)."""
    state = _refuse_foreign(out)
    if state == "run" and not resume:
        raise UserError(f"{out} already exists and is not empty; pass --resume to continue that run or choose a "
                        "new --out")
    ckpt = latest_checkpoint(out) if state == "run" else None
    if ckpt:
        old = read_run_config(out)
        if changed := _changed(old, resolved):
            # causes first; what follows from them (counts, steps) after
            changed.sort(key=lambda k: k in ("train_pairs", "eval_pairs", "steps_per_epoch", "total_steps",
                                             "warmup_steps"))
            if changed[0] == "where_pairs":  # the same predicate, now keeping other pairs
                was, now = old.get("where_pairs") or {}, resolved["where_pairs"] or {}
                raise UserError(f"{out}: --where {resolved.get('where')!r} now keeps other pairs than when the run "
                                f"started ({was.get('kept')} pairs then, {now.get('kept')} now; their pair ids "
                                "differ): the predicate depends on something that changed (random(), a column); "
                                "resume with a predicate that keeps the same pairs or use a new --out")
            if changed[0] in ("cache_fingerprint", "eval_cache_fingerprint"):
                flag = "--cache" if changed[0] == "cache_fingerprint" else "--eval-cache"
                what = resolved.get(changed[0].removesuffix("_fingerprint"))
                raise UserError(f"{out}: {flag} {what} is not the cache the run started with (its content differs: "
                                "another model, other data or settings); resume with that cache, through any path "
                                "to it, or use a new --out")
            k = changed[0]
            raise UserError(f"{out} was started with different settings ({', '.join(changed)}; e.g. {k}: "
                            f"{_short(old.get(k))} then, {_short(resolved[k])} now); resume with the same "
                            "settings or use a new --out")
        if ckpt.endswith(".pt") == resolved["sharded"]:
            was = "--parallel fsdp" if resolved["sharded"] is False else "one process or --parallel ddp"
            raise UserError(f"{ckpt} was written by a run under {was}; resume it the same way")
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, "summary.json"))
        moved = {k: resolved.get(k) for k in (*IDENTIFIED_BY, *IDENTIFIED_BY.values()) if old.get(k) != resolved.get(k)}
        if moved:  # the same cache or model, now at another path (or an older run's record, completed)
            _write_json(os.path.join(out, "config.json"), {**old, **moved})
        return old["run_id"], ckpt
    # new, half-created, or a run killed before its first checkpoint: start over, config.json first
    _remove_own(out)
    run_id = f"{os.path.basename(os.path.normpath(out))}-{uuid.uuid4().hex[:8]}"
    _write_json(os.path.join(out, "config.json"), {"kind": RUN_KIND, **resolved, "run_id": run_id})
    os.makedirs(os.path.join(out, "examples"), exist_ok=True)
    return run_id, None


def open_run_dir(out: str, resolved: dict, resume: bool, world: P.World):
    """Rank 0 locks and prepares `out`; every process gets (run_id, checkpoint or None, lock or None). A refusal
    raises the same UserError on every process."""
    answer, lock = None, None
    if world.master:
        try:
            _refuse_foreign(out)  # before creating anything in it (again under the lock, below)
            os.makedirs(out, exist_ok=True)
            lock = DirLock(out, "train").acquire()
            answer = ("ok", *_prepare(out, resolved, resume))
        except BaseException as e:
            if lock:
                lock.release()
            if not isinstance(e, UserError):
                raise
            answer = ("error", str(e))
    answer = world.broadcast(answer)
    if answer[0] == "error":
        raise UserError(answer[1])
    return answer[1], answer[2], lock


# ---- the log ------------------------------------------------------------------------------------------------


class RunLog:
    def __init__(self, out: str, run_id: str, world: P.World, steps_per_epoch: int, cfg, lock=None):
        self.out, self.run_id, self.world, self.lock = out, run_id, world, lock
        self.steps_per_epoch = steps_per_epoch
        self.batch_size, self.seed = cfg.batch_size, cfg.seed
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
            restored = [(r["step"], DB.step_tags(r)) for r in self.steps] + \
                [(r["step"], DB.eval_tags(r)) for r in self.evals]
            self.boards = DB.open_dashboards(names, self.out, self.run_id, config, start_step,
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
                board.log(step, DB.step_tags(row))
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
            board.log(step, DB.eval_tags(row))

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

    def _trainer_state(self, run, step: int) -> dict:
        return {
            "step": step,
            "scheduler": run.sched.state_dict(),
            "steps_rows": list(self.steps),
            "eval_rows": list(self.evals),
            "data": {"epoch": step // self.steps_per_epoch, "batch": step % self.steps_per_epoch,
                     "steps_per_epoch": self.steps_per_epoch, "seed": self.seed},
            "run_id": self.run_id,
            "world_size": self.world.size,
        }

    def checkpoint(self, run, step: int):
        """Logs first (all rows < step), then the checkpoint: a crash between the two resumes from the older one.
        One file from rank 0 (the model is whole on every process), or a directory of shards (FSDP)."""
        if self.world.master:
            self.flush()
        t0 = time.perf_counter()
        ckpt_dir = os.path.join(self.out, "checkpoints")
        path = os.path.join(ckpt_dir, f"step-{step:08d}")
        if run.sharded:
            self._save_sharded(run, step, path)
        elif self.world.master:
            state = {**self._trainer_state(run, step), "model": M.trainable_state(run.model),
                     "optimizer": run.opt.state_dict(), "rng": get_rng()}
            os.makedirs(ckpt_dir, exist_ok=True)
            _save_torch(state, path + ".pt")
        if self.world.master:
            for old in checkpoints(self.out)[: -max(1, self.keep)]:
                shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
        self.world.barrier()
        self.seconds["checkpoint"] += time.perf_counter() - t0

    def _save_sharded(self, run, step, path):
        tmp = path + ".tmp"
        if self.world.master:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        self.world.barrier()
        P.save_sharded(tmp, run.net, run.opt)
        _save_torch(get_rng(), os.path.join(tmp, f"rng-rank{self.world.rank}.pt"))
        self.world.barrier()
        if self.world.master:
            _save_torch(self._trainer_state(run, step), os.path.join(tmp, "trainer.pt"))
            if os.path.isdir(path):  # the final checkpoint again, after a resume from it
                os.replace(path, path + ".old")
            os.replace(tmp, path)
            shutil.rmtree(path + ".old", ignore_errors=True)

    def resume(self, run) -> int:
        """Restore the newest checkpoint that can be read, and return its step. One a process died while writing
        (or a copy cut short) is passed over, with a note, for the one before it; none readable is one line."""
        found, skipped = checkpoints(self.out), []
        for path in reversed(found):
            try:
                step = self.restore(run, path)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - torch's and DCP's errors for a cut or damaged file
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                skipped.append((path, first.split(". ")[0][:200]))  # torch's first sentence says what failed
                continue
            for bad, why in skipped if self.world.master else ():
                print(f"note: {bad}: cannot be read ({why}); resumed from {os.path.basename(path)} instead",
                      file=sys.stderr)
            return step
        bad, why = skipped[0] if skipped else (self.out, "no checkpoint")
        raise UserError(f"{bad}: cannot be read ({why}), nor can any earlier checkpoint; start a new --out")

    def restore(self, run, path: str) -> int:
        """Load checkpoint `path` into run (weights, optimizer, scheduler, RNG) and these rows; drop the example
        rows written after it. Returns its step."""
        if path.endswith(".pt"):
            state = torch.load(path, map_location=self.world.device, weights_only=False)
            M.load_trainable(run.model, state["model"])
            run.opt.load_state_dict(state["optimizer"])
            rng = state["rng"]
        else:
            state = torch.load(os.path.join(path, "trainer.pt"), weights_only=False)
            P.load_sharded(path, run.net, run.opt)
            mine = os.path.join(path, f"rng-rank{self.world.rank}.pt")
            rng = torch.load(mine if os.path.exists(mine) else os.path.join(path, "rng-rank0.pt"), weights_only=False)
        data = state["data"]
        if data["steps_per_epoch"] != self.steps_per_epoch or data["seed"] != self.seed:
            raise UserError(f"{path}: written for another data order ({data}); resume with the same settings")
        run.sched.load_state_dict(state["scheduler"])
        set_rng(rng)
        # the final checkpoint holds the last eval pass; a resume from it redoes that pass
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
            _write_json(os.path.join(self.out, "summary.json"), summary)
        return summary

    def close(self):
        boards, self.boards = self.boards, []
        for board in boards:
            board.close()
        if self.lock:
            self.lock.release()
            self.lock = None


# ---- files and RNG ----------------------------------------------------------------------------------------


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


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_torch(obj, path):
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except RuntimeError as e:  # torch's zip writer reports a failed write (a full disk) as "unexpected pos …"
        free = shutil.disk_usage(os.path.dirname(tmp) or ".").free
        os.remove(tmp)  # ours, half written: give the space back
        raise OSError(errno.ENOSPC if free < 64 << 20 else errno.EIO, f"torch.save failed: {e}", tmp) from e
    os.replace(tmp, path)


def _norm(v):
    return json.loads(json.dumps(v, default=str))


def _short(value, n=60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 1] + "…"


def get_rng() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng(s: dict):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
