"""`refcache train` and `refcache sweep`: command-line front ends of dpo.train.train."""

import dataclasses
import json
import os

from dpo import losses as L
from refcache import UserError


def add_commands(sub):
    p = sub.add_parser(
        "train",
        help="train a policy with a DPO-family loss from a reference cache",
        description="Train a policy with a DPO-family loss, reading reference log-probs from CACHE.",
    )
    _add_train_args(p)
    p.add_argument("--out", required=True, help="run directory (new, or existing with --resume)")
    p.set_defaults(func=cmd_train)

    s = sub.add_parser(
        "sweep",
        help="several trainings over one cache (betas x losses)",
        description="Run one training per (loss, beta) from the same cache, one after another, "
        "each in DIR/<loss>-beta<B>/. Finished runs are skipped, unfinished ones resumed.",
    )
    _add_train_args(s, sweep=True)
    s.add_argument("--out", required=True, help="directory holding one run directory per (loss, beta)")
    s.set_defaults(func=cmd_sweep)


def _add_train_args(p, sweep=False):
    """The flags of `train` and `sweep`: one per TrainConfig field (defaults read from it), one per loss
    parameter in dpo.losses.PARAMS (help and defaults from the table and the loss signatures)."""
    from dpo.config import CHOICES, TrainConfig

    d = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    a = p.add_argument
    a("--cache", required=True, help="stage-1 cache directory (training pairs)")
    a("--eval-cache", help="stage-1 cache of eval pairs: probes, and the eval pass of --eval-every")
    a("--model", help="policy to start from (default: the model the cache was scored with)")
    a("--loss", default=d["loss"], help=f"{'comma-separated loss names' if sweep else 'one'} of: "
      f"{', '.join(L.LOSSES)} (default {d['loss']})")
    for name in L.PARAMS:
        if name == "beta" and sweep:
            a("--beta", required=True, help="comma-separated betas, e.g. 0.05,0.1,0.5")
        else:
            a("--" + name.replace("_", "-"), type=float, help=L.param_help(name))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, help="optimizer steps")
    g.add_argument("--epochs", type=float, help="passes over the training pairs (default 1)")
    a("--batch-size", type=int, default=d["batch_size"],
      help=f"pairs per optimizer step, over all processes ({d['batch_size']})")
    a("--grad-accum", type=int, default=d["grad_accum"], help=f"micro-batches per process per step ({d['grad_accum']})")
    a("--max-tokens", type=int, default=d["max_tokens"], help="padded tokens per forward pass: longer micro-batches "
      f"run in pieces, same gradient ({d['max_tokens']}; 0 = no limit)")
    a("--no-share-prompt", dest="share_prompt", action="store_false",
      help="run the prompt twice (rows prompt+chosen, prompt+rejected) instead of once per pair")
    a("--lr", type=float, default=d["lr"], help=f"peak learning rate ({d['lr']:g})")
    a("--warmup", type=float, default=d["warmup"],
      help=f"warmup steps, or a fraction of all steps if < 1 ({d['warmup']:g})")
    a("--schedule", default=d["schedule"], choices=CHOICES["schedule"], help="lr decay after warmup")
    a("--min-lr-ratio", type=float, default=d["min_lr_ratio"], help="final lr as a fraction of the peak (0)")
    a("--weight-decay", type=float, default=d["weight_decay"])
    a("--max-grad-norm", type=float, default=d["max_grad_norm"],
      help=f"clip the global grad norm ({d['max_grad_norm']:g}; 0 = off)")
    a("--seed", type=int, default=d["seed"])
    a("--dtype", default=d["dtype"], choices=CHOICES["dtype"],
      help="compute dtype (bfloat16: autocast, or FSDP mixed precision; master weights stay fp32)")
    a("--device", default=d["device"], choices=CHOICES["device"])
    a("--parallel", default=d["parallel"], choices=CHOICES["parallel"],
      help="several processes (torchrun): ddp replicates the model on each, fsdp shards weights, gradients and "
      "optimizer state over them (FSDP2); auto = ddp")
    a("--grad-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    a("--lora", type=int, default=d["lora"], metavar="RANK", help="train LoRA adapters of this rank (needs peft)")
    a("--lora-alpha", type=float, default=d["lora_alpha"])
    a("--live-ref", action="store_true", help="load the reference model and score it live (for comparison)")
    a("--ref-model", help="reference model for --live-ref (default: the cache's model)")
    a("--probe-every", type=int, default=d["probe_every"],
      help=f"score the probe pairs every K steps ({d['probe_every']}; 0 = at the end only)")
    a("--probe-size", type=int, default=d["probe_size"], help=f"probe pairs per split ({d['probe_size']})")
    a("--eval-every", type=int, default=d["eval_every"], metavar="N",
      help="score the whole --eval-cache every N steps and at the end, into evals.parquet (0 = never)")
    a("--checkpoint-every", type=int, default=d["checkpoint_every"],
      help=f"checkpoint every K steps ({d['checkpoint_every']}; 0 = only at the end)")
    a("--keep-checkpoints", type=int, default=d["keep_checkpoints"], help=f"({d['keep_checkpoints']})")
    a("--allow-mismatch", action="store_true", help="train even if the cache was scored with another model")
    a("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    a("--threads", type=int, help="torch CPU threads")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _config(args, **over):
    from dpo.config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = {k: v for k, v in vars(args).items() if k in fields}
    kw.update(over)
    return TrainConfig(**kw)


def _check_cache(path, flag):
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path}: no such directory; build one with `refcache precompute`")
    from pipeline.cache import is_cache

    if not is_cache(path):
        raise UserError(
            f"{flag} {path}: not a refcache cache (no manifest.json); build one with `refcache precompute`"
        )


def _check_loss(name):
    if name not in L.LOSSES:
        raise UserError(f"unknown loss {name!r}; choose one of: {', '.join(L.LOSSES)}")


def cmd_train(args) -> int:
    from dpo.train import train

    _check_loss(args.loss)
    _check_cache(args.cache, "--cache")
    if args.eval_cache:
        _check_cache(args.eval_cache, "--eval-cache")
    summary = train(_config(args))
    if summary:
        _print_summary(summary)
    return 0


def cmd_sweep(args) -> int:
    from dpo.train import train

    losses = [x.strip() for x in args.loss.split(",") if x.strip()]
    for name in losses:
        _check_loss(name)
    try:
        betas = [float(x) for x in args.beta.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--beta {args.beta!r}: expected comma-separated numbers like 0.05,0.1,0.5") from None
    if not betas or not losses:
        raise UserError("--beta and --loss need at least one value each")
    _check_cache(args.cache, "--cache")
    if args.eval_cache:
        _check_cache(args.eval_cache, "--eval-cache")
    results = []
    for name in losses:
        for beta in betas:
            run = os.path.join(args.out, f"{name}-beta{beta:g}")
            done = os.path.join(run, "summary.json")
            if os.path.isfile(done):
                print(f"{run}: already finished, skipped")
                with open(done) as f:
                    results.append(json.load(f))
                continue
            results.append(train(_config(args, loss=name, beta=beta, out=run, resume=True)))
    # Side by side at the last probe step every run reached: the run-comparison diagnostic of stage 3.
    import polars as pl

    from queries import connect, run_query

    runs = [r["run_dir"] for r in results]
    cols = ["run", "split", "step", "chosen_drift_mean", "rejected_drift_mean", "both_down_share", "margin_mean",
            "accuracy", "final_loss"]
    table = run_query(connect(runs=runs), "compare").select(cols)
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=180, fmt_str_lengths=48, tbl_hide_dataframe_shape=True):
        print(table)
    print(f"more: refcache query compare --run {' '.join(runs)}   |   refcache report {' '.join(runs)}")
    return 0


def _print_summary(s):
    ev = (s.get("probe") or {}).get("eval")
    line = f"{s['run_dir']}: {s['steps']} steps, loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}"
    if ev:
        line += f", eval probe reward accuracy {ev['reward_accuracy']:.3f} (margin {ev['reward_margin']:.3f})"
    if full := s.get("eval"):
        line += (f", eval pass on {full['pairs']} pairs: loss {full['loss']:.4f}, reward accuracy "
                 f"{full['reward_accuracy']:.3f}")
    print(line)
