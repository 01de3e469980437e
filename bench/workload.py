"""Benchmark workload (issue 5): a ~30M-parameter Llama and ~1,000 preference pairs with realistic lengths.

Built locally under bench/work/ (gitignored), deterministically, and reused when present with the same settings:

    <work>/model/          Llama (head_dim 64) built by data/build_model.py, briefly trained
    <work>/pairs.jsonl     explicit-prompt pairs {"prompt", "chosen", "rejected"}; token lengths, measured with
                           the model's tokenizer, are log-uniform in [20, 300] for the prompt and for each
                           completion (EOS included), as in real preference sets: many short, a long tail
    <work>/pairs_sweep.jsonl   the first --sweep-pairs of them (the beta-sweep comparison)
    <work>/workload.json   settings, parameter count, token counts (what run.py reports)

    .venv/bin/python bench/workload.py                 # the full workload (model build takes a few minutes)
    .venv/bin/python bench/workload.py --quick         # toy size for smoke tests, under bench/work/quick/

The prompt ends with a newline and each completion starts with a letter, so the prompt/completion token
boundary is the same whether a tool tokenizes prompt and completion apart (refcache) or together (TRL).
"""

import argparse
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "data"))

FULL = {"hidden": 512, "layers": 9, "heads": 8, "intermediate": 1408, "vocab": 4096, "steps": 60, "pairs": 1000,
        "sweep_pairs": 256, "min_len": 20, "max_len": 300, "tokenizer_docs": 20000}
QUICK = {"hidden": 128, "layers": 4, "heads": 2, "intermediate": 352, "vocab": 512, "steps": 2, "pairs": 16,
         "sweep_pairs": 16, "min_len": 20, "max_len": 120, "tokenizer_docs": 2000}


def settings(quick):
    return dict(QUICK if quick else FULL)


def default_dir(quick):
    return ROOT / "bench" / "work" / ("quick/workload" if quick else "workload")


def log_uniform(rng, lo, hi):
    return round(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def sentence(rng, words, names, items):
    """One line of plain text from the synthetic world's vocabulary."""
    kind = rng.random()
    if kind < 0.3:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"{rng.choice(names)} has {a} {rng.choice(items)} and gets {b} more, so {a + b} in all."
    if kind < 0.5:
        return f"The {rng.choice(words)} is next to the {rng.choice(words)} near the {rng.choice(words)}."
    n = rng.randint(4, 12)
    return " ".join(rng.choice(words) for _ in range(n)).capitalize() + "."


def text_of_tokens(tok, rng, n_tokens, first_upper=True):
    """Text that tokenizes to exactly n_tokens tokens (cut on a token boundary, then checked)."""
    import synthetic

    parts, ids = [], []
    while len(ids) < n_tokens + 8:
        parts.append(sentence(rng, synthetic.WORDS, synthetic.NAMES, synthetic.ITEMS))
        text = " ".join(parts)
        ids = tok(text, add_special_tokens=False)["input_ids"]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    cut = enc["offset_mapping"][n_tokens - 1][1]
    text = text[:cut].rstrip()
    if first_upper:
        text = text[:1].upper() + text[1:]
    return text


def make_pairs(model_dir, n, seed, lo, hi):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        # Prompt: "Question <i>:" + text + newline; completions: text, EOS appended by the tools (counted here).
        p_len, c_len, r_len = (log_uniform(rng, lo, hi) for _ in range(3))
        state = rng.getstate()
        for extra in range(8):  # "Question: " and the newline may merge: grow the body until the length is hit
            rng.setstate(state)
            prompt = f"Question: {text_of_tokens(tok, rng, max(1, p_len - 4 + extra))}\n"
            if len(tok(prompt, add_special_tokens=False)["input_ids"]) >= p_len:
                break
        chosen = text_of_tokens(tok, rng, max(1, c_len - 1))
        rejected = text_of_tokens(tok, rng, max(1, r_len - 1))
        if rejected == chosen:
            rejected = rejected + " No."
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    # Measured lengths (what the tools will see: prompt alone; completion = prompt+completion minus prompt, + EOS).
    lens = []
    for r in rows:
        p = len(tok(r["prompt"], add_special_tokens=False)["input_ids"])
        c = len(tok(r["prompt"] + r["chosen"], add_special_tokens=False)["input_ids"]) - p + 1
        j = len(tok(r["prompt"] + r["rejected"], add_special_tokens=False)["input_ids"]) - p + 1
        lens.append((p, c, j))
    return rows, lens


def write_jsonl(path, rows):
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)


def build(out: Path, cfg: dict, seed=0, threads=None, log=print):
    """Build (or reuse) the workload in `out`; returns the workload.json record."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / "workload.json"
    want = {"settings": cfg, "seed": seed}
    if stamp.exists():
        rec = json.loads(stamp.read_text())
        if {k: rec.get(k) for k in want} == want and (out / "model" / "config.json").exists():
            log(f"workload: reusing {out}")
            return rec
    model = out / "model"
    built = model / "training.json"
    have = json.loads(built.read_text())["args"] if built.exists() else {}
    if any(have.get(k) != v for k, v in _model_args(cfg).items()) or have.get("seed") != seed:
        log(f"workload: building the model under {model} (data/build_model.py, {cfg['steps']} steps)")
        cmd = [sys.executable, str(ROOT / "data" / "build_model.py"), "--out", str(model),
               "--seed", str(seed), "--threads", str(threads or os.cpu_count() or 1),
               "--tokenizer-docs", str(cfg["tokenizer_docs"])]
        for k, v in _model_args(cfg).items():
            cmd += [f"--{k}", str(v)]
        subprocess.run(cmd, check=True)
    log(f"workload: writing {cfg['pairs']} pairs")
    rows, lens = make_pairs(model, cfg["pairs"], seed + 7, cfg["min_len"], cfg["max_len"])
    write_jsonl(out / "pairs.jsonl", rows)
    write_jsonl(out / "pairs_sweep.jsonl", rows[:cfg["sweep_pairs"]])

    mcfg = json.loads((model / "config.json").read_text())
    params = json.loads((model / "training.json").read_text())["params"]
    p, c, r = (sorted(x[i] for x in lens) for i in range(3))
    rec = want | {
        "model": str(model), "pairs_path": str(out / "pairs.jsonl"), "sweep_pairs_path": str(out / "pairs_sweep.jsonl"),
        "params": params, "vocab_size": mcfg["vocab_size"], "hidden_size": mcfg["hidden_size"],
        "num_hidden_layers": mcfg["num_hidden_layers"], "head_dim": mcfg.get("head_dim"),
        "n_pairs": len(rows), "lengths": [list(x) for x in lens],
        "tokens_unique": sum(a + b + c_ for a, b, c_ in lens),  # prompt + chosen + rejected
        "tokens_sequences": sum(2 * a + b + c_ for a, b, c_ in lens),  # prompt+chosen and prompt+rejected
        "length_stats": {name: {"min": v[0], "median": v[len(v) // 2], "max": v[-1], "mean": round(sum(v) / len(v), 1)}
                         for name, v in (("prompt", p), ("chosen", c), ("rejected", r))},
    }
    stamp.write_text(json.dumps(rec))
    log(f"workload: {params / 1e6:.1f}M params, {len(rows)} pairs, {rec['tokens_unique']:,} tokens "
        f"(prompt+chosen+rejected); lengths {rec['length_stats']}")
    return rec


def _model_args(cfg):
    return {k: cfg[k] for k in ("hidden", "layers", "heads", "intermediate", "vocab", "steps")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="toy size for smoke tests")
    ap.add_argument("--out", default=None, help="default bench/work/workload (bench/work/quick/workload)")
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="model training steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also copy workload.json here")
    args = ap.parse_args()
    cfg = settings(args.quick)
    if args.pairs:
        cfg["pairs"] = args.pairs
        cfg["sweep_pairs"] = min(cfg["sweep_pairs"], args.pairs)
    if args.steps is not None:
        cfg["steps"] = args.steps
    rec = build(Path(args.out) if args.out else default_dir(args.quick), cfg, args.seed, args.threads)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({k: v for k, v in rec.items() if k != "lengths"}, indent=1))


if __name__ == "__main__":
    main()
