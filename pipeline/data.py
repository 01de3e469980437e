"""Read preference data, streaming, and turn each row into a normalized pair or a readable rejection.

Sources: a JSONL / JSON / Parquet / CSV file (JSONL, JSON and CSV also gzip- or zstd-compressed: .gz, .zst),
a directory of them, or a `datasets` dataset saved with `save_to_disk`. Every reader yields rows one at a time
(record batches or lines underneath, decompressed as a stream), so memory does not grow with the dataset. A
UTF-8 byte-order mark at the start of a text file is dropped. A row that cannot be parsed (invalid UTF-8 or
JSON, nested too deeply, ...) is yielded as an error, so it is rejected alone.

Row formats (detected per row, after column mapping):
  explicit        prompt, chosen, rejected are strings
  conversational  prompt is a list of messages; chosen/rejected are lists of assistant messages (TRL format)
                  or plain strings (taken as one assistant message)
  implicit        no prompt: chosen/rejected are whole texts or whole conversations, as in HH-RLHF /
                  UltraFeedback-binarized. The prompt ends at the last assistant turn they share, never inside a
                  reply: conversations at their last assistant message; texts at the last transcript marker
                  (HH-RLHF's "Assistant:", see TRANSCRIPT_MARKERS) or, for other texts, at their longest
                  common prefix backed off to a word boundary (--prompt-split picks the rule)
"""

import codecs
import csv
import gzip
import hashlib
import io
import json
import os
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.reject import Reject
from refcache_base import UserError

FILE_SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSED = {".gz": "gzip", ".zst": "zstd"}  # for the text formats (Parquet compresses inside the file)
BOM = b"\xef\xbb\xbf"
BATCH_ROWS = 1024  # rows per record batch for columnar readers


@dataclass
class RawRow:
    """One input row: its global row number, the file it came from, and the record (or why it is unreadable)."""

    index: int
    file: str
    record: dict | None
    error: Reject | None = None


@dataclass
class Pair:
    """A normalized preference pair. Text fields are str, or lists of {role, content} messages."""

    index: int
    file: str
    pair_id: str
    kind: str  # explicit | conversational | implicit-text | implicit-conversation
    prompt: str | list
    chosen: str | list
    rejected: str | list
    split: str | None = None  # implicit rows: how the prompt was found, one of SPLIT_RULES
    extra: dict = field(default_factory=dict)  # the input's own columns the cache keeps (pipeline/columns.py)


# ---------------------------------------------------------------- sources


class Source:
    """A data path, opened: knows its files, their hash and how to stream rows out of them."""

    def __init__(self, path, columns=None):
        self.path = Path(path)
        self.columns = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", **(columns or {})}
        if not self.path.exists():
            raise UserError(f"{self.path}: no such file or directory")
        if self.path.is_dir() and _is_saved_dataset(self.path):
            self.kind = "datasets"
            self.files = sorted(p for p in self.path.rglob("*") if p.is_file())
        elif self.path.is_dir():
            self.kind = "directory"
            self.files = sorted(p for p in self.path.iterdir() if p.is_file() and file_format(p))
            if not self.files:
                raise UserError(f"{self.path}: directory has no .jsonl/.json/.parquet/.csv files "
                                "(or .jsonl/.json/.csv .gz/.zst)")
        elif file_format(self.path):
            self.kind = file_format(self.path)
            self.files = [self.path]
        else:
            raise UserError(f"{self.path}: unsupported file type (use .jsonl, .json, .parquet, .csv, gzip/zstd "
                            "compressed .jsonl/.json/.csv (.gz, .zst), a directory of them, or a "
                            "datasets.save_to_disk directory)")
        for f in self.files:
            if not os.access(f, os.R_OK):
                raise UserError(f"{f}: file is not readable")

    def sha256(self) -> str:
        """sha256 over the input bytes (file names relative to the source, then contents), streamed."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(str(f.relative_to(self.path) if f != self.path else f.name).encode() + b"\0")
            try:
                with open(f, "rb") as fh:
                    while block := fh.read(1 << 20):
                        h.update(block)
            except OSError as e:
                raise UserError(f"{f}: cannot read ({e.strerror})") from None
        return h.hexdigest()

    def approx_rows(self) -> int | None:
        """A cheap row count for progress bars (None when unknown)."""
        try:
            if self.kind == "datasets":
                return _load_dataset(self.path).num_rows
            total = 0
            for f in self.files:
                if f.suffix == ".parquet":
                    import pyarrow.parquet as pq

                    total += pq.ParquetFile(f).metadata.num_rows
                elif f.suffix in (".jsonl", ".csv"):  # not compressed files: that would read them twice
                    with open(f, "rb") as fh:
                        total += sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 20), b""))
                else:
                    return None
            return total
        except Exception:  # noqa: BLE001 - only a progress-bar estimate
            return None

    def describe(self) -> dict:
        return {"source": str(self.path.resolve()), "format": self.kind, "files": len(self.files)}

    def rows(self):
        """Yield RawRow for every input row, numbered 0.. across files (files in name order)."""
        index = 0
        if self.kind == "datasets":
            files = [(self.path, _iter_saved_dataset(self.path))]
        else:
            files = [(f, _READERS[file_format(f)](f)) for f in self.files]
        for f, it in files:
            name = str(f.relative_to(self.path)) if f != self.path else f.name
            for record, error in it:
                yield RawRow(index, name, record, error)
                index += 1


def file_format(f: Path) -> str | None:
    """jsonl / json / parquet / csv from the name (x.jsonl.gz -> jsonl), or None when not an input file."""
    suffixes = f.suffixes[-2:]
    if suffixes and suffixes[-1] in COMPRESSED:
        fmt = FILE_SUFFIXES.get(suffixes[0]) if len(suffixes) == 2 else None
        return fmt if fmt != "parquet" else None
    return FILE_SUFFIXES.get(f.suffix)


def _is_saved_dataset(d: Path) -> bool:
    return (d / "dataset_info.json").exists() or (d / "state.json").exists() or (d / "dataset_dict.json").exists()


def _load_dataset(d: Path):
    if (d / "dataset_dict.json").exists():
        splits = json.loads((d / "dataset_dict.json").read_text()).get("splits", [])
        raise UserError(f"{d}: a DatasetDict with splits {splits}; point at one split, e.g. {d / splits[0]}"
                        if splits else f"{d}: a DatasetDict; point at one split directory")
    try:
        import datasets

        return datasets.load_from_disk(str(d))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure here is the dataset's, reported on one line
        raise UserError(f"{d}: cannot load the saved dataset ({type(e).__name__}: {e})") from None


def _iter_saved_dataset(d: Path):
    ds = _load_dataset(d)
    for batch in ds.iter(batch_size=BATCH_ROWS):  # memory-mapped arrow, one batch at a time
        yield from _batch_rows(batch)


def _batch_rows(batch: dict):
    names = list(batch)
    n = len(batch[names[0]]) if names else 0
    for i in range(n):
        yield {k: batch[k][i] for k in names}, None


def _open(f: Path):
    """The file's bytes as a buffered binary stream, decompressed on the fly for .gz / .zst; the caller closes
    it with `with`."""
    try:
        codec = COMPRESSED.get(f.suffix)
        if codec == "gzip":
            return gzip.open(f, "rb")
        if codec == "zstd":
            import pyarrow as pa

            return io.BufferedReader(pa.input_stream(str(f), compression="zstd"), 1 << 20)
        return open(f, "rb")
    except OSError as e:
        raise UserError(f"{f}: cannot open ({e.strerror or e})") from None


def _damaged(f: Path, where: str, e: Exception) -> UserError:
    return UserError(f"{f}: cannot read past {where} ({type(e).__name__}: {str(e).strip() or 'cut off'}); the "
                     "file is damaged or incomplete: fetch it again (rows read so far are kept for resume)")


def _lines(f: Path):
    """(line number, bytes) of a text file, BOM dropped, decompressed as a stream; a damaged compressed stream
    ends with one line naming the file."""
    with _open(f) as fh:
        lineno = 0
        try:
            for lineno, raw in enumerate(fh, 1):
                yield lineno, raw[3:] if lineno == 1 and raw.startswith(BOM) else raw
        except (OSError, EOFError, zlib.error, ValueError) as e:
            raise _damaged(f, f"line {lineno}", e) from None


def _parse_line(lineno, raw):
    """(record, None) or (None, Reject) for one JSON line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, Reject("invalid_text", f"line {lineno}: invalid UTF-8 at byte {e.start}")
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        return None, Reject("invalid_json", f"line {lineno}: invalid JSON ({e.msg} at column {e.colno})")
    except RecursionError:
        return None, Reject("too_deep", f"line {lineno}: JSON nested too deeply to parse")
    except Exception as e:  # noqa: BLE001 - whatever else goes wrong with one line rejects that line
        return None, Reject("invalid_json", f"line {lineno}: cannot parse ({type(e).__name__})")
    if not isinstance(rec, dict):
        return None, Reject("not_an_object", f"line {lineno}: expected a JSON object, got {type(rec).__name__}")
    return rec, None


def _read_jsonl(f: Path):
    for lineno, raw in _lines(f):
        if raw.strip():  # blank lines are not rows
            yield _parse_line(lineno, raw)


def _read_json(f: Path):
    """A top-level JSON array of objects, parsed one element at a time. (JSON Lines in a .json file also work.)"""
    with _open(f) as fh:
        try:
            head = fh.peek(4096)[:4096].lstrip()
        except (OSError, EOFError, zlib.error, ValueError) as e:
            raise _damaged(f, "its start", e) from None
        if head.startswith(BOM):
            head = head[3:].lstrip()
        if head.startswith(b"{"):  # JSON Lines with a .json name (datasets' to_json writes these)
            fh.close()
            yield from _read_jsonl(f)
            return
        if not head.startswith(b"["):
            raise UserError(f"{f}: expected a JSON array of objects (or JSON Lines)")
        decoder = codecs.getincrementaldecoder("utf-8-sig")("strict")
        dec = json.JSONDecoder()
        buf, pos, eof, started, n = "", 0, False, False, 0

        def more():
            nonlocal buf, pos, eof
            try:
                block = fh.read(1 << 18)
            except (OSError, EOFError, zlib.error, ValueError) as e:
                raise _damaged(f, f"element {n}", e) from None
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise UserError(f"{f}: invalid UTF-8 near element {n} ({e.reason}); fix the file or use JSONL, "
                                "where bad lines are rejected one by one") from None
            buf, pos = buf[pos:] + text, 0
            eof = not block

        while True:
            skip = " \t\r\n," if started else " \t\r\n"  # commas separate elements inside the array
            while pos < len(buf) and buf[pos] in skip:
                pos += 1
            if pos >= len(buf):
                if eof:
                    raise UserError(f"{f}: JSON array is not closed (file truncated?)")
                more()
                continue
            if not started:
                if buf[pos] != "[":
                    raise UserError(f"{f}: expected a JSON array of objects")
                started, pos = True, pos + 1
                continue
            if buf[pos] == "]":
                return
            try:
                rec, end = dec.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if not eof:
                    more()
                    continue
                raise UserError(f"{f}: invalid JSON in element {n} ({e.msg}); fix the file or use JSONL") from None
            except RecursionError:
                end = _value_end(buf, pos)
                if end is None:  # the element goes on past the buffer
                    if eof:
                        raise UserError(f"{f}: JSON array is not closed (file truncated?)") from None
                    more()
                    continue
                pos = end
                n += 1
                yield None, Reject("too_deep", f"element {n - 1}: JSON nested too deeply to parse")
                continue
            pos = end
            n += 1
            if isinstance(rec, dict):
                yield rec, None
            else:
                yield None, Reject("not_an_object",
                                   f"element {n - 1}: expected a JSON object, got {type(rec).__name__}")


def _value_end(buf: str, pos: int) -> int | None:
    """End of the JSON array/object starting at buf[pos], found without recursion; None if not in buf yet."""
    depth, in_str, esc = 0, False, False
    for j in range(pos, len(buf)):
        c = buf[j]
        if in_str:
            esc, in_str = (False, True) if esc else (c == "\\", c != '"')
        elif c == '"':
            in_str = True
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return j + 1
    return None


def open_parquet(f: Path):
    """pyarrow.parquet.ParquetFile(f), or a one-line UserError naming the file."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(f)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise UserError(f"{f}: not a readable Parquet file ({e})") from None


def _read_parquet(f: Path):
    pf = open_parquet(f)
    for batch in pf.iter_batches(batch_size=BATCH_ROWS):
        for rec in batch.to_pylist():
            yield rec, None


def _read_csv(f: Path):
    csv.field_size_limit(sys.maxsize)
    with _open(f) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.DictReader(fh)  # utf-8-sig: a BOM (Excel writes one) is not part of the first column's name
        i = 0
        try:
            for i, rec in enumerate(reader, 1):
                bad = [k for k, v in rec.items() if isinstance(v, str) and _has_surrogates(v)]
                if bad:
                    yield None, Reject("invalid_text", f"CSV row {i}: invalid UTF-8 in column {bad[0]!r}")
                    continue
                if None in rec:
                    yield None, Reject("bad_csv_row", f"CSV row {i}: more fields than the header has")
                    continue
                yield {k: _maybe_messages(v) for k, v in rec.items()}, None
        except (OSError, EOFError, zlib.error) as e:
            raise _damaged(f, f"CSV row {i}", e) from None


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _maybe_messages(v):
    """CSV cells are strings; a cell holding a JSON list of messages is read as that list."""
    if isinstance(v, str) and v.lstrip().startswith("[{"):
        try:
            val = json.loads(v)
        except (json.JSONDecodeError, RecursionError):
            return v
        if isinstance(val, list) and all(isinstance(m, dict) and "role" in m for m in val):
            return val
    return v


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "csv": _read_csv}


# ---------------------------------------------------------------- normalization

# Plain-text transcripts `--prompt-split auto` recognises, as (user marker, assistant marker).
TRANSCRIPT_MARKERS = (
    ("\nHuman:", "\nAssistant:"),  # Anthropic HH-RLHF: "\n\nHuman: ...\n\nAssistant: ..."
    ("\nUser:", "\nAssistant:"),
    ("### Human:", "### Assistant:"),  # OpenAssistant Guanaco
    ("USER:", "ASSISTANT:"),  # Vicuna
)
SPLIT_RULES = ("marker", "prefix", "last assistant turn")  # how an implicit prompt was found (Pair.split)


def pair_id(prompt, chosen, rejected) -> str:
    """Stable id of (prompt, chosen, rejected) as given: sha256 of canonical JSON, 32 hex chars."""
    blob = json.dumps([prompt, chosen, rejected], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def check_prompt_split(value: str) -> str:
    """--prompt-split: 'auto', 'prefix', or a marker string (typed escapes \\n and \\t read as newline, tab)."""
    if value in ("auto", "prefix"):
        return value
    marker = value.replace("\\n", "\n").replace("\\t", "\t")
    if not marker.strip():
        raise UserError(f"--prompt-split {value!r}: use auto, prefix, or a marker string such as '\\n\\nAssistant:'")
    return marker


def normalize(row: RawRow, columns: dict, prompt_split: str = "auto", extras=None) -> Pair:
    """RawRow -> Pair, or raise Reject(kind, reason). `prompt_split` is how implicit text prompts are found:
    'auto' (transcript markers such as HH-RLHF's, else the common prefix), 'prefix', or a marker string.
    `extras` (pipeline.columns.ExtraColumns) says which other columns the pair carries, with what type."""
    if row.error:
        raise row.error
    rec = row.record
    pc, cc, rc = columns["prompt"], columns["chosen"], columns["rejected"]
    for col in (cc, rc):
        if col not in rec:
            raise Reject("missing_field", f"missing field {col!r} (fields: {', '.join(map(str, rec)) or 'none'})")
    prompt, chosen, rejected = rec.get(pc), rec[cc], rec[rc]
    for col, v in ((cc, chosen), (rc, rejected)):
        _check_value(col, v, allow_empty=False)
    if pc in rec:  # a null prompt is an error, not an implicit prompt
        if prompt is None:
            raise Reject("null_field", f"field {pc!r} is null (leave the field out where the prompt is inside "
                                       f"{cc!r} and {rc!r})")
        _check_value(pc, prompt, allow_empty=False)
    pid = pair_id(prompt, chosen, rejected)

    split = None
    if pc not in rec or (isinstance(prompt, str) and isinstance(chosen, list) and _is_whole_conversation(chosen)):
        kind, split, (p, c, r) = _split_implicit(chosen, rejected, cc, rc, prompt_split)
    elif isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
        kind, p, c, r = "explicit", prompt, chosen, rejected
    else:
        kind = "conversational"
        p = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        c, r = (_as_assistant(v) for v in (chosen, rejected))
    if isinstance(p, list):
        _check_roles(p, c, cc)
        _check_roles(p, r, rc)
    if c == r:
        raise Reject("same_completion", "chosen and rejected are identical")
    return Pair(row.index, row.file, pid, kind, p, c, r, split, extras.values(rec) if extras else {})


def _check_value(col, v, allow_empty):
    if v is None:
        raise Reject("null_field", f"field {col!r} is null")
    if isinstance(v, str):
        if not allow_empty and not v.strip():
            raise Reject("empty_field", f"field {col!r} is empty")
        return
    if isinstance(v, list):
        if not v:
            raise Reject("empty_field", f"field {col!r} is an empty list")
        for i, m in enumerate(v):
            if not isinstance(m, dict):
                raise Reject("wrong_type",
                             f"field {col!r}[{i}] is {type(m).__name__}, expected a message {{role, content}}")
            if not isinstance(m.get("role"), str):
                raise Reject("wrong_type", f"field {col!r}[{i}] has no 'role' string")
            if not isinstance(m.get("content"), str):
                raise Reject("wrong_type", f"field {col!r}[{i}] has no 'content' string")
        return
    raise Reject("wrong_type", f"field {col!r} is {type(v).__name__}, expected a string or a list of messages")


def _check_roles(prompt: list, reply: list, col):
    """The reply answers the prompt: it starts and ends with an assistant turn, after a prompt that does not."""
    if reply[0]["role"] != "assistant":
        raise Reject("bad_turns", f"{col!r} starts with a {reply[0]['role']!r} turn; the completion must be the "
                                  "assistant's reply")
    if reply[-1]["role"] != "assistant":
        raise Reject("bad_turns", f"the {col!r} conversation ends on a {reply[-1]['role']!r} turn; it must end "
                                  "with the assistant's reply")
    if prompt[-1]["role"] == "assistant":
        raise Reject("bad_turns", f"the prompt ends on an assistant turn, so {col!r} would be a second assistant "
                                  "turn in a row")


def _is_whole_conversation(msgs) -> bool:
    return any(m["role"] != "assistant" for m in msgs)


def _as_assistant(v):
    return [{"role": "assistant", "content": v}] if isinstance(v, str) else [_clean(m) for m in v]


def _clean(m):
    return {"role": m["role"], "content": m["content"]}


def _split_implicit(chosen, rejected, cc, rc, prompt_split):
    """(kind, split rule, (prompt, chosen, rejected)) of a row whose prompt is inside chosen and rejected."""
    if isinstance(chosen, str) and isinstance(rejected, str):
        return ("implicit-text", *_split_text(chosen, rejected, cc, rc, prompt_split))
    if isinstance(chosen, list) and isinstance(rejected, list):
        chosen, rejected = [_clean(m) for m in chosen], [_clean(m) for m in rejected]
        last = [max((i for i, m in enumerate(x) if m["role"] == "assistant"), default=-1) for x in (chosen, rejected)]
        if min(last) <= 0:
            raise Reject("no_shared_prompt",
                         f"conversation in {cc if last[0] <= 0 else rc!r} has no assistant turn after the prompt")
        if chosen[: last[0]] != rejected[: last[1]]:
            raise Reject("no_shared_prompt",
                         "chosen and rejected conversations differ before their last assistant turn")
        return "implicit-conversation", "last assistant turn", (chosen[: last[0]], chosen[last[0]:],
                                                                rejected[last[1]:])
    raise Reject("wrong_type", f"fields {cc!r} and {rc!r} must both be strings or both be message lists")


def _split_text(chosen, rejected, cc, rc, prompt_split):
    """(split rule, (prompt, chosen, rejected)) of two whole texts."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    if prompt_split == "prefix":
        return "prefix", _split_prefix(chosen, rejected, n, both_words=False)
    if prompt_split == "auto":
        style = next((s for s in TRANSCRIPT_MARKERS if _has_turns(chosen, *s) or _has_turns(rejected, *s)), None)
        if style is None:
            return "prefix", _split_prefix(chosen, rejected, n, both_words=True)
        user, marker = style
    else:
        user, marker = None, prompt_split
    return "marker", _split_at_marker(chosen, rejected, n, marker, user, cc, rc)


def _has_turns(text, user, assistant) -> bool:
    """Whether `text` reads as a transcript in this layout: a user turn, then an assistant marker."""
    first = text.find(assistant)
    return first > 0 and (user in text[:first] or text.lstrip().startswith(user.strip()))


def _split_at_marker(chosen, rejected, n, marker, user, cc, rc):
    """The prompt ends with the last `marker` inside the n characters chosen and rejected share."""
    at = chosen.rfind(marker, 0, n)
    if at < 0:
        how = "--prompt-split marker" if user is None else "transcript marker"
        raise Reject("no_shared_prompt", f"chosen and rejected differ before their first {marker!r} ({how}), so "
                                         "they share no prompt")
    end = at + len(marker)
    for col, reply in ((cc, chosen[end:]), (rc, rejected[end:])):
        if not reply.strip():
            raise Reject("empty_completion", f"{col!r} has an empty reply after its last {marker!r}")
        if marker in reply:
            raise Reject("no_shared_prompt", f"chosen and rejected differ before their last {marker!r} turn "
                                             f"({col!r} goes on past it)")
        if user is not None and user in reply:
            raise Reject("bad_turns", f"the {col!r} transcript ends on a {user.strip()!r} turn; it must end with the "
                         "assistant's reply")
    return chosen[:end], chosen[end:], rejected[end:]


def _split_prefix(chosen, rejected, n, both_words):
    """The longest common prefix (TRL's rule), backed off to a word boundary of chosen (`prefix`, the rule
    before `auto`) or of both texts (`auto`: "A handy" / "At 5%" is cut before "A", not after it)."""
    n = min(n, len(chosen) - 1, len(rejected) - 1)  # leave each completion at least one character
    at_space = chosen[n].isspace() and (rejected[n].isspace() or not both_words)
    if n > 0 and not chosen[n - 1].isspace() and not at_space:  # mid-word: back off to a space
        cut = max(chosen.rfind(" ", 0, n), chosen.rfind("\n", 0, n))
        n = cut if cut > 0 else n
    if n <= 0 or not chosen[:n].strip():
        raise Reject("no_shared_prompt", "no prompt field and chosen/rejected share no common prefix to use as the "
                                         "prompt (map the prompt column with --prompt-col)")
    return chosen[:n], chosen[n:], rejected[n:]
