"""vLLM vs hf on the real model (SmolLM2-135M-Instruct, fp32): every completion token within verify's fp32
tolerance |diff| <= 1e-4 + 1e-5 |log p|, on chat rows (its ChatML template) and longer plain-text pairs;
`refcache verify` passes on the vLLM cache; CHES from vLLM's second engine equals hf's within 1e-4 of each score's
scale. One vLLM scorer (its two engines) for the module."""

import json

import numpy as np
import pytest
from oracles import ches_diff

from pipeline.backends import HFScorer
from pipeline.cache import load_table
from pipeline.precompute import format_summary, precompute
from pipeline.verify import TOLERANCE, compare
from refcache.cli import main as cli_main

CHAT_ROWS = 24

# Longer plain-text pairs (a few hundred tokens each): explanations whose rejected side drifts or errs.
TOPICS = [
    ("Why is the sky blue?",
     ("Sunlight contains every colour. Air molecules scatter short wavelengths far more than long ones, so blue "
      "light is scattered across the whole sky and reaches our eyes from every direction."),
     "The sky is blue because it reflects the colour of the oceans, which cover most of the planet's surface."),
    ("How does a refrigerator keep food cold?",
     ("A refrigerant evaporates inside the cabinet and absorbs heat; a compressor then squeezes the vapour, and "
      "the coils at the back release that heat into the kitchen before the cycle repeats."),
     "A refrigerator makes cold by burning a small amount of gas, and the cold smoke is blown over the food."),
    ("What causes the seasons on Earth?",
     ("The Earth's axis is tilted by about 23 degrees. As it orbits the Sun, each hemisphere takes turns leaning "
      "towards the Sun, receiving more direct light and longer days in its summer."),
     "The seasons happen because the Earth moves much closer to the Sun in summer and much further in winter."),
    ("Describe how a bill becomes a law in a parliament.",
     ("A bill is drafted and introduced, debated in readings, examined line by line in committee, amended, voted "
      "on in each chamber, and finally signed or assented to by the head of state."),
     "A bill becomes a law as soon as one member of parliament writes it down and reads it aloud once."),
    ("Explain what a hash table is to a new programmer.",
     ("A hash table stores values under keys. A hash function turns each key into an index in an array, so a "
      "lookup jumps straight to the right slot; collisions are handled by chaining or probing."),
     "A hash table is a table made of hashes that sorts your data alphabetically so you can read it faster."),
    ("Why do we need sleep?",
     ("During sleep the brain consolidates memories, clears metabolic waste, and the body repairs tissue and "
      "regulates hormones; without it attention, mood and immunity all decline."),
     "We need sleep mainly so that our eyes can rest, since the rest of the body does not change at night."),
    ("How do vaccines work?",
     ("A vaccine shows the immune system a harmless piece or copy of a pathogen, so it learns to make antibodies "
      "and memory cells that respond quickly if the real pathogen appears later."),
     "Vaccines work by killing every germ in the body at once, which is why people never get ill afterwards."),
    ("What is inflation and why does it matter?",
     ("Inflation is the general rise of prices over time, which lowers what a unit of money buys; it matters for "
      "savings, wages, interest rates and the decisions central banks make."),
     "Inflation is when a country prints bigger banknotes; it does not affect prices or what people can buy."),
]


def long_pairs():
    """Each topic as a plain-text pair: a prompt with some context and answers three paragraphs long."""
    rows = []
    for i, (q, good, bad) in enumerate(TOPICS):
        prompt = (f"The following is a question from a student, answered by a careful teacher who explains the "
                  f"reasoning step by step and avoids common misconceptions.\n\nQuestion {i + 1}: {q}\nAnswer:")
        rows.append({"prompt": prompt,
                     "chosen": " " + " ".join([good, "To put it another way: " + good, "In short, " + good]),
                     "rejected": " " + " ".join([bad, "To put it another way: " + bad, "In short, " + bad])})
    return rows


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory, prefs_dir):
    chat = [r for r in map(json.loads, (prefs_dir / "train.jsonl").open()) if r.get("category") == "chat"]
    rows = chat[:CHAT_ROWS] + long_pairs()
    path = tmp_path_factory.mktemp("real") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def smollm2_vllm(smollm2_dir, start_vllm):
    scorer, _ = start_vllm(smollm2_dir, max_model_len=1025)
    yield scorer
    scorer.close()


def _token_logps(cache):
    t = load_table(cache, ["chosen_ids", "ref_chosen_token_logps", "ref_rejected_token_logps"])
    lps = [np.asarray(x, np.float64) for pair in zip(t.column(1).to_pylist(), t.column(2).to_pylist())
           for x in pair]  # chosen, rejected, chosen, ... as verify.compare takes them
    return lps, max(map(len, t.column(0).to_pylist()))


def test_vllm_matches_hf_on_smollm2_fp32(tmp_path, smollm2_vllm, smollm2_dir, pairs_file, capsys):
    vcache, hcache = tmp_path / "vllm", tmp_path / "hf"
    s = precompute(pairs_file, smollm2_dir, vcache, dtype="float32", progress=False, scorer=smollm2_vllm)
    assert s["complete"] and s["rows_kept"] == CHAT_ROWS + len(TOPICS)
    precompute(pairs_file, smollm2_dir, hcache, backend="hf", dtype="float32", progress=False)
    assert load_table(vcache, ["chosen_ids"]).equals(load_table(hcache, ["chosen_ids"]))

    vllm_lp, longest = _token_logps(vcache)
    hf_lp, _ = _token_logps(hcache)
    assert longest >= 100  # the plain-text pairs reach well past the chat rows' lengths
    atol, rtol = TOLERANCE["float32"]
    r = compare(hf_lp, vllm_lp, atol, rtol, beta=0.1)
    with capsys.disabled():
        print(f"\nSmolLM2 fp32, vLLM vs hf: {r['tokens']} tokens, per-token |diff| max {r['max_abs_diff']:.3g} "
              f"(mean {r['mean_abs_diff']:.2g}); worst |diff| / ({atol:g} + {rtol:g}|log p|) = "
              f"{r['worst_ratio']:.2f} at log p {r['worst_logp']:.3g}; margin error at beta 0.1 max "
              f"{r['margin_error_max']:.2g}")
    assert r["passed"], r

    # CHES: finite for every pair; on a handful of them (chat rows and the long pairs) equal to hf's within 1e-4 of
    # each score's scale (tests/oracles.direct_ches)
    cols = ["prompt_ids", "chosen_ids", "rejected_ids", "ches", "ln_ches"]
    vrows, hrows = load_table(vcache, cols).to_pylist(), load_table(hcache, cols).to_pylist()
    assert all(np.isfinite(x["ches"]) and np.isfinite(x["ln_ches"]) for x in vrows)
    some = slice(None, None, 4)
    worst = ches_diff(HFScorer(smollm2_dir, "float32").model, vrows[some], hrows[some])
    with capsys.disabled():
        print(f"SmolLM2 fp32, vLLM vs hf CHES on {len(vrows[some])} pairs: max |diff| / scale: ches "
              f"{worst['ches']:.2g}, ln_ches {worst['ln_ches']:.2g}; "
              + next(x for x in format_summary(s).splitlines() if x.startswith("CHES cost")))
    assert worst["ches"] <= 1e-4 and worst["ln_ches"] <= 1e-4

    # `refcache verify` re-scores the vLLM cache with hf (its two-rows-per-pair oracle) and agrees
    capsys.readouterr()
    assert cli_main(["verify", str(vcache), "--sample", "64"]) == 0
    out = capsys.readouterr().out
    with capsys.disabled():
        print(out)
    assert f"{CHAT_ROWS + len(TOPICS)} pairs" in out and "against the vllm cache" in out and ": OK" in out
