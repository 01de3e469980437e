"""One self-contained HTML page (PNGs inline as base64, and written beside it) of the key diagnostics.

Plots: drift of chosen and rejected log-probs with p10-p90 bands (train vs eval probes), the share of
both-down pairs, margin and accuracy, the collapse alarm marked on the curves, the length scatter and
correlations, the training loss. Tables: the runs, the findings, collapse windows, the top displaced pairs
with their text (decoded with the tokenizer named in the cache manifest when it is a local directory).
"""

import base64
import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import polars as pl

from queries.db import attached, connect, view_sources
from queries.findings import findings
from queries.runner import run_query

STYLE = {"train": "-", "eval": "--"}
COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _series(df, runs):
    """(run, split, colour, linestyle, label, rows sorted by step) for each run x split present."""
    for k, run in enumerate(runs):
        for split in ("train", "eval"):
            rows = df.filter((pl.col("run") == run) & (pl.col("split") == split)).sort("step")
            if rows.height:
                yield run, split, COLORS[k % len(COLORS)], STYLE[split], f"{run} · {split} probes", rows


def _mark_collapse(ax, coll, runs, curves, col):
    """Over each alarm window, thicken the series' own curve (peak -> end) and mark the alarm step."""
    for k, run in enumerate(runs):
        c = COLORS[k % len(COLORS)]
        for w in coll.filter(pl.col("run") == run).iter_rows(named=True):
            r = curves.filter((pl.col("run") == run) & (pl.col("split") == w["split"]) &
                              pl.col("step").is_between(w["peak_step"], w["end_step"])).sort("step")
            ax.plot(r["step"].to_numpy(), r[col].to_numpy(), color=c, lw=7, alpha=0.25, solid_capstyle="round")
            a = r.filter(pl.col("step") == w["alarm_step"])
            if a.height:
                ax.plot(a["step"].to_numpy(), a[col].to_numpy(), marker="v", ms=10, color=c, mec="k", mew=0.6)


def _collapse_note(ax, coll):
    if coll.height:
        ax.text(0.99, 0.97, "thick: collapse window (peak→end); ▼: alarm raised", transform=ax.transAxes,
                fontsize=8, color="0.3", ha="right", va="top")


def _save(fig, out_dir: Path, name: str) -> str:
    path = out_dir / name
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return name


def _plot_drift(drift, coll, runs, out_dir):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharex=True)
    for ax, side in zip(axes, ("chosen", "rejected")):
        for run, split, c, ls, label, r in _series(drift, runs):
            x = r["step"].to_numpy()
            ax.fill_between(x, r[f"{side}_drift_p10"].to_numpy(), r[f"{side}_drift_p90"].to_numpy(),
                            color=c, alpha=0.12, lw=0)
            ax.plot(x, r[f"{side}_drift_mean"].to_numpy(), color=c, ls=ls, lw=1.8, label=label)
        ax.axhline(0, color="0.4", lw=0.8)
        if side == "chosen":
            _mark_collapse(ax, coll, runs, drift, "chosen_drift_mean")
        ax.set_title(f"{side}: policy − reference log-prob (mean, band p10–p90)")
        ax.set_xlabel("step (probe scored after this many updates)")
        ax.set_ylabel("nats per completion")
        ax.grid(alpha=0.3)
    _collapse_note(axes[0], coll)
    axes[0].legend(fontsize=8, loc="lower left")
    return _save(fig, out_dir, "drift.png")


def _two_panels(drift, runs, left, right):
    """One figure, two panels: column `left` and column `right` of `drift` over steps, a line per run/split."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), sharex=True)
    for run, split, c, ls, label, r in _series(drift, runs):
        x = r["step"].to_numpy()
        axes[0].plot(x, r[left].to_numpy(), color=c, ls=ls, lw=1.8, label=label)
        axes[1].plot(x, r[right].to_numpy(), color=c, ls=ls, lw=1.8, label=label)
    return fig, axes


def _plot_shares(drift, runs, out_dir):
    fig, axes = _two_panels(drift, runs, "both_down_share", "chosen_down_share")
    axes[0].set_title("share of probe pairs where chosen AND rejected fell")
    axes[1].set_title("share of probe pairs where chosen fell below the reference")
    for ax in axes:
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(fig, out_dir, "shares.png")


def _plot_margin(drift, coll, runs, out_dir):
    fig, axes = _two_panels(drift, runs, "margin_mean", "accuracy")
    axes[0].set_title("mean reward margin β·[(πc−rc) − (πr−rr)]")
    axes[1].set_title("reward accuracy (share of probe pairs with margin > 0)")
    axes[1].set_ylim(-0.02, 1.02)
    _mark_collapse(axes[0], coll, runs, drift, "margin_mean")
    _mark_collapse(axes[1], coll, runs, drift, "accuracy")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    _collapse_note(axes[0], coll)
    axes[0].legend(fontsize=8)
    return _save(fig, out_dir, "margin_accuracy.png")


def _plot_length(con, length, runs, out_dir):
    pts = con.sql(
        """WITH last AS (SELECT run, max(step) AS step FROM examples WHERE source = 'probe' GROUP BY run)
           SELECT e.run, e.split, e.margin, e.chosen_len - e.rejected_len AS length_diff
           FROM examples e JOIN last USING (run, step) WHERE e.source = 'probe'""").pl()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for k, run in enumerate(runs):
        p = pts.filter(pl.col("run") == run)
        if p.height > 4000:
            p = p.sample(4000, seed=0)
        c = COLORS[k % len(COLORS)]
        step = length.filter(pl.col("run") == run)["step"].max()
        axes[0].scatter(p["length_diff"].to_numpy(), p["margin"].to_numpy(), s=9, alpha=0.5, color=c,
                        label=f"{run} (step {step})", edgecolors="none")
        for split in ("train", "eval"):
            r = length.filter((pl.col("run") == run) & (pl.col("split") == split)).sort("step")
            if r.height:
                axes[1].plot(r["step"].to_numpy(), r["corr_summed"].to_numpy(), color=c, ls=STYLE[split], lw=1.8,
                             label=f"{run} · {split}: summed margin")
                axes[1].plot(r["step"].to_numpy(), r["corr_per_token"].to_numpy(), color=c, ls=STYLE[split],
                             lw=1.0, alpha=0.6, marker=".", ms=3, label=f"{run} · {split}: per-token margin")
    axes[0].axhline(0, color="0.4", lw=0.8)
    axes[0].axvline(0, color="0.4", lw=0.8)
    axes[0].set_title("margin vs length difference at the last probe")
    axes[0].set_xlabel("chosen_len − rejected_len (tokens)")
    axes[0].set_ylabel("margin")
    axes[0].legend(fontsize=8)
    axes[1].axhline(0, color="0.4", lw=0.8)
    axes[1].set_ylim(-1.02, 1.02)
    axes[1].set_title("corr(margin, length difference) over training")
    axes[1].set_xlabel("step")
    axes[1].legend(fontsize=7, ncol=1 if len(runs) < 3 else 2)
    for ax in axes:
        ax.grid(alpha=0.3)
    return _save(fig, out_dir, "length.png")


def _plot_loss(con, drift, runs, out_dir):
    steps = con.sql("SELECT run, step, loss FROM steps ORDER BY run, step").pl()
    fig, ax = plt.subplots(figsize=(12, 3.4))
    for k, run in enumerate(runs):
        c = COLORS[k % len(COLORS)]
        s = steps.filter(pl.col("run") == run)
        if s.height:
            w = max(1, s.height // 50)  # light smoothing of the per-batch loss
            ax.plot(s["step"].to_numpy(), s["loss"].rolling_mean(w, min_samples=1).to_numpy(), color=c, lw=1.2,
                    alpha=0.8, label=f"{run} · train batches (rolling mean of {w})")
        ev = drift.filter((pl.col("run") == run) & (pl.col("split") == "eval")).sort("step")
        if ev.height:
            ax.plot(ev["step"].to_numpy(), ev["loss_mean"].to_numpy(), color=c, ls="--", lw=1.8,
                    label=f"{run} · eval probes")
    ax.axhline(0.693147, color="0.5", lw=0.8, ls=":")
    ax.set_title("DPO loss (dotted: ln 2, the loss at step 0)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_dir, "loss.png")


def _tokenizer_for(manifest: dict):
    """A tokenizer from the manifest's model/tokenizer path if that is a local directory, else None."""
    cands = []
    for key in ("tokenizer", "model"):
        v = manifest.get(key)
        if isinstance(v, dict):
            cands += [v.get(k) for k in ("path", "name_or_path", "id", "name")]
        elif isinstance(v, str):
            cands.append(v)
    for c in cands:
        if isinstance(c, str) and Path(c).is_dir():
            try:
                from transformers import AutoTokenizer

                return AutoTokenizer.from_pretrained(c, local_files_only=True)
            except (OSError, ValueError, KeyError, TypeError, ImportError):
                pass  # not loadable: try the next candidate, else show token ids
    return None


def _pair_texts(con, disp: pl.DataFrame) -> dict:
    """pair_id -> (prompt, shared prefix, chosen tail, rejected tail, decoded?) for the displaced pairs."""
    if disp.is_empty():
        return {}
    ids = disp["pair_id"].unique().to_list()
    rows = con.sql("""SELECT cache, pair_id, prompt_ids, chosen_ids, rejected_ids, shared_prefix_len
                      FROM pairs WHERE list_contains($ids, pair_id)""", params={"ids": ids}).pl()
    dirs = {name: d for kind, name, d in attached(con) if kind == "cache"}
    toks = {}
    out = {}
    for r in rows.iter_rows(named=True):
        cache = r["cache"]
        if cache not in toks:
            mf = Path(dirs.get(cache, "")) / "manifest.json"
            try:
                toks[cache] = _tokenizer_for(json.loads(mf.read_text())) if mf.exists() else None
            except ValueError:
                toks[cache] = None
        tok = toks[cache]
        k = r["shared_prefix_len"] or 0

        def dec(x, tok=tok):
            return tok.decode(x) if tok is not None else " ".join(map(str, x))

        out[r["pair_id"]] = (dec(r["prompt_ids"]), dec(r["chosen_ids"][:k]), dec(r["chosen_ids"][k:]),
                             dec(r["rejected_ids"][k:]), tok is not None)
    return out


def _table(df: pl.DataFrame, floats=4) -> str:
    if df.is_empty():
        return "<p class=note>(none)</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in df.columns)
    body = []
    for row in df.iter_rows():
        cells = []
        for v in row:
            if isinstance(v, float):
                v = f"{v:.{floats}g}"
            cells.append(f"<td>{html.escape(str(v)) if v is not None else ''}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _short(s: str, n: int, tail=True) -> str:
    s = s.replace("\n", "⏎ ")
    if len(s) <= n:
        return s
    return "…" + s[-n:] if tail else s[:n] + "…"


def _displaced_html(disp: pl.DataFrame, texts: dict) -> str:
    if disp.is_empty():
        return "<p class=note>(no pair whose chosen log-prob fell below the reference while its margin grew)</p>"
    decoded = any(t[4] for t in texts.values())
    rows = []
    for r in disp.iter_rows(named=True):
        t = texts.get(r["pair_id"])
        if t:
            prompt, shared, ct, rt, _ = (html.escape(x) for x in (_short(t[0], 160), _short(t[1], 160),
                                                                  _short(t[2], 120, False), _short(t[3], 120, False),
                                                                  ""))
            text = (f"<div class=prompt>{prompt}</div><div>{shared}<span class=c>{ct}</span></div>"
                    f"<div>{shared}<span class=r>{rt}</span></div>")
        else:
            text = "<span class=note>(pair not in the attached caches)</span>"
        prefix_share = "" if r["prefix_share"] is None else f"{r['prefix_share']:.2f}"
        rows.append(
            f"<tr><td>{html.escape(r['run'])}</td><td>{r['rank']}</td><td>{r['split']}</td>"
            f"<td>{r['chosen_drift']:+.2f}</td><td>{r['rejected_drift']:+.2f}</td><td>{r['margin_gain']:+.3f}</td>"
            f"<td>{r['shared_prefix_len']}</td><td>{prefix_share}</td><td>{r['tail_tokens']}</td>"
            f"<td>{r['length_diff']}</td>"
            f"<td class=text>{text}</td></tr>")
    how = ("decoded with the cache's tokenizer" if decoded else
           "token ids: the tokenizer named in the cache manifest is not a loadable local directory")
    return (f"<p class=note>Text {how}. Each pair shows the prompt (grey), then chosen and rejected: the shared "
            f"prefix is shown on both lines; <span class=c>green</span> / <span class=r>red</span> is where "
            f"chosen / rejected differ.</p><table><tr><th>run</th><th>rank</th><th>split</th><th>chosen drift"
            f"</th><th>rejected drift</th><th>margin gain</th><th>shared prefix</th><th>prefix share</th>"
            f"<th>tokens after prefix</th><th>length diff</th><th>prompt / chosen / rejected</th></tr>{''.join(rows)}</table>")


CSS = """body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1320px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:12px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 6px;
vertical-align:top}th{background:#f4f4f4}img{max-width:100%;border:1px solid #eee}.note{color:#666;font-size:12px}
.text{font-family:ui-monospace,monospace;font-size:11px;max-width:620px;word-break:break-word}
.prompt{color:#888}.c{background:#d8f5d8}.r{background:#f8d8d8}li{margin:4px 0}"""


def write_report(runs, caches=None, out_dir="report", *, top=15) -> Path:
    """Render the report for `runs` (run directories) into `out_dir`; return the path of report.html."""
    if isinstance(runs, (str, Path)):
        runs = [runs]
    con = connect(runs, caches)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for k, n, _ in attached(con) if k == "run"]
    drift = run_query(con, "drift")
    coll = run_query(con, "collapse")
    length = run_query(con, "length")
    have_pairs = bool(view_sources(con).get("pairs"))
    disp = run_query(con, "displacement", {"limit": top}) if have_pairs else pl.DataFrame()
    imgs = []
    if drift.height:
        imgs.append(("Drift from the reference", _plot_drift(drift, coll, names, out)))
        imgs.append(("Both-down and chosen-down shares", _plot_shares(drift, names, out)))
        imgs.append(("Margin and accuracy", _plot_margin(drift, coll, names, out)))
        imgs.append(("Length exploitation", _plot_length(con, length, names, out)))
    imgs.append(("Loss", _plot_loss(con, drift, names, out)))

    runs_tab = con.sql("SELECT run, loss, beta, lr, batch_size, steps, cache, eval_cache, finished "
                       "FROM runs").pl()
    title = html.escape(", ".join(names))
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>refcache report: {title}</title>",
             f"<style>{CSS}</style></head><body>",
             f"<h1>refcache report — {title}</h1>",
             ("<p class=note>Probe rows at step s are scored after s updates (step 0 = the reference: all drift 0). "
              "Drift = policy − reference summed completion log-prob, in nats. Solid lines: probe pairs from the "
              "training data; dashed: held-out eval pairs.</p>"),
             "<h2>Runs</h2>", _table(runs_tab),
             "<h2>Findings</h2><ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in findings(con)) + "</ul>"]
    for title, name in imgs:
        data = base64.b64encode((out / name).read_bytes()).decode()
        parts.append(f"<h2>{html.escape(title)}</h2><img alt='{name}' src='data:image/png;base64,{data}'>")
        if name == "margin_accuracy.png":
            parts.append("<h3>Reward-collapse alarm windows</h3>" + _table(coll))
    parts.append("<h2>Top displaced pairs (chosen fell below the reference while the margin grew)</h2>")
    if have_pairs:
        parts.append(_displaced_html(disp, _pair_texts(con, disp)))
    else:
        parts.append("<p class=note>No cache attached (pass --cache CACHE): pair text and shared prefixes "
                     "come from the cache.</p>")
    if len(names) > 1:
        parts.append("<h2>Run comparison at the last common probe step</h2>" + _table(run_query(con, "compare")))
    parts.append("</body></html>")
    path = out / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text("\n".join(parts))
    tmp.replace(path)
    return path
