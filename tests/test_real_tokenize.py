"""Chat-template completions on a real tokenizer (SmolLM2's ChatML) and on templates that differ.

The rule under test: for a conversational row, `prompt_ids + chosen_ids` is exactly the chat template's
rendering of prompt + chosen, tokenized as refcache tokenizes rendered text (add_special_tokens=False, as
apply_chat_template(tokenize=True) does): the template's own end of turn and trailing text end the completion,
nothing is appended. Plain-text completions end with one EOS. A conversation the rule cannot split exactly is
rejected with a reason, never split elsewhere.
"""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from pipeline import cache
from pipeline.data import Pair, Source, normalize
from pipeline.precompute import format_summary, precompute
from pipeline.tokenize import PairTokenizer, settings
from refcache import UserError

REAL = Path(__file__).resolve().parents[1] / "data" / "prefs" / "real"
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM"  # ChatML default system message (SmolLM2's template)

# Templates that differ from ChatML, for the tiny model's tokenizer (special tokens <s>, </s>, <|role|>).
TINY_TEMPLATE = None  # the tokenizer's own: "<|role|>\n{content}</s>", generation prompt "<|assistant|>\n"
TRAILING = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")  # text after the end of turn
WITH_BOS = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")  # Llama-3 style BOS
NO_GENERATION_PROMPT = "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token }}{% endfor %}"
THINK = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|assistant|>\n<think>\n\n</think>\n\n' }}{% endif %}")
ALTERNATE = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
             "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
             "{% endif %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")  # Llama-2 / Mistral style


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def tiny_with(tiny_model_dir, template):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    if template is not None:
        tok.chat_template = template
    return tok


def real_pairs(name, prompt_split="auto"):
    src = Source(REAL / name)
    return [normalize(row, src.columns, prompt_split) for row in src.rows()]


def rendered_ids(tok, messages):
    """The reference: the template's text for the whole conversation, tokenized as rendered text."""
    return tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]


def assert_exact(tok, kept):
    for t in kept:
        for side, ids in (("chosen", t.chosen_ids), ("rejected", t.rejected_ids)):
            assert t.prompt_ids + ids == rendered_ids(tok, t.pair.prompt + getattr(t.pair, side)), (t.pair.index, side)


def test_smollm2_chatml_completions_are_exactly_the_template(smol):
    pairs = real_pairs("conversational.jsonl") + real_pairs("ultrafeedback.jsonl")
    kept, rejected = PairTokenizer(smol, max_length=1024, max_prompt_length=512)(pairs)
    assert not rejected and len(kept) == 34 + 24
    assert_exact(smol, kept)
    assert not any(t.boundary_merged for t in kept)  # ChatML: prompt_ids are the generation prompt's own tokens
    im_end, newline = smol.convert_tokens_to_ids(["<|im_end|>", "Ċ"])
    for t in kept:
        # TRL's path (apply_chat_template tokenizing itself) gives the same ids
        full = smol.apply_chat_template(t.pair.prompt + t.pair.chosen, tokenize=True)["input_ids"]
        assert t.prompt_ids + t.chosen_ids == full
        for ids in (t.chosen_ids, t.rejected_ids):
            assert ids[-2:] == [im_end, newline] and ids.count(im_end) == 1  # ends its turn once, nothing after
        assert smol.decode(t.prompt_ids).endswith("<|im_start|>assistant\n")
        has_system = t.pair.prompt[0]["role"] == "system"
        assert (SMOL_SYSTEM in smol.decode(t.prompt_ids)) == (not has_system)  # ChatML injects its default
    assert any(t.pair.prompt[0]["role"] == "system" for t in kept)
    assert any(len(t.pair.prompt) >= 3 for t in kept)  # multi-turn prompts too


def test_smollm2_plain_text_completions_end_with_one_eos(smol):
    kept, rejected = PairTokenizer(smol, max_length=1024, max_prompt_length=512)(real_pairs("hh_rlhf.jsonl"))
    assert not rejected and len(kept) == 34 and not any(t.boundary_merged for t in kept)
    for t in kept:
        for side, ids in (("chosen", t.chosen_ids), ("rejected", t.rejected_ids)):
            assert ids[-1] == smol.eos_token_id and ids.count(smol.eos_token_id) == 1
            assert t.prompt_ids + ids[:-1] == smol(t.pair.prompt + getattr(t.pair, side))["input_ids"]
        assert smol.decode(t.prompt_ids).endswith("\n\nAssistant:")


@pytest.mark.parametrize("template", [TINY_TEMPLATE, TRAILING, WITH_BOS, NO_GENERATION_PROMPT],
                         ids=["tiny-own", "trailing-text", "bos-in-template", "no-generation-prompt"])
def test_other_templates_keep_the_rule(tiny_model_dir, template):
    tok = tiny_with(tiny_model_dir, template)
    pairs = real_pairs("conversational.jsonl") + real_pairs("ultrafeedback.jsonl")
    kept, rejected = PairTokenizer(tok, max_length=1024, max_prompt_length=512)(pairs)
    assert not rejected and len(kept) == len(pairs)
    assert_exact(tok, kept)
    eos, bos = tok.eos_token_id, tok.bos_token_id
    tail = tok("</s>\n\n", add_special_tokens=False)["input_ids"] if template == TRAILING else [eos]
    for t in kept:
        for ids in (t.chosen_ids, t.rejected_ids):
            assert ids[-len(tail):] == tail and ids.count(eos) == 1  # the template's end, no EOS appended
        assert t.prompt_ids.count(bos) == (1 if template == WITH_BOS else 0)  # no second BOS
        if template == NO_GENERATION_PROMPT:  # the assistant header is part of what the template renders
            assert tok.decode(t.chosen_ids).startswith("<|assistant|>\n")
        else:
            assert tok.decode(t.prompt_ids).endswith("<|assistant|>\n")


def test_a_generation_prompt_that_is_not_a_prefix_is_rejected(tiny_model_dir):
    tok = tiny_with(tiny_model_dir, THINK)
    pairs = real_pairs("conversational.jsonl")
    kept, rejected = PairTokenizer(tok)(pairs)
    assert not kept and len(rejected) == len(pairs)
    reason = str(rejected[0][1])
    assert rejected[0][1].kind == "not_a_prefix"
    assert "not a prefix" in reason and "<think>" in reason and "\n" not in reason, reason


def test_two_user_turns_rejected_when_the_template_refuses(tiny_model_dir):
    tok = tiny_with(tiny_model_dir, ALTERNATE)
    user = [{"role": "user", "content": "Hi."}, {"role": "user", "content": "Are you there?"}]
    ok = [{"role": "user", "content": "Are you there?"}]
    a, b = [{"role": "assistant", "content": "Yes."}], [{"role": "assistant", "content": "No."}]
    kept, rejected = PairTokenizer(tok)([Pair(0, "f", "x", "conversational", user, a, b),
                                         Pair(1, "f", "y", "conversational", ok, a, b)])
    assert [t.pair.index for t in kept] == [1]
    assert [p.index for p, _ in rejected] == [0]
    reason = str(rejected[0][1])
    assert "Conversation roles must alternate" in reason and "\n" not in reason and rejected[0][1].kind == "template_error"


def test_truncation_cuts_chat_completions_from_the_right(smol):
    pairs = real_pairs("conversational.jsonl")
    pt = PairTokenizer(smol, max_length=96, max_prompt_length=48)
    kept, rejected = pt(pairs)
    assert all("longer than max_length 96" in str(r) and r.kind == "too_long" for _, r in rejected)  # long prompts
    assert len(kept) >= 20
    im_end = smol.convert_tokens_to_ids("<|im_end|>")
    cut = 0
    for t in kept:
        p_text = smol.apply_chat_template(t.pair.prompt, tokenize=False, add_generation_prompt=True)
        p_ids = smol(p_text, add_special_tokens=False)["input_ids"]
        assert len(t.prompt_ids) + max(len(t.chosen_ids), len(t.rejected_ids)) <= 96
        if not t.truncated:
            assert_exact(smol, [t])
            continue
        assert t.prompt_ids == (p_ids[-48:] if len(p_ids) > 48 else p_ids)  # prompt cut from the left
        room = 96 - len(t.prompt_ids)
        for side, ids in (("chosen", t.chosen_ids), ("rejected", t.rejected_ids)):
            full = rendered_ids(smol, t.pair.prompt + getattr(t.pair, side))
            assert ids == full[len(p_ids):][:room]  # completion cut from the right
            if len(full) - len(p_ids) > room:
                assert im_end not in ids  # the cut completion lost its end of turn: recorded as truncated
                cut += 1
    assert cut > 10


def test_tokenization_settings_record_the_rule(smol, tmp_path):
    """A cache made under the old rule (EOS after every completion) is refused for resume, naming the change."""
    new = settings(smol, 1024, 512, "keep_end", "auto")
    assert new["prompt_split"] == "auto" and "never to chat-template" in new["eos"]
    old = {k: v for k, v in new.items() if k not in ("prompt_split", "chat_completion")}
    old["eos"] = "appended to each completion unless it already ends with eos_token_id"  # the rule before
    old_settings, new_settings = {"tokenization": old, "limit": None}, {"tokenization": new, "limit": None}
    old_fp, new_fp = cache.settings_fingerprint(old_settings), cache.settings_fingerprint(new_settings)
    assert old_fp != new_fp
    cache.write_json(tmp_path / cache.shard_name(0, 1), {"fingerprint": old_fp, "settings": old_settings})
    with pytest.raises(UserError) as e:
        cache.check_compatible(tmp_path, new_fp, new_settings)
    msg = str(e.value)
    assert "tokenization differ" in msg and "tokenization.eos 'appended to each completion" in msg, msg
    assert "tokenization.prompt_split (absent) -> 'auto'" in msg and "\n" not in msg, msg


def test_precompute_on_smollm2_counts_formats_and_rules(smollm2_dir, tmp_path):
    rows = []
    for name in ("hh_rlhf.jsonl", "ultrafeedback.jsonl", "conversational.jsonl"):
        rows += (REAL / name).read_text().splitlines()[:2]
    rows += [json.dumps({"prompt": None, "chosen": "a", "rejected": "b"}),
             json.dumps({"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "user", "content": "x"}],
                         "rejected": [{"role": "assistant", "content": "y"}]})]
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "cache"
    s = precompute(data, smollm2_dir, out, backend="hf", dtype="float32", progress=False, max_length=512,
                   max_prompt_length=256, part_size=4)
    assert (s["rows_read"], s["rows_kept"], s["rows_rejected"]) == (8, 6, 2)
    assert s["formats"] == {"explicit": 0, "conversational": 2, "implicit-text": 2, "implicit-conversation": 2}
    assert s["split_rules"] == {"marker": 2, "prefix": 0, "last assistant turn": 2}
    text = format_summary(s)
    assert "conversational 2, implicit-text 2, implicit-conversation 2" in text
    assert "marker 2, prefix 0, last assistant turn 2" in text
    manifest = cache.read_manifest(out)
    assert manifest["tokenization"]["prompt_split"] == "auto"
    # a re-run reuses the parts and still counts them
    again = precompute(data, smollm2_dir, out, backend="hf", dtype="float32", progress=False, max_length=512,
                       max_prompt_length=256, part_size=4)
    assert again["parts_written"] == 0 and again["formats"] == s["formats"]
    assert again["split_rules"] == s["split_rules"]
    # the split rule changes content: a cache made with another one is refused, naming it
    with pytest.raises(UserError, match="tokenization.prompt_split 'auto' -> 'prefix'"):
        precompute(data, smollm2_dir, out, backend="hf", dtype="float32", progress=False, max_length=512,
                   max_prompt_length=256, part_size=4, prompt_split="prefix")
