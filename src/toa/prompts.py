"""Streaming prompt loading: JSONL, CSV or Parquet from any fsspec URL, one row at a time.

A `PromptSource` names the file and how to read it. Defaults: format "auto" (from the path's
suffix, a compression suffix such as ".gz" ignored), text in the field "prompt", the id in
"id" (derived from the text when absent or null), an optional reference answer in
"reference", on_bad_row "fail", no limit. Compression is inferred from the suffix by fsspec.

`iter_prompts` is a generator and never holds the file in memory: JSONL and CSV are read
line by line from the file opened in binary mode (each line decoded here, so undecodable
bytes are caught on the line they occur), Parquet batch by batch with
`pyarrow.parquet.ParquetFile.iter_batches`. Beyond the current line or batch, the only state
it keeps is a compact table of 64-bit digests of the prompt ids seen so far, needed to catch
duplicates (16-32 bytes per distinct prompt, whatever the prompt length).

A bad row (invalid JSON, a row that is not an object, a missing/empty/non-string text, a
duplicate prompt_id, undecodable bytes) raises `BadPromptRow` ("prompts.jsonl:7: missing
field 'prompt'") with on_bad_row="fail", or is yielded as a `SkippedRow` with "skip". Lines
are 1-based physical lines (the CSV header is line 1); Parquet rows are 1-based row numbers.
Blank lines are ignored.

`DEFAULT_PROMPTS` is the path of the small prompt set packaged with toa.

Verifiable sources (questions with known answers, so methods compare by accuracy too):
`preset = "gsm8k"` reads "question" and "answer" and keeps as the reference the gold after
"#### " (a bare number is taken as is); `preset = "math"` reads "problem" and the gold from "answer", or
where a row has none, the last \\boxed{} of its "solution" (a field without one is taken whole). A preset only fills fields left unset; `answer_format` is the extraction on its own.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import posixpath
import unicodedata
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import fsspec
from fsspec.utils import infer_compression
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from toa.errors import UserError
from toa.rows import Prompt, SkippedRow
from toa.storage import mask_credentials, plain_options

DEFAULT_PROMPTS: str = str(Path(__file__).parent / "data" / "default_prompts.jsonl")

RAW_LIMIT = 500  # SkippedRow.raw keeps at most this many characters of the offending row
PARQUET_BATCH_ROWS = 1024  # rows per Arrow batch: bounds memory independently of the file

_SUFFIX_FORMATS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet", ".pq": "parquet",
}


class BadPromptRow(UserError):
    """A prompt row that cannot be used; the message reads "<file>:<line>: <reason>"."""

    def __init__(self, source: str, line: int, reason: str):
        self.source, self.line, self.reason = source, line, reason
        super().__init__(f"{display_name(source)}:{line}: {reason}")


# What a preset fills in when the source leaves it unset.
PRESETS: dict[str, dict[str, str]] = {
    "gsm8k": {"text_field": "question", "reference_field": "answer", "answer_format": "gsm8k"},
    "math": {"text_field": "problem", "reference_field": "answer", "reference_fallback_field": "solution",
             "answer_format": "math"},
}


class PromptSource(BaseModel):
    """Where the prompts are and how to read them."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="Any fsspec URL or local path (file://, s3://, memory://, https://...); "
                                  "compression (.gz, .bz2, .xz, .zst) is inferred from the suffix.")
    format: Literal["auto", "jsonl", "parquet", "csv"] = Field(
        "auto", description="File format; 'auto' picks it from the suffix, ignoring a compression suffix.")
    text_field: str = Field("prompt", description="Field holding the prompt text.")
    id_field: str | None = Field(
        "id", description="Field holding the prompt id; when absent, null or None, the id is derived "
                          "from the normalised text (see prompt_id_for).")
    reference_field: str | None = Field(
        "reference", description="Optional field holding a reference answer; missing values become None.")
    on_bad_row: Literal["fail", "skip"] = Field(
        "fail", description="'fail' raises BadPromptRow at the first bad row; "
                            "'skip' yields a SkippedRow for it and goes on.")
    limit: int | None = Field(None, ge=0, description="Stop after this many good prompts; None reads all.")
    preset: Literal["gsm8k", "math"] | None = Field(
        None, description="A verifiable source layout: 'gsm8k' (question, answer with the gold after '#### ') "
                          "or 'math' (problem; answer, else the last \\boxed{} of solution); fills only unset fields.")
    reference_fallback_field: str | None = Field(
        None, description="Where a row has no reference_field value, the reference is read from this field.")
    answer_format: Literal["raw", "gsm8k", "math"] = Field(
        "raw", description="How the reference field becomes the gold answer: 'raw' as is, 'gsm8k' the text "
                           "after the last '#### ', 'math' the last \\boxed{} content. Not 'raw' marks the source "
                           "verifiable: every sample gets a verdict (accuracy views).")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed to fsspec (credentials, endpoints, ...); not part of the fingerprint.")
    _mask_credentials = field_validator("storage_options")(mask_credentials)  # masked when printed or stored

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            data = {**PRESETS[data["preset"]], **data}  # explicit fields win over the preset
        return data

    @property
    def verifiable(self) -> bool:
        """References are gold answers a verifier can check (toa.verdicts)."""
        return self.answer_format != "raw"

    def resolved_format(self) -> str:
        return self.format if self.format != "auto" else format_from_suffix(self.path)

    def fingerprint(self) -> dict[str, Any]:
        """The fields that change which prompts come out; storage_options are left out on
        purpose (they hold credentials and do not change the data)."""
        return {
            "path": self.path, "format": self.resolved_format(), "text_field": self.text_field,
            "id_field": self.id_field, "reference_field": self.reference_field, "limit": self.limit,
            "answer_format": self.answer_format, "reference_fallback_field": self.reference_fallback_field,
        }


# --- names and ids -------------------------------------------------------------------------

def _url_path(path: str) -> str:
    """The path part of a URL, without query or fragment (https://h/p.jsonl?sig=... -> /p.jsonl)."""
    return path.split("?", 1)[0].split("#", 1)[0]


def display_name(path: str) -> str:
    """The file name used in messages: 's3://b/x/prompts.jsonl.gz' -> 'prompts.jsonl.gz'."""
    return posixpath.basename(_url_path(path).rstrip("/")) or path


def format_from_suffix(path: str) -> str:
    name = display_name(path).lower()
    if infer_compression(name):  # "prompts.jsonl.gz" -> look at ".jsonl"
        name = posixpath.splitext(name)[0]
    suffix = posixpath.splitext(name)[1]
    if suffix not in _SUFFIX_FORMATS:
        raise ValueError(f"cannot infer the prompt format of {path!r} from its suffix {suffix!r}; "
                         f"set format to one of jsonl, csv, parquet")
    return _SUFFIX_FORMATS[suffix]


def normalize_text(text: str) -> str:
    """NFC, stripped, internal whitespace runs collapsed to one space."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def prompt_id_for(text: str) -> str:
    """Stable id of a prompt: the first 16 hex digits of sha256(normalised text)."""
    return hashlib.sha256(normalize_text(text).encode("utf-8")).hexdigest()[:16]


class _SeenIds:
    """The prompt ids seen so far, as 64-bit digests in an open-addressing table of machine
    words: 16-32 bytes per distinct id, where a Python set of ints costs ~70. This is the only
    state that grows with the file, so it bounds what "streaming" costs on big files.
    A false duplicate needs a 64-bit collision (about 1e-9 at 200k prompts)."""

    def __init__(self) -> None:
        self._table = array("Q", [0]) * 1024  # 0 marks an empty slot; digests are never 0
        self._used = 0

    @staticmethod
    def _digest(prompt_id: str) -> int:
        d = int.from_bytes(hashlib.blake2b(prompt_id.encode("utf-8"), digest_size=8).digest(), "big")
        return d or 1

    def add(self, prompt_id: str) -> bool:
        """Record the id; False when it was already there."""
        if 2 * (self._used + 1) > len(self._table):  # keep the load under 1/2: short probes
            self._grow()
        found = self._insert(self._table, self._digest(prompt_id))
        self._used += not found
        return not found

    @staticmethod
    def _insert(table: array, digest: int) -> bool:
        mask = len(table) - 1
        i = digest & mask
        while table[i]:
            if table[i] == digest:
                return True
            i = (i + 1) & mask
        table[i] = digest
        return False

    def _grow(self) -> None:
        bigger = array("Q", [0]) * (2 * len(self._table))
        for digest in self._table:
            if digest:
                self._insert(bigger, digest)
        self._table = bigger


# --- row validation --------------------------------------------------------------------------

def _scalar_text(value: Any) -> str | None:
    """Ids and references may be numbers in the source ("42"); other non-strings are not usable."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


# Field names prompt sets commonly keep their text in, for the hint when text_field is missing.
TEXT_FIELD_GUESSES = ("prompt", "instruction", "question", "problem", "input", "query", "text", "content")


def missing_text_field(field: str, found: list[str]) -> str:
    """The reason for a row without the text field: what was expected, what the row has, and
    the setting that would read it."""
    reason = f"missing field {field!r} (prompts.text_field); the row has {', '.join(map(repr, found)) or 'no fields'}"
    guess = next((f for f in TEXT_FIELD_GUESSES if f in found and f != field), None)
    return reason + (f": set prompts.text_field = {guess!r}" if guess else "")


def _row_to_prompt(row: Any, src: PromptSource, line: int) -> Prompt | str:
    """A Prompt, or the reason the row is bad (duplicates are checked by the caller)."""
    if not isinstance(row, dict):
        return f"row is not a JSON object (got {type(row).__name__})"
    field = src.text_field
    if field not in row:
        return missing_text_field(field, list(row))
    text = row[field]
    if text is None:
        return f"field {field!r} is null"
    if not isinstance(text, str):
        return f"field {field!r} is not a string (got {type(text).__name__})"
    if not text.strip():
        return f"field {field!r} is empty"
    prompt_id = prompt_id_for(text)
    if src.id_field is not None and row.get(src.id_field) is not None:
        own = _scalar_text(row[src.id_field])
        if own is None or not own.strip():
            return f"field {src.id_field!r} is not a usable id ({row[src.id_field]!r})"
        prompt_id = own
    reference = None
    ref_field = src.reference_field
    if src.reference_fallback_field is not None and (ref_field is None or row.get(ref_field) is None):
        ref_field = src.reference_fallback_field
    if ref_field is not None and row.get(ref_field) is not None:
        reference = _scalar_text(row[ref_field])
        if reference is None:
            return f"field {ref_field!r} is not a string (got {type(row[ref_field]).__name__})"
        reference = gold_answer(reference, src.answer_format)
        if reference is None:
            return f"field {ref_field!r} holds no {src.answer_format} gold answer"
    return Prompt(prompt_id=prompt_id, text=text, reference=reference, source=src.path, line=line)


def gold_answer(reference: str, answer_format: str) -> str | None:
    """The gold answer inside a reference field: GSM8K's text after the last '#### ', MATH's
    last \\boxed{} content; a field without the marker is taken whole (a bare gold). None when
    nothing is left."""
    text = reference.strip()
    if answer_format == "gsm8k" and "####" in text:
        text = text.rsplit("####", 1)[1].strip().replace(",", "")
    elif answer_format == "math":
        from toa.reward.math_verify import boxed_contents

        boxed = boxed_contents(text)
        text = boxed[-1].strip() if boxed else text
    return text or None


# --- per-format row readers: yield (line, row | reason, raw) -----------------------------------

Item = tuple[int, Any, str]  # (1-based line or row, the parsed row or a _Reason, raw text)


class _Reason(str):
    """Marks a reader-level failure (bad bytes, bad JSON) so it is not mistaken for a row."""


def _decode(data: bytes, lineno: int) -> str | _Reason:
    if lineno == 1 and data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        return _Reason(f"invalid UTF-8 at byte {e.start}")


def _jsonl_rows(f: Iterable[bytes]) -> Iterator[Item]:
    for lineno, data in enumerate(f, start=1):
        text = _decode(data.rstrip(b"\r\n"), lineno)
        if isinstance(text, _Reason):
            yield lineno, text, data.rstrip(b"\r\n").decode("utf-8", "replace")
            continue
        if not text.strip():
            continue  # blank lines (and a trailing newline) are not rows
        try:
            yield lineno, json.loads(text), text
        except json.JSONDecodeError as e:
            yield lineno, _Reason(f"invalid JSON: {e.msg} (column {e.colno})"), text


class _DecodedLines:
    """Feeds csv.reader decoded lines one at a time, remembering which lines had bad bytes so
    the row built from them can be reported (csv rows may span lines: quoted newlines)."""

    def __init__(self, f: Iterable[bytes]):
        self._it = iter(f)
        self.lineno = 0
        self.bad: dict[int, _Reason] = {}

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        data = next(self._it)
        self.lineno += 1
        text = _decode(data, self.lineno)
        if isinstance(text, _Reason):
            self.bad[self.lineno] = text
            return data.decode("utf-8", "replace")
        return text

    def bad_between(self, first: int, last: int) -> _Reason | None:
        found = [self.bad.pop(n) for n in range(first, last + 1) if n in self.bad]
        return found[0] if found else None


def _csv_rows(f: Iterable[bytes], src: PromptSource) -> Iterator[Item]:
    lines = _DecodedLines(f)
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None:
        return
    if bad := lines.bad_between(1, lines.lineno):
        raise BadPromptRow(src.path, 1, f"header: {bad}")
    if src.text_field not in header:
        # a missing column would make every row bad: a source error, whatever on_bad_row says
        raise BadPromptRow(src.path, 1, f"header has no column {src.text_field!r} (columns: {header})")
    while True:
        first = lines.lineno + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield first, _Reason(f"invalid CSV: {e}"), ""
            continue
        raw = ",".join(cells)
        if bad := lines.bad_between(first, lines.lineno):
            yield first, bad, raw
        elif not cells:
            continue  # blank line
        elif len(cells) != len(header):
            yield first, _Reason(f"row has {len(cells)} fields, header has {len(header)}"), raw
        else:
            # an empty cell is how CSV writes "no value": treat it as missing, not as ""
            yield first, {k: v for k, v in zip(header, cells) if v != "" or k == src.text_field}, raw


def _parquet_rows(f: Any, src: PromptSource) -> Iterator[Item]:
    import pyarrow.parquet as pq  # imported here: jsonl/csv users need not load Arrow

    pf = pq.ParquetFile(f)
    names = pf.schema_arrow.names
    if src.text_field not in names:
        raise BadPromptRow(src.path, 1, f"file has no column {src.text_field!r} (columns: {names})")
    wanted = [c for c in (src.text_field, src.id_field, src.reference_field, src.reference_fallback_field)
              if c in names]
    rowno = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted):
        for row in batch.to_pylist():
            rowno += 1
            row = {k: v for k, v in row.items() if v is not None or k == src.text_field}
            yield rowno, row, json.dumps(row, ensure_ascii=False, default=str)


def _rows(f: Any, fmt: str, src: PromptSource) -> Iterator[Item]:
    if fmt == "jsonl":
        return _jsonl_rows(f)
    if fmt == "csv":
        return _csv_rows(f, src)
    return _parquet_rows(f, src)


# --- public API --------------------------------------------------------------------------------

def iter_prompts(source: PromptSource) -> Iterator[Prompt | SkippedRow]:
    """Stream the prompts of `source`: each good row as a Prompt, each bad row as a SkippedRow
    (on_bad_row="skip") or a BadPromptRow raised at it (on_bad_row="fail")."""
    fmt = source.resolved_format()
    if source.limit == 0:
        return
    seen = _SeenIds()
    good = 0
    with fsspec.open(source.path, "rb", compression="infer", **plain_options(source.storage_options)) as f:
        for line, row, raw in _rows(f, fmt, source):
            result = row if isinstance(row, _Reason) else _row_to_prompt(row, source, line)
            if isinstance(result, Prompt):
                if not seen.add(result.prompt_id):
                    result = f"duplicate prompt_id {result.prompt_id!r}"
            if isinstance(result, str):
                if source.on_bad_row == "fail":
                    raise BadPromptRow(source.path, line, result)
                yield SkippedRow(source=source.path, line=line, reason=str(result), raw=raw[:RAW_LIMIT])
                continue
            yield result
            good += 1
            if source.limit is not None and good >= source.limit:
                return


def load_prompts(source: PromptSource | str) -> tuple[list[Prompt], list[SkippedRow]]:
    """All prompts and skipped rows of a (small) source, in file order."""
    src = PromptSource(path=source) if isinstance(source, str) else source
    prompts: list[Prompt] = []
    skipped: list[SkippedRow] = []
    for item in iter_prompts(src):
        (prompts if isinstance(item, Prompt) else skipped).append(item)
    return prompts, skipped


def default_source(**overrides: Any) -> PromptSource:
    """The packaged default prompt set as a PromptSource."""
    return PromptSource(path=DEFAULT_PROMPTS, **overrides)


__all__ = [
    "DEFAULT_PROMPTS",
    "PRESETS",
    "BadPromptRow",
    "PromptSource",
    "default_source",
    "display_name",
    "format_from_suffix",
    "gold_answer",
    "iter_prompts",
    "load_prompts",
    "normalize_text",
    "prompt_id_for",
]
