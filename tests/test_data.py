"""The embedded default in data/: the tiny reference model and the preference sets."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data")
MODEL = os.path.join(DATA, "tiny-llama")
PREFS = os.path.join(DATA, "prefs")


def _load(name):
    sys.path.insert(0, DATA)
    spec = importlib.util.spec_from_file_location(name, os.path.join(DATA, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


S = _load("synthetic")
build_model = _load("build_model")
build_prefs = _load("build_prefs")


def _read(name):
    with open(os.path.join(PREFS, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def train():
    return _read("train.jsonl")


@pytest.fixture(scope="module")
def evals():
    return _read("eval.jsonl")


def _valid(rows):
    return [r for r in rows if not r["category"].startswith("bad_")]


def _prompt_text(tok, prompt):
    if isinstance(prompt, list):
        return tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return prompt


def _completion_text(tok, prompt, completion):
    if isinstance(prompt, list):
        full = tok.apply_chat_template(prompt + completion, tokenize=False)
        head = _prompt_text(tok, prompt)
        assert full.startswith(head)
        return full[len(head) :]
    return completion


# ---- model -------------------------------------------------------------------------------------


def test_model_config_and_size(model, tok):
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.architectures == ["LlamaForCausalLM"]
    assert cfg.hidden_size // cfg.num_attention_heads == 64 and cfg.head_dim == 64
    assert cfg.vocab_size == len(tok)
    assert next(model.parameters()).dtype == torch.float32
    size = os.path.getsize(os.path.join(MODEL, "model.safetensors"))
    assert size <= 20 * 2**20, size


def test_tokenizer_special_tokens_and_chat_template(tok):
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    assert tok.chat_template
    msgs = [
        {"role": "system", "content": "Answer briefly and correctly."},
        {"role": "user", "content": "What is 12 + 30?"},
    ]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert prompt == build_model.render_chat(msgs, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "12 + 30 = 42."}], tokenize=False)
    assert full == prompt + "12 + 30 = 42." + tok.eos_token
    # the prompt's tokens are a prefix of the whole conversation's: the split at the assistant turn is exact
    p_ids, f_ids = tok(prompt)["input_ids"], tok(full)["input_ids"]
    assert f_ids[: len(p_ids)] == p_ids and f_ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(p_ids[-2:]) == ["<|assistant|>", "Ċ"]
    # plain prompts split exactly too, and digits are one token each
    a = tok("Question: What is 37 + 48?\nAnswer:")["input_ids"]
    b = tok("Question: What is 37 + 48?\nAnswer: 85")["input_ids"]
    assert b[: len(a)] == a and tok.convert_ids_to_tokens(b[len(a) :]) == ["Ġ", "8", "5"]
    assert tok("x")["input_ids"][0] != tok.bos_token_id  # no BOS added implicitly


def test_tokenizer_rebuilds_identically(tmp_path):
    with open(os.path.join(MODEL, "training.json")) as f:
        args = json.load(f)["args"]
    fresh = build_model.train_tokenizer(args["vocab"], args["tokenizer_docs"])
    build_model.save_tokenizer(fresh, str(tmp_path))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(MODEL, name), "rb") as f1, open(tmp_path / name, "rb") as f2:
            assert f1.read() == f2.read(), name


def test_model_is_trained_far_below_uniform(model, tok):
    docs = build_model.corpus(seed=777_777, n=64)  # fresh documents, not the training stream
    loss = build_model.mean_token_loss(model, tok, docs)
    uniform = math.log(len(tok))
    assert loss < 0.3 * uniform, (loss, uniform)


def _completion_logps(model, tok, pairs):
    """Sum of log p(completion tokens + EOS | prompt) for (prompt, completion) strings, one padded batch."""
    seqs = [
        (tok(p)["input_ids"], tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        for p, c in pairs
    ]
    T = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), T), tok.pad_token_id)
    attn, comp = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, c) in enumerate(seqs):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attn[i, : len(p) + len(c)] = 1
        comp[i, len(p) : len(p) + len(c)] = True
    with torch.no_grad():
        lp = model(input_ids=ids, attention_mask=attn).logits[:, :-1].log_softmax(-1)
    lp = lp.gather(-1, ids[:, 1:, None])[..., 0]
    return (lp * comp[:, 1:]).sum(-1)


def test_model_prefers_correct_answers(model, tok, evals):
    """On held-out questions the reference already ranks the correct bare answer above the wrong one
    more often than not: its log-probs carry task knowledge, not just format."""
    rows = [r for r in evals if r["category"] in ("arith", "word")]
    lps = _completion_logps(model, tok, [(r["prompt"], r[s]) for r in rows for s in ("chosen", "rejected")])
    win_rate = (lps[0::2] > lps[1::2]).float().mean().item()
    assert win_rate > 0.6, win_rate


# ---- preference data ---------------------------------------------------------------------------


def test_counts_per_split_and_category(train, evals):
    def counts(rows):
        out = {}
        for r in rows:
            out[r["category"]] = out.get(r["category"], 0) + 1
        return out

    assert counts(_valid(train)) == build_prefs.TRAIN_COUNTS
    assert counts(evals) == build_prefs.EVAL_COUNTS
    assert len(_valid(train)) >= 2000 and len(evals) >= 200
    assert len(train) == len(_valid(train)) + 3
    bad = {i: r["category"] for i, r in enumerate(train) if r["category"].startswith("bad_")}
    assert bad == {50: "bad_identical", 1200: "bad_empty_rejected", 2300: "bad_missing_rejected"}
    assert train[50]["chosen"] == train[50]["rejected"]
    assert train[1200]["rejected"] == ""
    assert "rejected" not in train[2300]
    assert {r["category"] for r in train[:256]} >= set(build_prefs.TRAIN_COUNTS)


def test_formats_and_lengths(train, evals, tok):
    for r in _valid(train) + evals:
        if r["category"] == "chat":
            assert [m["role"] for m in r["prompt"]] in (["user"], ["system", "user"])
            for side in ("chosen", "rejected"):
                assert len(r[side]) == 1 and r[side][0]["role"] == "assistant" and r[side][0]["content"]
        else:
            assert isinstance(r["prompt"], str) and r["prompt"].endswith("\nAnswer:")
            assert r["chosen"].startswith(" ") and r["rejected"].startswith(" ")
        p = tok(_prompt_text(tok, r["prompt"]))["input_ids"]
        assert len(p) <= 128
        for side in ("chosen", "rejected"):
            c = tok(_completion_text(tok, r["prompt"], r[side]), add_special_tokens=False)["input_ids"]
            assert 1 <= len(c) <= 64


def test_chosen_is_correct_and_rejected_wrong(train, evals):
    for r in _valid(train) + evals:
        q = S.question_of(r["prompt"])
        truth = S.solve(q)
        assert truth is not None, r
        assert S.final_answer(q, r["chosen"]) == truth, r
        assert S.final_answer(q, r["rejected"]) != truth, r
    # and the checker does catch a swap
    r = _valid(train)[0]
    assert not build_prefs.check_row(r | {"chosen": r["rejected"], "rejected": r["chosen"]})


def test_near_identical_and_long_chosen(train, tok):
    near = [r for r in train if r["category"] == "near_identical"]
    for r in near:
        c = tok(r["chosen"], add_special_tokens=False)["input_ids"]
        j = tok(r["rejected"], add_special_tokens=False)["input_ids"]
        assert len(c) == len(j) and 1 <= sum(a != b for a, b in zip(c, j)) <= 2, r
    assert sum(len(r["chosen"]) > 30 for r in near) > len(near) // 4  # some share a long worked prefix
    for r in (r for r in train if r["category"] == "long_chosen"):
        assert len(tok(r["chosen"])["input_ids"]) > 2 * len(tok(r["rejected"])["input_ids"]), r


def test_train_eval_disjoint(train, evals):
    def questions(rows):
        return {S.question_of(r["prompt"]) for r in rows}

    tq, eq = questions(_valid(train)), questions(evals)
    assert not tq & eq
    # eval questions come from the reserved part of the question space, which the model's corpus avoids
    assert all(S.is_eval_key(S.parse(q).key) for q in eq)
    assert not any(S.is_eval_key(S.parse(q).key) for q in tq)
    docs = build_model.corpus(seed=0, n=500)
    asked = [
        q for d in docs for q in re.findall(r"Question: (.*)\n|<\|user\|>\n(.*?)</s>", d) for q in q if q
    ]
    assert len(asked) == 500 and not any(S.is_eval_key(S.parse(q).key) for q in asked)
    rows = [json.dumps([r["prompt"], r["chosen"], r["rejected"]]) for r in _valid(train)]
    assert len(rows) == len(set(rows))


def test_build_prefs_is_deterministic(tmp_path):
    subprocess.run(
        [sys.executable, os.path.join(DATA, "build_prefs.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for name in ("train.jsonl", "eval.jsonl", "implicit_sample.jsonl"):
        with open(os.path.join(PREFS, name), "rb") as f1, open(tmp_path / name, "rb") as f2:
            assert f1.read() == f2.read(), name
