"""One optimizer step, the probes and the eval pass: forward and backward over the policy through the shared
log-prob kernel (dpo/logps.py), the loss (dpo/losses.py), and every pair's numbers gathered from all processes
as `Scores`. `run` is the dpo.train.Run that `setup` builds.
"""

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from dpo.data import Pairs, collate, split_batch, split_tokens
from dpo.logps import batch_logps
from dpo.losses import BATCH_LEVEL, compute, needs
from dpo.parallel import clip_grad_norm, no_sync

if TYPE_CHECKING:
    from dpo.train import Run


@dataclass
class Scores:
    """Per-pair results of forward passes: float64 arrays aligned with `idx`, the pairs' rows in their cache."""

    idx: np.ndarray
    policy_chosen: np.ndarray  # summed completion log-probs under the policy
    policy_rejected: np.ndarray
    ref_chosen: np.ndarray  # the same under the reference (cached, or live)
    ref_rejected: np.ndarray
    loss: np.ndarray  # per-example loss
    reward_chosen: np.ndarray  # beta * (policy - ref)
    reward_rejected: np.ndarray

    @classmethod
    def of(cls, idx, **tensors) -> "Scores":
        return cls(idx=np.asarray(idx), **{k: t.detach().double().cpu().numpy() for k, t in tensors.items()})

    @classmethod
    def cat(cls, parts) -> "Scores":
        parts = list(parts)
        return cls(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in cls.__dataclass_fields__})

    @property
    def margin(self) -> np.ndarray:
        return self.reward_chosen - self.reward_rejected

    def __len__(self):
        return len(self.idx)

    def means(self) -> dict:
        """TRL's metrics over these pairs: loss, rewards (chosen, rejected, margin, accuracy), log-probs."""
        return {
            "loss": float(self.loss.mean()),
            "reward_chosen": float(self.reward_chosen.mean()),
            "reward_rejected": float(self.reward_rejected.mean()),
            "reward_margin": float(self.margin.mean()),
            "reward_accuracy": float((self.margin > 0).mean()),
            "policy_chosen_logp": float(self.policy_chosen.mean()),
            "policy_rejected_logp": float(self.policy_rejected.mean()),
            "ref_chosen_logp": float(self.ref_chosen.mean()),
            "ref_rejected_logp": float(self.ref_rejected.mean()),
        }


@dataclass
class StepResult:
    """One optimizer step: every pair of its batch (from all processes) and the step's own numbers."""

    scores: Scores
    lr: float  # the learning rate the update used
    grad_norm: float  # before clipping
    tokens: int  # non-pad tokens in the step's forward passes
    seconds: float


def train_step(run: "Run", step: int) -> StepResult:
    """Optimizer step `step`: forward and backward over this process's share of the step's batch (in pieces of
    at most max_tokens padded tokens), clip, update, and gather every pair's results from all processes."""
    t0 = time.perf_counter()
    cfg, world = run.cfg, run.world
    micro = split_batch(run.batch(step), run.train_pairs.seq_len, world.size * cfg.grad_accum)
    cost = run.train_pairs.packed_len if run.share_prompt else 2 * run.train_pairs.seq_len
    max_tokens = 0 if cfg.loss in BATCH_LEVEL else cfg.max_tokens  # aot ranks over the whole micro-batch
    pieces = [p for m in micro[world.rank :: world.size] for p in split_tokens(m, cost, max_tokens)]
    if run.sharded:  # every process runs the same number of forward passes: each one all-gathers the weights
        pieces = _split_to(pieces, world.max(len(pieces)))
    parts, tokens = [], 0
    for j, idx in enumerate(pieces):
        with no_sync(run.train_net, last=j == len(pieces) - 1):
            losses, scores, n = _forward(run, run.train_pairs, idx, run.train_net)
            (losses.sum() * (world.size / cfg.batch_size)).backward()
        parts.append(scores)
        tokens += n
    grad_norm = clip_grad_norm(run.opt.param_groups[0]["params"], cfg.max_grad_norm)
    lr = run.sched.get_last_lr()[0]
    run.opt.step()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    gathered = world.gather((Scores.cat(parts), tokens))
    return StepResult(scores=Scores.cat(s for s, _ in gathered), lr=lr, grad_norm=grad_norm,
                      tokens=sum(t for _, t in gathered), seconds=time.perf_counter() - t0)


def probe(run: "Run") -> list:
    """Score the probe pairs with the current weights: [(split, pairs, Scores)], the same on every process."""
    return [(split, pairs, score(run, pairs, subset)) for split, pairs, subset in run.probes]


def evaluate(run: "Run") -> Scores:
    """Score every pair of the eval cache with the current weights (the eval pass)."""
    return score(run, run.eval_pairs, np.arange(len(run.eval_pairs)))


def score(run: "Run", pairs: Pairs, subset: np.ndarray) -> Scores:
    """Score pairs `subset` without gradients: length-sorted chunks, dealt out to the processes, gathered."""
    world = run.world
    chunks = _chunks(subset, pairs.seq_len, max(run.cfg.batch_size // (world.size * run.cfg.grad_accum), 8))
    mine = chunks[world.rank :: world.size]
    rounds = -(-len(chunks) // world.size) if run.sharded else len(mine)  # FSDP: the same number everywhere
    parts = []
    with torch.no_grad():
        for i in range(rounds):
            _, scores, _ = _forward(run, pairs, mine[i] if i < len(mine) else chunks[0], run.net)
            if i < len(mine):
                parts.append(scores)
    return Scores.cat(p for ps in world.gather(parts) for p in ps)


def _forward(run: "Run", pairs: Pairs, idx: np.ndarray, net):
    """Policy (through `net`) and reference log-probs of pairs `idx`, and the loss: (losses (b,), Scores, tokens)."""
    device = run.world.device
    batch = collate(pairs, idx, share_prompt=run.share_prompt)
    with run.autocast:
        pc, pr, _ = batch_logps(net, batch, device)
    if run.ref_net is None:
        rc, rr = batch["ref_chosen_logp"].to(device), batch["ref_rejected_logp"].to(device)
    else:
        with torch.no_grad(), run.autocast:
            rc, rr, _ = batch_logps(run.ref_net, batch, device)
    logps = {"policy_chosen_logps": pc, "policy_rejected_logps": pr, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    data = {k: batch[k].to(device) for k in needs(run.cfg.loss)}
    losses, rwc, rwr = compute(run.cfg.loss, logps, data, run.loss_params)
    scores = Scores.of(idx, policy_chosen=pc, policy_rejected=pr, ref_chosen=rc, ref_rejected=rr, loss=losses,
                       reward_chosen=rwc, reward_rejected=rwr)
    return losses, scores, batch["tokens"]


def _chunks(subset, lengths, size):
    order = subset[np.argsort(-lengths[subset], kind="stable")]
    return [order[i : i + size] for i in range(0, len(order), size)]


def _split_to(pieces: list, n: int) -> list:
    """Split the largest pieces in two until there are `n` (each process has as many pairs, at least one per
    piece, so n pieces always exist). The gradient is a sum over pairs: unchanged."""
    pieces = list(pieces)
    while len(pieces) < n:
        i = max(range(len(pieces)), key=lambda j: len(pieces[j]))
        half = len(pieces[i]) // 2
        pieces[i : i + 1] = [pieces[i][:half], pieces[i][half:]]
    return pieces
