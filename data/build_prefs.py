"""Rebuild the embedded preference data deterministically.

  .venv/bin/python data/build_prefs.py                 # writes data/prefs/{train,eval,implicit_sample}.jsonl
  .venv/bin/python data/build_prefs.py --out /tmp/prefs

Questions come from the same task world as the tiny model's corpus (data/synthetic.py). In every
valid pair `chosen` gives the correct answer and `rejected` a wrong one (check with
synthetic.solve / synthetic.final_answer). Categories (the "category" column):

  arith           explicit strings; bare answers, wrong by a typical slip (off by 1 or 10, dropped
                  carry, swapped digits) or further off
  near_identical  explicit strings; chosen and rejected differ in one or two digit tokens: either
                  " 85" vs " 86" or a whole worked explanation whose last number differs
  long_chosen     explicit strings; chosen is a worked explanation, rejected a bare wrong answer
  chat            conversational: prompt is [system?, user] messages, chosen/rejected one assistant message
  word            explicit strings; "which is larger", "reverse the word", "what comes next"

train.jsonl also holds 3 deliberately bad rows (category bad_*) at 0-based lines 50, 1200, 2300, so the
pipeline's rejected-rows report has something to show. eval.jsonl questions never occur in train
nor in the model's corpus. implicit_sample.jsonl shows the implicit-prompt format (not used by the demo).
"""

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import synthetic as S

TRAIN_COUNTS = {"arith": 720, "near_identical": 600, "long_chosen": 360, "chat": 480, "word": 240}
EVAL_COUNTS = {k: v // 10 for k, v in TRAIN_COUNTS.items()}
BAD_LINES = (50, 1200, 2300)
NUMERIC_KINDS = {"add": 0.3, "sub": 0.15, "mul": 0.15, "story": 0.2, "compare": 0.1, "next": 0.1}


def wrong_answer(rng, p, near_rate=0.5):
    pool = p.wrong_near if (p.wrong_near and rng.random() < near_rate) or not p.wrong_far else p.wrong_far
    return rng.choice(pool)


def make_row(rng, category, split):
    if category == "arith":
        p = S.draw_problem(rng, S.ARITH_KINDS, split)
        return {
            "prompt": S.plain_prompt(p.question),
            "chosen": " " + p.answer,
            "rejected": " " + wrong_answer(rng, p),
        }
    if category == "near_identical":
        while True:
            p = S.draw_problem(rng, NUMERIC_KINDS, split)
            if p.wrong_near:
                break
        w = rng.choice(p.wrong_near)
        if rng.random() < 0.6:
            chosen, rejected = " " + p.answer, " " + w
        else:
            chosen, rejected = " " + p.worked(), " " + p.worked(w)
        return {"prompt": S.plain_prompt(p.question), "chosen": chosen, "rejected": rejected}
    if category == "long_chosen":
        p = S.draw_problem(rng, S.ALL_KINDS, split)
        return {
            "prompt": S.plain_prompt(p.question),
            "chosen": " " + p.worked(),
            "rejected": " " + wrong_answer(rng, p),
        }
    if category == "chat":
        p = S.draw_problem(rng, S.ALL_KINDS, split)
        w = wrong_answer(rng, p)
        worked = rng.random() < 0.25
        return {
            "prompt": S.chat_messages(p.question, rng),
            "chosen": [{"role": "assistant", "content": p.worked() if worked else p.chat()}],
            "rejected": [{"role": "assistant", "content": p.worked(w) if worked else p.chat(w)}],
        }
    if category == "word":
        p = S.draw_problem(rng, S.WORD_KINDS, split)
        return {
            "prompt": S.plain_prompt(p.question),
            "chosen": " " + p.answer,
            "rejected": " " + wrong_answer(rng, p),
        }
    raise ValueError(category)


def check_row(row):
    """True when the row is a valid pair whose chosen answer is right and rejected answer wrong."""
    q = S.question_of(row["prompt"])
    truth = S.solve(q)
    return (
        truth is not None
        and S.final_answer(q, row["chosen"]) == truth
        and S.final_answer(q, row["rejected"]) != truth
    )


def build_split(rng, counts, split):
    rows, seen = [], set()
    for category, n in counts.items():
        got = 0
        while got < n:
            row = make_row(rng, category, split)
            key = json.dumps([row["prompt"], row["chosen"], row["rejected"]])
            if key in seen:
                continue
            assert check_row(row), row
            seen.add(key)
            rows.append(row | {"category": category})
            got += 1
    rng.shuffle(rows)
    first = {r["category"] for r in rows[:256]}
    assert first == set(counts), f"first 256 rows miss categories: {set(counts) - first}"
    return rows


def bad_rows(rng):
    """Three rows stage 1 must reject, each with a readable category."""
    ps = [S.draw_problem(rng, S.ARITH_KINDS, "train") for _ in range(3)]
    return [
        {
            "prompt": S.plain_prompt(ps[0].question),
            "chosen": " " + ps[0].answer,
            "rejected": " " + ps[0].answer,
            "category": "bad_identical",
        },
        {
            "prompt": S.plain_prompt(ps[1].question),
            "chosen": " " + ps[1].answer,
            "rejected": "",
            "category": "bad_empty_rejected",
        },
        {
            "prompt": S.plain_prompt(ps[2].question),
            "chosen": " " + ps[2].answer,
            "category": "bad_missing_rejected",
        },
    ]


def implicit_rows(rng, n=20):
    rows = []
    for i in range(n):
        p = S.draw_problem(rng, S.ALL_KINDS, "train")
        w = wrong_answer(rng, p)
        if i % 2 == 0:
            base = S.plain_prompt(p.question)
            rows.append({"chosen": base + " " + p.answer, "rejected": base + " " + w, "category": "implicit"})
        else:
            user = S.chat_messages(p.question)
            rows.append(
                {
                    "chosen": user + [{"role": "assistant", "content": p.chat()}],
                    "rejected": user + [{"role": "assistant", "content": p.chat(w)}],
                    "category": "implicit_chat",
                }
            )
    return rows


def write_jsonl(path, rows):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "prefs"))
    ap.add_argument("--seed", type=int, default=2024)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    train = build_split(rng, TRAIN_COUNTS, "train")
    evals = build_split(rng, EVAL_COUNTS, "eval")
    for line, row in zip(BAD_LINES, bad_rows(rng)):
        train.insert(line, row)  # ascending order, so each bad row ends up at exactly `line`
    implicit = implicit_rows(rng)

    os.makedirs(args.out, exist_ok=True)
    write_jsonl(os.path.join(args.out, "train.jsonl"), train)
    write_jsonl(os.path.join(args.out, "eval.jsonl"), evals)
    write_jsonl(os.path.join(args.out, "implicit_sample.jsonl"), implicit)
    for name, rows in (("train", train), ("eval", evals), ("implicit_sample", implicit)):
        counts = {}
        for r in rows:
            counts[r["category"]] = counts.get(r["category"], 0) + 1
        print(f"{name}: {len(rows)} rows {counts}")


if __name__ == "__main__":
    main()
