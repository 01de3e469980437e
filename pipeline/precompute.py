"""Stage 1, top to bottom: read pairs -> tokenize -> score with the reference model -> write the cache.

The input is cut into fixed chunks of `part_size` rows; chunk k becomes CACHE/part-k.parquet. A re-run skips
parts that exist and belong to the same settings (resume after a crash or kill); `shard=(i, n)` processes
the chunks with k % n == i, so n jobs can share one cache directory. The last shard to finish (or the
single-process run) merges: validates every part and writes manifest.json and rejected_rows.parquet.
"""

import json
import math
import time
from pathlib import Path

import refcache
from pipeline import cache
from pipeline.backends import check_settings, make_scorer, resolve_backend, torch_dtype
from pipeline.data import Reject, Source, normalize
from pipeline.fingerprint import model_identity, resolve_model_dir, tokenizer_identity
from pipeline.schema import SCHEMA_VERSION
from pipeline.tokenize import PairTokenizer, sequences
from pipeline.tokenize import settings as tokenization_settings
from refcache import UserError

SCORE_PAIRS = {"hf": 256, "vllm": 1024}  # pairs per scoring call (progress granularity)


def parse_shard(shard):
    if shard is None:
        return 0, 1
    if isinstance(shard, str):
        try:
            i, n = (int(x) for x in shard.split("/"))
        except ValueError:
            raise UserError(f"--shard {shard}: expected I/N, e.g. 0/4") from None
    else:
        i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise UserError(f"--shard {i}/{n}: need 0 <= I < N")
    return i, n


def load_tokenizer(model_dir):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # noqa: BLE001 - reported on one line, naming the directory
        raise UserError(f"{model_dir}: cannot load the tokenizer ({type(e).__name__}: {e})") from None


def precompute(data, model, out, *, backend="auto", dtype="float32", max_length=None, max_prompt_length=512,
               truncation_mode="keep_end", batch_size=None, shard=None, limit=None, part_size=1024,
               columns=None, progress=True, scorer=None, **backend_settings) -> dict:
    """Build (or resume, or add a shard to) the cache at `out`. Returns a summary dict.

    `columns` maps our names to the input's: {"prompt": "question", ...}. `scorer` lets a caller reuse an
    already-built backend (one vLLM engine per process). Extra keyword arguments go to the backend
    (max_model_len, tensor_parallel_size, gpu_memory_utilization). max_length=None means
    min(1024, the model's context - 1): vLLM needs one position beyond the scored sequence."""
    t0 = time.time()
    shard_i, shard_n = parse_shard(shard)
    torch_dtype(dtype)
    model_dir = resolve_model_dir(model)
    name = scorer.name if scorer is not None else resolve_backend(backend, dtype)
    max_length = _check_context(model_dir, max_length, name)
    if max_prompt_length is not None and max_prompt_length >= max_length:
        raise UserError(f"--max-prompt-length {max_prompt_length} must be smaller than --max-length {max_length}")
    if truncation_mode not in ("keep_end", "keep_start"):
        raise UserError(f"truncation mode {truncation_mode!r}: use keep_end or keep_start")
    if part_size < 1:
        raise UserError("--part-size must be at least 1")
    check_settings(name, dict(backend_settings, batch_size=batch_size))  # a setting for another backend: refused

    model_id, tok_id = model_identity(model_dir), tokenizer_identity(model_dir)
    src = Source(data, columns)
    data_sha = src.sha256()
    if scorer is not None and (scorer.dtype != dtype or Path(scorer.model_dir).resolve() != model_dir.resolve()):
        raise UserError(f"the given scorer runs {scorer.model_dir} in {scorer.dtype}, not {model_dir} in {dtype}")
    tokenizer = load_tokenizer(model_dir)
    tok_settings = tokenization_settings(tokenizer, max_length, max_prompt_length, truncation_mode)
    pair_tok = PairTokenizer(tokenizer, max_length, max_prompt_length, truncation_mode)

    # Everything that changes the cache's content. A partial cache made with other settings is refused.
    settings = {"schema_version": SCHEMA_VERSION, "model_sha256": model_id["sha256"],
                "tokenizer_sha256": tok_id["sha256"], "chat_template_sha256": tok_id["chat_template_sha256"],
                "tokenization": tok_settings, "backend": name, "dtype": dtype, "dataset_sha256": data_sha,
                "columns": src.columns, "limit": limit, "part_size": part_size}
    fingerprint = cache.settings_fingerprint(settings)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache.check_compatible(out, fingerprint, settings)
    done = cache.done_parts(out, fingerprint)

    identity = {"model": model_id, "tokenizer": tok_id, "tokenization": tok_settings,
                "backend": {"name": name, "dtype": dtype},
                "dataset": {**src.describe(), "sha256": data_sha, "columns": src.columns, "limit": limit,
                            "part_size": part_size}}
    stats = {"rows_read": 0, "rows_kept": 0, "rows_rejected": 0, "tokens": 0, "completion_tokens": 0,
             "parts_written": 0, "parts_skipped": 0, "load_seconds": 0.0, "post_seconds": 0.0, "write_seconds": 0.0}
    bar = _progress(src, limit, shard_n, progress)
    own_scorer = scorer is None
    score_seconds = 0.0

    def run_chunk(k, rows):
        nonlocal scorer, score_seconds
        pairs, rejected = [], []
        for row in rows:
            try:
                pairs.append(normalize(row, src.columns))
            except Reject as e:
                rejected.append((row.index, row.file, str(e)))
        kept, rej = pair_tok(pairs)
        rejected += [(p.index, p.file, reason) for p, reason in rej]
        if kept and scorer is None:
            settings_ = dict(backend_settings, batch_size=batch_size)
            if name == "vllm":
                settings_["max_model_len"] = settings_.get("max_model_len") or max_length + 1
            tl = time.time()
            scorer = make_scorer(name, model_dir, dtype, **settings_)
            stats["load_seconds"] = round(time.time() - tl, 3)
        chosen, rejected_lp = [], []
        ts = time.time()
        step = SCORE_PAIRS.get(name, 256)
        for j in range(0, len(kept), step):
            group = kept[j: j + step]
            post0 = getattr(scorer, "post_seconds", 0.0)
            if getattr(scorer, "can_pack", lambda: False)():  # hf: one row per pair, the prompt runs once
                lps = scorer.score_pairs([(t.prompt_ids, t.chosen_ids, t.rejected_ids) for t in group])
                chosen += [c for c, _ in lps]
                rejected_lp += [r for _, r in lps]
            else:
                seqs, starts = sequences(group)
                lps = scorer.score(seqs, starts)
                chosen += lps[0::2]
                rejected_lp += lps[1::2]
            stats["post_seconds"] += getattr(scorer, "post_seconds", 0.0) - post0  # engine output -> numpy
            stats["tokens"] += sum(len(t.prompt_ids) + len(t.chosen_ids) + len(t.rejected_ids) for t in group)
            stats["completion_tokens"] += sum(len(t.chosen_ids) + len(t.rejected_ids) for t in group)
            if bar is not None:
                bar.update(len(group))
                busy = score_seconds + time.time() - ts  # scoring time so far (model start excluded)
                bar.set_postfix(tok_s=f"{stats['tokens'] / max(busy, 1e-9):,.0f}", refresh=False)
        score_seconds += time.time() - ts
        if bar is not None:
            bar.update(len(rows) - len(kept))
        rejected.sort()
        meta = {"schema_version": SCHEMA_VERSION, "refcache_version": refcache.__version__,
                "fingerprint": fingerprint, "settings": settings,
                "identity": {**identity, "backend": {**identity["backend"], "version": scorer.version(),
                                                     "settings": scorer.settings()} if scorer else
                             identity["backend"]},
                "part": {"index": k, "first_source_index": k * part_size, "rows_read": len(rows),
                         "rows_kept": len(kept), "rejected": rejected,
                         "prompt_tokens": sum(len(t.prompt_ids) for t in kept),
                         "chosen_tokens": sum(len(t.chosen_ids) for t in kept),
                         "rejected_tokens": sum(len(t.rejected_ids) for t in kept)}}
        tw = time.time()
        cache.write_part(out, k, cache.part_table(kept, chosen, rejected_lp), meta)
        stats["write_seconds"] += time.time() - tw
        stats["rows_kept"] += len(kept)
        stats["rows_rejected"] += len(rejected)
        stats["parts_written"] += 1

    def finish_chunk(k, rows):
        if k % shard_n != shard_i:
            return
        stats["rows_read"] += len(rows)
        if k in done:
            p = done[k]["part"]
            stats["rows_kept"] += p["rows_kept"]
            stats["rows_rejected"] += len(p["rejected"])
            stats["parts_skipped"] += 1
            if bar is not None:
                bar.update(len(rows))
            return
        run_chunk(k, rows)

    total_read, k, rows = 0, 0, []
    try:
        for row in src.rows():
            if limit is not None and row.index >= limit:
                break
            total_read += 1
            if row.index // part_size != k:
                finish_chunk(k, rows)
                k, rows = row.index // part_size, []
            if k % shard_n == shard_i:
                rows.append(row)
        if rows:
            finish_chunk(k, rows)
    finally:
        if bar is not None:
            bar.close()
        if own_scorer and scorer is not None and hasattr(scorer, "close"):
            scorer.close()
    if total_read == 0:
        raise UserError(f"{data}: no rows to read")

    num_chunks = math.ceil(total_read / part_size)
    cache.write_json(out / cache.shard_name(shard_i, shard_n), {
        "fingerprint": fingerprint, "settings": settings, "identity": identity,
        "shard": {"index": shard_i, "count": shard_n}, "num_chunks": num_chunks, "rows_read": total_read,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    others = [out / cache.shard_name(j, shard_n) for j in range(shard_n)]
    complete = all(p.exists() and json.loads(p.read_text()).get("fingerprint") == fingerprint for p in others)
    manifest = cache.merge(out) if complete else None
    if manifest:
        for tmp in out.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
    seconds = time.time() - t0
    summary = {
        "out": str(out), "backend": name, "dtype": dtype, "shard": f"{shard_i}/{shard_n}", "complete": bool(manifest),
        **stats, "seconds": round(seconds, 3), "score_seconds": round(score_seconds, 3),
        "tokens_per_s": stats["tokens"] / score_seconds if score_seconds else 0.0,
        # share of the stage spent turning backend output into numpy and writing Parquet
        "postprocess_share": (stats["post_seconds"] + stats["write_seconds"]) / (score_seconds + stats["write_seconds"])
        if score_seconds else None,
    }
    if manifest:
        ds = manifest["dataset"]
        summary.update(rows_read=ds["rows_read"], rows_kept=ds["rows_kept"], rows_rejected=ds["rows_rejected"])
        part_bytes = sum((out / s["file"]).stat().st_size for s in manifest["shards"])
        summary["cache_bytes_per_pair"] = part_bytes / max(ds["rows_kept"], 1)
        if ds["rows_kept"] == 0:
            raise UserError(f"all {ds['rows_read']} rows were rejected; reasons are in {out}/rejected_rows.parquet")
    return summary


def _check_context(model_dir, max_length, backend):
    """Resolve max_length against the model's context (vLLM needs one spare position for its output token)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    ctx = cfg.get("max_position_embeddings") or (cfg.get("text_config") or {}).get("max_position_embeddings")
    spare = 1 if backend == "vllm" else 0
    if max_length is None:  # the same default for every backend, so their caches are interchangeable
        return min(1024, ctx - 1) if ctx else 1024
    if max_length < 2:
        raise UserError(f"--max-length {max_length}: need at least 2 tokens")
    if ctx and max_length + spare > ctx:
        raise UserError(f"--max-length {max_length} does not fit the model's context of {ctx} tokens "
                        f"({model_dir}/config.json) with the {backend} backend; use --max-length {ctx - spare}")
    return max_length


def _progress(src, limit, shard_n, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    total = src.approx_rows()
    if total is not None and limit is not None:
        total = min(total, limit)
    return tqdm(total=None if total is None else math.ceil(total / shard_n), unit="pair", desc="precompute",
                dynamic_ncols=True)


def format_summary(s: dict) -> str:
    lines = [f"rows read {s['rows_read']:,} = kept {s['rows_kept']:,} + rejected {s['rows_rejected']:,}"
             + (f" (shard {s['shard']})" if s["shard"] != "0/1" else ""),
             (f"scored {s['tokens']:,} tokens ({s['completion_tokens']:,} completion) with {s['backend']} "
              f"{s['dtype']} in {s['score_seconds']:.1f} s = {s['tokens_per_s']:,.0f} tokens/s; "
              f"total {s['seconds']:.1f} s; parts written {s['parts_written']}, reused {s['parts_skipped']}")]
    if s.get("complete"):
        lines.append(f"cache {s['out']}: {s['cache_bytes_per_pair']:,.0f} bytes per pair; manifest written")
        if s["rows_rejected"]:
            lines.append(f"rejected rows and reasons: {s['out']}/rejected_rows.parquet")
    else:
        lines.append(f"shard {s['shard']} done; the cache completes when every shard has run "
                     f"(the last one merges, or run `refcache merge {s['out']}`)")
    return "\n".join(lines)
