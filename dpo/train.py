"""DPO training from a stage-1 cache: the reference model is never loaded (except with `live_ref`).

Reads top-down like nanoGPT's train.py: resolve the config, load the cached pairs and check them against the
policy, build the model and optimizer, maybe resume, then loop over steps (probe, forward/backward over the
micro-batches, clip, step, log, checkpoint), then save the final model and a summary.

Python API: ``train(TrainConfig(cache=..., out=...)) -> summary dict``. Command line: ``refcache train``.

Run directory (schemas in dpo/runlog_schema.py): config.json, steps.parquet, examples/part-*.parquet,
checkpoints/step-*.pt, final/ (Hugging Face format), summary.json.

Batch semantics: ``batch_size`` pairs per optimizer step in total (across all processes), split into
``world_size * grad_accum`` equal micro-batches of similar length; the loss is the mean over the batch. So the
per-step numbers do not depend on how many processes run it. A micro-batch whose forward pass would hold more
than ``max_tokens`` padded tokens runs in pieces (gradients add up), which bounds activation memory. Each pair is
one row [prompt, chosen, rejected] (``share_prompt``, pipeline/packing.py). Multi-process: launch with torchrun
or ``accelerate launch`` (env WORLD_SIZE/RANK/LOCAL_RANK); gloo on CPU, nccl on GPU; only rank 0 writes.
"""

import contextlib
import dataclasses
import glob
import hashlib
import json
import math
import os
import random
import resource
import shutil
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import refcache
from dpo import data as D
from dpo import losses as L
from dpo.logps import CompletionLogps, batch_logps
from dpo.runlog_schema import EXAMPLES_SCHEMA, STEPS_SCHEMA
from pipeline.packing import takes_custom_mask
from refcache import UserError


@dataclass
class TrainConfig:
    """Everything a run depends on. Plain values; `None` means "derive it" (documented per field)."""

    cache: str  # stage-1 cache directory with the training pairs
    out: str  # run directory (created; must be new unless resume=True)
    eval_cache: str | None = None  # stage-1 cache with eval pairs, scored as probes (split='eval')
    model: str | None = (
        None  # policy initialisation (HF dir); None = the model recorded in the cache manifest
    )
    loss: str = "sigmoid"  # a name in dpo.losses.LOSSES
    beta: float | None = None  # None = the loss's default (0.1; simpo 2.0)
    label_smoothing: float | None = (
        None  # sigmoid/robust/aot: flip probability; exo_pair: epsilon (default 1e-3)
    )
    rpo_alpha: float | None = None  # rpo: weight of the chosen NLL (default 1.0)
    rdpo_alpha: float | None = None  # rdpo: length penalty per token (default 0.01)
    simpo_gamma: float | None = None  # simpo: target margin (default 0.5)
    dpop_lambda: float | None = None  # dpop: penalty weight (default 50)
    discopop_tau: float | None = None  # discopop: gate temperature (default 0.05)
    steps: int | None = None  # optimizer steps; None = from epochs
    epochs: float | None = None  # passes over the training pairs (default 1 when steps is None)
    batch_size: int = 8  # pairs per optimizer step, across all processes
    grad_accum: int = 1  # micro-batches per process per step
    max_tokens: int = 2048  # padded tokens per forward pass; longer micro-batches are cut (0 = no limit)
    share_prompt: bool = True  # one row [prompt, chosen, rejected] per pair: the prompt runs once
    lr: float = 1e-6  # peak learning rate (AdamW)
    warmup: float = 0.0  # warmup steps (>= 1) or fraction of total steps (< 1)
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.0  # final lr as a fraction of the peak (cosine/linear)
    weight_decay: float = 0.0
    adam_betas: tuple = (0.9, 0.999)
    max_grad_norm: float = 1.0  # clip to this global norm; 0 = no clipping (norm still logged)
    seed: int = 0  # data order, probe subset, LoRA init
    dtype: str = "float32"  # float32 | bfloat16 (autocast; master weights stay fp32)
    device: str = "auto"  # auto | cpu | cuda
    grad_checkpointing: bool = False
    lora: int = 0  # LoRA rank (0 = full fine-tuning); needs peft
    lora_alpha: float = 16.0
    live_ref: bool = False  # load the reference model and score it live instead of reading the cache
    ref_model: str | None = None  # reference for live_ref; None = the model recorded in the cache manifest
    probe_every: int = 10  # score the probe pairs every K steps (0 = only at start and end)
    probe_size: int = 32  # probe pairs per split (train, eval); 0 = no probes
    checkpoint_every: int = 100  # checkpoint every K steps (0 = only at the end)
    keep_checkpoints: int = 2
    flush_seconds: float = 30.0  # write logs at least this often (and at every checkpoint)
    allow_mismatch: bool = False  # train even if the cache was not made with this policy/tokenizer
    resume: bool = False  # continue from the latest checkpoint in `out` (fresh start if there is none)
    save_final: bool = True  # write out/final/ in Hugging Face format
    threads: int | None = None  # torch CPU threads (None = torch's default)
    progress: bool = True  # tqdm progress bar (rank 0)


# Fields that may differ between a run and its resumption.
_RESUME_FREE = {"resume", "progress", "out", "flush_seconds", "threads", "keep_checkpoints", "max_tokens"}
LOSS_PARAM_FIELDS = (
    "beta",
    "label_smoothing",
    "rpo_alpha",
    "rdpo_alpha",
    "simpo_gamma",
    "dpop_lambda",
    "discopop_tau",
)


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) one training run; returns the summary dict (also written to out/summary.json)."""
    t_start = time.perf_counter()
    cfg = dataclasses.replace(cfg)
    for k in ("cache", "out", "eval_cache", "model", "ref_model"):  # accept pathlib.Path too
        if getattr(cfg, k) is not None:
            setattr(cfg, k, os.fspath(getattr(cfg, k)))
    if cfg.loss not in L.LOSSES:
        raise UserError(f"unknown loss {cfg.loss!r}; choose one of: {', '.join(L.LOSSES)}")
    loss_params = L.loss_params(cfg.loss, {k: getattr(cfg, k) for k in LOSS_PARAM_FIELDS})
    if problem := L.check_params(cfg.loss, loss_params):
        raise UserError(problem)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    # ---- processes and device ----
    world, rank, local_rank = (
        int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0))
    )
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(f"cuda:{local_rank}" if cfg.device == "cuda" else cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    master = rank == 0

    # ---- data and the checks against the policy ----
    train_pairs = D.load_pairs(cfg.cache)
    eval_pairs = D.load_pairs(cfg.eval_cache) if cfg.eval_cache else None
    manifest = train_pairs.manifest
    cfg.model = cfg.model or _manifest_model_path(manifest, cfg.cache)
    if cfg.live_ref:
        cfg.ref_model = cfg.ref_model or _manifest_model_path(manifest, cfg.cache)
    check_policy(manifest, cfg.model, cfg.cache, cfg.allow_mismatch)
    if eval_pairs is not None:
        check_caches(manifest, eval_pairs.manifest, cfg.cache, cfg.eval_cache, cfg.allow_mismatch)

    n_micro = world * cfg.grad_accum
    if cfg.batch_size % n_micro:
        raise UserError(
            f"--batch-size {cfg.batch_size} must be a multiple of processes x --grad-accum = {n_micro}"
        )
    steps_per_epoch = len(train_pairs) // cfg.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{cfg.cache}: {len(train_pairs)} pairs are fewer than --batch-size {cfg.batch_size}")
    total_steps = cfg.steps if cfg.steps is not None else math.ceil((cfg.epochs or 1.0) * steps_per_epoch)
    if total_steps <= 0:
        raise UserError("--steps/--epochs give no training steps")
    warmup = int(cfg.warmup if cfg.warmup >= 1 else round(cfg.warmup * total_steps))
    if cfg.schedule not in ("cosine", "linear", "constant"):
        raise UserError(f"unknown --schedule {cfg.schedule!r}; choose cosine, linear or constant")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise UserError(f"unknown --dtype {cfg.dtype!r}; choose float32 or bfloat16")

    resolved = {
        **dataclasses.asdict(cfg),
        "loss_params": loss_params,
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "warmup_steps": warmup,
        "world_size": world,
        "micro_batch_size": cfg.batch_size // n_micro,
        "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs) if eval_pairs is not None else 0,
        "cache_fingerprint": cache_fingerprint(cfg.cache, manifest),
        "eval_cache_fingerprint": cache_fingerprint(cfg.eval_cache, eval_pairs.manifest)
        if eval_pairs
        else None,
        "versions": {
            "refcache": refcache.__version__,
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
        },
    }

    # ---- run directory: fresh, or resume from the latest checkpoint ----
    run = cfg.out
    ckpt_dir, ex_dir = os.path.join(run, "checkpoints"), os.path.join(run, "examples")
    ckpt_path = _latest_checkpoint(ckpt_dir) if cfg.resume else None
    if master:
        resolved["run_id"] = _prepare_run_dir(run, cfg, resolved, ckpt_path)
    resolved["run_id"] = _broadcast(resolved.get("run_id"), world)
    run_id = resolved["run_id"]

    # ---- model, reference, optimizer ----
    torch.manual_seed(cfg.seed)
    model = load_policy(cfg)
    net = CompletionLogps(model).to(device)
    ddp_net = (
        torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
        if world > 1
        else net
    )
    ref_net = None
    if cfg.live_ref:
        ref_net = CompletionLogps(_load_causal_lm(cfg.ref_model)).to(device).eval().requires_grad_(False)
    share = cfg.share_prompt and takes_custom_mask(model) and (ref_net is None or takes_custom_mask(ref_net.model))
    if cfg.share_prompt and not share and master:
        print("note: this attention implementation takes no custom mask; prompts run once per completion")
    params = [p for p in model.parameters() if p.requires_grad]
    # fused AdamW: one kernel over all parameters (3x faster than foreach on a 30M model on CPU)
    opt = torch.optim.AdamW(
        params, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay, fused=True
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, warmup, total_steps, cfg.schedule, cfg.min_lr_ratio)
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")

    step, step_rows, part_seq = 0, [], 0
    if ckpt_path:
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        _load_trainable(model, state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _set_rng(state["rng"])
        step, step_rows = state["step"], state["steps_rows"]
        assert state["data"]["steps_per_epoch"] == steps_per_epoch and state["data"]["seed"] == cfg.seed
        if master:
            part_seq = _truncate_examples(ex_dir, step)
    _barrier(world)

    # ---- probe subsets and logging buffers ----
    lengths = train_pairs.seq_len
    cost = train_pairs.packed_len if share else 2 * lengths  # padded tokens a pair adds to a forward pass
    probes = [("train", train_pairs, D.probe_subset(len(train_pairs), cfg.probe_size, cfg.seed))]
    if eval_pairs is not None:
        probes.append(("eval", eval_pairs, D.probe_subset(len(eval_pairs), cfg.probe_size, cfg.seed)))
    probes = [p for p in probes if len(p[2])]  # probe_size 0: no probes at all
    micro_bs = cfg.batch_size // n_micro
    max_tokens = 0 if cfg.loss in L.BATCH_LEVEL else cfg.max_tokens  # aot ranks over the whole micro-batch
    ex_buffer, timers = [], {"log": 0.0, "probe": 0.0, "checkpoint": 0.0, "train": 0.0}
    last_flush = time.perf_counter()
    last_probe = {}
    epoch_cache = {}

    def batches_of(epoch):
        if epoch not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[epoch] = D.epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch)
        return epoch_cache[epoch]

    def ref_sums(batch):
        if ref_net is None:
            return batch["ref_chosen_logp"].to(device), batch["ref_rejected_logp"].to(device)
        with torch.no_grad(), autocast:
            rc, rr, _ = batch_logps(ref_net, batch, device)
        return rc, rr

    def example_rows(s, source, split, pairs, idx, v):
        """Columns for examples/ from v: (n, 7) float64 [pc, pr, rc, rr, loss, reward_c, reward_r]."""
        n = len(idx)
        return {
            "run_id": [run_id] * n,
            "step": np.full(n, s, np.int64),
            "epoch": np.full(n, s / steps_per_epoch),
            "source": [source] * n,
            "split": [split] * n,
            "pair_id": pairs.pair_id[idx].tolist(),
            "policy_chosen_logp": v[:, 0],
            "policy_rejected_logp": v[:, 1],
            "ref_chosen_logp": v[:, 2],
            "ref_rejected_logp": v[:, 3],
            "chosen_reward": v[:, 5],
            "rejected_reward": v[:, 6],
            "margin": v[:, 5] - v[:, 6],
            "loss": v[:, 4],
            "chosen_len": pairs.chosen_len[idx].astype(np.int32),
            "rejected_len": pairs.rejected_len[idx].astype(np.int32),
        }

    def probe(s):
        """Score the probe pairs with the current weights (rank 0; no gradients): rows with step=s."""
        t0 = time.perf_counter()
        for split, pairs, subset in probes:
            vals, order = [], []
            for chunk in _chunks(subset, pairs.seq_len, max(micro_bs, 8)):
                batch = D.collate(pairs, chunk, share_prompt=share)
                with torch.no_grad(), autocast:
                    pc, pr, _ = batch_logps(net, batch, device)
                rc, rr = ref_sums(batch)
                losses, rwc, rwr = _loss(cfg.loss, pc, pr, rc, rr, batch, loss_params, device)
                vals.append(
                    torch.stack([pc, pr, rc, rr, losses.double(), rwc.double(), rwr.double()], 1).cpu()
                )
                order.append(chunk)
            v, idx = torch.cat(vals).numpy(), np.concatenate(order)
            ex_buffer.append(example_rows(s, "probe", split, pairs, idx, v))
            margin = v[:, 5] - v[:, 6]
            last_probe[split] = {
                "step": s,
                "reward_accuracy": float((margin > 0).mean()),
                "reward_margin": float(margin.mean()),
                "loss": float(v[:, 4].mean()),
            }
        timers["probe"] += time.perf_counter() - t0

    def flush():
        """Rewrite steps.parquet and write buffered example rows as a new part, both atomically."""
        nonlocal part_seq, last_flush
        t0 = time.perf_counter()
        _write_parquet(
            pa.Table.from_pylist(step_rows, schema=STEPS_SCHEMA), os.path.join(run, "steps.parquet")
        )
        if ex_buffer:
            cols = {k: np.concatenate([np.asarray(b[k]) for b in ex_buffer]) for k in EXAMPLES_SCHEMA.names}
            _write_parquet(
                pa.table(cols, schema=EXAMPLES_SCHEMA), os.path.join(ex_dir, f"part-{part_seq:06d}.parquet")
            )
            part_seq += 1
            ex_buffer.clear()
        last_flush = time.perf_counter()
        timers["log"] += last_flush - t0

    def checkpoint(s):
        """Logs first (all rows < s), then the checkpoint: a crash between the two resumes from the older one."""
        flush()
        t0 = time.perf_counter()
        state = {
            "step": s,
            "model": _trainable_state(model),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": _get_rng(),
            "steps_rows": list(step_rows),
            "data": {
                "epoch": s // steps_per_epoch,
                "batch": s % steps_per_epoch,
                "steps_per_epoch": steps_per_epoch,
                "seed": cfg.seed,
            },
            "run_id": run_id,
        }
        os.makedirs(ckpt_dir, exist_ok=True)
        path = os.path.join(ckpt_dir, f"step-{s:08d}.pt")
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        for old in sorted(glob.glob(os.path.join(ckpt_dir, "step-*.pt")))[: -max(1, cfg.keep_checkpoints)]:
            os.remove(old)
        timers["checkpoint"] += time.perf_counter() - t0

    # ---- the loop ----
    net.train()
    step_delay = float(os.environ.get("REFCACHE_STEP_DELAY", "0"))  # testing aid: slow a run down to kill it
    bar = tqdm(
        total=total_steps,
        initial=step,
        unit="step",
        disable=not (master and cfg.progress),
        dynamic_ncols=True,
        desc=os.path.basename(os.path.normpath(run)),
    )
    while step < total_steps:
        if master and cfg.probe_every and step % cfg.probe_every == 0:
            probe(step)
        t0 = time.perf_counter()
        epoch, k = divmod(step, steps_per_epoch)
        micro = D.split_batch(batches_of(epoch)[k], lengths, n_micro)
        mine = [p for m in micro[rank::world] for p in D.split_tokens(m, cost, max_tokens)]
        stats, tokens = [], 0
        for j, idx in enumerate(mine):
            batch = D.collate(train_pairs, idx, share_prompt=share)
            sync = contextlib.nullcontext() if world == 1 or j == len(mine) - 1 else ddp_net.no_sync()
            with sync:
                with autocast:
                    pc, pr, _ = batch_logps(ddp_net, batch, device)
                rc, rr = ref_sums(batch)
                losses, rwc, rwr = _loss(cfg.loss, pc, pr, rc, rr, batch, loss_params, device)
                (losses.sum() * (world / cfg.batch_size)).backward()
            stats.append(
                torch.stack(
                    [pc.detach(), pr.detach(), rc, rr, losses.detach().double(), rwc.double(), rwr.double()],
                    1,
                )
            )
            tokens += batch["tokens"]
        grad_norm = torch.nn.utils.clip_grad_norm_(
            params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        )
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        v = torch.cat(stats)
        if world > 1:
            v, tokens = _gather_stats(v, tokens, world)
        v = v.cpu().numpy()
        seconds = time.perf_counter() - t0
        timers["train"] += seconds

        t1 = time.perf_counter()
        if master:
            idx = np.concatenate([np.concatenate(micro[r::world]) for r in range(world)])
            ex_buffer.append(example_rows(step, "train", "train", train_pairs, idx, v))
            margin = v[:, 5] - v[:, 6]
            row = {
                "run_id": run_id,
                "step": step,
                "epoch": step / steps_per_epoch,
                "lr": lr,
                "loss": float(v[:, 4].mean()),
                "grad_norm": float(grad_norm),
                "reward_chosen": float(v[:, 5].mean()),
                "reward_rejected": float(v[:, 6].mean()),
                "reward_margin": float(margin.mean()),
                "reward_accuracy": float((margin > 0).mean()),
                "policy_chosen_logp": float(v[:, 0].mean()),
                "policy_rejected_logp": float(v[:, 1].mean()),
                "ref_chosen_logp": float(v[:, 2].mean()),
                "ref_rejected_logp": float(v[:, 3].mean()),
                "tokens": int(tokens),
                "seconds": seconds,
                "samples_per_s": cfg.batch_size / seconds,
            }
            step_rows.append(row)
            bar.set_postfix(
                loss=f"{row['loss']:.4f}",
                margin=f"{row['reward_margin']:.3f}",
                acc=f"{row['reward_accuracy']:.2f}",
                sps=f"{row['samples_per_s']:.1f}",
                refresh=False,
            )
            bar.update(1)
        timers["log"] += time.perf_counter() - t1
        step += 1
        if step < total_steps and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            if master:
                checkpoint(step)
            _barrier(world)
        elif master and time.perf_counter() - last_flush > cfg.flush_seconds:
            flush()
        if step_delay:
            time.sleep(step_delay)
    bar.close()
    timers["shared_prompt"] = share
    timers["peak_rss_loop"] = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )  # before the final save

    # ---- the end: final probe, checkpoint, model, summary ----
    summary = None
    if master:
        probe(total_steps)
        checkpoint(total_steps)
        if cfg.save_final:
            save_final(model, cfg.model, os.path.join(run, "final"))
        summary = _summary(
            run, run_id, resolved, step_rows, last_probe, timers, time.perf_counter() - t_start, device
        )
        _write_json(os.path.join(run, "summary.json"), summary)
    _barrier(world)
    if own_group:
        dist.destroy_process_group()
    return summary


# ---- pieces used by the loop ----------------------------------------------------------------------------


def lr_factor(s: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at update s: linear warmup ((s+1)/warmup), then cosine/linear decay to
    min_ratio at the last update, or constant."""
    if s < warmup:
        return (s + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (s - warmup) / max(1, total - warmup - 1)
    progress = min(1.0, progress)
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _loss(name, pc, pr, rc, rr, batch, params, device):
    logps = {
        "policy_chosen_logps": pc,
        "policy_rejected_logps": pr,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    data = {k: batch[k].to(device) for k in L.needs(name)}
    return L.compute(name, logps, data, params)


def _chunks(subset, lengths, size):
    order = subset[np.argsort(-lengths[subset], kind="stable")]
    return [order[i : i + size] for i in range(0, len(order), size)]


def _gather_stats(v, tokens, world):
    out = torch.empty((world * v.shape[0], v.shape[1]), dtype=v.dtype, device=v.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(out, v.contiguous())
    t = torch.tensor([tokens], dtype=torch.int64, device=v.device)
    dist.all_reduce(t)
    return out, int(t.item())


def _barrier(world):
    if world > 1:
        dist.barrier()


def _broadcast(obj, world):
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---- models ----------------------------------------------------------------------------------------------


def _load_causal_lm(path):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if not os.path.isdir(path):
        raise UserError(f"model directory {path} not found; pass --model with a local Hugging Face model dir")
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load a causal LM ({str(e).splitlines()[0]})") from None
    _disable_dropout(model)
    return model


def _disable_dropout(model):
    """DPO convention (as in TRL): no dropout, so the policy at step 0 scores exactly like the reference."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def load_policy(cfg: TrainConfig):
    model = _load_causal_lm(cfg.model)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise UserError("--lora needs peft: pip install 'refcache[lora]'") from None
        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.lora,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=0.0,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            ),
        )
    return model


def save_final(model, source_dir, out_dir):
    """The trained policy in Hugging Face format (merged if LoRA) plus the tokenizer files, atomically."""
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    to_save = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    to_save.save_pretrained(tmp, safe_serialization=True)
    for f in os.listdir(source_dir):
        if f.startswith(
            ("tokenizer", "special_tokens_map", "vocab", "merges", "chat_template", "added_tokens")
        ) or f.endswith(".model"):
            shutil.copy2(os.path.join(source_dir, f), os.path.join(tmp, f))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def _trainable_state(model):
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}


def _load_trainable(model, state):
    missing = {n for n, p in model.named_parameters() if p.requires_grad} - set(state)
    if missing:
        raise UserError(f"checkpoint lacks trainable weights ({min(missing)}, ...); start a new --out")
    model.load_state_dict(state, strict=False)


def _get_rng():
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ---- manifest checks ---------------------------------------------------------------------------------------


def _manifest_model_path(manifest, cache_dir):
    model = manifest.get("model") or {}
    path = model.get("path") if isinstance(model, dict) else model
    if not path:
        raise UserError(f"{cache_dir}/manifest.json names no model path; pass --model")
    for cand in (path, os.path.join(cache_dir, path)):
        if os.path.isdir(cand):
            return cand
    raise UserError(f"model {path} recorded in {cache_dir}/manifest.json not found here; pass --model DIR")


def check_policy(manifest, model_dir, cache_dir, allow_mismatch):
    """Refuse a policy whose weights or tokenizer differ from the model the cache was scored with (hashes
    decide; paths do not: a copied model is the same model)."""
    from pipeline import fingerprint

    if not os.path.isdir(model_dir):
        raise UserError(
            f"model directory {model_dir} not found; pass --model with a local Hugging Face model dir"
        )
    diffs = []
    for what, ident in (("model", fingerprint.model_identity), ("tokenizer", fingerprint.tokenizer_identity)):
        diffs += [
            f"{what} {k}" for k in fingerprint.identity_diff(manifest.get(what) or {}, ident(model_dir), what)
        ]
    if diffs and not allow_mismatch:
        raise UserError(
            f"policy {model_dir} does not match the model cache {cache_dir} was scored with "
            f"(differs: {', '.join(diffs)}), so step 0 would not start at the reference; re-run "
            "precompute with this model, or pass --allow-mismatch to train anyway"
        )


def check_caches(train_manifest, eval_manifest, train_dir, eval_dir, allow_mismatch):
    """The eval cache must come from the same model, tokenizer and tokenization as the train cache."""
    from pipeline import fingerprint

    diffs = []
    for what in ("model", "tokenizer"):
        diffs += [
            f"{what} {k}"
            for k in fingerprint.identity_diff(
                train_manifest.get(what) or {}, eval_manifest.get(what) or {}, what
            )
        ]
    a, b = train_manifest.get("tokenization") or {}, eval_manifest.get("tokenization") or {}
    diffs += [f"tokenization {k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diffs and not allow_mismatch:
        raise UserError(
            f"eval cache {eval_dir} was built differently from {train_dir} (differs: {', '.join(diffs)}); "
            "rebuild it with the same model and settings, or pass --allow-mismatch"
        )


def cache_fingerprint(cache_dir, manifest):
    with open(os.path.join(cache_dir, "manifest.json"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    keep = ("schema_version", "model", "tokenizer", "tokenization", "backend", "dataset")
    return {
        "path": os.path.abspath(cache_dir),
        "manifest_sha256": digest,
        **{k: manifest.get(k) for k in keep},
    }


# ---- run directory --------------------------------------------------------------------------------------


def _latest_checkpoint(ckpt_dir):
    paths = sorted(glob.glob(os.path.join(ckpt_dir, "step-*.pt")))
    return paths[-1] if paths else None


def _short(value, n=60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 1] + "…"


def _prepare_run_dir(run, cfg, resolved, ckpt_path):
    """Create or check the run directory; returns the run_id (kept across resumes)."""
    cfg_path = os.path.join(run, "config.json")
    if ckpt_path:
        with open(cfg_path) as f:
            old = json.load(f)
        changed = [
            k
            for k in resolved
            if k not in _RESUME_FREE
            and k not in ("run_id", "versions")
            and _norm(old.get(k)) != _norm(resolved[k])
        ]
        if changed:
            k = changed[0]
            raise UserError(
                f"{run} was started with different settings ({', '.join(changed)}; e.g. {k}: "
                f"{_short(old.get(k))} then, {_short(resolved[k])} now); resume with the same settings or use a new --out"
            )
        for f in ("summary.json",):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(run, f))
        return old["run_id"]
    if os.path.isdir(run) and os.listdir(run):
        if not cfg.resume:
            raise UserError(
                f"{run} already exists and is not empty; pass --resume to continue that run or choose a new --out"
            )
        # --resume without a checkpoint: the run died before its first checkpoint; start it over
        if not os.path.isfile(cfg_path):
            raise UserError(f"{run} is not a refcache run (no config.json); choose a new --out")
        shutil.rmtree(run)
    os.makedirs(os.path.join(run, "examples"), exist_ok=True)
    run_id = f"{os.path.basename(os.path.normpath(run))}-{uuid.uuid4().hex[:8]}"
    _write_json(cfg_path, {**resolved, "run_id": run_id})
    return run_id


def _norm(v):
    return json.loads(json.dumps(v, default=str))


def _truncate_examples(ex_dir, step):
    """Drop example rows with step >= `step` (written after the checkpoint we resume from). Returns the next
    part number."""
    last = -1
    for path in sorted(glob.glob(os.path.join(ex_dir, "part-*.parquet"))):
        steps = pq.read_table(path, columns=["step"]).column("step").to_numpy()
        if len(steps) == 0 or steps.min() >= step:
            os.remove(path)
            continue
        if steps.max() >= step:
            t = pq.read_table(path)
            _write_parquet(t.filter(pa.compute.less(t.column("step"), step)), path)
        last = max(last, int(os.path.basename(path)[5:11]))
    for tmp in glob.glob(os.path.join(ex_dir, ".*.tmp")):
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
    os.replace(tmp, path)


def _summary(run, run_id, resolved, step_rows, last_probe, timers, wall, device):
    steps_s = [r["seconds"] for r in step_rows]
    return {
        "run_id": run_id,
        "run_dir": os.path.abspath(run),
        "loss": resolved["loss"],
        "loss_params": resolved["loss_params"],
        "steps": len(step_rows),
        "epochs": len(step_rows) / resolved["steps_per_epoch"],
        "train_pairs": resolved["train_pairs"],
        "eval_pairs": resolved["eval_pairs"],
        "first_loss": step_rows[0]["loss"] if step_rows else None,
        "final_loss": step_rows[-1]["loss"] if step_rows else None,
        "final_train_reward_accuracy": step_rows[-1]["reward_accuracy"] if step_rows else None,
        "shared_prompt": timers["shared_prompt"],
        "probe": last_probe,
        "wall_seconds": wall,
        "step_seconds_median": float(np.median(steps_s)) if steps_s else None,
        "samples_per_s": resolved["batch_size"] * len(steps_s) / sum(steps_s) if steps_s else None,
        "train_seconds": timers["train"],
        "probe_seconds": timers["probe"],
        "logging_seconds": timers["log"],
        "checkpoint_seconds": timers["checkpoint"],
        "logging_share_of_step_time": timers["log"] / timers["train"] if timers["train"] else None,
        "peak_rss_bytes": timers["peak_rss_loop"],  # process peak up to the end of the training loop
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "final_model": os.path.abspath(os.path.join(run, "final")) if resolved["save_final"] else None,
    }
