"""Why an input row is not in the cache: a readable reason, and its kind.

Every rejection has one short, stable kind (KINDS, the one list of them) and a reason text that names the row's
own details (which field, which row it repeats, how many tokens). rejected_rows.parquet keeps both, `reason_kind`
and `reason`, so `SELECT reason_kind, count(*) FROM rejected_rows GROUP BY reason_kind` counts rows by cause
while `reason` still says what to fix in each row. A rejection travels as (source_index, source_file,
reason_kind, reason); part metadata written before kinds existed holds (source_index, source_file, reason),
read here with the kind None (null in rejected_rows.parquet; NOT_RECORDED in counts).
"""

# kind -> what it means (README lists them). Only add to this list; a kind's name never changes.
KINDS = {
    "invalid_text": "bytes that are not UTF-8 text, or text holding lone surrogates",
    "invalid_json": "a line or element that is not valid JSON",
    "too_deep": "JSON nested too deeply to parse or process",
    "not_an_object": "a JSON value that is not an object {...}",
    "bad_csv_row": "a CSV row with more fields than the header",
    "missing_field": "no chosen or rejected column in the row",
    "null_field": "prompt, chosen or rejected is null",
    "empty_field": "prompt, chosen or rejected is an empty string or list",
    "wrong_type": "a field that is neither a string nor a list of {role, content} messages, or mixes them",
    "column_type": "one of the input's own columns changed type after the scan",
    "bad_turns": "turns out of order: a completion that is not the assistant's reply, a prompt ending on one",
    "no_shared_prompt": "no prompt column, and chosen and rejected share no prompt to split off",
    "same_completion": "chosen and rejected are the same text, or render to the same tokens",
    "duplicate": "a later copy of a pair (same prompt, chosen and rejected) read before",
    "no_chat_template": "a conversation, but the tokenizer has no chat template",
    "template_error": "the chat template raised an error (e.g. a role it does not support)",
    "not_a_prefix": "the prompt's rendering is not a prefix of the conversation's",
    "empty_completion": "a completion with no text or no tokens",
    "no_prompt_tokens": "the prompt's first token merges with the completion: nothing to condition on",
    "boundary_merge": "the prompt's last tokens merge with the completion (--strict-boundary)",
    "too_long": "the prompt leaves no room for the completion within --max-length",
    "same_after_truncation": "chosen and rejected are identical once cut to --max-length",
    "error": "any other error while reading or tokenizing the row (the reason names it)",
}
NOT_RECORDED = "(not recorded)"  # counts' key for rows rejected by a refcache before kinds


class Reject(Exception):
    """A row that cannot be used: `kind` (one of KINDS) and the readable reason (the message)."""

    def __init__(self, kind: str, reason: str):
        if kind not in KINDS:
            raise ValueError(f"unknown rejection kind {kind!r}: add it to pipeline.reject.KINDS")
        super().__init__(reason)
        self.kind = kind

    @property
    def reason(self) -> str:
        return str(self)


def from_error(e: Exception) -> Reject:
    """An unexpected error while reading or tokenizing one row, as that row's rejection."""
    if isinstance(e, Reject):
        return e
    if isinstance(e, RecursionError):
        return Reject("too_deep", "nested too deeply to process (RecursionError)")
    if isinstance(e, UnicodeError) and hasattr(e, "object"):
        return Reject("invalid_text", f"invalid text: {e.object[e.start:e.end]!a} ({e.reason}); fix the encoding "
                                      "of this row")
    first = str(e).strip().splitlines()
    return Reject("error", f"cannot process this row ({type(e).__name__}{': ' + first[0][:200] if first else ''})")


def row(index: int, file: str, e: Reject) -> tuple:
    """One rejection as it is recorded: (source_index, source_file, reason_kind, reason)."""
    return index, file, e.kind, str(e)


def as_row(r) -> tuple:
    """A recorded rejection, from part metadata of any version, as (source_index, source_file, kind, reason)."""
    return (r[0], r[1], None, r[2]) if len(r) == 3 else tuple(r)


def by_kind(rows) -> dict:
    """{kind: {"rows": n, "first": {"source_file", "source_index", "reason"}}} over recorded rejections (any
    version; a kind not recorded is counted under NOT_RECORDED), "first" being the kind's lowest source_index."""
    out = {}
    for i, f, kind, reason in sorted(map(as_row, rows), key=lambda r: r[0]):
        kind = kind or NOT_RECORDED
        if kind not in out:
            out[kind] = {"rows": 0, "first": {"source_file": f, "source_index": i, "reason": reason}}
        out[kind]["rows"] += 1
    return out


def add_by_kind(total: dict, more: dict) -> dict:
    """`more`'s counts added into `total` (both from `by_kind`), in place."""
    for kind, v in more.items():
        t = total.setdefault(kind, {"rows": 0, "first": v["first"]})
        t["rows"] += v["rows"]
        if v["first"]["source_index"] < t["first"]["source_index"]:
            t["first"] = v["first"]
    return total


def top_kinds(counts: dict, n: int = 5, width: int = 100) -> list[str]:
    """Lines for the summary: the n most frequent kinds (`by_kind`'s counts), each with its count and its first
    row, whose reason is cut to one line of at most `width` characters."""
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1]["rows"], kv[0]))[:n]
    pad = max((len(k) for k, _ in ranked), default=0)
    digits = max((len(f"{v['rows']:,}") for _, v in ranked), default=0)
    lines = []
    for kind, v in ranked:
        first = v["first"]
        reason = " ".join(str(first["reason"]).split())
        reason = reason if len(reason) <= width else reason[:width - 3] + "..."
        lines.append(f"  {kind:<{pad}} {v['rows']:>{digits},}  e.g. {first['source_file']} row "
                     f"{first['source_index']}: {reason}")
    return lines
