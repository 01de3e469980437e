"""`refcache demo`: every stage on the embedded default (data/tiny-llama + data/prefs), in a few minutes on a CPU.

1. precompute the reference cache for train and eval pairs (stage 1)
2. check a sample of it against transformers (verify)
3. train a short DPO run from the cache, with probes (stage 2)
4. print the key diagnostics as tables, write the HTML report (stage 3), and say what they found
"""

import shutil
import time
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
SHOWN_ROWS = 12  # rows of each table; a per-step table shows that many probe steps, evenly spaced


def add_commands(sub) -> None:
    from pipeline.backends import BACKENDS

    p = sub.add_parser("demo", help="run all stages on the embedded default", description=__doc__)
    p.add_argument("--out", default="out/demo", help="where caches, the run and the report go")
    # vLLM by default: the demo shows the production path (on a CPU `auto` would pick hf, see BENCHMARKS.md).
    p.add_argument("--backend", default="vllm", choices=["auto", *BACKENDS], help="stage-1 scoring backend")
    p.add_argument("--epochs", type=float, default=2.0, help="passes over the training pairs (data/prefs/train.jsonl)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    # Tuned for the 3.6M-param embedded model (its eval accuracy plateaus near 0.68 after 2 epochs);
    # real models want lr around 5e-7..1e-6.
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (tuned for the embedded 3.6M model; "
                   "real models want 5e-7..1e-6)")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per optimizer step")
    p.set_defaults(func=run)


# diagnostic -> (params, columns printed; `refcache query NAME --run ...` shows them all)
SHOWN = {
    "drift": ({}, ["split", "step", "chosen_drift_mean", "rejected_drift_mean", "both_down_share", "margin_mean",
                   "accuracy"]),
    "displacement": ({"limit": 8}, ["rank", "split", "chosen_drift", "rejected_drift", "margin_gain",
                                    "edit_distance", "rel_edit", "near_identical", "length_diff"]),
    "collapse": ({}, None),
    "length": ({}, ["split", "step", "corr_summed", "corr_per_token"]),
    "effects": ({}, ["split", "metric", "above_noise", "estimate", "ci_low", "ci_high", "null_value"]),
}
PER_STEP = ("drift", "length")  # shown for the eval probes, SHOWN_ROWS steps spread from the first to the last


def show_diagnostics(con, run_dir) -> None:
    """Print the key diagnostics of the run as tables that fit the terminal."""
    from queries import run_query
    from queries.fmt import render_table
    from queries.runner import get_query

    width = shutil.get_terminal_size((120, 40)).columns
    for name, (params, cols) in SHOWN.items():
        df = run_query(con, name, params)
        more = f"all of it: refcache query {name} --run {run_dir}"
        if name in PER_STEP:
            df = df.filter(pl.col("split") == "eval")
        print(f"\n-- {name} (eval probes)" if name in PER_STEP else f"\n-- {name}")
        table = df.select([c for c in cols if c in df.columns]) if cols else df
        if name in PER_STEP and df.height > SHOWN_ROWS:
            print(render_table(evenly_spaced(table, SHOWN_ROWS), width=width, max_rows=None), end="")
            print(f"note: {SHOWN_ROWS} of {df.height} probe steps, evenly spaced from the first to the last; {more}")
        else:
            print(render_table(table, width=width, max_rows=SHOWN_ROWS, more_hint=more,
                               empty=get_query(name).empty), end="")


def evenly_spaced(df: pl.DataFrame, n: int) -> pl.DataFrame:
    """n rows of `df` (n >= 2) spread evenly from its first row to its last, both included."""
    if df.height <= n:
        return df
    return df[sorted({round(i * (df.height - 1) / (n - 1)) for i in range(n)})]


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def run(args) -> int:
    """The demo in --out; where --out holds a demo made with other settings or by an earlier refcache (it cannot
    be resumed), in the first free --out-2, --out-3, ... instead, said in one line; nothing is deleted."""
    from refcache_base import SettingsChanged

    out = Path(args.out)
    for n in range(2, 100):
        try:
            return _run(args, out)
        except SettingsChanged as e:
            nxt = next(p for k in range(n, 100) if not (p := Path(f"{args.out}-{k}")).exists())
            print(f"note: {out} holds a demo this refcache cannot resume ({e}); starting again in {nxt}",
                  flush=True)
            out = nxt
    raise SystemExit("refcache demo: no free --out folder; pass --out")


def _run(args, out: Path) -> int:
    from dpo.train import TrainConfig, train
    from pipeline.backends import make_scorer, resolve_backend
    from pipeline.precompute import precompute
    from pipeline.verify import verify
    from queries import findings
    from queries.db import connect
    from queries.report import write_report

    model = DATA / "tiny-llama"
    t0 = time.time()

    _banner("stage 1: reference log-probs -> Parquet cache")
    caches = {}
    scorer = make_scorer(resolve_backend(args.backend, "float32"), model, "float32")  # one engine for both
    try:
        for split in ("train", "eval"):
            caches[split] = out / "cache" / split
            precompute(DATA / "prefs" / f"{split}.jsonl", model, caches[split], scorer=scorer)
    finally:
        getattr(scorer, "close", lambda: None)()
    check = verify(caches["train"], sample=32, tolerance=1e-4)
    print(f"verify: {scorer.name} cache vs transformers on {check['pairs']} pairs: per-token |diff| "
          f"max {check['max_abs_diff']:.2e}, mean {check['mean_abs_diff']:.2e} nats")

    _banner("stage 2: DPO from the cache (no reference model loaded)")
    run_dir = out / "runs" / f"sigmoid-beta{args.beta:g}"
    cfg = TrainConfig(
        cache=str(caches["train"]), eval_cache=str(caches["eval"]), out=str(run_dir),
        loss="sigmoid", beta=args.beta, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        warmup=0.1, probe_every=10, probe_size=64, resume=True,
    )
    train(cfg)

    _banner("stage 3: diagnostics (DuckDB over the cache and the run logs)")
    con = connect(runs=[run_dir], caches=[caches["train"], caches["eval"]])
    show_diagnostics(con, run_dir)
    report_path = write_report([run_dir], caches=[caches["train"], caches["eval"]], out_dir=out / "report")

    _banner(f"done in {time.time() - t0:.0f} s")
    print(f"caches:  {caches['train']}  {caches['eval']}")
    print(f"run:     {run_dir}")
    print(f"report:  {report_path}")
    print("findings:")
    for line in findings(con):
        print(f"  - {line}")
    return 0
