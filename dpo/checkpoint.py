"""A run's checkpoints: RUN/checkpoints/step-NNNNNNNN.pt (one file from rank 0; the model is whole on every process)
or step-NNNNNNNN/ (FSDP: every process writes its shards through torch.distributed.checkpoint, plus trainer.pt
and one rng-rankR.pt per process). Each holds the trainable weights, AdamW state, scheduler, RNG, data position
and the log rows before its step (`rows`, from dpo/runlog.py), so a resume continues exactly.
"""

import os
import random
import shutil
import sys

import numpy as np
import torch

from dpo import parallel
from dpo.model import load_trainable, trainable_state
from refcache_base import UserError
from refcache_base.files import save_torch, swap_dir


def listed(out: str) -> list:
    """Complete checkpoints, oldest first (a step-N.pt.tmp or step-N.tmp being written is not one)."""
    found = []
    folder = os.path.join(out, "checkpoints")
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        path = os.path.join(folder, name)
        if name.startswith("step-") and ((name.endswith(".pt") and len(name) == 16) or
                                         (len(name) == 13 and os.path.isdir(path))):
            found.append((name[5:13], path))
    return [p for _, p in sorted(found)]


def latest(out: str) -> str | None:
    found = listed(out)
    return found[-1] if found else None


def save(run, step: int, rows: dict, keep: int):
    """Checkpoint `run` after `step` updates with the log rows `rows`, then keep the newest `keep` checkpoints."""
    world = run.world
    path = os.path.join(run.cfg.out, "checkpoints", f"step-{step:08d}")
    state = {**rows, "step": step, "scheduler": run.sched.state_dict(),
             "data": {"epoch": step // run.steps_per_epoch, "batch": step % run.steps_per_epoch,
                      "steps_per_epoch": run.steps_per_epoch, "seed": run.cfg.seed}, "world_size": world.size}
    if run.sharded:
        _save_sharded(run, state, path)
    elif world.master:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_torch({**state, "model": trainable_state(run.policy), "optimizer": run.opt.state_dict(),
                    "rng": get_rng()}, path + ".pt")
    if world.master:
        for old in listed(run.cfg.out)[: -max(1, keep)]:
            shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
    world.barrier()


def _save_sharded(run, state: dict, path: str):
    world, tmp = run.world, path + ".tmp"
    if world.master:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    world.barrier()
    parallel.save_sharded(tmp, run.net, run.opt)
    save_torch(get_rng(), os.path.join(tmp, f"rng-rank{world.rank}.pt"))
    world.barrier()
    if world.master:
        save_torch(state, os.path.join(tmp, "trainer.pt"))
        swap_dir(tmp, path)  # over an existing one: the final checkpoint again, after a resume from it


def resume(run) -> dict:
    """Restore the newest checkpoint that can be read into `run`; returns its trainer state (step, rows, ...).
    One a process died while writing (or a copy cut short) is passed over, with a note, for the one before it;
    none readable is one line."""
    found, skipped = listed(run.cfg.out), []
    for path in reversed(found):
        try:
            state = restore(run, path)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - torch's and DCP's errors for a cut or damaged file
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            skipped.append((path, first.split(". ")[0][:200]))  # torch's first sentence says what failed
            continue
        for bad, why in skipped if run.world.master else ():
            print(f"note: {bad}: cannot be read ({why}); resumed from {os.path.basename(path)} instead",
                  file=sys.stderr)
        return state
    bad, why = skipped[0] if skipped else (run.cfg.out, "no checkpoint")
    raise UserError(f"{bad}: cannot be read ({why}), nor can any earlier checkpoint; start a new --out")


def restore(run, path: str) -> dict:
    """Load checkpoint `path` into run (weights, optimizer, scheduler, RNG); returns its trainer state."""
    if path.endswith(".pt"):
        state = torch.load(path, map_location=run.world.device, weights_only=False)
        load_trainable(run.policy, state["model"])
        run.opt.load_state_dict(state["optimizer"])
        rng = state["rng"]
    else:
        state = torch.load(os.path.join(path, "trainer.pt"), weights_only=False)
        parallel.load_sharded(path, run.net, run.opt)
        mine = os.path.join(path, f"rng-rank{run.world.rank}.pt")
        rng = torch.load(mine if os.path.exists(mine) else os.path.join(path, "rng-rank0.pt"), weights_only=False)
    data = state["data"]
    if data["steps_per_epoch"] != run.steps_per_epoch or data["seed"] != run.cfg.seed:
        raise UserError(f"{path}: written for another data order ({data}); resume with the same settings")
    run.sched.load_state_dict(state["scheduler"])
    set_rng(rng)
    return state


def get_rng() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng(s: dict):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
