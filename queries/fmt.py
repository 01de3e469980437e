"""Numbers and tables for people: one formatter used by the terminal tables, the findings and the report.

num(x)                 a number by its magnitude: 2400 (integers as integers), 0.5938, -18.15, 1e-06, 2.86e-06
format_column(values)  the cells of one column, with decimals chosen from the column's largest value
render_table(df, ...)  a plain-text table that fits a width: all columns if they fit; else, for a few rows,
                       one line per column (transposed); else the leading columns that fit and a note;
                       no rows: one line saying what that means
"""

import math
from decimal import Decimal

import polars as pl

SIG = 4  # significant digits of a plain number
NOTHING = "nothing matched"  # what a table without rows means, unless its maker says
GAP = "  "  # between table columns


def _is_integral(x: float) -> bool:
    return math.isfinite(x) and x == int(x) and abs(x) < 1e15


def num(x, sig: int = SIG) -> str:
    """`x` by its magnitude: integers as integers, else at most `sig` significant digits (trailing zeros
    dropped), scientific below 1e-3 and from 1e6."""
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, int):
        return str(x)
    x = float(x)  # float, Decimal
    if math.isnan(x):
        return "NaN"
    if _is_integral(x):
        return str(int(x))
    if not math.isfinite(x) or abs(x) < 1e-3 or abs(x) >= 1e6:
        return f"{x:.{sig - 1}g}" if math.isfinite(x) else ("inf" if x > 0 else "-inf")
    decimals = max(0, sig - 1 - math.floor(math.log10(abs(x))))
    text = f"{x:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def format_column(values, max_str: int = 60) -> list[str]:
    """Cells of one column. Floats of similar magnitude (within 100x) share the decimals that give the
    largest SIG significant digits (so the column reads aligned), less the trailing zeros all of them have;
    otherwise, and for a value those decimals would show as 0, each float gets num(); integral values print
    as integers."""
    values = [float(v) if isinstance(v, Decimal) else v for v in values]  # SQL literals like 2400.0
    finite = [abs(v) for v in values if isinstance(v, float) and math.isfinite(v) and not _is_integral(v)]
    top = max(finite, default=0.0)
    decimals = None
    if 1e-3 <= top < 1e6 and top <= 100 * min(finite):  # similar magnitudes: shared decimals
        decimals = max(0, SIG - 1 - math.floor(math.log10(top)))
    out, fixed = [], []
    for v in values:
        if isinstance(v, float) and decimals is not None and math.isfinite(v) and not _is_integral(v) \
                and abs(v) >= 0.5 * 10 ** -decimals:
            fixed.append(len(out))
            out.append(f"{v:.{decimals}f}")
        elif isinstance(v, str):
            s = v.replace("\n", "⏎")
            out.append(s if len(s) <= max_str else s[: max_str - 1] + "…")
        elif isinstance(v, (list, tuple)):
            s = "[" + ", ".join(num(x) if isinstance(x, (int, float)) else str(x) for x in v) + "]"
            out.append(s if len(s) <= max_str else s[: max_str - 1] + "…")
        else:
            out.append(num(v) if v is None or isinstance(v, (bool, int, float)) else str(v))
    if fixed:  # drop the trailing zeros every fixed cell has (0.1000 -> 0.1), keeping the column aligned
        cut = min(len(out[i]) - len(out[i].rstrip("0")) for i in fixed)
        cut = min(cut, decimals)
        if cut:
            for i in fixed:
                out[i] = out[i][:-cut].rstrip(".") if cut == decimals else out[i][:-cut]
    return out


def _numeric(dtype) -> bool:
    return dtype.is_numeric()


def _grid(header: list[str], cols: list[list[str]], right: list[bool]) -> list[str]:
    widths = [max([len(h)] + [len(c) for c in col]) for h, col in zip(header, cols)]

    def line(cells):
        return GAP.join((c.rjust(w) if r else c.ljust(w)) for c, w, r in zip(cells, widths, right)).rstrip()

    lines = [line(header), GAP.join("-" * w for w in widths)]
    lines += [line([col[i] for col in cols]) for i in range(len(cols[0]) if cols else 0)]
    return lines


def render_table(df: pl.DataFrame, width: int | None = None, max_rows: int | None = 60,
                 more_hint: str = "", empty: str = NOTHING) -> str:
    """`df` as text no wider than `width` (None: no limit) with at most `max_rows` rows (None/0: all).
    What is left out is said in a note at the end, with `more_hint` (how to see it) appended. Without rows:
    "no rows: `empty`" (what that means), one line."""
    if df.width == 0:
        return "(no columns)\n"
    if df.height == 0:
        return f"no rows: {empty}\n"
    shown = df if not max_rows or df.height <= max_rows else df.head(max_rows)
    cells = [format_column(shown[c].to_list()) for c in df.columns]
    right = [_numeric(df.schema[c]) for c in df.columns]
    lines = _grid(df.columns, cells, right)
    notes = []
    if width is not None and max(len(x) for x in lines) > width:
        if df.height <= 4:  # a few wide rows: one line per column reads better
            names = list(df.columns)
            t_cols = [names] + [[cells[j][i] for j in range(len(names))] for i in range(shown.height)]
            t_lines = _grid(["column"] + [f"row {i + 1}" for i in range(shown.height)], t_cols,
                            [False] + [True] * shown.height)
            if max(len(x) for x in t_lines) <= width:
                lines = t_lines
        if max(len(x) for x in lines) > width:
            keep, used = [], 0
            for j, c in enumerate(df.columns):
                w = max([len(c)] + [len(x) for x in cells[j]]) + (len(GAP) if keep else 0)
                if keep and used + w > width:
                    break
                keep.append(j)
                used += w
            lines = _grid([df.columns[j] for j in keep], [cells[j] for j in keep], [right[j] for j in keep])
            hidden = [c for j, c in enumerate(df.columns) if j not in keep]
            notes.append(f"{len(hidden)} of {df.width} columns not shown (wider than {width} characters): "
                         f"{', '.join(hidden)}; choose columns with --columns NAME,NAME")
    if shown.height < df.height:
        notes.append(f"showing the first {shown.height} of {df.height} rows; all rows: --max-rows 0")
    text = "\n".join(lines) + f"\n{df.height} row{'s' if df.height != 1 else ''}\n"
    if notes:
        text += "".join(f"note: {n}\n" for n in notes) + (f"note: {more_hint}\n" if more_hint else "")
    return text
