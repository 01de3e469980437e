"""`refcache train` and `refcache sweep`: command-line front ends of dpo.train.train."""

import dataclasses
import itertools
import json
import os
import textwrap

from dpo import losses as L
from refcache import UserError

# Flags of `refcache sweep` that take a comma list: the sweep trains every combination of their values.
SWEEP_FIELDS = ("loss", *L.PARAMS, "lr", "seed", "batch_size", "warmup")


def add_commands(sub):
    from refcache.cli import HelpFormatter

    p = sub.add_parser(
        "train", formatter_class=HelpFormatter,
        help="train a policy with a DPO-family loss from a reference cache",
        description="Train a policy with a DPO-family loss, reading reference log-probs from CACHE (the reference "
        "model is not loaded).\nWrites OUT/config.json, steps.parquet, examples/, evals.parquet (--eval-every), "
        "checkpoints/, final/\nand summary.json; --report-to adds TensorBoard / W&B curves under TRL's names.\n\n"
        "example:\n  refcache train --cache cache/train --eval-cache cache/eval --out runs/b0.1 --beta 0.1 "
        "--epochs 1",
    )
    _add_train_args(p)
    p.add_argument("--out", required=True, help="run directory (new, or existing with --resume)")
    p.set_defaults(func=cmd_train)

    fields = ", ".join(_flag(f) for f in SWEEP_FIELDS)
    s = sub.add_parser(
        "sweep", formatter_class=HelpFormatter,
        help="several trainings over one cache (every combination of comma-separated values)",
        description="Train one run per combination of the comma-separated values of\n" + textwrap.fill(
            fields, 100) + ",\nfrom the same cache, one after another, each in DIR/<loss>-beta<B>[-<flag><value>...]: "
        "the name carries\nloss and beta and every other setting that takes more than one value. A finished run "
        "is skipped\nand an unfinished one resumed, when its settings are the ones asked; a run made with other "
        "settings\nis refused (sweep into a new --out). Then the runs are compared side by side.\n\n"
        "example:\n  refcache sweep --cache cache/train --eval-cache cache/eval --out sweeps/a --beta 0.05,0.1 "
        "--lr 5e-7,1e-6",
    )
    _add_train_args(s, sweep=True)
    s.add_argument("--out", required=True, metavar="DIR", help="directory holding one run directory per setting")
    s.set_defaults(func=cmd_sweep)


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _add_train_args(p, sweep=False):
    """The flags of `train` and `sweep`: one per TrainConfig field (defaults read from it, shown by the help
    formatter), one per loss parameter in dpo.losses.PARAMS (help and defaults from the table and the loss
    signatures). In a sweep the SWEEP_FIELDS flags take comma lists."""
    from dpo.config import CHOICES, TrainConfig
    from dpo.dashboards import REPORT_TO

    d = {f.name: f.default for f in dataclasses.fields(TrainConfig)}

    def a(*flags, **kw):  # in a sweep, the SWEEP_FIELDS flags are read as text (a comma list)
        if sweep and kw.get("dest", flags[0][2:].replace("-", "_")) in SWEEP_FIELDS:
            kw["type"] = str
            kw.pop("choices", None)
        p.add_argument(*flags, **kw)

    a("--cache", required=True, help="stage-1 cache directory (training pairs)")
    a("--eval-cache", help="stage-1 cache of eval pairs: probes, and the eval pass of --eval-every")
    a("--where", metavar="SQL", help="train only on the pairs this SQL predicate over the `pairs` view keeps, "
      "e.g. \"ln_ches < 0.5\" or \"category = 'math'\" (any column of `refcache sql \"DESCRIBE pairs\" "
      "--cache CACHE`; a NULL result drops the pair; the eval cache is not filtered)")
    a("--model", help="policy to start from (default: the model the cache was scored with)")
    a("--loss", default=d["loss"], help=f"one of: {', '.join(L.LOSSES)}")
    for name in L.PARAMS:
        a(_flag(name), type=float, required=sweep and name == "beta", help=L.param_help(name))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, help="optimizer steps (default: from --epochs)")
    g.add_argument("--epochs", type=float, help="passes over the training pairs (default: 1 unless --steps)")
    a("--batch-size", type=int, default=d["batch_size"], help="pairs per optimizer step, over all processes")
    a("--grad-accum", type=int, default=d["grad_accum"], help="micro-batches per process per step")
    a("--max-tokens", type=int, default=d["max_tokens"], help="padded tokens per forward pass: longer "
      "micro-batches run in pieces, same gradient (0 = no limit)")
    a("--no-share-prompt", dest="share_prompt", action="store_false",
      help="run the prompt twice (rows prompt+chosen, prompt+rejected) instead of once per pair")
    a("--lr", type=float, default=d["lr"], help="peak learning rate")
    a("--warmup", type=float, default=d["warmup"], help="warmup steps, or a fraction of all steps if < 1")
    a("--schedule", default=d["schedule"], choices=CHOICES["schedule"], help="lr decay after warmup")
    a("--min-lr-ratio", type=float, default=d["min_lr_ratio"], help="final lr as a fraction of the peak")
    a("--weight-decay", type=float, default=d["weight_decay"], help="AdamW weight decay")
    a("--max-grad-norm", type=float, default=d["max_grad_norm"], help="clip the global grad norm (0 = off)")
    a("--seed", type=int, default=d["seed"], help="data order, probe subset, LoRA init")
    a("--dtype", default=d["dtype"], choices=CHOICES["dtype"],
      help="compute dtype (bfloat16: autocast, or FSDP mixed precision; master weights stay fp32)")
    a("--device", default=d["device"], choices=CHOICES["device"], help="auto: cuda when there is a GPU")
    a("--parallel", default=d["parallel"], choices=CHOICES["parallel"],
      help="several processes (torchrun): ddp replicates the model on each, fsdp shards weights, gradients and "
      "optimizer state over them (FSDP2); auto = ddp")
    a("--grad-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    a("--lora", type=int, default=d["lora"], metavar="RANK", help="train LoRA adapters of this rank (needs peft; "
      "0 = full fine-tuning)")
    a("--lora-alpha", type=float, default=d["lora_alpha"], help="LoRA scaling numerator")
    a("--live-ref", action="store_true", help="load the reference model and score it live (for comparison)")
    a("--ref-model", help="reference model for --live-ref (default: the cache's model)")
    a("--probe-every", type=int, default=d["probe_every"], metavar="K",
      help="score the probe pairs every K steps (0 = at the end only)")
    a("--probe-size", type=int, default=d["probe_size"], metavar="N",
      help="probe pairs per split (all of them when a split has fewer)")
    a("--eval-every", type=int, default=d["eval_every"], metavar="N",
      help="score the whole --eval-cache every N steps and at the end, into evals.parquet (0 = never)")
    a("--checkpoint-every", type=int, default=d["checkpoint_every"], metavar="K",
      help="checkpoint every K steps (0 = only at the end)")
    a("--keep-checkpoints", type=int, default=d["keep_checkpoints"], metavar="N", help="newest checkpoints kept")
    a("--report-to", nargs="+", default="none", metavar="NAME",
      help=f"also write the curves (TRL's names: train/loss, train/rewards/chosen, eval/loss, ...) to "
      f"{', '.join(REPORT_TO)} or none; several allowed. tensorboard: OUT/tensorboard/ (pip install "
      f"'refcache[tensorboard]'); wandb: OUT/wandb/, offline unless logged in (pip install 'refcache[wandb]')")
    a("--allow-mismatch", action="store_true", help="train even if the cache was scored with another model")
    a("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    a("--threads", type=int, help="torch CPU threads (default: torch's)")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _config(args, **over):
    from dpo.config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = {k: v for k, v in vars(args).items() if k in fields}
    kw.update(over)
    return TrainConfig(**kw)


def _check_cache(path, flag):
    from pipeline.cache import read_manifest

    if not os.path.isdir(path):
        raise UserError(f"{flag} {path}: no such directory; build one with `refcache precompute`")
    try:
        read_manifest(path)
    except UserError as e:
        raise UserError(f"{flag} {e}") from None


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


def _values(args, field) -> list:
    """The values a sweep flag lists (comma-separated, typed like the TrainConfig field); [default] if not given."""
    v = getattr(args, field)
    if not isinstance(v, str):
        return [v]
    kind = {"loss": str, "seed": int, "batch_size": int}.get(field, float)
    try:
        out = [kind(x.strip()) for x in v.split(",") if x.strip()]
    except ValueError:
        example = "1,2,3" if kind is int else "0.05,0.1,0.5"
        raise UserError(f"{_flag(field)} {v!r}: expected comma-separated numbers like {example}") from None
    if not out:
        raise UserError(f"{_flag(field)} {v!r}: give at least one value")
    return list(dict.fromkeys(out))


def sweep_runs(args) -> list:
    """[(run directory name, {field: value})] for every combination of the sweep flags' values. The name is
    <loss>-beta<B>, then -<flag><value> for each other setting that takes more than one value. A loss parameter
    the run's loss does not take is left out (so `--loss sigmoid,simpo --simpo-gamma 0.5,1` is 3 runs, not 4)."""
    grid = {f: _values(args, f) for f in SWEEP_FIELDS}
    for name in grid["loss"]:
        _check_loss(name)
    varying = [f for f in SWEEP_FIELDS if f not in ("loss", "beta") and len(grid[f]) > 1]
    runs = {}
    for combo in itertools.product(*grid.values()):
        over = dict(zip(grid, combo))
        takes = L.loss_params(over["loss"])
        over = {f: v for f, v in over.items() if v is not None and (f not in L.PARAMS or f in takes)}
        name = f"{over['loss']}-beta{over['beta']:g}" + "".join(
            f"-{f.replace('_', '-')}{over[f]:g}" for f in varying if f in over)
        runs.setdefault(name, over)
    return list(runs.items())


def cmd_sweep(args) -> int:
    from dpo.config import validate
    from dpo.runlog import read_run_config, settings_changed
    from dpo.train import train

    runs = sweep_runs(args)
    _check_cache(args.cache, "--cache")
    if args.eval_cache:
        _check_cache(args.eval_cache, "--eval-cache")
    plan, refused = [], []
    for name, over in runs:  # every run checked before any trains
        cfg = validate(_config(args, **over, out=os.path.join(args.out, name), resume=True))
        if read_run_config(cfg.out) is not None and (changed := settings_changed(cfg.out, cfg)):
            refused.append((cfg.out, changed))
        plan.append(cfg)
    if refused:
        out, changed = refused[0]
        what = "; ".join(f"{k}: {_short(old)} then, {_short(new)} now" for k, old, new in changed[:3])
        more = f" (and {len(refused) - 1} more of the {len(runs)} runs)" if len(refused) > 1 else ""
        raise UserError(f"{out} was trained with other settings than asked ({what}){more}; sweep into a new "
                        "--out, or remove that run directory to train it again")
    results = []
    for cfg in plan:
        done = os.path.join(cfg.out, "summary.json")
        if os.path.isfile(done):
            print(f"{cfg.out}: already finished with these settings, skipped")
            with open(done) as f:
                results.append(json.load(f))
            continue
        results.append(train(cfg))
    # Side by side at the last probe step every run reached: the run-comparison diagnostic of stage 3.
    import polars as pl

    from queries import connect, run_query

    dirs = [r["run_dir"] for r in results]
    cols = ["run", "split", "step", "chosen_drift_mean", "rejected_drift_mean", "both_down_share", "margin_mean",
            "accuracy", "final_loss"]
    table = run_query(connect(runs=dirs), "compare").select(cols)
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=180, fmt_str_lengths=48, tbl_hide_dataframe_shape=True):
        print(table)
    print(f"more: refcache query compare --run {' '.join(dirs)}   |   refcache report {' '.join(dirs)}")
    return 0


def _short(value, n=40) -> str:
    text = f"{value:g}" if isinstance(value, float) else repr(value)
    return text if len(text) <= n else text[: n - 1] + "…"


def _print_summary(s):
    ev = (s.get("probe") or {}).get("eval")
    line = f"{s['run_dir']}: {s['steps']} steps, loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}"
    if ev:
        line += f", eval probe reward accuracy {ev['reward_accuracy']:.3f} (margin {ev['reward_margin']:.3f})"
    if full := s.get("eval"):
        line += (f", eval pass on {full['pairs']} pairs: loss {full['loss']:.4f}, reward accuracy "
                 f"{full['reward_accuracy']:.3f}")
    print(line)
