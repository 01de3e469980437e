"""`refcache train` and `refcache sweep`: command-line front ends of dpo.train.train and dpo.sweep.sweep. Every
flag is made from its TrainConfig field's declaration (dpo/config.py `setting`): name, type, default, help, and
TRL's names for it. A TRL name whose value is the field's is one more spelling of the flag (--learning_rate,
--learning-rate); one whose value needs converting (--loss_type ipo, --per_device_train_batch_size 2, --bf16) is
a hidden flag of its own, converted by `apply_trl` once everything is parsed. `--config FILE` gives the same
settings from a YAML or JSON file (refcache.cli.Parser); the flags on the command line win."""

import argparse
import dataclasses
import os
import textwrap

from dpo.config import (
    CHOICES,
    FIELDS,
    SWEEP_FIELDS,
    TRL_ACCEPTED,
    TRL_UNSUPPORTED,
    TrainConfig,
    Trl,
    flag,
    scalar_type,
)
from dpo.losses import PARAMS
from refcache_base import UserError

CONFIG_HELP = ("read settings from a YAML or JSON file: TRL's DPOConfig / TrainingArguments names (learning_rate, "
               "per_device_train_batch_size, ...) or refcache's; flags given here win (README \"Coming from TRL\")")


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
    out = p.add_argument(*_spellings("out"), dest="out", required=True, help=_help("out"))
    out.hidden_options = out.option_strings[1:]
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
    --loss, with TRL's names for it; the TRL settings refcache takes at one value (TRL_ACCEPTED); --config.
    In a sweep the SWEEP_FIELDS flags are read as text (comma lists) and --beta is required."""
    groups = {}

    def where(group):
        if group and group not in groups:
            groups[group] = p.add_mutually_exclusive_group()
        return groups[group] if group else p

    for name in _flag_order():
        f = FIELDS[name]
        kw = dict(f.metadata["argparse"])
        group = kw.pop("group", None)
        kw["help"] = _help(name)
        kw["dest"] = name
        if "action" not in kw:
            kw["type"] = scalar_type(name) if name != "adam_betas" else float
            kw["default"] = kw.pop("cli_default", None if f.default is dataclasses.MISSING else f.default)
            if name in CHOICES:
                kw["choices"] = CHOICES[name]
        if sweep and name in SWEEP_FIELDS:
            kw["type"] = str
            kw.pop("choices", None)
            kw["required"] = kw.get("required", False) or name == "beta"
        action = where(group).add_argument(*_spellings(name), **kw)
        action.hidden_options = action.option_strings[1:]
        for t in f.metadata["trl"]:
            if t.convert:
                _add_trl_flag(where(group), t)
    for t in TRL_ACCEPTED:
        _add_trl_flag(p, t)
    p.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    p.settings_option = "--config"  # refcache.cli.Parser reads it
    p.flag_hints = TRL_UNSUPPORTED


def _spellings(name) -> list:
    """The flag of field `name` as refcache spells it, then TRL's names for it whose value is the field's, with
    `_` and with `-`."""
    meta = FIELDS[name].metadata
    own = meta["flag"] if isinstance(meta["flag"], str) else flag(name)
    trl = [s for t in meta["trl"] if not t.convert for s in ("--" + t.name, flag(t.name))]
    return list(dict.fromkeys([own, *trl]))


def _help(name) -> str:
    """The field's help, and TRL's names for it."""
    trl = [t.name for t in FIELDS[name].metadata["trl"] if t.name != name]  # --beta is TRL's beta
    return FIELDS[name].metadata["help"] + (f" [TRL: {', '.join(trl)}]" if trl else "")


def _add_trl_flag(p, t: Trl):
    """A hidden flag for TRL's `t.name` whose value `apply_trl` converts; as text, and as a --config file gives it."""
    kw = {"nargs": "?", "const": "true"} if t.switch else {}
    a = p.add_argument(*dict.fromkeys(["--" + t.name, flag(t.name)]), dest=_trl_dest(t), default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS, **kw)
    a.raw_settings = True


def _trl_dest(t: Trl) -> str:
    return "trl_" + t.name


def apply_trl(args, sweep=False):
    """Put the values of the TRL flags that need converting (and of the --config file's such keys) into the
    fields they set, in declaration order; check the TRL_ACCEPTED ones. A sweep's comma lists are converted one
    value at a time."""
    todo = [(name, t) for name, f in FIELDS.items() for t in f.metadata["trl"] if t.convert]
    for name, t in [*todo, *((None, t) for t in TRL_ACCEPTED)]:
        if not hasattr(args, _trl_dest(t)):
            continue
        value = getattr(args, _trl_dest(t))
        if sweep and name in SWEEP_FIELDS and isinstance(value, str):
            value = ",".join(str(t.convert(v.strip(), args)) for v in value.split(",") if v.strip())
        else:
            value = t.convert(value, args)
        if name:
            setattr(args, name, value)


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

    apply_trl(args)
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

    apply_trl(args, sweep=True)
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


def trl_table() -> str:
    """README "Coming from TRL": every TRL name refcache takes (the flag it sets, and what differs), and the ones
    it does not (why), from the declarations in dpo/config.py. tests/test_trl_names.py checks the README holds
    exactly this; regenerate with `python -c "from dpo.cli import trl_table; print(trl_table())"`."""
    rows = ["| TRL / transformers | refcache | difference |", "|---|---|---|"]
    for name, f in FIELDS.items():
        for t in f.metadata["trl"]:
            rows.append(f"| `{t.name}` | `{_spellings(name)[0]}` | {t.note} |")
    for t in TRL_ACCEPTED:
        rows.append(f"| `{t.name}` | (nothing to set) | {t.note} |")
    rows += ["", "| not taken | why |", "|---|---|"]
    rows += [f"| `{name}` | {why} |" for name, why in TRL_UNSUPPORTED.items()]
    return "\n".join(rows)
