"""What a TRL user meets first (issue 19): rejections counted by kind on the terminal and in SQL, TRL's row counts
with --keep-duplicates, chat templates without a system role (--system-message fold), and rows whose prompt
merges into the completion when tokenized together (TRL 1.16's boundary rule, counted; --strict-boundary).

Real tokenizers (the tiny model's, SmolLM2's), real Parquet caches, real DuckDB.
"""

import json
import shutil
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import rows_of
from transformers import AutoTokenizer

import queries
from pipeline import cache
from pipeline.cache import load_table, read_manifest
from pipeline.data import Pair, Source, normalize, pair_id
from pipeline.precompute import format_summary, precompute
from pipeline.reject import KINDS
from pipeline.tokenize import PairTokenizer, fold_system
from pipeline.tokenize import settings as tokenization_settings
from refcache import UserError
from refcache.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "data" / "prefs" / "real"
KW = {"backend": "hf", "dtype": "float32", "progress": False}

# A Gemma-style template for the tiny tokenizer: no system role (Gemma's own raises the same error).
NO_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
             "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
# A Llama-3.1-style template whose headers are plain text on SmolLM2's BPE (not special tokens there): the
# generation prompt ends in "<|end_header_id|>\n\n", one "\n\n" token alone, "\n", "\n" before a reply.
LLAMA3 = ("{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + "
          "'<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


@pytest.fixture(scope="module")
def scorer(tiny_model_dir):
    from pipeline.backends import HFScorer

    return HFScorer(tiny_model_dir, "float32")


def pid(row):
    return pair_id(row["prompt"], row["chosen"], row["rejected"])


def overview(con) -> dict:
    """{metric: value} of the cache_overview diagnostic (one cache attached)."""
    return dict(queries.run_query(con, "cache_overview").select("metric", "value").iter_rows())


def write_rows(path, rows):
    """JSON lines; a str item is written as it is (a line that is not valid JSON)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def with_template(model_dir, template, dest):
    """A model directory like `model_dir` (its files linked) whose tokenizer has another chat template."""
    dest.mkdir()
    for f in model_dir.iterdir():
        if not f.name.startswith(("tokenizer", "chat_template")):
            (dest / f.name).symlink_to(f.resolve())
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = template
    tok.save_pretrained(dest)
    return dest


# ---------------------------------------------------------------- kinds, on the terminal and in SQL

A = {"prompt": "Say hi.", "chosen": " Hi there!", "rejected": " No."}
B = {"prompt": "Greet me.", "chosen": " Hello.", "rejected": " Go away."}
LONG = "a_column_whose_name_is_long_enough_to_make_the_reason_longer_than_one_summary_line"
MIXED = [A, B, A, {"prompt": "Q", "chosen": "same", "rejected": "same"}, A, B,
         {"prompt": "Q", "chosen": "x", LONG: 1}, {"prompt": "", "chosen": "x", "rejected": "y"},
         '{"prompt": "p", "chosen": ', {"prompt": 3, "chosen": "a", "rejected": "b"},
         {"prompt": "Q", "chosen": " ", "rejected": "y"}, A]
# source_index -> reason_kind of the rows MIXED rejects
WANT = {2: "duplicate", 3: "same_completion", 4: "duplicate", 5: "duplicate", 6: "missing_field", 7: "empty_field",
        8: "invalid_json", 9: "wrong_type", 10: "empty_field", 11: "duplicate"}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, tiny_model_dir, scorer):
    d = tmp_path_factory.mktemp("mixed")
    data = write_rows(d / "mixed.jsonl", MIXED)
    summary = precompute(data, tiny_model_dir, d / "cache", scorer=scorer, part_size=4, **KW)
    return d / "cache", summary


def test_every_rejection_has_a_kind_and_group_by_counts_them(mixed):
    out, s = mixed
    m = read_manifest(out)
    rej = pq.read_table(cache.rejected_path(out, m))
    assert rej.schema.names == ["source_index", "source_file", "reason_kind", "reason"]
    rows = rej.to_pylist()
    assert {r["source_index"]: r["reason_kind"] for r in rows} == WANT
    assert all(r["reason_kind"] in KINDS for r in rows)
    assert {r["reason"] for r in rows if r["reason_kind"] == "duplicate"} == {
        f"duplicate of row {i} (same prompt, chosen and rejected; pair_id {p})"
        for i, p in ((0, pid(A)), (1, pid(B)))}  # the reason still names the row it repeats
    group = "SELECT reason_kind, count(*) FROM '{}' GROUP BY reason_kind ORDER BY 2 DESC, 1"
    counts = duckdb.sql(group.format(cache.rejected_path(out, m))).fetchall()
    assert counts == [("duplicate", 4), ("empty_field", 2), ("invalid_json", 1), ("missing_field", 1),
                      ("same_completion", 1), ("wrong_type", 1)]
    # the same through refcache's views, and the cache overview counts by kind
    con = queries.connect([], caches=[out])
    view = "SELECT reason_kind, count(*) FROM rejected_rows GROUP BY 1 ORDER BY 2 DESC, 1"
    assert con.sql(view).fetchall() == counts
    metrics = overview(con)
    assert metrics["rejected:duplicate"] == 4 and metrics["rejected:empty_field"] == 2
    # the manifest counts them too, with each kind's first row
    assert {k: v["rows"] for k, v in m["rejected_rows"]["by_kind"].items()} == dict(counts)
    assert m["rejected_rows"]["by_kind"]["duplicate"]["first"]["source_index"] == 2
    assert (s["rows_read"], s["rows_kept"], s["rows_rejected"]) == (12, 2, 10)


def test_the_summary_prints_the_top_five_kinds_with_an_example_each(mixed):
    out, s = mixed
    text = format_summary(s)
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("rejected 10 rows by kind"))
    assert lines[head] == (f"rejected 10 rows by kind (top 5 of 6 kinds; all of them, with reason_kind and reason, "
                           f"in {out / cache.SIDE / cache.REJECTED_FILE}):")
    block = lines[head + 1:head + 6]
    assert head + 6 == len(lines)  # five lines, the sixth kind left out
    assert [b.split()[0] for b in block] == ["duplicate", "empty_field", "invalid_json", "missing_field",
                                             "same_completion"]
    assert [b.split()[1] for b in block] == ["4", "2", "1", "1", "1"]
    assert "e.g. mixed.jsonl row 2: duplicate of row 0 (same prompt, chosen and rejected; pair_id " in block[0]
    assert "e.g. mixed.jsonl row 7: field 'prompt' is empty" in block[1]
    assert "e.g. mixed.jsonl row 8: line 9: invalid JSON" in block[2]
    assert all(len(b.split(": ", 1)[1]) <= 100 for b in block)  # each reason on one short line
    assert f"e.g. mixed.jsonl row 6: missing field 'rejected' (fields: prompt, chosen, {LONG[:20]}" in block[3]
    assert block[3].endswith("...")  # a long reason, cut


def test_old_rejected_rows_without_kinds_stay_readable(mixed, tmp_path):
    """A cache written before reason_kind: its rejected_rows.parquet has no such column (read as null), and parts
    whose metadata lists (source_index, file, reason) merge into null kinds."""
    old = tmp_path / "old"
    shutil.copytree(mixed[0], old)
    rej = cache.rejected_path(old, read_manifest(old))
    pq.write_table(pq.read_table(rej).drop(["reason_kind"]), rej)
    con = queries.connect([], caches=[old])
    assert con.execute("SELECT count(*), count(reason_kind) FROM rejected_rows").fetchone() == (10, 0)
    assert overview(con)["rejected:chosen and rejected are identical"] == 1  # by the reason text, as before
    # parts as an older refcache wrote them: rejected rows without their kind
    for part in sorted(old.glob("part-*.parquet")):
        meta = cache.part_meta(part)
        meta["part"]["rejected"] = [[i, f, reason] for i, f, _, reason in meta["part"]["rejected"]]
        del meta["part"]["boundary_merged"]
        t = pq.read_table(part).replace_schema_metadata({cache.META_KEY: json.dumps(meta, sort_keys=True)})
        pq.write_table(t, part, compression="zstd")
        cache._append_line(old / cache.written_log(0, 1), {"file": part.name, "sha256": cache.file_sha256(part)})
    m = cache.merge(old)
    assert pq.read_table(rej).column("reason_kind").null_count == 10
    assert m["rejected_rows"]["by_kind"]["(not recorded)"]["rows"] == 10 and m["dataset"]["boundary_merged"] is None
    assert load_table(old).num_rows == 2


# ---------------------------------------------------------------- --keep-duplicates


def test_keep_duplicates_keeps_trl_row_counts_with_unique_pair_ids(tmp_path, tiny_model_dir, scorer, capsys):
    rows = [A, B, A, A, B, {**A, "rejected": " Go."}]
    data = write_rows(tmp_path / "dups.jsonl", rows)
    s = precompute(data, tiny_model_dir, tmp_path / "one", scorer=scorer, part_size=2, keep_duplicates=True, **KW)
    assert (s["rows_read"], s["rows_kept"], s["rows_rejected"]) == (6, 6, 0)  # as many rows as TRL trains on
    t = load_table(tmp_path / "one", ["pair_id", "source_index"]).to_pydict()
    a, b = pid(A), pid(B)
    assert t["pair_id"] == [a, b, a + "#2", a + "#3", b + "#2", pid(rows[5])]
    con = queries.connect([], caches=[tmp_path / "one"])
    assert con.execute("SELECT count(*), count(DISTINCT pair_id) FROM pairs").fetchone() == (6, 6)
    # the copies are scored like the first: same tokens, same log-probs
    full = load_table(tmp_path / "one").to_pylist()
    assert full[2]["ref_chosen_token_logps"] == full[0]["ref_chosen_token_logps"]
    # two shards make the same decisions (each reads every row)
    for shard in ("1/2", "0/2"):
        two = precompute(data, tiny_model_dir, tmp_path / "two", scorer=scorer, part_size=2, keep_duplicates=True,
                         shard=shard, **KW)
    assert two["complete"] and load_table(tmp_path / "two").equals(load_table(tmp_path / "one"))
    assert cli_main(["verify", str(tmp_path / "one"), "--sample", "2"]) == 0  # pair_id unique: it checks
    # a cache setting: resuming with the default refuses, naming it
    with pytest.raises(UserError, match="duplicates 'every copy kept, the n-th as pair_id#n' -> 'first copy kept, "
                                        "later copies rejected'"):
        precompute(data, tiny_model_dir, tmp_path / "one", scorer=scorer, part_size=2, **KW)
    # and on the command line
    assert cli_main(["precompute", str(data), "--model", str(tiny_model_dir), "--out", str(tmp_path / "cli"),
                     "--backend", "hf", "--part-size", "2", "--no-progress", "--keep-duplicates"]) == 0
    assert "rows read 6 = kept 6 + rejected 0" in capsys.readouterr().out
    assert read_manifest(tmp_path / "cli")["settings"]["duplicates"] == "every copy kept, the n-th as pair_id#n"


def test_seen_pairs_counts_copies_across_batches():
    """Which copy each row is, against a dict, over many batches and merges of the index's runs."""
    import hashlib

    import numpy as np

    from pipeline.dedup import SeenPairs

    rng = np.random.default_rng(1)
    ids = [hashlib.sha256(str(x).encode()).hexdigest()[:32] for x in rng.integers(0, 3000, 12_000)]
    seen, firsts, nths = SeenPairs(count=True), [], []
    for start in range(0, len(ids), 250):
        f, n = seen.first_rows(ids[start:start + 250], np.arange(start, min(len(ids), start + 250)))
        firsts += list(f)
        nths += list(n)
    first, count = {}, {}
    assert firsts == [first.setdefault(p, i) for i, p in enumerate(ids)]
    assert nths == [count.__setitem__(p, count.get(p, 0) + 1) or count[p] for p in ids]
    assert len(seen) == len(first) and len(seen.runs) < 12


# ---------------------------------------------------------------- --system-message fold


def test_fold_merges_the_system_message_into_the_first_user_turn():
    sys_, user = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}
    assert fold_system([sys_, user]) == [{"role": "user", "content": "Be brief.\n\nHi?"}]
    assert fold_system([user]) == [user]
    assert fold_system([sys_]) == [{"role": "user", "content": "Be brief."}]


def test_fold_renders_rows_a_template_without_a_system_role_rejects(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = NO_SYSTEM
    src = Source(REAL / "conversational.jsonl")
    pairs = [normalize(row, src.columns) for row in src.rows()]
    with_system = [p for p in pairs if p.prompt[0]["role"] == "system"]
    assert len(with_system) == 15
    kept, rejected = PairTokenizer(tok)(pairs)
    assert len(rejected) == 15 and {e.kind for _, e in rejected} == {"template_error"}
    assert "System role not supported" in str(rejected[0][1]) and "--system-message fold" in str(rejected[0][1])
    kept, rejected = PairTokenizer(tok, system_message="fold")(pairs)
    assert not rejected and len(kept) == 34
    for t in kept:
        if t.pair.prompt[0]["role"] == "system":
            system, user = t.pair.prompt[0]["content"], t.pair.prompt[1]["content"]
            assert tok.decode(t.prompt_ids).startswith(f"<|user|>\n{system}\n\n{user}</s>")


def test_precompute_with_fold_has_no_template_errors(tmp_path, tiny_model_dir):
    model = with_template(tiny_model_dir, NO_SYSTEM, tmp_path / "no-system")
    data = rows_of(REAL / "conversational.jsonl", tmp_path / "conv.jsonl", stop=12)  # 5 with a system message
    keep = precompute(data, model, tmp_path / "keep", part_size=6, **KW)
    assert (keep["rows_kept"], keep["rows_rejected"]) == (7, 5)
    assert {k: v["rows"] for k, v in keep["rejected_by_kind"].items()} == {"template_error": 5}
    assert "  template_error 5  e.g. conv.jsonl row 1: chat template failed: TemplateError: System role not " \
           "supported; --system-message fold" in format_summary(keep)
    fold = precompute(data, model, tmp_path / "fold", part_size=6, system_message="fold", **KW)
    assert (fold["rows_kept"], fold["rows_rejected"]) == (12, 0) and "rows by kind" not in format_summary(fold)
    assert read_manifest(tmp_path / "fold")["tokenization"]["system_message"] == "fold"
    with pytest.raises(UserError, match="tokenization.system_message 'fold' -> 'keep'"):
        precompute(data, model, tmp_path / "fold", part_size=6, **KW)
    with pytest.raises(UserError, match="--system-message merge: use keep or fold"):
        precompute(data, model, tmp_path / "bad", system_message="merge", **KW)
    assert not (tmp_path / "bad").exists()  # refused before any work


# ---------------------------------------------------------------- the prompt/completion boundary


def llama3_pairs():
    """One conversation whose reply starts with a word (the header's "\\n\\n" merges: "\\n", "\\n", "Sure") and
    one whose reply starts with a space (it does not: "\\n\\n", " Sure")."""
    prompt = [{"role": "user", "content": "Can you help?"}]
    reply = [{"role": "assistant", "content": c} for c in ("Sure, gladly.", "No.", " Sure, gladly.", " No.")]
    return [Pair(0, "f", "a", "conversational", prompt, [reply[0]], [reply[1]]),
            Pair(1, "f", "b", "conversational", prompt, [reply[2]], [reply[3]])]


def test_a_boundary_merge_is_counted_scored_as_trl_does_and_rejected_when_strict(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.chat_template = LLAMA3
    nl2 = tok("\n\n", add_special_tokens=False)["input_ids"]
    assert len(nl2) == 1  # "\n\n" is one token on this BPE ...
    pairs = llama3_pairs()
    gen = tok(tok.apply_chat_template(pairs[0].prompt, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    assert gen[-1] == nl2[0]  # ... and ends the generation prompt,
    whole = tok(tok.apply_chat_template(pairs[0].prompt + pairs[0].chosen, tokenize=False),
                add_special_tokens=False)["input_ids"]
    assert whole[:len(gen) - 1] == gen[:-1] and whole[len(gen) - 1] != nl2[0]  # but splits before a word

    kept, rejected = PairTokenizer(tok)(pairs)
    assert not rejected and [t.boundary_merged for t in kept] == [1, 0]
    merged, clean = kept
    assert clean.prompt_ids == gen  # the prompt the model generates from
    assert merged.prompt_ids == gen[:-1]  # TRL 1.16: the shared tokens; the "\n", "\n" start the completion
    assert tok.decode(merged.chosen_ids).startswith("\n\nSure")
    for t in kept:
        for side in ("chosen", "rejected"):
            assert t.prompt_ids + getattr(t, side + "_ids") == tok.apply_chat_template(
                t.pair.prompt + getattr(t.pair, side), tokenize=True)["input_ids"]

    kept, rejected = PairTokenizer(tok, strict_boundary=True)(pairs)
    assert [t.pair.index for t in kept] == [1] and kept[0].prompt_ids == gen
    (pair, e), = rejected
    assert pair.index == 0 and e.kind == "boundary_merge" and "\n" not in str(e)
    assert "['\\n\\n']" in str(e) and "['\\n', '\\n', 'Sure'" in str(e), str(e)


def test_trl_116_splits_the_same_tokens(smollm2_dir):
    """The boundary rule is TRL 1.16's own (DPOTrainer's tokenize_fn): same prompt, chosen and rejected ids."""
    pytest.importorskip("trl", reason="TRL 1.16 is in the dev extra: pip install -e '.[dev]'")
    from trl.data_utils import _tokenize, common_prefix_length

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.chat_template = LLAMA3
    for t in PairTokenizer(tok)(llama3_pairs())[0]:
        p = _tokenize(tok, t.pair.prompt, add_generation_prompt=True)["input_ids"]
        c = _tokenize(tok, t.pair.prompt + t.pair.chosen)["input_ids"]
        r = _tokenize(tok, t.pair.prompt + t.pair.rejected)["input_ids"]
        n = min(common_prefix_length(p, c), common_prefix_length(p, r))
        assert (t.prompt_ids, t.chosen_ids, t.rejected_ids) == (p[:n], c[n:], r[n:])


def test_precompute_counts_boundary_merges_and_strict_rejects_them(tmp_path, smollm2_dir, capsys):
    model = with_template(smollm2_dir, LLAMA3, tmp_path / "llama3")
    rows = [{"prompt": [{"role": "user", "content": "Can you help?"}], "chosen": c, "rejected": r}
            for c, r in (("Sure, gladly.", "No."), (" Sure, gladly.", " No."), ("Yes.", "Never."))]
    data = write_rows(tmp_path / "rows.jsonl", rows)
    kw = {**KW, "max_length": 64, "part_size": 2}
    s = precompute(data, model, tmp_path / "lenient", **kw)
    assert (s["rows_kept"], s["boundary_merged"]) == (3, 2)
    assert read_manifest(tmp_path / "lenient")["dataset"]["boundary_merged"] == 2
    assert "boundary: 2 kept rows end their prompt in text that merges with the completion" in format_summary(s)
    with pytest.raises(UserError, match="tokenization.strict_boundary False -> True"):
        precompute(data, model, tmp_path / "lenient", strict_boundary=True, **kw)
    strict = precompute(data, model, tmp_path / "strict", strict_boundary=True, **kw)
    assert (strict["rows_kept"], strict["rows_rejected"], strict["boundary_merged"]) == (1, 2, 0)
    assert {k: v["rows"] for k, v in strict["rejected_by_kind"].items()} == {"boundary_merge": 2}
    assert "boundary:" not in format_summary(strict)
    prompt = load_table(tmp_path / "strict", ["prompt_ids"]).column("prompt_ids").to_pylist()[0]
    tok = AutoTokenizer.from_pretrained(model)
    assert prompt == tok(tok.apply_chat_template(rows[1]["prompt"], tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"]


def test_a_cache_made_before_these_settings_is_not_resumed(tmp_path, tiny_model_dir):
    """Parts written before --system-message and --strict-boundary existed hold neither: a resume names both."""
    new = tokenization_settings(AutoTokenizer.from_pretrained(tiny_model_dir), 1023, 512, "keep_end")
    assert (new["system_message"], new["strict_boundary"]) == ("keep", False)
    old = {k: v for k, v in new.items() if k not in ("system_message", "strict_boundary")}
    cache.write_json(tmp_path / cache.shard_name(0, 1), {"fingerprint": cache.settings_fingerprint({"tokenization": old}),
                                                         "settings": {"tokenization": old}})
    with pytest.raises(UserError) as e:
        cache.check_compatible(tmp_path, cache.settings_fingerprint({"tokenization": new}), {"tokenization": new})
    assert "tokenization.strict_boundary (absent) -> False, tokenization.system_message (absent) -> 'keep'" in \
        str(e.value), str(e.value)


# ---------------------------------------------------------------- Ray


def test_ray_actors_tokenize_with_the_same_options(tmp_path, tiny_model_dir, scorer):
    ray = pytest.importorskip("ray", reason="pip install 'refcache[ray]'")
    rows = [A, B, A, {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
                      "chosen": "Hello!", "rejected": "Go."}, A]
    data = write_rows(tmp_path / "rows.jsonl", rows)
    kw = {**KW, "part_size": 2, "keep_duplicates": True, "system_message": "fold"}
    precompute(data, tiny_model_dir, tmp_path / "single", scorer=scorer, **kw)
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        s = precompute(data, tiny_model_dir, tmp_path / "ray", ray="auto", **kw)
    finally:
        ray.shutdown()
    assert (s["rows_kept"], s["rows_rejected"]) == (5, 0)
    a, b = (read_manifest(tmp_path / d) for d in ("single", "ray"))
    assert [x["sha256"] for x in a["shards"]] == [x["sha256"] for x in b["shards"]]
    assert pa.Table.equals(load_table(tmp_path / "single"), load_table(tmp_path / "ray"))
