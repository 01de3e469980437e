"""`refcache sweep`: one training run per combination of the comma-listed values of dpo.config.SWEEP_FIELDS, all
from one cache, then the runs side by side (stage 3's `compare`).

Each run is DIR/<loss>-beta<B>[-<flag><value>...], named by every setting that takes more than one value. Every
run is checked before any trains: a finished one with the same settings is skipped, an unfinished one resumed,
and one made with other settings is refused, naming the difference.
"""

import itertools
import json
import os

from dpo.cli import check_cache, config_from
from dpo.config import SWEEP_FIELDS, check_loss, flag, scalar_type, validate
from dpo.losses import PARAMS, loss_params
from refcache_base import UserError


def sweep(args) -> list:
    """Train (or skip, or resume) every run the parsed sweep flags `args` ask for and print the comparison.
    Returns the runs' summaries."""
    from dpo.rundir import read_run_config, settings_changed
    from dpo.train import train

    runs = sweep_runs(args)
    check_cache(args.cache, "--cache")
    if args.eval_cache:
        check_cache(args.eval_cache, "--eval-cache")
    plan, refused = [], []
    for name, over in runs:  # every run checked before any trains
        cfg = validate(config_from(args, **over, out=os.path.join(args.out, name), resume=True))
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
    _print_comparison([r["run_dir"] for r in results])
    return results


def sweep_runs(args) -> list:
    """[(run directory name, {field: value})] for every combination of the sweep flags' values. The name is
    <loss>-beta<B>, then -<flag><value> for each other setting that takes more than one value. A loss parameter
    the run's loss does not take is left out (so `--loss sigmoid,simpo --simpo-gamma 0.5,1` is 3 runs, not 4)."""
    grid = {f: _values(args, f) for f in SWEEP_FIELDS}
    for name in grid["loss"]:
        check_loss(name)
    varying = [f for f in SWEEP_FIELDS if f not in ("loss", "beta") and len(grid[f]) > 1]
    runs = {}
    for combo in itertools.product(*grid.values()):
        over = dict(zip(grid, combo))
        takes = loss_params(over["loss"])
        over = {f: v for f, v in over.items() if v is not None and (f not in PARAMS or f in takes)}
        name = f"{over['loss']}-beta{over['beta']:g}" + "".join(
            f"-{f.replace('_', '-')}{over[f]:g}" for f in varying if f in over)
        runs.setdefault(name, over)
    return list(runs.items())


def _values(args, field) -> list:
    """The values a sweep flag lists (comma-separated, typed like the TrainConfig field); [default] if not given."""
    v = getattr(args, field)
    if not isinstance(v, str):
        return [v]
    kind = scalar_type(field)
    try:
        out = [kind(x.strip()) for x in v.split(",") if x.strip()]
    except ValueError:
        example = "1,2,3" if kind is int else "0.05,0.1,0.5"
        raise UserError(f"{flag(field)} {v!r}: expected comma-separated numbers like {example}") from None
    if not out:
        raise UserError(f"{flag(field)} {v!r}: give at least one value")
    return list(dict.fromkeys(out))


TAIL = 10  # steps the comparison averages the training loss over


def _print_comparison(dirs: list):
    """Side by side at the last probe step every run reached: the run-comparison diagnostic of stage 3, as
    `refcache query` prints tables. loss_last10 is the mean training loss of each run's last 10 steps (what `train`
    prints as its final loss is the last step's alone)."""
    import shutil

    import polars as pl

    from queries import connect, run_query
    from queries.fmt import render_table

    table = run_query(connect(runs=dirs), "compare", {"tail": TAIL}).select(
        "run", "split", "step", "chosen_drift_mean", "rejected_drift_mean", "both_down_share", "margin_mean",
        "accuracy", pl.col("final_loss").alias(f"loss_last{TAIL}"))
    print(render_table(table, width=shutil.get_terminal_size((120, 40)).columns, max_rows=None,
                       more_hint=f"every column: refcache query compare --run {' '.join(dirs)}"), end="")
    print(f"more: refcache query compare --run {' '.join(dirs)}   |   refcache report {' '.join(dirs)}")


def _short(value, n=40) -> str:
    text = f"{value:g}" if isinstance(value, float) else repr(value)
    return text if len(text) <= n else text[: n - 1] + "…"
