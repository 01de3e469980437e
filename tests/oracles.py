"""Plain-Python reference computations the tests check SQL and numpy results against (pytest puts tests/ on
sys.path: `from oracles import ...`)."""


def levenshtein(a, b) -> int:
    """Token edit distance, the textbook dynamic programme (independent of the SQL macro)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def direct_ches(model, prompt, chosen, rejected):
    """CHES (pipeline/ches.py) the paper's way, in fp64 from two separate forwards of an hf model: h = the last entry
    of output_hidden_states (the LM head's input) at the positions predicting each completion token. Returns
    (ches, ln_ches, (scale, scale_ln)): each scale is the size of the two dot products that cancel in the score
    (|a||b| bounds a dot product's rounding), what a tolerance is relative to, as fp32 kernels of other engines
    and CPUs round differently."""
    import torch

    def hs(completion):
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            h = model(ids, output_hidden_states=True).hidden_states[-1][0].double()
        return h[len(prompt) - 1 : len(prompt) + len(completion) - 1]

    hp, hn = hs(chosen), hs(rejected)
    assert hp.shape[0] == len(chosen) and hn.shape[0] == len(rejected)
    sp, sn, mp, mn = hp.sum(0), hn.sum(0), hp.mean(0), hn.mean(0)
    scale = tuple((a.norm() * (a.norm() + b.norm())).item() for a, b in ((sp, sn), (mp, mn)))
    return (sp @ sn - sp @ sp).item(), (mp @ mn - mp @ mp).item(), scale


def ches_diff(model, rows, other) -> dict:
    """The largest difference between two caches' CHES over the same pairs, relative to each score's scale
    (direct_ches): rows and other are lists of dicts with prompt_ids, chosen_ids, rejected_ids, ches, ln_ches."""
    worst = {"ches": 0.0, "ln_ches": 0.0}
    for a, b in zip(rows, other):
        assert a["chosen_ids"] == b["chosen_ids"] and a["rejected_ids"] == b["rejected_ids"]
        *_, (scale, scale_ln) = direct_ches(model, a["prompt_ids"], a["chosen_ids"], a["rejected_ids"])
        worst["ches"] = max(worst["ches"], abs(a["ches"] - b["ches"]) / scale)
        worst["ln_ches"] = max(worst["ln_ches"], abs(a["ln_ches"] - b["ln_ches"]) / scale_ln)
    return worst
