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
    assert "![Best reward vs generations, tokens and server seconds (95 % bootstrap bands)](curves.png)" in md
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


def test_markdown_has_the_pairwise_table_and_intervals(built):
    md = built["markdown"].read_text()
    assert "## Paired comparison at equal budget" in md and "ties counting half" in md
    # p1 is the one prompt both answered: random's best 0.9 beats toa's 0.7 (zero-width intervals
    # with a single prompt); each pair once
    assert ("| method A | method B | k | prompts | A wins / ties / B wins | win rate of A [95 % CI] "
            "| mean difference A - B [95 % CI] |") in md
    assert "| random | toa | 4 | 1 | 1 / 0 / 0 | 1.000 [1.000, 1.000] | 0.200 [0.200, 0.200] |" in md
    assert "| toa | random |" not in md
    # each method at its budget: both curves with their intervals, and what k generations cost
    assert "## Best of k at the budget, with intervals" in md
    assert "| toa | 4 | 1 | 0.700 [0.700, 0.700] | 0.700 [0.700, 0.700] | 20 | 2 |" in md
    assert "| random | 4 | 2 | 0.650 [0.400, 0.900] | 0.650 [0.400, 0.900] | 12.5 | 4 |" in md


def test_html_has_the_pairwise_table(built):
    page = built["html"].read_text()
    assert "<h2>Paired comparison at equal budget</h2>" in page
    assert "<td>1.000 [1.000, 1.000]</td><td>0.200 [0.200, 0.200]</td>" in page


def test_curves_have_a_band_per_method_and_curve_in_each_panel(tmp_path, monkeypatch):
    """The figure as drawn (Figure.savefig recorded, then run): three panels (k, completion tokens,
    server seconds), each with one shaded band per method and curve."""
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure

    store = Store(str(tmp_path / "results"))
    write_run(store, "run1")
    drawn, real_savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **kw: (drawn.append(fig), real_savefig(fig, *a, **kw)))
    path = report.plot_curves(report.load_tables(store, "run1"), tmp_path / "curves.png", "run1")
    assert path.read_bytes().startswith(PNG_MAGIC)
    panels = drawn[0].axes[:3]
    assert [ax.get_xlabel().split(" ")[0] for ax in panels] == ["generations", "completion", "server"]
    for ax in panels:
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert len(bands) == 4  # 2 methods x (expected, first k)
    # random's expected curve against k: its band spans the interval 0.4 .. 0.9 at k = 3
    spans = [(round(b.get_paths()[0].vertices[:, 1].min(), 6), round(b.get_paths()[0].vertices[:, 1].max(), 6))
             for b in panels[0].collections if isinstance(b, PolyCollection)]
    assert (0.4, 0.9) in spans
