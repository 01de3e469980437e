"""DPO training from a stage-1 cache: the reference model is never loaded (except with `live_ref`).

Reads top-down like nanoGPT's train.py: `setup` resolves the config, loads the cached pairs and checks them
against the policy, opens the run directory, builds the model and optimizer and maybe resumes; `train` then
loops over steps (probe, eval pass, `train_step`, log, checkpoint) and saves the final model and a summary.

Python API: ``train(TrainConfig(cache=..., out=...)) -> summary dict``; or ``with setup(cfg) as run:`` and
``train_step(run, step)`` / ``probe(run, step)`` / ``evaluate(run)`` for a loop of your own (bench/ does).
Command line: ``refcache train``.

Run directory (dpo/runlog.py, schemas in refcache_base/runlog_schema.py): config.json, steps.parquet, evals.parquet,
examples/part-*.parquet, checkpoints/step-*, final/ (Hugging Face format), summary.json; tensorboard/ and wandb/
with --report-to (dpo/dashboards.py). ``where`` trains on the pairs an SQL predicate keeps (dpo/subset.py).

Batch semantics: ``batch_size`` pairs per optimizer step in total (across all processes), split into
``world_size * grad_accum`` equal micro-batches of similar length; the loss is the mean over the batch. So the
per-step numbers do not depend on how many processes run it. A micro-batch whose forward pass would hold more
than ``max_tokens`` padded tokens runs in pieces (gradients add up), which bounds activation memory. Each pair is
one row [prompt, chosen, rejected] (``share_prompt``, pipeline/packing.py). Several processes: DDP, or FSDP2
with ``parallel="fsdp"`` (dpo/parallel.py).
"""

import dataclasses
import math
import os
import resource
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from dpo.config import TrainConfig, loss_params, validate
from dpo.data import Pairs, epoch_batches, load_pairs, probe_subset
from dpo.logps import CompletionLogps
from dpo.model import (
    cache_fingerprint,
    check_caches,
    check_policy,
    load_causal_lm,
    load_policy,
    manifest_model_path,
    write_hf_model,
)
from dpo.parallel import World, full_state, local_sizes, shard, wrap
from dpo.parallel import mode as parallel_mode
from dpo.parallel import start as start_processes
from dpo.rundir import open_run_dir
from dpo.runlog import RunLog
from dpo.step import Scores, StepResult, evaluate, probe, score, train_step
from dpo.subset import select as select_where
from pipeline.cache import content_id
from pipeline.logps import bf16_matmul_native
from pipeline.packing import takes_custom_mask
from refcache_base import UserError, __version__, preempt
from refcache_base.progress import Progress

__all__ = ["Run", "Scores", "StepResult", "TrainConfig", "evaluate", "lr_factor", "probe", "score", "setup", "train",
           "train_step"]


def train(cfg: TrainConfig) -> dict | None:
    """Run (or resume) one training run; returns the summary dict on rank 0 (also written to out/summary.json)."""
    t_start = time.perf_counter()
    with setup(cfg) as run:
        cfg, log = run.cfg, run.log
        # a SIGTERM ends the step, checkpoints and stops (refcache_base/preempt.py); the bar closes on any exit
        with _progress_bar(run) as bar, preempt.at_step_end():
            for step in range(run.start_step, run.total_steps):
                if cfg.probe_every and step % cfg.probe_every == 0:
                    log.add_probes(step, *_timed(probe, run))
                if cfg.eval_every and step % cfg.eval_every == 0:
                    log.add_eval(step, *_timed(evaluate, run))
                row = log.add_step(step, train_step(run, step), run.train_pairs)
                bar.update(1, loss=f"{row['loss']:.4f}", margin=f"{row['reward_margin']:.3f}",
                           acc=f"{row['reward_accuracy']:.2f}", sps=f"{row['samples_per_s']:.1f}",
                           tok_s=f"{row['tokens'] / row['seconds']:,.0f}")
                done = step + 1
                if preempt.requested(run.world):
                    bar.close()
                    log.checkpoint(run, done)
                    raise preempt.Preempted(f"stopped by SIGTERM after step {done} of {run.total_steps}, "
                                            f"checkpoint written")
                if done < run.total_steps and cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                    log.checkpoint(run, done)
                else:
                    log.maybe_flush()
                time.sleep(run.step_delay)
        peak_rss = run.world.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # before saving
        shards = run.world.gather(local_sizes(run.net, run.opt))

        # the end: final probe and eval pass, checkpoint, model, summary
        log.add_probes(run.total_steps, *_timed(probe, run))
        if cfg.eval_every:
            log.add_eval(run.total_steps, *_timed(evaluate, run))
        log.checkpoint(run, run.total_steps)
        if cfg.save_final:
            _save_final(run)
        summary = log.finish(run, time.perf_counter() - t_start, peak_rss, shards)
        run.world.barrier()
        return summary if run.world.master else None


# ---- setup ---------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything the loop works with, built by `setup`. Close it (or use `with`) to release the run directory's
    lock and the process group."""

    cfg: TrainConfig  # validated, with model/device resolved
    world: World
    parallel: str  # none | ddp | fsdp
    # The policy has two handles: `net` (CompletionLogps over the Hugging Face model, maybe LoRA-wrapped; sharded
    # in place under FSDP) is what is scored, optimized and checkpointed; `train_net` is what the training
    # forward runs through: `net` itself, or DDP(net) whose backward all-reduces the gradients.
    net: torch.nn.Module
    train_net: torch.nn.Module
    ref_net: torch.nn.Module | None  # the live reference (live_ref), else None: the cache has its log-probs
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    train_pairs: Pairs
    eval_pairs: Pairs | None
    probes: list  # [(split, pairs, row indices)] scored every probe_every steps
    loss_params: dict
    share_prompt: bool  # one row [prompt, chosen, rejected] per pair
    total_steps: int
    steps_per_epoch: int
    log: RunLog
    start_step: int = 0
    step_delay: float = 0.0  # testing aid (env REFCACHE_STEP_DELAY): slow a run down to kill it mid-way
    _epoch: dict = field(default_factory=dict)

    @property
    def policy(self) -> torch.nn.Module:
        """The Hugging Face policy (maybe LoRA-wrapped) inside `net`: its weights are what training changes."""
        return self.net.model

    @property
    def sharded(self) -> bool:
        return self.parallel == "fsdp"

    @property
    def autocast(self):
        """bf16 autocast, except under FSDP, whose mixed-precision policy casts the weights instead, and on a CPU
        without bf16 instructions, where bf16 matmuls are the slow path (pipeline.logps.bf16_matmul_native; the
        figures are in BENCHMARKS.md, "SmolLM2: the bf16 cliff"): there it trains in fp32."""
        on = self.cfg.dtype == "bfloat16" and not self.sharded and bf16_matmul_native(self.world.device)
        return torch.autocast(self.world.device.type, dtype=torch.bfloat16, enabled=on)

    def batch(self, step: int) -> np.ndarray:
        """Row indices of the batch of optimizer step `step` (a pure function of seed, epoch and step)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch not in self._epoch:
            self._epoch = {epoch: epoch_batches(self.train_pairs.seq_len, self.cfg.batch_size, self.cfg.seed, epoch)}
        return self._epoch[epoch][k]

    def close(self):
        self.log.close()
        self.world.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def setup(cfg: TrainConfig) -> Run:
    """Check the config, start the processes, load and check the data, open the run directory, build the model
    and optimizer, and resume from the latest checkpoint when cfg.resume finds one."""
    cfg = validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world = start_processes(cfg.device, cfg.parallel)
    cfg.device = world.device.type
    log = None
    try:
        n_micro = world.size * cfg.grad_accum
        if cfg.batch_size % n_micro:
            raise UserError(
                f"--batch-size {cfg.batch_size} must be a multiple of processes x --grad-accum = {n_micro}")
        train_pairs, eval_pairs, where_pairs, model_sha256 = _load_data(cfg, world)
        steps_per_epoch = len(train_pairs) // cfg.batch_size
        if steps_per_epoch == 0:
            kept = " (kept by --where)" if cfg.where else ""
            raise UserError(f"{cfg.cache}: {len(train_pairs)} pairs{kept} are fewer than --batch-size "
                            f"{cfg.batch_size}; pass --batch-size {len(train_pairs)} or less")
        total_steps = cfg.steps if cfg.steps is not None else math.ceil((cfg.epochs or 1.0) * steps_per_epoch)
        warmup = warmup_steps(cfg.warmup, total_steps)
        parallel = parallel_mode(cfg.parallel, world)
        resolved = _resolved(cfg, world, parallel, train_pairs, eval_pairs, total_steps, steps_per_epoch, warmup)
        resolved.update(where_pairs=where_pairs, model_sha256=model_sha256)
        run_id, ckpt, lock = open_run_dir(cfg.out, resolved, cfg.resume, world)
        log = RunLog(cfg.out, run_id, world, steps_per_epoch, cfg, lock)

        net, train_net, ref_net, share = _models(cfg, world, parallel)
        # fused AdamW: one kernel over all parameters instead of one per tensor
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr,
                                betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay, fused=True)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, warmup, total_steps, cfg.schedule, cfg.min_lr_ratio))
        probes = [(split, pairs, probe_subset(len(pairs), cfg.probe_size, cfg.seed))
                  for split, pairs in (("train", train_pairs), ("eval", eval_pairs)) if pairs is not None]
        run = Run(cfg=cfg, world=world, parallel=parallel, net=net, train_net=train_net,
                  ref_net=ref_net, opt=opt, sched=sched, train_pairs=train_pairs, eval_pairs=eval_pairs,
                  probes=[p for p in probes if len(p[2])], loss_params=resolved["loss_params"], share_prompt=share,
                  total_steps=total_steps, steps_per_epoch=steps_per_epoch, log=log,
                  step_delay=float(os.environ.get("REFCACHE_STEP_DELAY", "0")))
        if ckpt:
            run.start_step = log.resume(run)
        log.start_dashboards(cfg.report_to, resolved, run.start_step)
        world.barrier()
        net.train()
        return run
    except BaseException:
        if log is not None:
            log.close()
        world.stop()
        raise


def _models(cfg, world, parallel):
    """The policy (its CompletionLogps net, and the module training runs through) and the live reference (or
    None); whether pairs run as one shared-prompt row."""
    torch.manual_seed(cfg.seed)
    model = load_policy(cfg)
    net = CompletionLogps(model)
    ref_net = CompletionLogps(load_causal_lm(cfg.ref_model)).eval().requires_grad_(False) if cfg.live_ref else None
    share = cfg.share_prompt and takes_custom_mask(model) and (ref_net is None or takes_custom_mask(ref_net.model))
    if cfg.dtype == "bfloat16" and parallel != "fsdp" and not bf16_matmul_native(world.device) and world.master:
        print("note: this CPU has no bf16 instructions (bf16 matmuls run 2-4.5x slower than fp32); computing in fp32")
    if cfg.share_prompt and not share and world.master:
        print("note: this attention implementation takes no custom mask; prompts run once per completion")
    train_net = wrap(net, model, world, parallel, cfg.dtype)
    if ref_net is not None:  # no gradients, so no DDP; under FSDP sharded like the policy
        ref_net = shard(ref_net, ref_net.model, world, cfg.dtype) if parallel == "fsdp" else ref_net.to(world.device)
    return net, train_net, ref_net, share


def _load_data(cfg, world):
    """The train (and eval) pairs, checked against the policy and each other, the --where counts (or None) and
    the policy's sha256. Fills in cfg.model/ref_model."""
    train_pairs, where_pairs = load_pairs(cfg.cache), None
    if cfg.where:
        train_pairs, where_pairs = select_where(train_pairs, cfg.where)
        if world.master:
            print(f"--where {cfg.where!r}: training on {where_pairs['kept']:,} of {where_pairs['cache_pairs']:,} "
                  f"pairs ({where_pairs['dropped']:,} dropped)")
    eval_pairs = load_pairs(cfg.eval_cache) if cfg.eval_cache else None
    manifest = train_pairs.manifest
    cfg.model = cfg.model or manifest_model_path(manifest, cfg.cache)
    if cfg.live_ref:
        cfg.ref_model = cfg.ref_model or manifest_model_path(manifest, cfg.cache)
    model_sha256 = check_policy(manifest, cfg.model, cfg.cache, cfg.allow_mismatch)
    if eval_pairs is not None:
        check_caches(manifest, eval_pairs.manifest, cfg.cache, cfg.eval_cache, cfg.allow_mismatch)
        if content_id(eval_pairs.manifest) == content_id(manifest) and world.master:
            print(f"note: --eval-cache {cfg.eval_cache} is the training cache itself: eval numbers will measure fit "
                  "to the training pairs, not generalization; give a cache of held-out pairs")
    return train_pairs, eval_pairs, where_pairs, model_sha256


def _resolved(cfg, world, parallel, train_pairs, eval_pairs, total_steps, steps_per_epoch, warmup) -> dict:
    """The run's config.json: every setting, resolved, and what the run trained against."""
    return {
        **dataclasses.asdict(cfg),
        "loss_params": loss_params(cfg),
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "warmup_steps": warmup,
        "lr_schedule": LR_SCHEDULE,
        "world_size": world.size,
        "sharded": parallel == "fsdp",
        "micro_batch_size": cfg.batch_size // (world.size * cfg.grad_accum),
        "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs) if eval_pairs is not None else 0,
        "cache_fingerprint": cache_fingerprint(cfg.cache, train_pairs.manifest),
        "eval_cache_fingerprint": cache_fingerprint(cfg.eval_cache, eval_pairs.manifest) if eval_pairs else None,
        "versions": {
            "refcache": __version__,
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
        },
    }


def warmup_steps(warmup: float, total: int) -> int:
    """--warmup as steps: a number of steps, or below 1 a fraction of `total` rounded up (transformers'
    get_warmup_steps)."""
    return int(warmup) if warmup >= 1 else math.ceil(warmup * total)


# The formulas of lr_factor, recorded in config.json: a run made with others (refcache before it recorded one,
# whose decay reached min_lr_ratio at the last update) is not resumed with these.
LR_SCHEDULE = "transformers"


def lr_factor(s: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at update s (0-based) of `total`, as transformers' get_scheduler(schedule,
    num_warmup_steps=warmup, num_training_steps=total) computes it: warmup rises linearly from 0 (s / warmup),
    then cosine or linear decay towards 0 at step `total` (so the last update's lr is still > 0), or constant.
    min_ratio > 0 decays towards that fraction instead: for cosine, transformers' cosine_with_min_lr with
    min_lr_rate; for linear the same blend (transformers has no linear one). "constant" has no warmup."""
    if schedule == "constant":
        return 1.0
    if s < warmup:
        return s / max(1, warmup)
    if schedule == "constant_with_warmup":
        return 1.0
    if schedule == "linear":
        decay = max(0.0, (total - s) / max(1, total - warmup))
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
    return max(0.0, decay * (1 - min_ratio) + min_ratio)


# ---- the end ------------------------------------------------------------------------------------------------


def _save_final(run: Run):
    """out/final/: the trained policy in Hugging Face format, by rank 0. Under FSDP the shards are gathered
    into one state dict on rank 0's CPU and loaded into a fresh copy of the policy first."""
    out = os.path.join(run.cfg.out, "final")
    if not run.sharded:
        if run.world.master:
            write_hf_model(run.policy, run.cfg.model, out)
        return
    full = full_state(run.net)  # every process takes part
    if run.world.master:
        whole = load_policy(run.cfg)
        whole.load_state_dict({k.removeprefix("model."): v for k, v in full.items()})
        write_hf_model(whole, run.cfg.model, out)
    run.world.barrier()


def _timed(fn, run):
    t0 = time.perf_counter()
    result = fn(run)
    return result, time.perf_counter() - t0


def _progress_bar(run: Run) -> Progress:
    """Steps done (refcache_base/progress.py: a bar on a terminal, a line every N seconds in a log), on rank 0."""
    return Progress(run.total_steps, "step", os.path.basename(os.path.normpath(run.cfg.out)),
                    initial=run.start_step, enabled=run.world.master and run.cfg.progress)
