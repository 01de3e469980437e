"""`refcache train` and `refcache sweep`: command-line front ends of dpo.train.train and dpo.sweep.sweep. Every
flag is made from its TrainConfig field's declaration (dpo/config.py `setting`): name, type, default, help."""

import dataclasses
import os
import textwrap

from dpo.config import CHOICES, FIELDS, SWEEP_FIELDS, TrainConfig, flag, scalar_type
from dpo.losses import PARAMS
from refcache_base import UserError


def add_commands(sub):
    p = sub.add_parser(
        "train",
        help="train a policy with a DPO-family loss from a reference cache",
        description="Train a policy with a DPO-family loss, reading reference log-probs from CACHE (the reference "
        "model is not loaded).\nWrites OUT/config.json, steps.parquet, examples/, evals.parquet (--eval-every), "
        "checkpoints/, final/\nand summary.json; --report-to adds TensorBoard / W&B curves under TRL's names.\n\n"
        "example:\n  refcache train --cache cache/train --eval-cache cache/eval --out runs/b0.1 --beta 0.1 "
        "--epochs 1",
    )
    add_config_flags(p)
    p.add_argument("--out", required=True, help=FIELDS["out"].metadata["help"])
    p.set_defaults(func=cmd_train)

    fields = ", ".join(flag(f) for f in SWEEP_FIELDS)
    s = sub.add_parser(
        "sweep",
        help="several trainings over one cache (every combination of comma-separated values)",
        description="Train one run per combination of the comma-separated values of\n" + textwrap.fill(
            fields, 100) + ",\nfrom the same cache, one after another, each in DIR/<loss>-beta<B>[-<flag><value>...]: "
        "the name carries\nloss and beta and every other setting that takes more than one value. A finished run "
        "is skipped\nand an unfinished one resumed, when its settings are the ones asked; a run made with other "
        "settings\nis refused (sweep into a new --out). Then the runs are compared side by side.\n\n"
        "example:\n  refcache sweep --cache cache/train --eval-cache cache/eval --out sweeps/a --beta 0.05,0.1 "
        "--lr 5e-7,1e-6",
    )
    add_config_flags(s, sweep=True)
    s.add_argument("--out", required=True, metavar="DIR", help="directory holding one run directory per setting")
    s.set_defaults(func=cmd_sweep)


def add_config_flags(p, sweep=False):
    """One flag per TrainConfig field that declares one, in declaration order, each loss parameter right after
    --loss. In a sweep the SWEEP_FIELDS flags are read as text (comma lists) and --beta is required."""
    groups = {}
    for name in _flag_order():
        f = FIELDS[name]
        meta = f.metadata
        kw = dict(meta["argparse"])
        names = [meta["flag"] if isinstance(meta["flag"], str) else flag(name)]
        group = kw.pop("group", None)
        kw["help"] = meta["help"]
        if names[0] != flag(name):
            kw["dest"] = name
        if "action" not in kw:
            kw["type"] = scalar_type(name)
            kw["default"] = kw.pop("cli_default", None if f.default is dataclasses.MISSING else f.default)
            if name in CHOICES:
                kw["choices"] = CHOICES[name]
        if sweep and name in SWEEP_FIELDS:
            kw["type"] = str
            kw.pop("choices", None)
            kw["required"] = kw.get("required", False) or name == "beta"
        if group and group not in groups:
            groups[group] = p.add_mutually_exclusive_group()
        (groups[group] if group else p).add_argument(*names, **kw)


def _flag_order() -> list:
    declared = [n for n, f in FIELDS.items() if f.metadata["flag"] and n not in PARAMS]
    at = declared.index("loss") + 1
    return declared[:at] + list(PARAMS) + declared[at:]


def config_from(args, **over) -> TrainConfig:
    """The TrainConfig of parsed flags (every field the parser has), with `over` on top."""
    kw = {k: v for k, v in vars(args).items() if k in FIELDS}
    kw.update(over)
    return TrainConfig(**kw)


def check_cache(path, which):
    """One line when --cache / --eval-cache is not a finished cache, before anything else is read."""
    from pipeline.cache import read_manifest

    if not os.path.isdir(path):
        raise UserError(f"{which} {path}: no such directory; build one with `refcache precompute`")
    try:
        read_manifest(path)
    except UserError as e:
        raise UserError(f"{which} {e}") from None


def cmd_train(args) -> int:
    from dpo.config import validate
    from dpo.train import train

    cfg = validate(config_from(args))
    check_cache(cfg.cache, "--cache")
    if cfg.eval_cache:
        check_cache(cfg.eval_cache, "--eval-cache")
    summary = train(cfg)
    if summary:
        _print_summary(summary)
    return 0


def cmd_sweep(args) -> int:
    from dpo.sweep import sweep

    sweep(args)
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
