"""The run report: plots, Markdown and HTML from the views, and its Prefect artifacts."""

from __future__ import annotations

import base64

import polars as pl
import pytest
from helpers import write_run  # the hand-built run the views are tested on

from toa import report
from toa.storage import Store

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    store = Store(str(tmp_path_factory.mktemp("results")))
    write_run(store, "run1")
    return report.build_report(store, "run1", tmp_path_factory.mktemp("report"))


def test_report_writes_every_file(built):
    assert set(built) == {"curves", "agent_share", "markdown", "html", "best_of_k"}
    for key in ("curves", "agent_share"):
        data = built[key].read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_html_is_self_contained(built):
    page = built["html"].read_text()
    assert "run1" in page and page.count('src="data:image/png;base64,') == 2
    first = page.split('src="data:image/png;base64,', 1)[1].split('"', 1)[0]
    assert base64.b64decode(first) == built["curves"].read_bytes()
    assert "&quot;n&quot;: 2" in page  # the run config, pretty-printed and escaped


def test_markdown_has_config_and_tables(built):
    md = built["markdown"].read_text()
    assert "![Best reward vs generations and tokens](curves.png)" in md
    assert '"n": 2' in md and "## Methods" in md and "| method |" in md
    # the best-of-k table: one row per k, one column per method
    assert "| k | random | toa |" in md and "| 2 | 0.5833 | 0.6 |" in md
    assert pl.read_csv(built["best_of_k"]).height == 8  # 2 methods x k = 1..4


def test_unknown_run_is_an_error(tmp_path):
    store = Store(str(tmp_path))
    write_run(store, "run1")
    with pytest.raises(LookupError, match="nope"):
        report.build_report(store, "nope", tmp_path / "out")


def test_publish_artifacts_attaches_markdown_and_table(built, monkeypatch):
    import prefect.artifacts

    made = {}
    monkeypatch.setattr(prefect.artifacts, "create_markdown_artifact", lambda **kw: made.setdefault("md", kw))
    monkeypatch.setattr(prefect.artifacts, "create_table_artifact", lambda **kw: made.setdefault("table", kw))
    report.publish_artifacts(built, "Run_1")
    assert made["md"]["key"] == "toa-report-run-1" and "data:image/png;base64," in made["md"]["markdown"]
    assert made["table"]["key"] == "toa-best-of-k-run-1" and len(made["table"]["table"]) == 8
    assert set(made["table"]["table"][0]) == {"method", "k", "best_reward", "tokens", "prompts"}
