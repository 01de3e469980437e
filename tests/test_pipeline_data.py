"""Stage 1 input handling: readers, row formats, validation reasons, tokenization boundary, truncation."""

import csv
import json
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from pipeline.data import Reject, Source, normalize, pair_id
from pipeline.tokenize import PairTokenizer
from refcache import UserError
from refcache.cli import main as cli_main

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


def test_each_bad_row_gets_a_readable_reason(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b"\n".join(line for line, _ in BAD_ROWS) + b"\n")
    src = Source(f)
    reasons = []
    for row in src.rows():
        with pytest.raises(Reject) as e:
            normalize(row, COLS)
        reasons.append(str(e.value))
    assert len(reasons) == len(BAD_ROWS)
    for reason, (_, want) in zip(reasons, BAD_ROWS):
        assert want in reason, (reason, want)


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
    assert "longer than max_length 32" in rejected[0][1]
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
    assert "identical after truncation" in rej[0][1]


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
