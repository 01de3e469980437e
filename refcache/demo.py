"""`refcache demo`: every stage on the embedded default (data/tiny-llama + data/prefs), in a few minutes on a CPU.

1. precompute the reference cache for train and eval pairs (stage 1)
2. check a sample of it against transformers (verify)
3. train a short DPO run from the cache, with probes (stage 2)
4. print the key diagnostics as tables, write the HTML report (stage 3), and say what they found
"""

import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"


def add_commands(sub) -> None:
    p = sub.add_parser("demo", help="run all stages on the embedded default", description=__doc__)
    p.add_argument("--out", default="out/demo", help="where caches, the run and the report go (default out/demo)")
    p.add_argument("--backend", default="auto", choices=["auto", "vllm", "hf"])
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--beta", type=float, default=0.1)
    p.set_defaults(func=run)


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def run(args) -> int:
    from dpo.train import TrainConfig, train
    from pipeline.precompute import precompute
    from pipeline.verify import verify
    from queries import findings, run_query
    from queries.db import connect
    from queries.report import write_report

    out = Path(args.out)
    model = DATA / "tiny-llama"
    t0 = time.time()

    _banner("stage 1: reference log-probs -> Parquet cache")
    caches = {}
    for split in ("train", "eval"):
        caches[split] = out / "cache" / split
        precompute(DATA / "prefs" / f"{split}.jsonl", model, caches[split], backend=args.backend)
    report = verify(caches["train"], sample=32, tolerance=1e-4)
    print(f"verify: max |vllm-or-hf - hf| per token = {report['max_abs_diff']:.2e} nats on 32 pairs")

    _banner("stage 2: DPO from the cache (no reference model loaded)")
    run_dir = out / "runs" / f"sigmoid-beta{args.beta:g}"
    cfg = TrainConfig(
        cache=str(caches["train"]), eval_cache=str(caches["eval"]), out=str(run_dir),
        loss="sigmoid", beta=args.beta, epochs=args.epochs,
    )
    train(cfg)

    _banner("stage 3: diagnostics (DuckDB over the cache and the run logs)")
    con = connect(runs=[run_dir], caches=[caches["train"], caches["eval"]])
    for name, params in [("drift", {}), ("displacement", {"limit": 10}), ("collapse", {}), ("length", {})]:
        print(f"\n-- {name}")
        print(run_query(con, name, params))
    report_path = write_report([run_dir], caches=[caches["train"], caches["eval"]], out_dir=out / "report")

    _banner(f"done in {time.time() - t0:.0f} s")
    print(f"caches:  {caches['train']}  {caches['eval']}")
    print(f"run:     {run_dir}")
    print(f"report:  {report_path}")
    print("findings:")
    for line in findings(con):
        print(f"  - {line}")
    return 0
