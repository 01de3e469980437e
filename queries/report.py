"""One self-contained HTML page (PNGs inline as base64, and written beside it) of the key diagnostics.

Plots: the TRL-style per-step curves from steps.parquet (loss, rewards/*, logps/*, grad_norm, learning_rate);
drift of chosen and rejected log-probs on one shared scale with p10-p90 bands (train vs eval probes in
different colours and line styles); the shares of pairs that fell; margin and accuracy with the collapse alarm
marked; the length scatter and correlations (none at step 0, where margins are rounding); ln-CHES against the
observed chosen drop (with displacement_prediction's rank correlation and interval). Tables: the runs,
the findings (only effects above noise) with the `effects` rows behind them, collapse windows, and the top
displaced pairs with their text (decoded with the tokenizer named in the cache manifest when it is a local
directory). One `top` sizes both the displaced-pairs table and the findings.
"""

import base64
import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import polars as pl
from matplotlib.colors import to_rgb
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from pipeline.cache import manifest_path
from queries.db import attached, connect, view_sources
from queries.findings import default_top, findings
from queries.fmt import format_column, num
from queries.runner import run_query
from refcache_base.runlog_schema import TRL_METRICS

STYLE = {"train": "-", "eval": "--"}
SPLIT_WORDS = {"train": "train probes (pairs trained on)", "eval": "eval probes (held out)"}
STEP_LABEL = "optimizer step"
SHARED_Y = [("rewards/chosen", "rewards/rejected"), ("logps/chosen", "logps/rejected")]


def _split_colours(runs) -> dict:
    """(run, split) -> colour. One run: a hue per split. Several: a hue per run, eval a lighter shade of it
    (and dashed: STYLE)."""
    if len(runs) == 1:
        return {(runs[0], "train"): "C0", (runs[0], "eval"): "C1"}
    out = {}
    for k, run in enumerate(runs):
        base = to_rgb(f"C{k % 10}")
        out[(run, "train")], out[(run, "eval")] = base, tuple(0.6 * c + 0.4 for c in base)
    return out


def _run_keys(runs, what="probes") -> list:
    """Legend entries for several runs: one per run (its hue) and one per line style (train / eval)."""
    if len(runs) == 1:
        return []
    colours = _split_colours(runs)
    return [Line2D([], [], color=colours[(r, "train")], lw=2, label=r) for r in runs] + [
        Line2D([], [], color="0.3", ls=STYLE["train"], label=f"train {what}"),
        Line2D([], [], color="0.6", ls=STYLE["eval"], label="eval probes (lighter)")]


def _series(df, runs):
    """(run, split, colour, linestyle, label, rows sorted by step) for each run x split present. With several
    runs the lines carry no label: _run_keys explains colours and styles once."""
    colours = _split_colours(runs)
    for run in runs:
        for split in ("train", "eval"):
            rows = df.filter((pl.col("run") == run) & (pl.col("split") == split)).sort("step")
            if rows.height:
                label = SPLIT_WORDS[split] if len(runs) == 1 else "_nolegend_"
                yield run, split, colours[(run, split)], STYLE[split], label, rows


def _line(ax, x, y, **kw):
    """ax.plot of one series over steps; a series of one point gets a marker (a line through one point draws
    nothing: a run probed once would leave the panel blank)."""
    if len(x) == 1 and "marker" not in kw:
        kw = {**kw, "marker": "o", "ms": 6}
    return ax.plot(x, y, **kw)


def _steps_axis(ax, xlabel=True):
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if xlabel:
        ax.set_xlabel(STEP_LABEL)
    ax.grid(alpha=0.3)


def _legend(fig, axes, extra=()):
    """One legend for the figure, above the panels (never over the data); duplicates dropped."""
    seen = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if not lab.startswith("_"):
                seen.setdefault(lab, h)
    for h in extra:
        seen.setdefault(h.get_label(), h)
    if seen:
        fig.legend(list(seen.values()), list(seen.keys()), loc="outside upper center",
                   ncol=min(len(seen), 5), fontsize=8, frameon=False)


def _mark_collapse(ax, coll, runs, curves, col):
    """Over each alarm window, thicken the series' own curve (peak -> end) and mark the alarm step."""
    colours = _split_colours(runs)
    for w in coll.iter_rows(named=True):
        if w["run"] not in runs:
            continue
        c = colours[(w["run"], w["split"])]
        r = curves.filter((pl.col("run") == w["run"]) & (pl.col("split") == w["split"]) &
                          pl.col("step").is_between(w["peak_step"], w["end_step"])).sort("step")
        ax.plot(r["step"].to_numpy(), r[col].to_numpy(), color=c, lw=7, alpha=0.25, solid_capstyle="round")
        a = r.filter(pl.col("step") == w["alarm_step"])
        if a.height:
            ax.plot(a["step"].to_numpy(), a[col].to_numpy(), marker="v", ms=10, color=c, mec="k", mew=0.6, ls="")


def _collapse_keys(coll) -> list:
    """Legend entries explaining the collapse marks (only when there is an alarm)."""
    if coll.is_empty():
        return []
    return [Line2D([], [], color="0.5", lw=7, alpha=0.3, label="collapse window (peak → end)"),
            Line2D([], [], color="0.5", marker="v", ms=9, mec="k", ls="", label="collapse alarm raised")]


def _save(fig, out_dir: Path, name: str) -> str:
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    return name


def _figure(ncols, nrows=1, height=3.9, **kw):
    fig, axes = plt.subplots(nrows, ncols, figsize=(12.5, height * nrows + 0.6), layout="constrained",
                             squeeze=False, **kw)
    return fig, axes.ravel()


def _plot_steps(steps, drift, runs, out_dir):
    """The per-step curves TRL users look at first, one panel per TRL metric name, a colour per run."""
    fig, axes = _figure(3, 3, height=2.9)
    panel = {name: ax for (name, _, _), ax in zip(TRL_METRICS, axes)}
    for a, b in SHARED_Y:
        panel[b].sharey(panel[a])
    colours = _split_colours(runs)
    for run in runs:
        s = steps.filter(pl.col("run") == run).sort("step")
        c = colours[(run, "train")]
        label = "training batches" if len(runs) == 1 else "_nolegend_"
        if s.height:
            w = max(1, s.height // 40)
            x = s["step"].to_numpy()
            for name, col, _ in TRL_METRICS:
                ax, y = panel[name], s[col]
                if col != "lr":
                    ax.plot(x, y.to_numpy(), color=c, lw=0.6, alpha=0.25)
                    y = y.rolling_mean(w, min_samples=1)
                _line(ax, x, y.to_numpy(), color=c, lw=1.6, label=label)
        ev = drift.filter((pl.col("run") == run) & (pl.col("split") == "eval")).sort("step")
        if ev.height:
            panel["loss"].plot(ev["step"].to_numpy(), ev["loss_mean"].to_numpy(), color=colours[(run, "eval")],
                               ls=STYLE["eval"], lw=2, marker="o", ms=3,
                               label="eval probes: mean loss" if len(runs) == 1 else "_nolegend_")
    panel["loss"].axhline(0.693147, color="0.5", lw=0.8, ls=":", label="ln 2 (loss at step 0)")
    panel["rewards/accuracies"].set_ylim(-0.02, 1.02)
    peaks = steps.group_by("run").agg(pl.col("lr").max())["lr"]  # each run's peak learning rate
    if peaks.len() > 1 and peaks.min() > 0 and peaks.max() > 20 * peaks.min():  # very different lr: log scale
        panel["learning_rate"].set_yscale("log")
        panel["learning_rate"].set_ylim(peaks.min() / 100, peaks.max() * 2)  # not down to the schedule's 0
    for (name, _, unit), ax in zip(TRL_METRICS, axes):
        ax.set_title(name, fontsize=10)
        ax.set_ylabel(unit)
        _steps_axis(ax)
    if panel["learning_rate"].get_yscale() == "linear":
        panel["learning_rate"].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    keys = [Line2D([], [], color="0.4", lw=0.7, alpha=0.5, label="per step (training batch)"),
            Line2D([], [], color="0.4", lw=1.6, label="rolling mean over ~1/40 of the run")]
    _legend(fig, axes, _run_keys(runs, "batches") + keys)
    return _save(fig, out_dir, "steps.png")


def _plot_drift(drift, coll, runs, out_dir):
    """Chosen and rejected drift side by side on ONE y-scale, so 'which fell more' reads at a glance."""
    fig, axes = _figure(2, sharex=True, sharey=True, height=4.2)
    bands = len(list(_series(drift, runs))) <= 2  # more than two bands overlap into mud: means only
    for ax, side in zip(axes, ("chosen", "rejected")):
        for run, split, c, ls, label, r in _series(drift, runs):
            x = r["step"].to_numpy()
            if bands:
                lo, hi = r[f"{side}_drift_p10"].to_numpy(), r[f"{side}_drift_p90"].to_numpy()
                if len(x) == 1:  # one probe step: the band is a bar
                    ax.plot([x[0], x[0]], [lo[0], hi[0]], color=c, lw=10, alpha=0.2, solid_capstyle="butt")
                else:
                    ax.fill_between(x, lo, hi, color=c, alpha=0.12, lw=0)
                for edge in (lo, hi):  # the band's edges in the series' own style, to tell the bands apart
                    ax.plot(x, edge, color=c, ls=ls, lw=0.7, alpha=0.6)
            _line(ax, x, r[f"{side}_drift_mean"].to_numpy(), color=c, ls=ls, lw=1.8,
                  label=f"{label}: mean" if not label.startswith("_") else label)
        ax.axhline(0, color="0.4", lw=0.8)
        if side == "chosen":
            _mark_collapse(ax, coll, runs, drift, "chosen_drift_mean")
        ax.set_title(f"{side} completions (both panels share one scale)")
        _steps_axis(ax)
    axes[0].set_ylabel("policy − reference log-prob (nats)")
    band = [Line2D([], [], color="0.6", lw=8, alpha=0.3, label="band (thin edges): p10–p90 over probe pairs")]
    _legend(fig, axes, _run_keys(runs) + (band if bands else []) + _collapse_keys(coll))
    return _save(fig, out_dir, "drift.png")


def _two_panels(drift, runs, left, right, right_from=0):
    """One figure, two panels: column `left` and column `right` (from step `right_from` on) of `drift` over
    steps, a line per run/split."""
    fig, axes = _figure(2, sharex=True)
    for run, split, c, ls, label, r in _series(drift, runs):
        _line(axes[0], r["step"].to_numpy(), r[left].to_numpy(), color=c, ls=ls, lw=1.8, label=label)
        r = r.filter(pl.col("step") >= right_from)
        _line(axes[1], r["step"].to_numpy(), r[right].to_numpy(), color=c, ls=ls, lw=1.8, label=label)
    for ax in axes:
        _steps_axis(ax)
    return fig, axes


def _plot_shares(drift, runs, out_dir):
    fig, axes = _two_panels(drift, runs, "both_down_share", "chosen_down_share")
    axes[0].set_title("chosen AND rejected fell below the reference")
    axes[1].set_title("chosen fell below the reference")
    for ax in axes:
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("share of probe pairs")
    _legend(fig, axes, _run_keys(runs))
    return _save(fig, out_dir, "shares.png")


def _plot_margin(drift, coll, runs, out_dir):
    # accuracy from the first probe after step 0: at step 0 every margin is rounding, so its sign means nothing
    fig, axes = _two_panels(drift, runs, "margin_mean", "accuracy", right_from=1)
    axes[0].set_title("mean reward margin β·[(π_c − ref_c) − (π_r − ref_r)]")
    axes[0].set_ylabel("margin (β·nats)")
    axes[0].axhline(0, color="0.4", lw=0.8)
    axes[1].set_title("reward accuracy (not at step 0, where margins are rounding)")
    axes[1].set_ylabel("share of probe pairs with margin > 0")
    axes[1].set_ylim(-0.02, 1.02)
    axes[1].axhline(0.5, color="0.5", lw=0.8, ls=":", label="chance (0.5)")
    _mark_collapse(axes[0], coll, runs, drift, "margin_mean")
    _mark_collapse(axes[1], coll, runs, drift, "accuracy")
    _legend(fig, axes, _run_keys(runs) + _collapse_keys(coll))
    return _save(fig, out_dir, "margin_accuracy.png")


def _plot_length(con, length, runs, out_dir):
    pts = con.sql(
        """SELECT run, split, margin, chosen_len - rejected_len AS length_diff
           FROM probe_rows(-1, 'all')""").pl()
    fig, axes = _figure(2)
    colours = _split_colours(runs)
    for run in runs:
        for split in ("train", "eval"):
            p = pts.filter((pl.col("run") == run) & (pl.col("split") == split))
            if p.height > 4000:
                p = p.sample(4000, seed=0)
            label = SPLIT_WORDS[split] if len(runs) == 1 else "_nolegend_"
            if p.height:
                axes[0].scatter(p["length_diff"].to_numpy(), p["margin"].to_numpy(), s=10, alpha=0.6,
                                color=colours[(run, split)], edgecolors="none", label=label)
            r = length.filter((pl.col("run") == run) & (pl.col("split") == split)).sort("step")
            if r.height:
                c = colours[(run, split)]
                axes[1].plot(r["step"].to_numpy(), r["corr_summed"].to_numpy(), color=c, ls="-", lw=1.8,
                             marker=".", ms=4)
                axes[1].plot(r["step"].to_numpy(), r["corr_per_token"].to_numpy(), color=c, ls=":", lw=1.4,
                             marker=".", ms=3)
    axes[0].axhline(0, color="0.4", lw=0.8)
    axes[0].axvline(0, color="0.4", lw=0.8)
    axes[0].set_title("margin vs length difference at the last probe step")
    axes[0].set_xlabel("chosen_len − rejected_len (tokens)")
    axes[0].set_ylabel("margin (β·nats)")
    axes[0].grid(alpha=0.3)
    axes[1].axhline(0, color="0.4", lw=0.8)
    axes[1].set_ylim(-1.02, 1.02)
    axes[1].set_title("corr(margin, length difference) over training (none at step 0)")
    axes[1].set_ylabel("Pearson correlation over probe pairs")
    _steps_axis(axes[1])
    keys = [Line2D([], [], color="0.3", ls="-", lw=1.8, label="corr: summed margin"),
            Line2D([], [], color="0.3", ls=":", lw=1.4, label="corr: per-token margin")]
    _legend(fig, axes, _run_keys(runs)[:len(runs)] + keys)  # run hues; lines here are styled by margin kind
    return _save(fig, out_dir, "length.png")


def ches_points(con) -> pl.DataFrame:
    """run, split, pair_id, ln_ches, chosen_drop (reference - policy chosen log-prob, nats) of every probe pair
    with CHES at its run's last probe step."""
    return con.sql(
        """WITH info AS (SELECT pair_id, any_value(ln_ches) AS ln_ches FROM pairs
                         WHERE pair_id IN (SELECT pair_id FROM probe_rows(-1, 'all')) GROUP BY pair_id)
           SELECT e.run, e.split, e.pair_id, i.ln_ches, e.ref_chosen_logp - e.policy_chosen_logp AS chosen_drop
           FROM probe_rows(-1, 'all') e JOIN info i USING (pair_id) WHERE i.ln_ches IS NOT NULL""").pl()


def _plot_ches(con, pred, runs, out_dir):
    """ln-CHES (known before training) against the chosen drop each probe pair showed at its run's last probe
    step, with displacement_prediction's Spearman and interval per run; None when the cache has no CHES."""
    pts = ches_points(con)
    if pts.is_empty():
        return None
    fig, axes = _figure(1, height=4.6)
    ax = axes[0]
    colours = _split_colours(runs)
    rho = pred.filter((pl.col("predictor") == "ln_ches") & (pl.col("metric") == "spearman")) if pred.height else pred
    for run in runs:
        for split in ("train", "eval"):
            p = pts.filter((pl.col("run") == run) & (pl.col("split") == split))
            if p.height:
                label = SPLIT_WORDS[split] if len(runs) == 1 else f"{run} {split}"
                ax.scatter(p["ln_ches"].to_numpy(), p["chosen_drop"].to_numpy(), s=12, alpha=0.7,
                           color=colours[(run, split)], edgecolors="none", label=label)
    ax.axhline(0, color="0.4", lw=0.8)
    lines = [f"{r['run']}: Spearman {r['estimate']:+.2f}" + (f" [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]"
             if r["ci_low"] is not None and r["ci_high"] is not None else "") + f", n {r['n']}"
             for r in rho.iter_rows(named=True) if r["estimate"] is not None]
    ax.set_title("ln-CHES before training vs the chosen drop at the last probe step\n"
                 + ("; ".join(lines) or "no rank correlation (too few pairs)"), fontsize=10)
    ax.set_xlabel("ln_ches (higher = predicted to displace)")
    ax.set_ylabel("chosen drop: reference − policy log-prob (nats)")
    ax.grid(alpha=0.3)
    _legend(fig, axes)
    return _save(fig, out_dir, "ches_vs_drop.png")


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
            mf = manifest_path(dirs.get(cache, ""))
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


def _table(df: pl.DataFrame) -> str:
    """An HTML table, numbers formatted as in the terminal (fmt.format_column); numeric cells right-aligned."""
    if df.is_empty():
        return "<p class=note>(none)</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in df.columns)
    cols = [format_column(df[c].to_list(), max_str=80) for c in df.columns]
    nums = [df.schema[c].is_numeric() for c in df.columns]
    body = "".join("<tr>" + "".join(f"<td{' class=n' if n else ''}>{html.escape(col[i])}</td>"
                                    for col, n in zip(cols, nums)) + "</tr>" for i in range(df.height))
    return f"<table><tr>{head}</tr>{body}</table>"


def _short(s: str, n: int, tail=True) -> str:
    s = s.replace("\n", "⏎ ")
    if len(s) <= n:
        return s
    return "…" + s[-n:] if tail else s[:n] + "…"


def _displaced_html(disp: pl.DataFrame, texts: dict) -> str:
    if disp.is_empty():
        return ("<p class=note>(no pair whose chosen log-prob fell below the reference by more than the step-0 "
                "noise while its margin grew)</p>")
    decoded = any(t[4] for t in texts.values())
    rows = []
    for r in disp.iter_rows(named=True):
        t = texts.get(r["pair_id"])
        if t:
            prompt, shared, ct, rt = (html.escape(x) for x in (_short(t[0], 160), _short(t[1], 160),
                                                               _short(t[2], 120, False), _short(t[3], 120, False)))
            text = (f"<div class=prompt>{prompt}</div><div>{shared}<span class=c>{ct}</span></div>"
                    f"<div>{shared}<span class=r>{rt}</span></div>")
        else:
            text = "<span class=note>(pair not in the attached caches)</span>"
        near = {True: "yes", False: "no", None: ""}[r["near_identical"]]
        cells = [html.escape(r["run"]), r["rank"], r["split"], num(r["chosen_drift"], 3), num(r["rejected_drift"], 3),
                 num(r["margin_gain"], 3), num(r["edit_distance"]), num(r["rel_edit"], 2), near,
                 num(r["ln_ches"], 3) if r["ln_ches"] is not None else "",
                 f"{r['risk_share']:.0%}" if r["risk_share"] is not None else "", num(r["length_diff"])]
        rows.append("<tr>" + "".join(f"<td class=n>{c}</td>" for c in cells) + f"<td class=text>{text}</td></tr>")
    how = ("decoded with the cache's tokenizer" if decoded else
           "token ids: the tokenizer named in the cache manifest is not a loadable local directory")
    head = ["run", "rank", "split", "chosen drift (nats)", "rejected drift (nats)", "margin gain",
            "edit distance (tokens)", "relative edit distance", "near-identical (≤ 0.1)", "ln-CHES",
            "ln-CHES rank in its cache (top %)", "length diff (tokens)",
            "prompt / chosen / rejected"]
    return (f"<p class=note>Text {how}. Each pair shows the prompt (grey), then chosen and rejected: the shared "
            f"prefix is shown on both lines; <span class=c>green</span> / <span class=r>red</span> is where "
            f"chosen / rejected differ.</p><table><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr>"
            f"{''.join(rows)}</table>")


def _prediction_html(pred: pl.DataFrame) -> str:
    """How well the pre-training predictors (ln-CHES, edit distance) picked the displaced pairs."""
    if pred.is_empty():
        return ""
    notes = sorted({n for n in pred["note"].to_list() if n})
    shown = pred.select("run", "step", "predictor", "metric", "above_noise", "estimate", "ci_low", "ci_high",
                        "null_value", "p_value", "n")
    return ("<h3>Did the pre-training ranking predict them? (<code>refcache query displacement_prediction</code>)"
            "</h3><p class=note>spearman: rank correlation of the predictor's risk (ln-CHES highest first; "
            "relative edit distance lowest first) with the chosen drop over all probe pairs; precision_at_top: "
            "share of the predictor's top pairs among the top displaced pairs, against the share a random pick "
            "gets (null_value). above_noise: the rule of the findings (step-0 noise, Holm).</p>" + _table(shown) +
            "".join(f"<p class=note>{html.escape(n)}</p>" for n in notes))


CSS = """body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1320px;color:#222;padding:0 12px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}h3{font-size:14px}
table{border-collapse:collapse;font-size:12px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 6px;
vertical-align:top;white-space:nowrap}th{background:#f4f4f4;white-space:normal}
td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #eee}.note{color:#666;font-size:12px}
.text{font-family:ui-monospace,monospace;font-size:11px;max-width:560px;word-break:break-word;
white-space:normal}
.prompt{color:#888}.c{background:#d8f5d8}.r{background:#f8d8d8}li{margin:6px 0;line-height:1.4}"""

def _displacing_runs(effects: pl.DataFrame) -> set:
    """Runs whose mean chosen drift is negative and above noise on some probe split."""
    rows = effects.filter((pl.col("metric") == "chosen_drift_mean") & pl.col("above_noise") &
                          (pl.col("estimate") < 0))
    return set(rows["run"].to_list())


def write_report(runs, caches=None, out_dir="report", *, top=None) -> Path:
    """Render the report for `runs` (run directories) into `out_dir`; return the path of report.html.
    `top` = displaced pairs in the table and in the findings (default: findings.default_top())."""
    if isinstance(runs, (str, Path)):
        runs = [runs]
    top = top or default_top()
    con = connect(runs, caches)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for k, n, _ in attached(con) if k == "run"]
    drift = run_query(con, "drift")
    coll = run_query(con, "collapse")
    length = run_query(con, "length")
    steps = con.sql("SELECT * FROM steps ORDER BY run, step").pl()
    have_pairs = bool(view_sources(con).get("pairs"))
    disp = run_query(con, "displacement", {"limit": top}) if have_pairs else pl.DataFrame()
    effects = run_query(con, "effects", {"top": top})
    imgs = []
    if steps.height:
        imgs.append(("Training curves (per optimizer step, TRL's names)", _plot_steps(steps, drift, names, out)))
    if drift.height:
        imgs.append(("Drift from the reference", _plot_drift(drift, coll, names, out)))
        imgs.append(("Pairs whose log-probs fell", _plot_shares(drift, names, out)))
        imgs.append(("Margin and accuracy on the probes", _plot_margin(drift, coll, names, out)))
        imgs.append(("Length exploitation", _plot_length(con, length, names, out)))

    runs_tab = con.sql("SELECT run, loss, beta, lr, batch_size, steps, cache, eval_cache, finished "
                       "FROM runs").pl()
    title = html.escape(", ".join(names))
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>refcache report: {title}</title>",
             f"<style>{CSS}</style></head><body>",
             f"<h1>refcache report — {title}</h1>",
             ("<p class=note>Probe pairs are a fixed subset scored every few steps; a probe at step s is scored "
              "after s updates (step 0 = the reference: every difference there is float rounding). Drift = policy "
              "− reference summed completion log-prob, in nats. Train probes are pairs the run trains on, eval "
              "probes are held out.</p>"),
             "<h2>Runs</h2>", _table(runs_tab),
             "<h2>Findings</h2><p class=note>Only effects whose interval excludes the no-change value and that "
             "exceed the step-0 float noise are stated as findings (the rule is in queries/effects.sql).</p><ul>" +
             "".join(f"<li>{html.escape(f)}</li>" for f in findings(con, top=top)) + "</ul>",
             "<details><summary class=note>the tests behind the findings (<code>refcache query effects</code>)"
             "</summary>" + _table(effects) + "</details>"]
    for heading, name in imgs:
        data = base64.b64encode((out / name).read_bytes()).decode()
        parts.append(f"<h2>{html.escape(heading)}</h2><img alt='{name}' src='data:image/png;base64,{data}'>")
        if name == "margin_accuracy.png":
            parts.append("<h3>Reward-collapse alarm windows</h3>" + _table(coll))
    parts.append(f"<h2>Top {top} displaced pairs per run (chosen fell below the reference while the margin "
                 "grew)</h2>")
    if have_pairs:
        quiet = sorted(set(disp["run"].to_list()) - _displacing_runs(effects)) if disp.height else []
        if quiet:
            parts.append(f"<p class=note><b>{html.escape(', '.join(quiet))}</b>: the mean chosen drift is within "
                         "noise (see Findings), so the run as a whole shows no displacement; the pairs below "
                         "moved by more than float rounding, not necessarily by more than chance.</p>")
        parts.append(_displaced_html(disp, _pair_texts(con, disp)))
        pred = run_query(con, "displacement_prediction", {"top": top})
        parts.append(_prediction_html(pred))
        if drift.height and (name := _plot_ches(con, pred, names, out)):
            data = base64.b64encode((out / name).read_bytes()).decode()
            parts.append(f"<img alt='{name}' src='data:image/png;base64,{data}'>")
    else:
        parts.append("<p class=note>No cache attached (pass --cache CACHE): pair text and edit distances "
                     "come from the cache.</p>")
    if len(names) > 1:
        parts.append("<h2>Run comparison at the last common probe step</h2>" + _table(run_query(con, "compare")))
    parts.append("</body></html>")
    path = out / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text("\n".join(parts))
    tmp.replace(path)
    return path
