"""Stage 1, top to bottom: read pairs -> tokenize -> score with the reference model -> write the cache.

The input is cut into fixed chunks of `part_size` rows; chunk k becomes CACHE/part-k.parquet. A re-run skips
parts that exist, belong to the same settings and still hash to the sum recorded when they were written
(resume after a crash or kill; a damaged part is recomputed); `shard=(i, n)` processes the chunks with
k % n == i, so n jobs can share one cache directory, each holding its own lock. The last shard to finish (or
the single-process run) merges: validates every part and writes manifest.json and
__refcache__/rejected_rows.parquet. `ray=` hands the parts to Ray actors instead of writing them here
(pipeline/distributed.py's RayWriter in PartWriter's place; both run `build_part`), for the same cache.

A row that cannot be used (any error while reading, normalizing or tokenizing it) is rejected with its
kind and reason (pipeline/reject.py); so is every later copy of a pair (see pipeline/dedup.py), unless
`keep_duplicates`. Rows read = kept + rejected.
"""

import contextlib
import inspect
import json
import math
import numbers
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline import cache, reject
from pipeline.backends import BACKENDS, Backend, check_settings, make_scorer, resolve_backend, torch_dtype
from pipeline.backends import backend_settings as backend_settings_of
from pipeline.columns import scan
from pipeline.data import SPLIT_RULES, Pair, Source, check_prompt_split, normalize
from pipeline.dedup import SeenPairs, copy_id
from pipeline.fingerprint import model_identity, resolve_model_dir, tokenizer_identity
from pipeline.reject import Reject
from pipeline.tokenize import SYSTEM_MESSAGE, PairTokenizer, sequences
from pipeline.tokenize import settings as tokenization_settings
from refcache_base import UserError, __version__
from refcache_base.cache_schema import CHES_COMPUTED, SCHEMA_VERSION, ches_missing_reason
from refcache_base.limits import allowed, inside
from refcache_base.lock import DirLock
from refcache_base.progress import Progress

DEFAULT_MAX_LENGTH = 1024  # max_length when not given (less when the model's context is shorter)


def parse_shard(shard):
    if shard is None:
        return 0, 1
    if isinstance(shard, str):
        try:
            i, n = (int(x) for x in shard.split("/"))
        except ValueError:
            raise UserError(f"--shard {shard}: must be I/N with whole numbers 0 <= I < N, e.g. 0/4") from None
    else:
        i, n = shard
    if not (isinstance(i, numbers.Integral) and isinstance(n, numbers.Integral) and n >= 1 and 0 <= i < n):
        raise UserError(f"--shard {i}/{n}: must be I/N with whole numbers 0 <= I < N, e.g. 0/4")
    return i, n


# precompute's own numeric arguments, all whole numbers: allowed values (refcache_base/limits.py); None means unset
# (part_size excepted). The backends' numeric settings carry theirs (Flag.limits).
WHOLE_ARGS = {"max_length": "[2, inf)", "max_prompt_length": "[1, inf)", "batch_size": "[1, inf)",
              "part_size": "[1, inf)", "limit": "[1, inf)", "ray_actors": "[1, inf)"}


def check_arguments(args: dict):
    """One-line UserError naming the flag and its allowed range for the first numeric argument out of range
    (whole numbers first, then the others), before any work, for the CLI and the API."""
    numeric = [(name, "--" + name.replace("_", "-"), spec, int) for name, spec in WHOLE_ARGS.items()]
    numeric += [(f.name, f.option, f.limits, f.type) for b in BACKENDS.values() for f in b.flags if f.limits]
    for name, flag, spec, kind in sorted(numeric, key=lambda a: a[3] is not int):
        v = args.get(name)
        if (v is None and name != "part_size") or (name == "max_prompt_length" and v == "auto"):
            continue
        if not inside(v, spec, whole=kind is int):
            also = " (or none, or auto)" if name == "max_prompt_length" else ""
            shown = f"{v:g}" if kind is not int and isinstance(v, float) else v
            raise UserError(f"{flag} {shown}: must be {allowed(spec, whole=kind is int)}{also}")
    parse_shard(args.get("shard"))
    check_ray(args)
    if args.get("system_message", "keep") not in SYSTEM_MESSAGE:
        raise UserError(f"--system-message {args['system_message']}: use {' or '.join(SYSTEM_MESSAGE)}")


def check_ray(args: dict):
    """--ray goes with neither --shard (Ray spreads the parts itself) nor a caller's scorer; --ray-actors needs it."""
    on = args.get("ray") not in (None, False)
    if on and args.get("shard") is not None:
        raise UserError("--ray and --shard: use one (--ray spreads the parts over a Ray cluster itself; --shard is "
                        "for separate jobs, such as a Slurm array)")
    if on and args.get("scorer") is not None:
        raise UserError("ray= and scorer=: use one (with Ray each actor starts its own scorer)")
    if not on and args.get("ray_actors") is not None:
        raise UserError(f"--ray-actors {args['ray_actors']} applies with --ray; add --ray")


def load_tokenizer(model_dir):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # noqa: BLE001 - reported on one line, naming the directory
        raise UserError(f"{model_dir}: cannot load the tokenizer ({type(e).__name__}: {e})") from None


def _precompute(data, model, out, *, backend="auto", dtype="float32", max_length=None, max_prompt_length="auto",
                truncation_mode="keep_end", batch_size=None, shard=None, limit=None, part_size=1024,
                columns=None, prompt_split="auto", keep_duplicates=False, system_message="keep",
                strict_boundary=False, progress=True, scorer=None, ray=None, ray_actors=None,
                **backend_settings) -> dict:
    """Build (or resume, or add a shard to) the cache at `out`. Returns a summary dict.

    `columns` maps our names to the input's: {"prompt": "question", ...}. `prompt_split` says where the
    prompt of an implicit text row ends: "auto", "prefix" or a marker string (pipeline.data). `keep_duplicates`
    keeps every copy of a pair (TRL's row counts), the n-th copy under pair_id "ID#n" (pipeline/dedup.py).
    `system_message` "fold" merges a leading system message into the first user turn, for chat templates without
    a system role; `strict_boundary` rejects rows whose prompt tail merges into the completion when tokenized
    together (pipeline/tokenize.py). All three are cache settings: a resume with others is refused. `scorer` lets
    a caller reuse an already-built backend (one vLLM engine per process). `ray` ("auto" or a cluster's
    address) writes the parts on Ray actors (pipeline/distributed.py): `ray_actors` of them on CPUs (default 1),
    one per GPU (or per tensor_parallel_size GPUs) on GPUs; the cache is the same. Extra keyword arguments go to the
    backend (max_model_len, tensor_parallel_size, gpu_memory_utilization). max_length=None means
    min(1024, the model's context - 1, vLLM's max_model_len - 1): vLLM needs one position beyond the scored
    sequence. max_prompt_length="auto" means half of max_length, rounded up (512 of 1024); None never cuts it.
    Numeric arguments are checked first; then the shard's lock on `out` is taken (a second writer of the
    same shard is refused) and held until the cache (or this shard) is written."""
    t0 = time.time()
    with _cluster(ray) as cluster:  # None without ray
        if cluster is not None:
            backend = cluster.resolve_backend(backend)  # auto: by the cluster's GPUs
        job = _plan(data, model, backend=backend, dtype=dtype, max_length=max_length,
                    max_prompt_length=max_prompt_length, truncation_mode=truncation_mode, batch_size=batch_size,
                    shard=shard, limit=limit, part_size=part_size, columns=columns, prompt_split=prompt_split,
                    keep_duplicates=keep_duplicates, system_message=system_message,
                    strict_boundary=strict_boundary, progress=progress, scorer=scorer,
                    backend_settings=backend_settings)
        out = Path(out)
        cache.check_compatible(out, job.fingerprint, job.settings)  # refuses a partial cache of other settings
        done, changed = cache.done_parts(out, job.fingerprint, job.shard)
        for f in changed:
            print(f"note: {f}: its bytes are not what refcache wrote (sha256 differs); recomputing it",
                  file=sys.stderr)

        writer = PartWriter(job, out, scorer, progress) if cluster is None else \
            cluster.writer(job, out, progress, ray_actors)
        rows_read = 0  # by every shard: the shard record's row count
        try:
            for k, items in read_chunks(job.src, limit, part_size, job.prompt_split, job.extras,
                                        job.keep_duplicates):
                rows_read += len(items)
                if k % job.shard[1] != job.shard[0]:
                    continue  # another shard's part
                if k in done:
                    writer.reuse(items, done[k]["part"])
                else:
                    writer.write(k, items)
            writer.finish()
        finally:
            writer.close()
    if rows_read == 0:
        raise UserError(f"{data}: no rows to read")

    _write_shard_record(out, job, rows_read)
    manifest = _merge_if_last(out, job)
    summary = _summary(out, job, writer, manifest, time.time() - t0)
    if manifest and manifest["dataset"]["rows_kept"] == 0:
        raise UserError(f"all {manifest['dataset']['rows_read']} rows were rejected; reasons are in "
                        f"{cache.rejected_path(out, manifest)}")
    return summary


def _cluster(ray):
    """The Ray connection for a run with `ray` (pipeline/distributed.py), or a context giving None without."""
    if ray in (None, False):
        return contextlib.nullcontext()
    from pipeline.distributed import Cluster

    return Cluster(ray)


@dataclass
class Job:
    """What one precompute run builds, resolved from its arguments before any scoring (see `_plan`)."""

    src: Source
    model_dir: Path
    backend: str  # a registered backend: hf | vllm
    dtype: str
    limit: int | None
    part_size: int
    prompt_split: str
    keep_duplicates: bool  # every copy of a pair kept, under pair_id#n (else later copies rejected)
    shard: tuple  # (i, n)
    extras: object  # pipeline.columns.ExtraColumns: the input's own columns the cache keeps
    scan_seconds: float
    pair_tok: PairTokenizer
    scorer_settings: dict  # what make_scorer gets when the run starts its own scorer
    settings: dict  # everything that changes the cache's content: fingerprinted
    fingerprint: str
    identity: dict  # model, tokenizer, tokenization, backend, dataset: recorded with every part


def _plan(data, model, *, backend, dtype, max_length, max_prompt_length, truncation_mode, batch_size, shard, limit,
          part_size, columns, prompt_split, keep_duplicates, system_message, strict_boundary, progress, scorer,
          backend_settings) -> Job:
    """Check the arguments against the model, read the model's, tokenizer's and input's identities and scan the
    input's columns: everything the run needs before it reads a row."""
    shard = parse_shard(shard)
    torch_dtype(dtype)
    prompt_split = check_prompt_split(prompt_split)
    model_dir = resolve_model_dir(model)
    name = scorer.name if scorer is not None else resolve_backend(backend, dtype)
    max_length, max_prompt_length = _lengths(model_dir, max_length, max_prompt_length, name, **backend_settings)
    if truncation_mode not in ("keep_end", "keep_start"):
        raise UserError(f"truncation mode {truncation_mode!r}: use keep_end or keep_start")
    scorer_settings = dict(backend_settings, batch_size=batch_size)
    check_settings(name, scorer_settings)  # a setting for another backend: refused
    scorer_settings = BACKENDS[name].complete_settings(scorer_settings, max_length)  # vllm: max_model_len

    model_id, tok_id = model_identity(model_dir), tokenizer_identity(model_dir)
    src = Source(data, columns)
    data_sha = src.sha256()
    extras, scan_seconds = scan(src, limit, progress)  # the input's own columns the cache keeps, with their types
    if scorer is not None and (scorer.dtype != dtype or Path(scorer.model_dir).resolve() != model_dir.resolve()):
        raise UserError(f"the given scorer runs {scorer.model_dir} in {scorer.dtype}, not {model_dir} in {dtype}")
    tokenizer = load_tokenizer(model_dir)
    tok_settings = tokenization_settings(tokenizer, max_length, max_prompt_length, truncation_mode, prompt_split,
                                         system_message, strict_boundary)
    pair_tok = PairTokenizer(tokenizer, max_length, max_prompt_length, truncation_mode, system_message,
                             bool(strict_boundary))

    # Everything that changes the cache's content. A partial cache made with other settings is refused.
    settings = {"schema_version": SCHEMA_VERSION, "model_sha256": model_id["sha256"],
                "tokenizer_sha256": tok_id["sha256"], "chat_template_sha256": tok_id["chat_template_sha256"],
                "tokenization": tok_settings, "backend": name, "dtype": dtype, "dataset_sha256": data_sha,
                "columns": src.columns, "limit": limit, "part_size": part_size,
                "extra_columns": extras.columns, "skipped_columns": extras.skipped}
    settings["duplicates"] = DUPLICATES[bool(keep_duplicates)]  # pipeline/dedup.py
    ches = _ches_choice(name, scorer, scorer_settings, backend_settings)
    if ches is not None:  # a backend whose CHES can be skipped (vllm --no-ches): what the cache holds depends on it
        settings["ches"] = ches
    identity = {"model": model_id, "tokenizer": tok_id, "tokenization": tok_settings,
                "backend": {"name": name, "dtype": dtype},
                "dataset": {**src.describe(), "sha256": data_sha, "columns": src.columns, "limit": limit,
                            "part_size": part_size}}
    return Job(src=src, model_dir=model_dir, backend=name, dtype=dtype, limit=limit, part_size=part_size,
               prompt_split=prompt_split, keep_duplicates=bool(keep_duplicates), shard=shard, extras=extras,
               scan_seconds=scan_seconds, pair_tok=pair_tok,
               scorer_settings=scorer_settings, settings=settings, fingerprint=cache.settings_fingerprint(settings),
               identity=identity)


def _ches_choice(name, scorer, scorer_settings, given):
    """Whether a backend that can skip CHES computes it (its `ches` setting, filled in by complete_settings), for
    the fingerprint; None for a backend without the choice. A given scorer's own choice wins, and an explicit
    contrary one is refused."""
    if "ches" not in backend_settings_of(name):
        return None
    if scorer is None:
        return bool(scorer_settings.get("ches", True))
    if given.get("ches") is not None and bool(given["ches"]) != bool(scorer.ches):
        raise UserError(f"the given scorer was started with ches={bool(scorer.ches)}, not ches={given['ches']}")
    return bool(scorer.ches)


# settings["duplicates"] without and with keep_duplicates
DUPLICATES = {False: "first copy kept, later copies rejected",
              True: "every copy kept, the n-th as pair_id#n"}

FORMATS = ("explicit", "conversational", "implicit-text", "implicit-conversation")  # Pair.kind


@dataclass
class Stage1Stats:
    """This shard's counters, in the summary's order: rows read = kept + rejected, over written and reused parts."""

    rows_read: int = 0
    rows_kept: int = 0
    rows_rejected: int = 0
    tokens: int = 0  # scored in this run (prompt + chosen + rejected)
    completion_tokens: int = 0
    parts_written: int = 0
    parts_skipped: int = 0  # reused from an earlier run
    load_seconds: float = 0.0  # starting the scorer
    post_seconds: float = 0.0  # turning engine output into numpy (part of the scoring time)
    ches_load_seconds: float = 0.0  # starting what only CHES needs (vllm: its second engine; part of load_seconds)
    ches_seconds: float = 0.0  # scoring time spent on CHES alone (vllm: its second pass; part of score_seconds)
    write_seconds: float = 0.0
    scan_seconds: float = 0.0
    extra_columns: list = field(default_factory=list)
    skipped_columns: dict = field(default_factory=dict)
    formats: dict = field(default_factory=lambda: dict.fromkeys(FORMATS, 0))  # kept rows per Pair.kind
    split_rules: dict = field(default_factory=lambda: dict.fromkeys(SPLIT_RULES, 0))  # implicit prompts' splits
    boundary_merged: int = 0  # kept rows whose prompt tail merged into the completion (pipeline/tokenize.py)
    rejected_by_kind: dict = field(default_factory=dict)  # pipeline.reject.by_kind

    def add_reused(self, rows_read: int, part: dict):
        """Count a part an earlier run wrote (its metadata's "part" record)."""
        self.rows_read += rows_read
        self.parts_skipped += 1
        self.add_part(part)

    def add_written(self, rows_read: int, result: dict):
        """Count a part written now (what `build_part` returned)."""
        self.rows_read += rows_read
        self.parts_written += 1
        self.tokens += result["tokens"]
        self.completion_tokens += result["completion_tokens"]
        self.post_seconds += result["post_seconds"]
        self.ches_seconds += result["ches_seconds"]
        self.ches_load_seconds = max(self.ches_load_seconds, round(result["ches_start_seconds"], 3))
        self.write_seconds += result["write_seconds"]
        self.add_part(result["part"])

    def add_part(self, part: dict):
        """Count a part (its metadata's "part" record, written now or reused)."""
        self.rows_kept += part["rows_kept"]
        self.rows_rejected += len(part["rejected"])
        self.boundary_merged += part.get("boundary_merged", 0)
        reject.add_by_kind(self.rejected_by_kind, reject.by_kind(part["rejected"]))
        for key in ("formats", "split_rules"):
            totals = getattr(self, key)
            for k, n in part.get(key, {}).items():
                totals[k] = totals.get(k, 0) + n


class LazyScorer:
    """The run's scorer, started by `get` at the first pair to score (so a resumed run with nothing left never
    loads the model); `scorer` is None until then. `close` stops the scorer it started (never a caller's)."""

    def __init__(self, job: Job, scorer=None):
        self.job, self.scorer, self.own = job, scorer, scorer is None
        self.load_seconds = 0.0

    def get(self):
        if self.scorer is None:
            tl = time.time()
            self.scorer = make_scorer(self.job.backend, self.job.model_dir, self.job.dtype, **self.job.scorer_settings)
            self.load_seconds = round(time.time() - tl, 3)
        return self.scorer

    def close(self):
        if self.own and self.scorer is not None:
            self.scorer.close()
            self.scorer = None


def build_part(job: Job, out: Path, k: int, items: list, scorers: LazyScorer, log: str, on_scored=None) -> dict:
    """Tokenize and score chunk k's pairs and write part k (every row not kept recorded with its reason): a run's
    one unit of work, done in this process (PartWriter) or in a Ray actor (pipeline/distributed.py). `log` is the
    writer's write log (cache.write_part); on_scored(pairs, tokens, seconds) as the scorer finishes pairs (whole
    pairs and their tokens, seconds of scoring so far; see Tally). Returns the part's
    metadata record ("part") with what scoring and writing it took (tokens, completion_tokens, post_seconds,
    score_seconds, write_seconds; ches_seconds and ches_start_seconds where CHES takes a pass of its own)."""
    pairs = [p for p in items if isinstance(p, Pair)]
    rejected = [p for p in items if not isinstance(p, Pair)]
    kept, rej = tokenize_rows(job.pair_tok, pairs)
    rejected += [reject.row(p.index, p.file, e) for p, e in rej]
    done = {"tokens": 0, "completion_tokens": 0, "post_seconds": 0.0, "score_seconds": 0.0, "ches_seconds": 0.0,
            "ches_start_seconds": 0.0}
    chosen, rejected_lp, ches, ln_ches = _score(job, scorers, kept, done, on_scored)
    rejected.sort()
    # the backend's version and settings go with the parts it scored: a part whose rows were all rejected carries
    # none, whether or not the scorer had started (so Ray actors, which start theirs first, write the same bytes)
    meta = part_meta(job, k, items, kept, rejected, scorers.scorer if kept else None)
    tw = time.time()
    table = cache.part_table(kept, chosen, rejected_lp, job.extras.columns, ches=ches, ln_ches=ln_ches)
    cache.write_part(out, k, table, meta, log)
    return {"part": meta["part"], **done, "write_seconds": time.time() - tw}


def _score(job: Job, scorers: LazyScorer, kept: list, done: dict, on_scored=None) -> tuple:
    """(chosen, rejected, ches, ln_ches), one entry per kept pair, scored the backend's pairs_per_call at a time;
    adds the tokens and seconds to `done`; on_scored(pairs, tokens, seconds) as pairs are done."""
    cols = ([], [], [], [])
    ts = time.time()
    step = BACKENDS[job.backend].pairs_per_call
    scored = None if on_scored is None else lambda pairs, tokens: on_scored(pairs, tokens, time.time() - ts)
    for j in range(0, len(kept), step):
        group = kept[j: j + step]
        scorer = scorers.get()
        if j == 0:
            ts = time.time()  # the scorer's start excluded
        post0, ches0 = scorer.post_seconds, scorer.ches_seconds
        for col, values in zip(cols, score_group(scorer, group, scored)):
            col += values
        done["post_seconds"] += scorer.post_seconds - post0  # engine output -> numpy
        done["ches_seconds"] += scorer.ches_seconds - ches0  # CHES's own pass (vllm)
        done["ches_start_seconds"] = scorer.ches_start_seconds  # a given scorer's too: what CHES cost it
        done["tokens"] += sum(len(t.prompt_ids) + len(t.chosen_ids) + len(t.rejected_ids) for t in group)
        done["completion_tokens"] += sum(len(t.chosen_ids) + len(t.rejected_ids) for t in group)
    done["score_seconds"] = time.time() - ts if kept else 0.0
    return cols


class PartWriter:
    """Writes this shard's new parts in this process (`build_part`) and counts them and the reused ones, with
    progress. Its scorer starts at the first pair to score; `close` stops the scorer it started (never a
    caller's). pipeline/distributed.py's RayWriter does the same with the parts spread over Ray actors."""

    def __init__(self, job: Job, out: Path, scorer, progress: bool):
        self.job, self.out = job, out
        self.scorers = LazyScorer(job, scorer)
        self.stats = Stage1Stats(scan_seconds=round(job.scan_seconds, 3), extra_columns=job.extras.columns,
                                 skipped_columns=job.extras.skipped)
        self.score_seconds = 0.0  # scoring only (the scorer's start excluded)
        self.log = cache.written_log(*job.shard)
        self.bar = progress_bar(job.src, job.limit, job.shard[1], progress)

    def reuse(self, items: list, part: dict):
        """Count a part an earlier run wrote (`part`: its metadata's "part" record)."""
        self.stats.add_reused(len(items), part)
        advance(self.bar, len(items))

    def write(self, k: int, items: list):
        """Tokenize and score chunk k's pairs and write part k."""
        tokens, busy = [self.stats.tokens], self.score_seconds

        def scored(pairs, n, seconds):  # progress as pairs are scored, with tokens/s so far
            tokens[0] += n
            advance(self.bar, pairs, tokens=tokens[0], seconds=busy + seconds)

        result = build_part(self.job, self.out, k, items, self.scorers, self.log, scored)
        self.stats.load_seconds = self.scorers.load_seconds
        self.stats.add_written(len(items), result)
        self.score_seconds += result["score_seconds"]
        advance(self.bar, result["part"]["rows_read"] - result["part"]["rows_kept"])

    def finish(self):
        """Nothing to wait for: every part is written when `write` returns."""

    def extra_summary(self) -> dict:
        return {}

    def close(self):
        if self.bar is not None:
            self.bar.close()
        self.scorers.close()


def advance(bar, n: int, tokens: int | None = None, seconds: float | None = None, **postfix):
    """Move the progress bar (None: no bar) by n pairs; with tokens and seconds (scoring so far), show tokens/s."""
    if bar is None:
        return
    if tokens is not None:
        postfix = {"tok_s": f"{tokens / max(seconds, 1e-9):,.0f}", **postfix}
    bar.update(n, **postfix)


def score_group(scorer, group: list, on_scored=None) -> tuple:
    """Score tokenized pairs: (chosen log-probs, rejected log-probs, ches, ln_ches), one entry per pair. A scorer
    that packs a pair into one prompt-shared row (hf) returns CHES from the same forward; the others score two
    sequences per pair and give CHES from `pair_ches` (vllm: a second pass), or none (null) where they do not.
    on_scored(pairs, tokens) as the scorer finishes its batches (Tally)."""
    tokens = sum(len(t.prompt_ids) + len(t.chosen_ids) + len(t.rejected_ids) for t in group)
    if scorer.can_pack():
        tally = Tally(len(group), tokens, len(group), tokens, on_scored)
        lps = scorer.score_pairs([(t.prompt_ids, t.chosen_ids, t.rejected_ids) for t in group], tally.on_batch)
        tally.finish()
        return [x[0] for x in lps], [x[1] for x in lps], [x[2] for x in lps], [x[3] for x in lps]
    seqs, starts = sequences(group)
    passes = 2 if scorer.ches_pass else 1
    tally = Tally(len(group), tokens, passes * len(seqs), passes * sum(map(len, seqs)), on_scored)
    lps = scorer.score(seqs, starts, tally.on_batch)
    ches = scorer.pair_ches(seqs, starts, tally.on_batch) or [(None, None)] * len(group)
    tally.finish()
    return lps[0::2], lps[1::2], [c for c, _ in ches], [c for _, c in ches]


class Tally:
    """One scoring call's progress in whole pairs: the scorer reports its work as it goes (`on_batch(units,
    tokens)`: pairs, or the sequences of each of its passes, with their tokens as it counts them, or None where it
    cannot tell which finished); `report(pairs, tokens)` gets the share of the call's pairs and scored tokens
    (prompt once + chosen + rejected) that this is, pro rata, in whole numbers that add up to the call's own at
    `finish` (which reports what a scorer without progress left)."""

    def __init__(self, pairs: int, tokens: int, units: int, unit_tokens: int, report=None):
        self.pairs, self.tokens, self.units, self.unit_tokens, self.report = pairs, tokens, units, unit_tokens, report
        self.units_done, self.tokens_done = 0, 0  # tokens_done None: the scorer does not count them
        self.sent = [0, 0]  # pairs, tokens reported
        self.on_batch = None if report is None else self._add

    def _add(self, units: int, tokens=None):
        self.units_done += units
        self.tokens_done = None if tokens is None or self.tokens_done is None else self.tokens_done + tokens
        share = self.units_done / max(self.units, 1) if self.tokens_done is None else \
            self.tokens_done / max(self.unit_tokens, 1)
        self._send(self.pairs * min(self.units_done, self.units) // max(self.units, 1),
                   min(self.tokens, int(self.tokens * share)))

    def _send(self, pairs: int, tokens: int):
        pairs, tokens = max(pairs, self.sent[0]), max(tokens, self.sent[1])
        if [pairs, tokens] != self.sent:
            self.report(pairs - self.sent[0], tokens - self.sent[1])
            self.sent = [pairs, tokens]

    def finish(self):
        if self.report is not None:
            self._send(self.pairs, self.tokens)


def part_meta(job: Job, k: int, items: list, kept: list, rejected: list, scorer) -> dict:
    """Part k's key-value metadata: the fingerprinted settings, the identity (with the scorer's version and
    settings once one runs) and the part's own counts and rejected rows."""
    backend = job.identity["backend"]
    if scorer:
        backend = {**backend, "version": scorer.version(), "settings": scorer.settings()}
    return {"schema_version": SCHEMA_VERSION, "refcache_version": __version__,
            "fingerprint": job.fingerprint, "settings": job.settings, "identity": {**job.identity, "backend": backend},
            "part": {"index": k, "first_source_index": k * job.part_size, "rows_read": len(items),
                     "rows_kept": len(kept), "rejected": rejected,
                     "boundary_merged": sum(1 for t in kept if t.boundary_merged),
                     "prompt_tokens": sum(len(t.prompt_ids) for t in kept),
                     "chosen_tokens": sum(len(t.chosen_ids) for t in kept),
                     "rejected_tokens": sum(len(t.rejected_ids) for t in kept),
                     "formats": dict(Counter(t.pair.kind for t in kept)),
                     "split_rules": dict(Counter(t.pair.split for t in kept if t.pair.split))}}


def _write_shard_record(out: Path, job: Job, rows_read: int):
    """This shard's record: it has run to the end with these settings (the merge waits for every shard's)."""
    i, n = job.shard
    cache.write_json(out / cache.shard_name(i, n), {
        "fingerprint": job.fingerprint, "settings": job.settings, "identity": job.identity,
        "shard": {"index": i, "count": n}, "num_chunks": math.ceil(rows_read / job.part_size), "rows_read": rows_read,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def _merge_if_last(out: Path, job: Job) -> dict | None:
    """Merge when every shard has its record: the manifest; None while a shard is missing or another merges."""
    others = [out / cache.shard_name(j, job.shard[1]) for j in range(job.shard[1])]
    if not all((cache.read_json(p) or {}).get("fingerprint") == job.fingerprint for p in others):
        return None
    manifest = cache.merge_unless_merging(out)  # None: another shard is merging
    if manifest:
        cache.remove_temp_files(out)
    return manifest


def _summary(out: Path, job: Job, writer: PartWriter, manifest: dict | None, seconds: float) -> dict:
    """The run's summary (format_summary prints it); with the whole cache's counts once it is merged."""
    stats, score_seconds = writer.stats, writer.score_seconds
    summary = {
        "out": str(out), "backend": job.backend, "dtype": job.dtype, "shard": "{}/{}".format(*job.shard),
        "complete": bool(manifest), **asdict(stats), **writer.extra_summary(), "seconds": round(seconds, 3),
        "score_seconds": round(score_seconds, 3),
        "tokens_per_s": stats.tokens / score_seconds if score_seconds else 0.0,
        # share of the stage spent turning backend output into numpy and writing Parquet
        "postprocess_share": (stats.post_seconds + stats.write_seconds) / (score_seconds + stats.write_seconds)
        if score_seconds else None,
    }
    summary["ches_cost"] = ches_cost(summary) if stats.ches_seconds else None
    if manifest:
        ds = manifest["dataset"]
        summary.update(rows_read=ds["rows_read"], rows_kept=ds["rows_kept"], rows_rejected=ds["rows_rejected"])
        part_bytes = sum((out / s["file"]).stat().st_size for s in manifest["shards"])
        summary["cache_bytes_per_pair"] = part_bytes / max(ds["rows_kept"], 1)
        summary["ches"] = ches_missing_reason(manifest) or CHES_COMPUTED  # for `refcache query displacement_risk`
        summary["boundary_merged"] = ds.get("boundary_merged")  # None: a part written before it was counted
        summary["rejected_by_kind"] = manifest["rejected_rows"].get("by_kind", {})
    return summary


def precompute(*args, **kwargs) -> dict:
    bound = inspect.signature(_precompute).bind(*args, **kwargs)
    bound.apply_defaults()
    check_arguments({**bound.arguments, **bound.arguments["backend_settings"]})
    out = Path(bound.arguments["out"])
    shard_i, shard_n = parse_shard(bound.arguments["shard"])
    cache.check_out_dir(out, bound.arguments["data"])  # never into a folder holding what we did not write
    out.mkdir(parents=True, exist_ok=True)
    with DirLock(out, "precompute", name=f"shard-{shard_i}-of-{shard_n}"):
        return _precompute(*args, **kwargs)


precompute.__doc__, precompute.__signature__ = _precompute.__doc__, inspect.signature(_precompute)


def read_chunks(src, limit=None, part_size=1024, prompt_split="auto", extras=None, keep_duplicates=False):
    """Stage 1's reading rules: (k, items) for each chunk k of `part_size` source rows, each item a Pair or the
    row's rejection (source_index, file, kind, reason). Every later copy of a pair is already rejected, or with
    `keep_duplicates` renamed pair_id#n (every shard reads every row, so all shards make the same decisions)."""
    seen = SeenPairs(count=keep_duplicates)
    k, items = 0, []
    for row in src.rows():
        if limit is not None and row.index >= limit:
            break
        if row.index // part_size != k and items:
            dedupe(seen, items, keep_duplicates)
            yield k, items
            items = []
        k = row.index // part_size
        items.append(normalize_row(row, src.columns, prompt_split, extras))
    if items:
        dedupe(seen, items, keep_duplicates)
        yield k, items


def tokenize_pairs(data, model, *, max_length=None, max_prompt_length="auto", truncation_mode="keep_end",
                   columns=None, prompt_split="auto", keep_duplicates=False, system_message="keep",
                   strict_boundary=False, limit=None):
    """Stage 1's front end without scoring: yield the kept pairs (pipeline.tokenize.Tokenized) of `data` as
    precompute tokenizes them for `model` (same defaults, same rejections; rejected rows are skipped). For
    benchmarks and users who bring their own scorer."""
    model_dir = resolve_model_dir(model)
    max_length, max_prompt_length = _lengths(model_dir, max_length, max_prompt_length, "hf")
    pair_tok = PairTokenizer(load_tokenizer(model_dir), max_length, max_prompt_length, truncation_mode,
                             system_message, strict_boundary)
    for _, items in read_chunks(Source(data, columns), limit, prompt_split=check_prompt_split(prompt_split),
                                keep_duplicates=keep_duplicates):
        yield from tokenize_rows(pair_tok, [p for p in items if isinstance(p, Pair)])[0]


def normalize_row(row, columns, prompt_split="auto", extras=None):
    """Pair, or (source_index, file, kind, reason) when the row cannot be used, whatever the error."""
    try:
        return normalize(row, columns, prompt_split, extras)
    except Exception as e:  # noqa: BLE001 - one row's failure rejects that row, never the build
        return reject.row(row.index, row.file, reject.from_error(e))


def dedupe(seen: SeenPairs, items: list, keep=False):
    """Every later copy of a pair (same pair_id as an earlier row), in place: replaced by its rejection, or with
    `keep` given the pair_id of its occurrence (pipeline.dedup.copy_id)."""
    at = [j for j, p in enumerate(items) if isinstance(p, Pair)]
    firsts, nth = seen.first_rows([items[j].pair_id for j in at], [items[j].index for j in at])
    for j, first, n in zip(at, firsts, nth if keep else firsts):
        p = items[j]
        if first == p.index:
            continue
        if keep:
            p.pair_id = copy_id(p.pair_id, n)
        else:
            reason = f"duplicate of row {first} (same prompt, chosen and rejected; pair_id {p.pair_id})"
            items[j] = reject.row(p.index, p.file, Reject("duplicate", reason))


def tokenize_rows(pair_tok, pairs):
    """pair_tok(pairs), or pair by pair when the batch raises, so that one pair's error rejects only that pair:
    (kept Tokenized, [(Pair, Reject)])."""
    try:
        return pair_tok(pairs)
    except Exception:  # noqa: BLE001 - find the pair(s) that fail
        kept, rejected = [], []
        for p in pairs:
            try:
                k, r = pair_tok([p])
            except Exception as e:  # noqa: BLE001
                k, r = [], [(p, reject.from_error(e))]
            kept += k
            rejected += r
        return kept, rejected


def _lengths(model_dir, max_length, max_prompt_length, backend, /, **settings):
    """(max_length, max_prompt_length) resolved so that the defaults follow what is given: max_length from the
    model's context and the backend's settings (vLLM's max_model_len), the prompt's limit half of max_length.
    Only an explicit pair that cannot work is an error, naming what to pass."""
    scorer_class = BACKENDS.get(backend, Backend)  # an unknown name is refused after this, by check_settings
    cap = scorer_class.max_length_cap(settings)
    if max_length is None and cap is not None:
        max_length = min(_check_context(model_dir, None, backend), cap)
    max_length = _check_context(model_dir, max_length, backend)
    scorer_class.check_max_length(max_length, settings)
    if max_prompt_length == "auto":
        max_prompt_length = (max_length + 1) // 2
    elif max_prompt_length is not None and max_prompt_length >= max_length:
        raise UserError(f"--max-prompt-length {max_prompt_length} must be smaller than --max-length {max_length}; "
                        f"pass a smaller one, or leave it out (default: half of --max-length, "
                        f"{(max_length + 1) // 2})")
    return max_length, max_prompt_length


def _check_context(model_dir, max_length, backend):
    """Resolve max_length against the model's context and the positions the backend needs past the sequence
    (vLLM: one, for its output token)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    ctx = cfg.get("max_position_embeddings") or (cfg.get("text_config") or {}).get("max_position_embeddings")
    spare = BACKENDS.get(backend, Backend).spare_positions
    if max_length is None:  # the same default for every backend, so their caches are interchangeable
        return min(DEFAULT_MAX_LENGTH, ctx - 1) if ctx else DEFAULT_MAX_LENGTH
    if ctx and max_length + spare > ctx:
        raise UserError(f"--max-length {max_length} does not fit the model's context of {ctx} tokens "
                        f"({model_dir}/config.json) with the {backend} backend; use --max-length {ctx - spare}")
    return max_length


def progress_bar(src, limit, shard_n, enabled) -> Progress | None:
    """The run's progress in pairs (refcache_base/progress.py: a bar on a terminal, lines in a log); None when off."""
    if not enabled:
        return None
    total = src.approx_rows()
    if total is not None and limit is not None:
        total = min(total, limit)
    return Progress(None if total is None else math.ceil(total / shard_n), "pair", "precompute")


def ches_cost(s: dict) -> dict:
    """What computing CHES cost this run where it took a pass of its own (vllm), from the summary's times:
    seconds with CHES / without, for the scoring alone and with the backend's start when this run started it."""
    score, ches, load, ches_load = s["score_seconds"], s["ches_seconds"], s["load_seconds"], s["ches_load_seconds"]
    out = {"scoring_with": score, "scoring_without": score - ches,
           "scoring_ratio": score / (score - ches) if score > ches else None}
    if load:
        out.update(with_start=load + score, without_start=load - ches_load + score - ches)
        out["ratio_with_start"] = out["with_start"] / out["without_start"] if out["without_start"] > 0 else None
    return out


def ches_cost_line(s: dict) -> str:
    c = s["ches_cost"]
    line = (f"CHES cost ({s['backend']}: a second engine returning hidden states; --no-ches skips it): "
            f"{s['ches_load_seconds']:.1f} s to start it + {s['ches_seconds']:.1f} s over the pairs; scoring "
            f"{c['scoring_with']:.1f} s with CHES / {c['scoring_without']:.1f} s without = {c['scoring_ratio']:.2f}x")
    if c.get("ratio_with_start"):
        line += (f"; with the engines' start {c['with_start']:.1f} s / {c['without_start']:.1f} s = "
                 f"{c['ratio_with_start']:.2f}x")
    return line


def format_summary(s: dict) -> str:
    lines = [f"rows read {s['rows_read']:,} = kept {s['rows_kept']:,} + rejected {s['rows_rejected']:,}"
             + (f" (shard {s['shard']})" if s["shard"] != "0/1" else ""),
             (f"scored {s['tokens']:,} tokens ({s['completion_tokens']:,} completion) with {s['backend']} "
              f"{s['dtype']} in {s['score_seconds']:.1f} s = {s['tokens_per_s']:,.0f} tokens/s; "
              f"total {s['seconds']:.1f} s; parts written {s['parts_written']}, reused {s['parts_skipped']}"),
             *([f"on Ray: {s['ray']['actors']} actors, {s['ray']['restarts']} restarted"] if "ray" in s else []),
             "kept rows by format: " + ", ".join(f"{k} {n:,}" for k, n in s["formats"].items())
             + "; implicit prompts split at: " + ", ".join(f"{k} {n:,}" for k, n in s["split_rules"].items())]
    if s.get("ches_seconds"):
        lines.append(ches_cost_line(s))
    if s["extra_columns"]:
        lines.append("input columns kept: " + ", ".join(
            c["source"] + (f" as {c['name']}" if c["name"] != c["source"] else "") + f" ({c['type']})"
            for c in s["extra_columns"]))
    if s["skipped_columns"]:
        lines.append("input columns not kept (not scalar): " + ", ".join(
            f"{k} ({why})" for k, why in s["skipped_columns"].items()))
    if s.get("complete"):
        lines.append(f"cache {s['out']}: {s['cache_bytes_per_pair']:,.0f} bytes per pair; manifest written")
        lines.append("CHES displacement scores (ches, ln_ches): " + s["ches"] +
                     (" (rank them: refcache query displacement_risk)" if s["ches"] == CHES_COMPUTED else ""))
    else:
        lines.append(f"shard {s['shard']} done; the cache completes when every shard has run "
                     f"(the last one merges, or run `refcache merge {s['out']}`)")
    if s.get("boundary_merged"):
        lines.append(f"boundary: {s['boundary_merged']:,} kept rows end their prompt in text that merges with the "
                     "completion when tokenized together; as in TRL 1.16, that text is scored as the completion's "
                     "start (prompt_ids stop before it); --strict-boundary rejects such rows")
    lines += rejections_block(s)
    return "\n".join(lines)


def rejections_block(s: dict, top: int = 5) -> list[str]:
    """The summary's rejected rows: the `top` most frequent kinds with a count and an example row each."""
    counts = s.get("rejected_by_kind") or {}
    if not s["rows_rejected"] or not counts:
        return []
    where = (f"all of them, with reason_kind and reason, in {cache.side_dir(s['out']) / cache.REJECTED_FILE}"
             if s.get("complete") else "this shard's parts")
    more = f"top {top} of {len(counts)} kinds" if len(counts) > top else f"{len(counts)} kind" + \
        ("s" if len(counts) > 1 else "")
    return [f"rejected {s['rows_rejected']:,} rows by kind ({more}; {where}):", *reject.top_kinds(counts, top)]
