"""`refcache report`: one self-contained HTML page with the expected plots (inline and as files) and the top
displaced pairs with their text, decoded with the tokenizer the cache manifest names."""

import argparse
import base64
import html
import json
import re
import shutil
import struct

import polars as pl
import pytest
from synth import make_world

import queries
from queries import cli
from queries.report import write_report

PLOTS = ["steps.png", "drift.png", "shares.png", "margin_accuracy.png", "length.png"]


def png_size(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("repworld")
    w = make_world(root, runs=(("beta0.1", 0.1), ("beta0.5", 0.5)), steps=80, probe_every=10, n_probe=20)
    # a word-level tokenizer (ids 0..599 -> "w0".."w599") the cache manifest points at, so pair text decodes
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({f"w{i}": i for i in range(600)}, unk_token="w0"))
    tok.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(root / "tok")
    for c in ("cache", "eval_cache"):
        mf = json.loads((w[c] / "__refcache__" / "manifest.json").read_text())
        mf["model"] = {"path": str(root / "tok")}
        (w[c] / "__refcache__" / "manifest.json").write_text(json.dumps(mf))
    return w


def test_report_html_and_plots(world, tmp_path):
    path = write_report(world["runs"], out_dir=tmp_path / "rep", top=5)
    page = path.read_text()
    inline = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(inline) == len(PLOTS)
    for name, b64 in zip(PLOTS, inline):
        data = (tmp_path / "rep" / name).read_bytes()
        assert base64.b64decode(b64) == data  # the page is self-contained and matches the files beside it
        w, h = png_size(data)
        assert w >= 1000 and h >= 300
    assert "src='http" not in page and "<script" not in page
    # the findings (sized by the same top as the table), the tests behind them, and the collapse table
    lines = queries.findings(queries.connect(world["runs"]), top=5)
    for line in lines:
        assert html.escape(line) in page
    assert any("of the top 5 displaced pairs" in s for s in lines) and "Top 5 displaced pairs" in page
    assert "near_identical_in_top" in page and "above_noise" in page
    assert "Reward-collapse alarm windows" in page and "alarm_step" in page
    # the top displaced pairs, with text decoded by the manifest's tokenizer
    disp = queries.run_query(queries.connect(world["runs"]), "displacement", {"limit": 5})
    assert disp.height == 10
    pairs = pl.read_parquet(world["cache"] / "part-*.parquet")
    top = disp.filter(pl.col("cache") == "cache").row(0, named=True)
    ids = pairs.filter(pl.col("pair_id") == top["pair_id"])["chosen_ids"].to_list()[0]
    k = top["shared_prefix_len"]
    tail = " ".join(f"w{i}" for i in ids[k:])[:60]
    assert tail in page and "decoded with the cache's tokenizer" in page
    assert "Run comparison" in page  # two runs: compare table
    assert "ches_vs_drop.png" not in page  # this world's cache has no CHES: no ln-CHES scatter
    # the default top is one number: displacement's limit, for the table and the findings alike
    page = write_report(world["runs"], out_dir=tmp_path / "rep15").read_text()
    assert "Top 15 displaced pairs" in page and "of the top 15 displaced pairs" in page
    # numbers read as numbers: lr by magnitude, beta without trailing zeros, steps as an integer
    runs = page[page.index("<h2>Runs</h2>"):page.index("<h2>Findings</h2>")]
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", runs)
    assert "5e-06" in cells and "0.1" in cells and "80" in cells  # lr by magnitude, beta, steps as integer
    assert not any(c.endswith(".0000") for c in cells)


def test_report_cli_falls_back_to_ids(world, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="refcache")
    cli.add_commands(parser.add_subparsers(dest="command", required=True))
    caches = []
    for c in ("cache", "eval_cache"):  # copies whose manifest names a model that is not a local directory
        shutil.copytree(world[c], tmp_path / c)
        mf = json.loads((tmp_path / c / "__refcache__" / "manifest.json").read_text())
        mf["model"] = {"path": "some-org/not-here"}
        (tmp_path / c / "__refcache__" / "manifest.json").write_text(json.dumps(mf))
        caches.append(str(tmp_path / c))
    args = parser.parse_args(["report", str(world["runs"][0]), "--cache", *caches, "--out", str(tmp_path / "r")])
    assert args.func(args) == 0
    assert "report:" in capsys.readouterr().out
    page = (tmp_path / "r" / "report.html").read_text()
    assert "token ids: the tokenizer named in the cache manifest is not a loadable" in page
    assert "Run comparison" not in page
    assert all((tmp_path / "r" / p).stat().st_size > 10_000 for p in PLOTS)


def test_report_of_a_run_that_learned_nothing(tmp_path):
    """The findings say nothing is above noise, and the displaced-pairs table says the run as a whole shows
    no displacement."""
    w = make_world(tmp_path / "w", runs=(("flat", 0.1),), steps=40, probe_every=10, n_probe=24, learn=0.0)
    page = write_report(w["runs"], out_dir=tmp_path / "rep").read_text()
    findings = page[page.index("<h2>Findings</h2>"):page.index("<details>")]
    assert "nothing is above noise" in findings and "Above noise" not in findings
    assert "near-identical pairs" not in findings and "collapse alarm" not in findings
    assert "the run as a whole shows no displacement" in page


def test_a_run_probed_once_draws_its_point(tmp_path, monkeypatch):
    """A run that probed once (`--probe-every 0`: only at the end) has one point per series: a line through one
    point draws nothing, so each drift, shares and margin/accuracy panel must show it with a marker."""
    from queries import report

    w = make_world(tmp_path / "w", runs=(("once", 0.1),), steps=40, probe_every=0, n_probe=24)
    figures = {}
    save = report._save

    def keep(fig, out_dir, name):  # the figure as drawn, before it is written and closed
        figures[name] = fig
        return save(fig, out_dir, name)

    monkeypatch.setattr(report, "_save", keep)
    write_report(w["runs"], out_dir=tmp_path / "rep")
    drift = queries.run_query(queries.connect(w["runs"]), "drift")
    assert drift["step"].unique().to_list() == [40]
    for name in ("drift.png", "shares.png", "margin_accuracy.png"):
        for ax in figures[name].axes:
            points = [ln for ln in ax.get_lines() if list(ln.get_xdata()) == [40]
                      and ln.get_marker() not in (None, "", " ", "None")]
            assert len(points) == 2, (name, ax.get_title())  # train and eval probes, each a visible marker
    chosen = figures["drift.png"].axes[0]
    means = sorted(float(ln.get_ydata()[0]) for ln in chosen.get_lines() if ln.get_marker() == "o")
    assert means == pytest.approx(sorted(drift["chosen_drift_mean"].to_list()))
