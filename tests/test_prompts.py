"""Tests for toa.prompts: formats, fsspec URLs, ids, every bad-row kind in both modes, limit,
the packaged default set, and a tracemalloc check that loading streams."""

from __future__ import annotations

import gzip
import json
import tracemalloc
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from toa.prompts import (
    DEFAULT_PROMPTS, BadPromptRow, PromptSource, iter_prompts, load_prompts, prompt_id_for,
)
from toa.rows import Prompt, SkippedRow


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def good_rows(n: int) -> list[dict]:
    return [{"prompt": f"question {i}", "reference": f"answer {i}"} for i in range(n)]


# --- ids ---------------------------------------------------------------------------------------

def test_prompt_id_is_16_hex_of_normalised_text():
    pid = prompt_id_for("What is 2+2?")
    assert len(pid) == 16 and int(pid, 16) >= 0
    assert prompt_id_for("a  b") == prompt_id_for(" a b") == prompt_id_for("a\t\nb ")
    assert prompt_id_for("caf\u00e9") == prompt_id_for("cafe\u0301")  # NFC
    assert prompt_id_for("a b") != prompt_id_for("ab")


def test_own_id_wins_and_missing_or_null_id_is_derived(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "x1", "prompt": "one"}, {"id": 7, "prompt": "two"},
        {"id": None, "prompt": "three"}, {"prompt": "four"},
    ])
    prompts, skipped = load_prompts(PromptSource(path=str(f)))
    assert skipped == []
    assert [p.prompt_id for p in prompts] == ["x1", "7", prompt_id_for("three"), prompt_id_for("four")]
    assert [p.line for p in prompts] == [1, 2, 3, 4]
    assert all(p.source == str(f) and p.reference is None for p in prompts)


def test_id_field_none_always_derives(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"id": "x1", "prompt": "one"}])
    (p,), _ = load_prompts(PromptSource(path=str(f), id_field=None))
    assert p.prompt_id == prompt_id_for("one")


# --- formats and locations -----------------------------------------------------------------------

def test_jsonl_with_references_and_blank_lines(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a", "reference": "ra"}\n\n   \n{"prompt": "b", "reference": 42}\n')
    prompts, skipped = load_prompts(PromptSource(path=str(f)))
    assert skipped == []
    assert [(p.text, p.reference, p.line) for p in prompts] == [("a", "ra", 1), ("b", "42", 4)]


def test_configurable_field_names(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"qid": "q9", "question": "why?", "gold": "because"}])
    src = PromptSource(path=str(f), text_field="question", id_field="qid", reference_field="gold")
    (p,), _ = load_prompts(src)
    assert (p.prompt_id, p.text, p.reference) == ("q9", "why?", "because")
    (p,), _ = load_prompts(src.model_copy(update={"reference_field": None}))
    assert p.reference is None


def test_gzip_jsonl_and_format_inferred_past_compression_suffix(tmp_path):
    f = tmp_path / "p.jsonl.gz"
    with gzip.open(f, "wt", encoding="utf-8") as g:
        g.write('{"prompt": "zipped", "reference": "r"}\n')
    assert PromptSource(path=str(f)).resolved_format() == "jsonl"
    (p,), _ = load_prompts(PromptSource(path=f"file://{f}"))
    assert (p.text, p.reference) == ("zipped", "r")


def test_csv_with_quoted_newline_and_empty_cells(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text('id,prompt,reference\n'
                 'c1,"multi\nline",ref\n'
                 ',plain,\n', encoding="utf-8")
    prompts, skipped = load_prompts(PromptSource(path=str(f)))
    assert skipped == []
    assert [(p.prompt_id, p.text, p.reference, p.line) for p in prompts] == [
        ("c1", "multi\nline", "ref", 2), (prompt_id_for("plain"), "plain", None, 4)]


def test_parquet_batches_and_row_numbers(tmp_path, monkeypatch):
    import toa.prompts as tp
    monkeypatch.setattr(tp, "PARQUET_BATCH_ROWS", 2)  # force several batches
    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": ["a", None, "c", "d", "e"], "prompt": ["p1", "p2", "p3", "p4", "p5"],
                             "reference": ["r1", "r2", None, "r4", "r5"], "extra": [1, 2, 3, 4, 5]}),
                   f, row_group_size=2)
    prompts, skipped = load_prompts(PromptSource(path=str(f)))
    assert skipped == []
    assert [(p.prompt_id, p.reference, p.line) for p in prompts] == [
        ("a", "r1", 1), (prompt_id_for("p2"), "r2", 2), ("c", None, 3), ("d", "r4", 4), ("e", "r5", 5)]


def test_memory_url_and_explicit_format():
    name = f"memory://toa-tests/{uuid.uuid4().hex}/prompts.txt"
    with fsspec.open(name, "wb") as f:
        f.write(b'{"prompt": "in memory"}\n')
    with pytest.raises(ValueError, match="cannot infer the prompt format"):
        load_prompts(PromptSource(path=name))
    (p,), _ = load_prompts(PromptSource(path=name, format="jsonl"))
    assert p.text == "in memory" and p.source == name


def test_memory_url_gzip_csv():
    name = f"memory://toa-tests/{uuid.uuid4().hex}/prompts.csv.gz"
    with fsspec.open(name, "wb") as f:
        f.write(gzip.compress(b"prompt\nhello\n"))
    (p,), _ = load_prompts(PromptSource(path=name))
    assert (p.text, p.line) == ("hello", 2)


def test_limit_counts_good_prompts_only(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", ["not json", *good_rows(5)])
    items = list(iter_prompts(PromptSource(path=str(f), limit=2, on_bad_row="skip")))
    assert [type(i) for i in items] == [SkippedRow, Prompt, Prompt]
    assert list(iter_prompts(PromptSource(path=str(f), limit=0))) == []


def test_identity_leaves_out_storage_options_and_resolves_format():
    src = PromptSource(path="s3://b/p.jsonl.gz", limit=3, storage_options={"key": "secret"})
    ident = src.fingerprint()
    assert ident == {"path": "s3://b/p.jsonl.gz", "format": "jsonl", "text_field": "prompt",
                     "id_field": "id", "reference_field": "reference", "limit": 3, "answer_format": "raw",
                     "reference_fallback_field": None}
    assert "secret" not in json.dumps(ident)


# --- bad rows: every kind, both modes -------------------------------------------------------------

JSONL_BAD = [
    ("{not json", "invalid JSON: Expecting property name enclosed in double quotes (column 2)"),
    ('["a", "list"]', "row is not a JSON object (got list)"),
    ('"just a string"', "row is not a JSON object (got str)"),
    ('{"text": "wrong field"}', "missing field 'prompt' (prompts.text_field); the row has 'text': set prompts.text_field = 'text'"),
    ('{"prompt": "   "}', "field 'prompt' is empty"),
    ('{"prompt": 12}', "field 'prompt' is not a string (got int)"),
    ('{"prompt": null}', "field 'prompt' is null"),
    ('{"prompt": "question 0"}', "duplicate prompt_id '" + prompt_id_for("question 0") + "'"),
    ('{"prompt": "dup id", "id": "x"}\n{"prompt": "other", "id": "x"}', "duplicate prompt_id 'x'"),
]


def _jsonl_with_bad_line(tmp_path: Path, bad: str) -> Path:
    """Good line 1, a blank line 2, good line 3, then the bad row ending on line 4 (or 5)."""
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"prompt": "question 0"}\n\n{"prompt": "question 1"}\n' + bad + '\n{"prompt": "last"}\n',
                 encoding="utf-8")
    return f


@pytest.mark.parametrize("bad,reason", JSONL_BAD)
def test_bad_jsonl_row_fails_with_file_line_reason(tmp_path, bad, reason):
    f = _jsonl_with_bad_line(tmp_path, bad)
    line = 4 + bad.count("\n")
    with pytest.raises(BadPromptRow) as e:
        load_prompts(PromptSource(path=str(f)))
    assert str(e.value) == f"prompts.jsonl:{line}: {reason}"
    assert (e.value.source, e.value.line, e.value.reason) == (str(f), line, reason)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("bad,reason", JSONL_BAD)
def test_bad_jsonl_row_is_skipped_and_reading_goes_on(tmp_path, bad, reason):
    f = _jsonl_with_bad_line(tmp_path, bad)
    line = 4 + bad.count("\n")
    prompts, skipped = load_prompts(PromptSource(path=str(f), on_bad_row="skip"))
    assert skipped == [SkippedRow(source=str(f), line=line, reason=reason, raw=bad.split("\n")[-1])]
    assert prompts[-1].text == "last" and prompts[-1].line == line + 1


def test_undecodable_bytes_are_caught_on_their_line(tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_bytes(b'{"prompt": "ok"}\n{"prompt": "bad \xff byte"}\n{"prompt": "after"}\n')
    with pytest.raises(BadPromptRow, match=r"^prompts\.jsonl:2: invalid UTF-8 at byte 16$"):
        load_prompts(PromptSource(path=str(f)))
    prompts, (s,) = load_prompts(PromptSource(path=str(f), on_bad_row="skip"))
    assert [p.text for p in prompts] == ["ok", "after"]
    assert (s.line, s.reason, s.raw) == (2, "invalid UTF-8 at byte 16", '{"prompt": "bad \ufffd byte"}')


def test_raw_is_truncated_to_500_chars(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"text": "x" * 2000}])
    _, (s,) = load_prompts(PromptSource(path=str(f), on_bad_row="skip"))
    assert len(s.raw) == 500 and s.reason.startswith("missing field 'prompt'")


def test_bad_id_and_reference_types(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "id": ["x"]}, {"prompt": "b", "reference": {"k": 1}}])
    _, skipped = load_prompts(PromptSource(path=str(f), on_bad_row="skip"))
    assert [(s.line, s.reason) for s in skipped] == [
        (1, "field 'id' is not a usable id (['x'])"), (2, "field 'reference' is not a string (got dict)")]


CSV_BAD = [
    ("c2,   ,r", "field 'prompt' is empty"),
    ("c1,other,r", "duplicate prompt_id 'c1'"),
    ("c2,too,many,cells", "row has 4 fields, header has 3"),
    ("c2,", "row has 2 fields, header has 3"),
]


@pytest.mark.parametrize("bad,reason", CSV_BAD)
def test_bad_csv_rows_both_modes(tmp_path, bad, reason):
    f = tmp_path / "prompts.csv"
    f.write_text(f"id,prompt,reference\nc1,first,r\n{bad}\nc3,last,r\n", encoding="utf-8")
    with pytest.raises(BadPromptRow) as e:
        load_prompts(PromptSource(path=str(f)))
    assert str(e.value) == f"prompts.csv:3: {reason}"
    prompts, skipped = load_prompts(PromptSource(path=str(f), on_bad_row="skip"))
    assert [(s.line, s.reason, s.raw) for s in skipped] == [(3, reason, bad)]
    assert [(p.text, p.line) for p in prompts] == [("first", 2), ("last", 4)]


def test_csv_undecodable_bytes_and_missing_column(tmp_path):
    f = tmp_path / "prompts.csv"
    f.write_bytes(b"prompt\nok\nbad \xc3\x28\nafter\n")
    prompts, (s,) = load_prompts(PromptSource(path=str(f), on_bad_row="skip"))
    assert [p.text for p in prompts] == ["ok", "after"] and (s.line, s.reason) == (3, "invalid UTF-8 at byte 4")
    with pytest.raises(BadPromptRow, match=r"^prompts\.csv:3: invalid UTF-8 at byte 4$"):
        load_prompts(PromptSource(path=str(f)))
    # a missing column is a source error, raised even in skip mode
    with pytest.raises(BadPromptRow, match=r"^prompts\.csv:1: header has no column 'question'"):
        load_prompts(PromptSource(path=str(f), text_field="question", on_bad_row="skip"))


def test_bad_parquet_rows_use_row_numbers(tmp_path):
    f = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "a", None], "prompt": ["p1", None, "p3", " "]}), f)
    with pytest.raises(BadPromptRow, match=r"^prompts\.parquet:2: field 'prompt' is null$"):
        load_prompts(PromptSource(path=str(f)))
    prompts, skipped = load_prompts(PromptSource(path=str(f), on_bad_row="skip"))
    assert [p.prompt_id for p in prompts] == ["a"]
    assert [(s.line, s.reason) for s in skipped] == [
        (2, "field 'prompt' is null"), (3, "duplicate prompt_id 'a'"), (4, "field 'prompt' is empty")]
    assert json.loads(skipped[1].raw) == {"id": "a", "prompt": "p3"}
    with pytest.raises(BadPromptRow, match=r"^prompts\.parquet:1: file has no column 'question'"):
        load_prompts(PromptSource(path=str(f), text_field="question", on_bad_row="skip"))


def test_non_string_parquet_text(tmp_path):
    f = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": [1, 2]}), f)
    with pytest.raises(BadPromptRow, match=r"^prompts\.parquet:1: field 'prompt' is not a string \(got int\)$"):
        load_prompts(PromptSource(path=str(f)))


# --- the packaged default set ---------------------------------------------------------------------

def test_default_prompts_load_cleanly():
    prompts, skipped = load_prompts(PromptSource(path=DEFAULT_PROMPTS))
    assert skipped == [] and len(prompts) == 16
    assert [p.prompt_id for p in prompts] == [f"d{i:02d}" for i in range(1, 17)]
    assert all(p.reference and p.reference.strip() and p.text.strip() for p in prompts)
    assert len({p.text for p in prompts}) == 16


# --- streaming -------------------------------------------------------------------------------------

def test_jsonl_is_streamed_not_loaded(tmp_path):
    """Peak Python memory while iterating 200k lines stays far below the file size."""
    f = tmp_path / "big.jsonl"
    pad = "lorem ipsum dolor sit amet " * 12  # ~320 chars per prompt
    with open(f, "w", encoding="utf-8") as out:
        for i in range(200_000):
            out.write(json.dumps({"prompt": f"{i} {pad}", "reference": "r"}) + "\n")
    size = f.stat().st_size

    tracemalloc.start()
    try:
        count = sum(1 for item in iter_prompts(PromptSource(path=str(f))) if isinstance(item, Prompt))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert count == 200_000
    print(f"\nstreamed {count} prompts from {size / 2**20:.1f} MiB; "
          f"peak Python memory {peak / 2**20:.1f} MiB ({peak / size:.1%} of the file)")
    assert peak < size / 4


def test_bom_and_crlf_line_endings(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\r\n{"prompt": "b", "id": "x"}')  # no final newline
    prompts, skipped = load_prompts(PromptSource(path=str(f)))
    assert skipped == [] and [(p.prompt_id, p.text) for p in prompts] == [(prompt_id_for("a"), "a"), ("x", "b")]
    c = tmp_path / "p.csv"
    c.write_bytes(b'\xef\xbb\xbfprompt,reference\r\nq,"r1\r\nr2"\r\n')
    (p,), _ = load_prompts(PromptSource(path=str(c)))
    assert (p.text, p.reference, p.line) == ("q", "r1\r\nr2", 2)
