"""Stage 1 input handling: readers, row formats, validation reasons, tokenization boundary, truncation."""

import csv
import json
import os
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from pipeline.data import RawRow, Reject, Source, check_prompt_split, normalize, pair_id
from pipeline.tokenize import PairTokenizer
from refcache import UserError
from refcache.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
COLS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
ROWS = [
    {"prompt": "Question: What is 2 + 3?\nAnswer:", "chosen": " 5", "rejected": " 6"},
    {"prompt": [{"role": "user", "content": "What is 4 * 4?"}],
     "chosen": [{"role": "assistant", "content": "4 * 4 = 16."}],
     "rejected": [{"role": "assistant", "content": "4 * 4 = 18."}]},
    {"prompt": "Say hi. ", "chosen": "Hi there!", "rejected": "No."},
] * 4


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def pairs_of(path, columns=None):
    src = Source(path, columns)
    out = []
    for row in src.rows():
        out.append(normalize(row, src.columns))
    return out


def write_all_formats(d):
    """The same rows as JSONL, JSON, Parquet, CSV, a directory of two files, and a saved `datasets` dataset."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (d / "rows.json").write_text(json.dumps(ROWS, indent=1))
    # Parquet/datasets need one type per column: store every field as a message list or JSON via struct lists.
    msg = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    conv = [r for r in ROWS if isinstance(r["prompt"], list)]
    pq.write_table(pa.Table.from_pylist(conv, schema=pa.schema([("prompt", msg), ("chosen", msg),
                                                                ("rejected", msg)])), d / "conv.parquet")
    with open(d / "rows.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["prompt", "chosen", "rejected"])
        w.writeheader()
        for r in ROWS:
            w.writerow({k: v if isinstance(v, str) else json.dumps(v) for k, v in r.items()})
    split = d / "split"
    split.mkdir()
    (split / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:5]))
    (split / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[5:]))
    import datasets

    datasets.Dataset.from_list(conv).save_to_disk(str(d / "saved"))
    return conv


def test_every_input_format_reads_the_same_pairs(tmp_path):
    conv = write_all_formats(tmp_path)
    want = [pair_id(r["prompt"], r["chosen"], r["rejected"]) for r in ROWS]
    for name in ("rows.jsonl", "rows.json", "rows.csv", "split"):
        got = pairs_of(tmp_path / name)
        assert [p.pair_id for p in got] == want, name
        assert [p.index for p in got] == list(range(len(ROWS))), name
    want_conv = [pair_id(r["prompt"], r["chosen"], r["rejected"]) for r in conv]
    for name in ("conv.parquet", "saved"):
        got = pairs_of(tmp_path / name)
        assert [p.pair_id for p in got] == want_conv, name
        assert all(p.kind == "conversational" for p in got)
    split = list(Source(tmp_path / "split").rows())
    assert [r.file for r in split] == ["a.jsonl"] * 5 + ["b.jsonl"] * 7


def test_formats_detected_per_row_and_column_mapping(tmp_path):
    f = tmp_path / "mixed.jsonl"
    rows = [
        {"q": "Q: 1+1?\nA:", "good": " 2", "bad": " 3"},  # explicit
        {"good": "Question: What is 7 + 8?\nAnswer: 15", "bad": "Question: What is 7 + 8?\nAnswer: 16"},  # implicit
        {"good": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
         "bad": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go"}]},  # implicit chat
        {"q": [{"role": "user", "content": "hi"}], "good": "hello", "bad": "go"},  # chat, string completions
        {"q": "hi", "good": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
         "bad": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go"}]},  # UltraFeedback
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = pairs_of(f, {"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert [p.kind for p in got] == ["explicit", "implicit-text", "implicit-conversation", "conversational",
                                     "implicit-conversation"]
    assert got[1].prompt == "Question: What is 7 + 8?\nAnswer:" and got[1].chosen == " 15"
    assert got[2].prompt == [{"role": "user", "content": "hi"}]
    assert got[2].chosen == [{"role": "assistant", "content": "hello"}]
    assert got[3].chosen == [{"role": "assistant", "content": "hello"}]
    # pair_id hashes the row as given: message key order does not matter, content does.
    assert pair_id([{"role": "user", "content": "x"}], "a", "b") == pair_id([{"content": "x", "role": "user"}], "a",
                                                                            "b")
    assert pair_id("p", "a", "b") != pair_id("p", "b", "a")


BAD_ROWS = [
    (b'{"prompt": "p", "chosen": "a"}', "missing field 'rejected'"),
    (b'{"prompt": "p", "chosen": null, "rejected": "b"}', "field 'chosen' is null"),
    (b'{"prompt": "p", "chosen": "  ", "rejected": "b"}', "field 'chosen' is empty"),
    (b'{"prompt": "", "chosen": "a", "rejected": "b"}', "field 'prompt' is empty"),
    (b'{"prompt": 3, "chosen": "a", "rejected": "b"}', "field 'prompt' is int"),
    (b'{"prompt": "p", "chosen": "a", "rejected": "a"}', "chosen and rejected are identical"),
    (b'{"prompt": "p", "chosen": "a", "rejected": [1]}', "field 'rejected'[0] is int"),
    (b'{"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}', "field 'prompt'[0] has no 'content'"),
    (b'{"chosen": "abc", "rejected": "xyz"}', "no common prefix"),
    (b'{"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]}',
     "no assistant turn"),
    (b'{"prompt": "p", "chosen": "a", ', "invalid JSON"),
    (b'["prompt", "chosen"]', "expected a JSON object"),
    (b'{"prompt": "p\xff\xfe", "chosen": "a", "rejected": "b"}', "invalid UTF-8"),
]


# the kind of each BAD_ROWS reason (rejected_rows.reason_kind)
BAD_KINDS = ["missing_field", "null_field", "empty_field", "empty_field", "wrong_type", "same_completion",
             "wrong_type", "wrong_type", "no_shared_prompt", "no_shared_prompt", "invalid_json", "not_an_object",
             "invalid_text"]


def test_each_bad_row_gets_a_readable_reason(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b"\n".join(line for line, _ in BAD_ROWS) + b"\n")
    src = Source(f)
    reasons, kinds = [], []
    for row in src.rows():
        with pytest.raises(Reject) as e:
            normalize(row, COLS)
        reasons.append(str(e.value))
        kinds.append(e.value.kind)
    assert len(reasons) == len(BAD_ROWS)
    for reason, (_, want) in zip(reasons, BAD_ROWS):
        assert want in reason, (reason, want)
    assert kinds == BAD_KINDS


def test_tokenization_reasons_and_truncation(tok):
    pt = PairTokenizer(tok, max_length=32, max_prompt_length=8)
    from pipeline.data import Pair

    long_prompt = " ".join(str(i) for i in range(40))
    count = " " + " ".join(str(i) for i in range(1, 30))
    rows = [
        Pair(0, "f", "a", "explicit", long_prompt, " yes", " no"),  # prompt alone > max_length: rejected
        Pair(1, "f", "b", "explicit", "0 1 2 3 4 5 6 7 8 9", " x" + count, " y" + count),
        Pair(2, "f", "c", "explicit", "Q: 1+1?\nA:", " 2", " 3"),
    ]
    kept, rejected = pt(rows)
    assert [p.index for p, _ in rejected] == [0]
    assert "longer than max_length 32" in str(rejected[0][1]) and rejected[0][1].kind == "too_long"
    t1, t2 = kept
    full = tok("0 1 2 3 4 5 6 7 8 9")["input_ids"]
    assert len(full) > 8
    assert t1.truncated and t1.prompt_ids == full[-8:]  # prompt cut from the left (keep_end)
    want = tok("0 1 2 3 4 5 6 7 8 9 x" + count)["input_ids"][len(full):][:24]  # completion cut from the right
    assert t1.chosen_ids == want and len(t1.prompt_ids) + len(t1.chosen_ids) == 32
    assert not t2.truncated and t2.chosen_ids[-1] == tok.eos_token_id
    # identical after truncation -> rejected with a reason
    pt2 = PairTokenizer(tok, max_length=12, max_prompt_length=4)
    _, rej = pt2([Pair(3, "f", "d", "explicit", "0 1 2 3", count + " x", count + " y")])
    assert "identical after truncation" in str(rej[0][1]) and rej[0][1].kind == "same_after_truncation"


def test_boundary_is_exact_for_every_format(tok, tmp_path):
    """prompt_ids + completion_ids is exactly the joint tokenization of prompt + completion (+ EOS)."""
    f = tmp_path / "b.jsonl"
    rows = [
        {"prompt": "Leo has 5 pen", "chosen": "cils.", "rejected": "s."},  # BPE merges across the boundary
        {"prompt": "Question: What is 12 + 30?\nAnswer:", "chosen": " 42", "rejected": " 43"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 * 3?"}],
         "chosen": [{"role": "assistant", "content": "3 * 3 = 9."}],
         "rejected": [{"role": "assistant", "content": "3 * 3 = 6."}]},
        {"chosen": "Question: What is 79 + 86?\nAnswer: 165", "rejected": "Question: What is 79 + 86?\nAnswer: 164"},
        {"chosen": [{"role": "user", "content": "Leo has 5 pens."}, {"role": "assistant", "content": "Yes, 5."}],
         "rejected": [{"role": "user", "content": "Leo has 5 pens."}, {"role": "assistant", "content": "No, 7."}]},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = pairs_of(f)
    kept, rejected = PairTokenizer(tok, max_length=256, max_prompt_length=128)(pairs)
    assert not rejected and len(kept) == len(rows)
    eos = tok.eos_token_id
    for t in kept:
        p_text, c_text, r_text, special = PairTokenizer(tok).texts(t.pair)
        for comp, text in ((t.chosen_ids, c_text), (t.rejected_ids, r_text)):
            joint = tok(text, add_special_tokens=special)["input_ids"]
            joint = joint if joint[-1] == eos else joint + [eos]
            assert t.prompt_ids + comp == joint, t.pair.kind
        assert t.prompt_ids and t.chosen_ids != t.rejected_ids
        assert p_text.startswith(tok.decode(t.prompt_ids))
    # the token BPE merges across the boundary (" pen" + "cils" -> " pencils") goes to the completion whole
    assert tok(rows[0]["prompt"])["input_ids"] != kept[0].prompt_ids
    assert tok.decode(kept[0].chosen_ids) == " pencils." + tok.eos_token
    assert tok.decode(kept[0].prompt_ids) == "Leo has 5"
    # implicit text splits at a word boundary; implicit chat at the last assistant turn
    assert pairs[3].prompt.endswith("Answer:") and tok.decode(kept[3].chosen_ids) == " 165" + tok.eos_token
    assert tok.decode(kept[4].prompt_ids).endswith("<|assistant|>\n")
    # shared_prefix_len counts the leading completion tokens both sides share
    assert kept[2].shared_prefix_len == len(tok.encode("3 * 3 = ", add_special_tokens=False))


def test_readers_stream_with_bounded_memory(tmp_path):
    """Peak Python memory while reading 20k rows stays far below what holding the rows would take."""
    n = 20_000
    rows = [{"prompt": f"Question {i}: " + "x" * 80, "chosen": " yes" * 20, "rejected": " no" * 20} for i in
            range(n)]
    (tmp_path / "big.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "big.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "big.parquet", row_group_size=4096)
    with open(tmp_path / "big.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    del rows
    size = (tmp_path / "big.jsonl").stat().st_size
    for name in ("big.jsonl", "big.json", "big.parquet", "big.csv"):
        tracemalloc.start()
        count = sum(1 for _ in Source(tmp_path / name).rows())
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert count == n
        print(f"{name}: peak traced memory {peak:,} bytes for a {size:,}-byte input")
        assert peak < 2_000_000, f"{name}: peak {peak:,} bytes for a {size:,}-byte input"


def _cli_error(capsys, argv):
    code = cli_main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_whole_file_problems_are_one_line_errors(tmp_path, capsys, tiny_model_dir):
    m = str(tiny_model_dir)
    out = str(tmp_path / "cache")
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "obj.json").write_text('"just a string"')
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "trunc.json").write_text('[{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": ')
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps(ROWS[0]) + "\n")
    (tmp_path / "notamodel").mkdir()
    cases = [
        ([str(tmp_path / "missing.jsonl"), "--model", m], "no such file"),
        ([str(tmp_path / "corrupt.parquet"), "--model", m], "not a readable Parquet file"),
        ([str(tmp_path / "obj.json"), "--model", m], "expected a JSON array"),
        ([str(tmp_path / "trunc.json"), "--model", m], "trunc.json"),
        ([str(tmp_path / "notes.txt"), "--model", m], "unsupported file type"),
        ([str(tmp_path / "empty"), "--model", m], "has no .jsonl"),
        ([str(ok), "--model", str(tmp_path / "notamodel")], "not a model directory"),
        ([str(ok), "--model", str(tmp_path / "nope")], "not a model directory"),
        ([str(ok), "--model", m, "--max-length", "64", "--max-prompt-length", "64"], "must be smaller"),
        ([str(ok), "--model", m, "--max-length", "5000"], "does not fit the model's context"),
        ([str(ok), "--model", m, "--shard", "2/2"], "0 <= I < N"),
        ([str(ok), "--model", m, "--prompt-split", " "], "--prompt-split ' ': use auto, prefix, or a marker"),
    ]
    for argv, want in cases:
        err = _cli_error(capsys, ["precompute", *argv, "--out", out, "--backend", "hf", "--no-progress"])
        assert want in err, (want, err)
    assert "no manifest.json" in _cli_error(capsys, ["verify", str(tmp_path / "empty")])
    assert "no finished shard" in _cli_error(capsys, ["merge", str(tmp_path / "empty")])
    with pytest.raises(UserError, match="DatasetDict"):
        (tmp_path / "dd").mkdir()
        (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
        list(Source(tmp_path / "dd").rows())


# ---------------------------------------------------------------- implicit prompts and conversation checks

REAL = Path(__file__).resolve().parents[1] / "data" / "prefs" / "real"


def _normalized(path, prompt_split="auto"):
    src = Source(path)
    return [(row.record, normalize(row, src.columns, prompt_split)) for row in src.rows()]


def test_hh_prompts_end_at_the_last_shared_assistant_marker():
    rows = _normalized(REAL / "hh_rlhf.jsonl")
    assert len(rows) == 34 and {p.split for _, p in rows} == {"marker"}
    for rec, p in rows:
        assert p.kind == "implicit-text" and p.prompt.endswith("\n\nAssistant:")
        assert p.prompt + p.chosen == rec["chosen"] and p.prompt + p.rejected == rec["rejected"]
        assert "\n\nAssistant:" not in p.chosen + p.rejected  # the completion is the one last reply
    assert sum(p.prompt.count("\n\nHuman:") > 1 for _, p in rows) == 10  # multi-turn rows
    # the rows whose replies open with the same words: the old rule split them inside the reply
    shared = [p for _, p in rows if p.chosen.split()[0] == p.rejected.split()[0]]
    assert len(shared) == 20


def test_prefix_mode_is_the_old_rule():
    """--prompt-split prefix: longest common prefix, cut back to a word boundary (what auto did before)."""
    inside = 0
    for rec, p in _normalized(REAL / "hh_rlhf.jsonl", "prefix"):
        assert p.split == "prefix"
        common = os.path.commonprefix([rec["chosen"], rec["rejected"]])
        rest = common[len(p.prompt):]
        assert common.startswith(p.prompt) and (rest == "" or (rest[0].isspace() and " " not in rest[1:]))
        inside += not p.prompt.rstrip().endswith("\n\nAssistant:")
    # split inside a reply: the 20 rows whose replies share opening words ("...Assistant: Sure!" | " Bring a
    # pot..."), and one cut after the "A" that "A handy ..." and "At 5% ..." share (a word end in chosen only)
    assert inside == 21
    sample = _normalized(ROOT / "data" / "prefs" / "implicit_sample.jsonl", "prefix")
    assert sample == _normalized(ROOT / "data" / "prefs" / "implicit_sample.jsonl")  # no markers: auto = prefix
    assert sorted(p.split for _, p in sample) == ["last assistant turn"] * 10 + ["prefix"] * 10
    # auto's fallback backs off to a word end of both texts; prefix, as before, of chosen only
    row = RawRow(0, "f", {"chosen": "Q: rate?\nA handy rule.", "rejected": "Q: rate?\nAt 5%."})
    assert normalize(row, COLS).prompt == "Q: rate?" and normalize(row, COLS, "prefix").prompt == "Q: rate?\nA"


def test_split_rules_counted_per_format():
    counts = {}
    for name in ("hh_rlhf.jsonl", "ultrafeedback.jsonl", "conversational.jsonl"):
        for _, p in _normalized(REAL / name):
            counts[name, p.kind, p.split] = counts.get((name, p.kind, p.split), 0) + 1
    assert counts == {("hh_rlhf.jsonl", "implicit-text", "marker"): 34,
                      ("ultrafeedback.jsonl", "implicit-conversation", "last assistant turn"): 24,
                      ("conversational.jsonl", "conversational", None): 34}


def test_marker_layouts_and_marker_strings(tmp_path):
    def norm(rec, prompt_split="auto"):
        return normalize(RawRow(0, "f", rec), COLS, prompt_split)

    guanaco = {"chosen": "### Human: Name a fruit. ### Assistant: Sure! An apple.",
               "rejected": "### Human: Name a fruit. ### Assistant: Sure! A carrot."}
    p = norm(guanaco)
    assert (p.prompt, p.chosen, p.split) == ("### Human: Name a fruit. ### Assistant:", " Sure! An apple.", "marker")
    vicuna = {"chosen": "A chat. USER: Hi ASSISTANT: Hello! How can I help?",
              "rejected": "A chat. USER: Hi ASSISTANT: Hello! Go away."}
    assert norm(vicuna).prompt == "A chat. USER: Hi ASSISTANT:"
    custom = {"chosen": "<q>Name a fruit.<a>Sure! An apple.", "rejected": "<q>Name a fruit.<a>Sure! A carrot."}
    assert norm(custom).prompt == "<q>Name a fruit.<a>Sure!"  # no known layout: prefix rule
    assert norm(custom, check_prompt_split("<a>")).prompt == "<q>Name a fruit.<a>"
    assert check_prompt_split("\\n\\nAssistant:") == "\n\nAssistant:"  # typed escapes, as from a shell
    with pytest.raises(Reject, match="marker"):
        norm(custom, "\n\nAssistant:")
    with pytest.raises(UserError, match="--prompt-split"):
        check_prompt_split("")


ROLE_ROWS = [  # rows that were accepted (or got a wrong reason) before the role-order checks
    ({"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "user", "content": "Hello"}],
      "rejected": [{"role": "assistant", "content": "Go"}]}, "'chosen' starts with a 'user' turn"),
    ({"prompt": [{"role": "user", "content": "Hi"}],
      "chosen": [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Thanks"}],
      "rejected": [{"role": "assistant", "content": "Go"}]}, "'chosen' conversation ends on a 'user' turn"),
    ({"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                 {"role": "user", "content": "Thanks"}],
      "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go"},
                   {"role": "user", "content": "Thanks"}]}, "'chosen' conversation ends on a 'user' turn"),
    ({"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
      "chosen": "How are you?", "rejected": "Bye."}, "second assistant turn in a row"),
    ({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello there\n\nHuman: Thanks",
      "rejected": "\n\nHuman: Hi\n\nAssistant: Go away\n\nHuman: Thanks"}, "ends on a 'Human:' turn"),
    ({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Joke?\n\nAssistant: No.",
      "rejected": "\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: Joke?\n\nAssistant: Sure."},
     "differ before their last '\\nAssistant:' turn"),
    ({"prompt": None, "chosen": "Hello there", "rejected": "Go away"}, "field 'prompt' is null"),
]


@pytest.mark.parametrize("rec,want", ROLE_ROWS, ids=["chosen-user", "reply-ends-user", "implicit-ends-user",
                                                     "prompt-ends-assistant", "hh-ends-human", "hh-differs-early",
                                                     "prompt-null"])
def test_malformed_conversations_rejected_with_a_reason(rec, want):
    with pytest.raises(Reject) as e:
        normalize(RawRow(0, "f", rec), COLS)
    assert want in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_real_samples_rebuild_identically(tmp_path):
    import runpy

    runpy.run_path(str(ROOT / "data" / "build_real_prefs.py"), run_name="build")["main"](["--out", str(tmp_path)])
    for name in ("hh_rlhf.jsonl", "ultrafeedback.jsonl", "conversational.jsonl"):
        assert (tmp_path / name).read_bytes() == (REAL / name).read_bytes(), name
