"""Stage-1 commands: `refcache precompute`, `refcache verify`, `refcache merge`."""

import argparse
import inspect
import json

from pipeline.backends import BACKENDS, backend_settings
from pipeline.verify import TOLERANCE


def _defaults(fn) -> dict:
    """{parameter: default} of a function or class: the one source of the flags' defaults."""
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def add_commands(sub):
    from pipeline.precompute import DEFAULT_MAX_LENGTH, _precompute
    from pipeline.verify import verify

    d = _defaults(_precompute)
    p = sub.add_parser(
        "precompute", help="score preference pairs with the reference model into a Parquet cache",
        description="Read preference pairs, tokenize once, score every completion token with the reference model, "
                    "write CACHE\n(resumable: re-run the same command).\n\n"
                    f"lengths: --max-length defaults to {DEFAULT_MAX_LENGTH}, or less to fit the model's context "
                    "(and vLLM's --max-model-len);\n--max-prompt-length to half of --max-length, rounded up; vLLM's "
                    "--max-model-len to --max-length + 1.\n\n"
                    "example:\n  refcache precompute data/prefs/train.jsonl --model data/tiny-llama --out "
                    "cache/train --max-length 256")
    p.add_argument("data", metavar="DATA", help="JSONL/JSON/Parquet/CSV file, a directory of them, "
                                                 "or a datasets.save_to_disk directory")
    p.add_argument("--model", required=True, help="reference model directory (Hugging Face format)")
    p.add_argument("--out", required=True, metavar="CACHE", help="cache directory to create or resume")
    p.add_argument("--backend", default=d["backend"], choices=["auto", *BACKENDS],
                   help="auto: vllm on a GPU, hf on a CPU (faster there, see BENCHMARKS.md)")
    p.add_argument("--dtype", default=d["dtype"], choices=["float32", "bfloat16"], help="scoring dtype")
    p.add_argument("--max-length", "--max_length", type=int, default=d["max_length"],
                   help=f"max prompt+completion tokens (default: {DEFAULT_MAX_LENGTH}, or less to fit the model's "
                        "context and --max-model-len) [TRL: max_length]").hidden_options = ["--max_length"]
    p.add_argument("--max-prompt-length", "--max_prompt_length", type=_opt_int, default=d["max_prompt_length"],
                   help="prompt tokens kept when a pair is too long; auto = half of --max-length, rounded up; "
                        "none = never cut the prompt [TRL: max_prompt_length]").hidden_options = ["--max_prompt_length"]
    p.add_argument("--truncation-mode", default=d["truncation_mode"], choices=["keep_end", "keep_start"],
                   help="which end of an over-long prompt to keep")
    p.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help="; ".join(f"{name}: {b.batch_size_help}" for name, b in BACKENDS.items() if b.batch_size_help))
    p.add_argument("--shard", default=d["shard"], metavar="I/N", help="process chunks k with k %% N == I")
    p.add_argument("--ray", nargs="?", const="auto", default=d["ray"], metavar="ADDRESS",
                   help="write the parts on a Ray cluster, one actor per GPU (or per --tensor-parallel-size GPUs), "
                        "the same cache: alone or `auto`, the cluster in RAY_ADDRESS, else a new local one; or "
                        "an address (ray://HOST:10001, HOST:6379). DATA, --model and --out must be on storage "
                        "every node sees. Needs pip install 'refcache[ray]'")
    p.add_argument("--ray-actors", type=int, default=d["ray_actors"], metavar="N",
                   help="with --ray on CPUs: N actors, each with 1/N of the CPUs (default: 1); on GPUs: N instead of "
                        "one per GPU")
    p.add_argument("--limit", type=int, default=d["limit"], metavar="N", help="only the first N input rows")
    p.add_argument("--part-size", type=int, default=d["part_size"], help="input rows per part file")
    p.add_argument("--prompt-col", default="prompt", help="input column holding the prompt")
    p.add_argument("--chosen-col", default="chosen", help="input column holding the chosen completion")
    p.add_argument("--rejected-col", default="rejected", help="input column holding the rejected completion")
    p.add_argument("--prompt-split", default=d["prompt_split"], metavar="auto|prefix|MARKER",
                   help="where an implicit prompt (no prompt column: chosen/rejected are whole texts) ends. auto: "
                        "after the last transcript marker both share, such as HH-RLHF's "
                        "'\\n\\nAssistant:', else at their longest common prefix cut back to a word boundary; "
                        "prefix: always the latter (TRL's rule); or a marker string, e.g. '\\n\\nAssistant:' "
                        "(typed \\n is a newline). Message lists always split at the last assistant turn")
    p.add_argument("--keep-duplicates", action="store_true", default=d["keep_duplicates"],
                   help="keep every copy of a repeated pair (TRL's row counts), the n-th copy under pair_id ID#n; "
                        "default: later copies are rejected as duplicates")
    p.add_argument("--system-message", default=d["system_message"], choices=["keep", "fold"],
                   help="fold: merge a leading system message into the first user turn ('{system}\\n\\n{user}') "
                        "before the chat template, for templates without a system role (Gemma's); keep: as given")
    p.add_argument("--strict-boundary", action="store_true", default=d["strict_boundary"],
                   help="reject rows whose prompt ends in text that merges with the completion when tokenized "
                        "together (they are kept by default and scored as TRL 1.16 does; the summary counts them)")
    for b in BACKENDS.values():  # each backend's own settings (pipeline/backends/*.py)
        for f in b.flags:
            _add_flag(p, f)
    p.add_argument("--verbose", action="store_true", default=None,
                   help="show the backend's own output (vLLM's logs, warnings and progress bars)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run_precompute)

    vd = _defaults(verify)
    v = sub.add_parser("verify", help="re-score sampled cached pairs with the hf backend and compare",
                       description="Re-score N cached pairs with transformers (model from the manifest) and "
                                   "report per-token and implied reward\ndifferences; exit 1 when a token is past "
                                   "the tolerance.\n\nexample:\n  refcache verify cache/train --sample 64")
    v.add_argument("cache", metavar="CACHE", help="cache directory (the --out of `refcache precompute`)")
    v.add_argument("--sample", type=int, default=vd["sample"], metavar="N",
                   help="pairs to re-score (all of them when the cache has fewer)")
    defaults = "; ".join(f"{d} {a:g} + {r:g}|log p|" for d, (a, r) in TOLERANCE.items())
    v.add_argument("--tolerance", type=float, default=vd["tolerance"], metavar="NATS",
                   help=f"a token passes when |diff| <= NATS + RTOL x |log p| (defaults by the cache's dtype: "
                        f"{defaults})")
    v.add_argument("--rtol", type=float, default=vd["rtol"], help="see --tolerance")
    v.add_argument("--beta", type=float, default=vd["beta"], help="beta for the implied reward error")
    v.add_argument("--model", default=vd["model"], help="model directory, if it moved since precompute "
                                                         "(default: the manifest's)")
    v.add_argument("--dtype", default=vd["dtype"], choices=["float32", "bfloat16"],
                   help="default: the cache's dtype")
    v.add_argument("--json", action="store_true", help="print the result as JSON")
    v.set_defaults(func=run_verify)

    m = sub.add_parser("merge", help="validate all parts of a (sharded) cache and write its manifest",
                       description="Check every part of CACHE written by `refcache precompute --shard I/N` runs "
                                   "(all shards finished,\nno part missing or changed) and write its manifest, so "
                                   "training and queries can read it.\n\nexample:\n  refcache merge cache/train")
    m.add_argument("cache", metavar="CACHE", help="cache directory the shards wrote into")
    m.set_defaults(func=run_merge)


def _add_flag(parser, flag):
    """A backend's Flag as an option; unset, it stays None (the backend's default)."""
    if flag.type is not None:
        parser.add_argument(flag.option, type=flag.type, default=None, metavar=flag.metavar, help=flag.help)
    else:
        action = argparse.BooleanOptionalAction if flag.negatable else "store_true"
        parser.add_argument(flag.option, action=action, default=None, help=flag.help)


def _backend_flags(args) -> dict:
    """The backend settings given on the command line: every backend's constructor settings that are flags here
    (one list: the backends' signatures); unset flags stay None and are dropped by the backend check."""
    names = {k for b in BACKENDS for k in backend_settings(b)} - {"batch_size"}
    return {k: getattr(args, k) for k in sorted(names) if hasattr(args, k)}


def _opt_int(s):
    if s.lower() == "auto":
        return "auto"
    return None if s.lower() in ("none", "0", "") else int(s)


def run_precompute(args) -> int:
    from pipeline.precompute import format_summary, precompute

    columns = {"prompt": args.prompt_col, "chosen": args.chosen_col, "rejected": args.rejected_col}
    summary = precompute(args.data, args.model, args.out, backend=args.backend, dtype=args.dtype,
                         max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                         truncation_mode=args.truncation_mode, batch_size=args.batch_size, shard=args.shard,
                         limit=args.limit, part_size=args.part_size, columns=columns, prompt_split=args.prompt_split,
                         keep_duplicates=args.keep_duplicates, system_message=args.system_message,
                         strict_boundary=args.strict_boundary, progress=not args.no_progress, ray=args.ray,
                         ray_actors=args.ray_actors,
                         **_backend_flags(args))
    print(json.dumps(summary) if args.json else format_summary(summary))
    return 0


def run_verify(args) -> int:
    from pipeline.verify import format_result, verify

    r = verify(args.cache, sample=args.sample, tolerance=args.tolerance, rtol=args.rtol, beta=args.beta,
               model=args.model, dtype=args.dtype)
    print(json.dumps(r) if args.json else format_result(r, args.cache))
    return 0 if r["passed"] else 1


def run_merge(args) -> int:
    from pipeline.cache import merge

    m = merge(args.cache)
    ds = m["dataset"]
    print(f"merged {args.cache}: {len(m['shards'])} parts; rows read {ds['rows_read']:,} = kept "
          f"{ds['rows_kept']:,} + rejected {ds['rows_rejected']:,}; manifest written")
    return 0
