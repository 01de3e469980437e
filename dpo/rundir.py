"""The run directory: what `refcache train --out` may write into, how a run is recognised, and what a resume must
match.

- A run is recognised by its config.json, written first and atomically, which carries `"kind": "refcache-run"`.
  refcache writes only into a new or empty directory or one of its own runs, and removes only files it wrote:
  a directory holding anything else (a Hugging Face model, say) is refused, with or without --resume.
- A lock file (refcache_base.lock.DirLock) keeps a second writer out while a run writes the directory.
- A resume must ask for the same settings as the run recorded; caches and the policy are compared by content
  (IDENTIFIED_BY), the --where subset by the pair ids it kept. A run whose config.json records another
  `lr_schedule` (dpo.train.LR_SCHEDULE; runs of refcache before it record none) is not resumed.

Files inside it: dpo/runlog.py (logs), dpo/checkpoint.py (checkpoints); schemas in refcache_base/runlog_schema.py.
"""

import contextlib
import dataclasses
import json
import os
import re
import shutil
import uuid

from dpo import checkpoint
from dpo.config import RESUME_FREE, TrainConfig
from dpo.model import cache_fingerprint
from dpo.parallel import World
from pipeline.cache import read_manifest
from refcache_base import SettingsChanged, UserError
from refcache_base.files import write_json
from refcache_base.lock import LOCK_PREFIX, DirLock

RUN_KIND = "refcache-run"
OWN_ENTRIES = ("config.json", "steps.parquet", "evals.parquet", "summary.json", "examples", "checkpoints",
               "final", "final.tmp", "final.old", "tensorboard", "wandb")
CONFIG_TMP = re.compile(r"\.config\.json\.\d+\.tmp|config\.json\.tmp")  # config.json being written (atomic_write)


def read_run_config(out: str) -> dict | None:
    """The run config in `out`, or None when `out` holds no config.json written by refcache train."""
    try:
        with open(os.path.join(out, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) and cfg.get("kind") == RUN_KIND else None


def _state(out: str) -> str:
    """'new' (missing or empty), 'half' (what a run killed before its config.json leaves), 'run', or 'foreign'."""
    if not os.path.exists(out):
        return "new"
    if not os.path.isdir(out):
        return "foreign"
    names = {n for n in os.listdir(out) if not n.startswith(LOCK_PREFIX)}
    if not names:
        return "new"
    if read_run_config(out) is not None:
        return "run"
    examples = os.path.join(out, "examples")
    if all(n == "examples" or CONFIG_TMP.fullmatch(n) for n in names) and \
            not (os.path.isdir(examples) and os.listdir(examples)):
        return "half"
    return "foreign"


def _remove_own(out: str):
    """Remove what refcache train writes into a run directory, and nothing else."""
    for name in OWN_ENTRIES + tuple(n for n in os.listdir(out) if CONFIG_TMP.fullmatch(n)):
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


# A path says where a cache or model is today; what it is is recorded beside it and decides on resume, so the
# same cache through another spelling, a symlink, a copy or another mount resumes (config.json then records
# the new path).
IDENTIFIED_BY = {"cache": "cache_fingerprint", "eval_cache": "eval_cache_fingerprint", "model": "model_sha256"}


def _same(key: str, old, new) -> bool:
    """Whether a setting is the same for a resume: caches by their content identity (pipeline.cache.content_id;
    the manifest file's sha256 for runs that recorded no content id), the --where subset by the pair ids it
    kept (its counts for runs that recorded no hash), everything else by value."""
    if key.endswith("cache_fingerprint") and isinstance(old, dict) and isinstance(new, dict):
        by = "content_sha256" if old.get("content_sha256") else "manifest_sha256"
        return old.get(by) == new.get(by)
    if key == "where_pairs" and isinstance(old, dict) and isinstance(new, dict) and "pair_ids_sha256" not in old:
        new = {k: v for k, v in new.items() if k in old}
    return _norm(old) == _norm(new)


def _changed(old: dict, new: dict) -> list:
    """Settings that differ; a setting an older version did not record ran with today's default."""
    skip = RESUME_FREE | {"run_id", "versions", "kind", "sharded"}
    skip |= {k for k, by in IDENTIFIED_BY.items() if old.get(by) is not None and new.get(by) is not None}
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)} | {"sharded": False}
    return [k for k in new if k not in skip and not _same(k, old.get(k, defaults.get(k)), new[k])]


def settings_changed(out: str, cfg: TrainConfig) -> list:
    """[(setting, value in out's config.json, value in cfg)] for the settings of a validated `cfg` that differ from
    the run in `out`, by the rule a resume applies (_changed). Settings training derives when cfg leaves them
    open (model, ref_model, device) count as the run's; the caches count by their fingerprints."""
    from dpo.config import loss_params

    old = read_run_config(out)
    new = {k: v for k, v in dataclasses.asdict(cfg).items()
           if not (k in ("model", "ref_model") and v is None) and not (k == "device" and v == "auto")}
    new["loss_params"] = loss_params(cfg)
    new["cache_fingerprint"] = cache_fingerprint(cfg.cache, read_manifest(cfg.cache))
    if cfg.eval_cache:
        new["eval_cache_fingerprint"] = cache_fingerprint(cfg.eval_cache, read_manifest(cfg.eval_cache))
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return [(k, old.get(k, defaults.get(k)), new[k]) for k in _changed(old, new)]


def _refuse_foreign(out: str) -> str:
    """The state of `out` (see _state); a UserError if it holds what refcache did not write."""
    state = _state(out)
    if state == "foreign":
        raise UserError(f"{out} already exists and is not a refcache run (no refcache config.json), so neither a "
                        "new run nor --resume may write there; choose a new --out")
    return state


def _prepare(out: str, resolved: dict, resume: bool) -> tuple[str, str | None]:
    """Check `out` (under its lock) and make it ready: returns (run_id, checkpoint to resume from or None)."""
    state = _refuse_foreign(out)
    if state == "run" and not resume:
        raise UserError(f"{out} already exists and is not empty; pass --resume to continue that run or choose a "
                        "new --out")
    ckpt = checkpoint.latest(out) if state == "run" else None
    if ckpt:
        old = read_run_config(out)
        if old.get("lr_schedule") != resolved["lr_schedule"]:
            raise SettingsChanged(f"{out} was started by an earlier refcache whose learning-rate schedule differs from "
                            "this one's (now transformers' formulas: warmup from 0, decay that ends after the last "
                            "update); resuming would change its learning rates mid-run: train it again in a new "
                            "--out")
        if changed := _changed(old, resolved):
            # causes first; what follows from them (counts, steps) after
            changed.sort(key=lambda k: k in ("train_pairs", "eval_pairs", "steps_per_epoch", "total_steps",
                                             "warmup_steps"))
            if changed[0] == "where_pairs":  # the same predicate, now keeping other pairs
                was, now = old.get("where_pairs") or {}, resolved["where_pairs"] or {}
                raise UserError(f"{out}: --where {resolved.get('where')!r} now keeps other pairs than when the run "
                                f"started ({was.get('kept')} pairs then, {now.get('kept')} now; their pair ids "
                                "differ): the predicate depends on something that changed (random(), a column); "
                                "resume with a predicate that keeps the same pairs or use a new --out")
            if changed[0] in ("cache_fingerprint", "eval_cache_fingerprint"):
                flag = "--cache" if changed[0] == "cache_fingerprint" else "--eval-cache"
                what = resolved.get(changed[0].removesuffix("_fingerprint"))
                raise UserError(f"{out}: {flag} {what} is not the cache the run started with (its content differs: "
                                "another model, other data or settings); resume with that cache, through any path "
                                "to it, or use a new --out")
            k = changed[0]
            raise SettingsChanged(f"{out} was started with different settings ({', '.join(changed)}; e.g. {k}: "
                            f"{_short(old.get(k))} then, {_short(resolved[k])} now); resume with the same "
                            "settings or use a new --out")
        if ckpt.endswith(".pt") == resolved["sharded"]:
            was = "--parallel fsdp" if resolved["sharded"] is False else "one process or --parallel ddp"
            raise UserError(f"{ckpt} was written by a run under {was}; resume it the same way")
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, "summary.json"))
        moved = {k: resolved.get(k) for k in (*IDENTIFIED_BY, *IDENTIFIED_BY.values()) if old.get(k) != resolved.get(k)}
        if moved:  # the same cache or model, now at another path (or an older run's record, completed)
            write_json(os.path.join(out, "config.json"), {**old, **moved})
        return old["run_id"], ckpt
    # new, half-created, or a run killed before its first checkpoint: start over, config.json first
    _remove_own(out)
    run_id = f"{os.path.basename(os.path.normpath(out))}-{uuid.uuid4().hex[:8]}"
    write_json(os.path.join(out, "config.json"), {"kind": RUN_KIND, **resolved, "run_id": run_id})
    os.makedirs(os.path.join(out, "examples"), exist_ok=True)
    return run_id, None


def open_run_dir(out: str, resolved: dict, resume: bool, world: World):
    """Rank 0 locks and prepares `out`; every process gets (run_id, checkpoint or None, lock or None). A refusal
    raises the same UserError (SettingsChanged where it is one) on every process."""
    answer, lock = None, None
    if world.master:
        try:
            _refuse_foreign(out)  # before creating anything in it (again under the lock, below)
            os.makedirs(out, exist_ok=True)
            lock = DirLock(out, "train").acquire()
            answer = ("ok", *_prepare(out, resolved, resume))
        except BaseException as e:
            if lock:
                lock.release()
            if not isinstance(e, UserError):
                raise
            answer = ("error", str(e), isinstance(e, SettingsChanged))
    answer = world.broadcast(answer)
    if answer[0] == "error":
        raise (SettingsChanged if answer[2] else UserError)(answer[1])
    return answer[1], answer[2], lock


def _norm(v):
    return json.loads(json.dumps(v, default=str))


def _short(value, n=60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 1] + "…"
