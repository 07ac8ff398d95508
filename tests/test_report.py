"""The run report: plots, Markdown and HTML from the views, and its Prefect artifacts."""

from __future__ import annotations

import base64
import xml.etree.ElementTree as ET

import polars as pl
import pytest
from helpers import write_run  # the hand-built run the views are tested on

from toa import report
from toa.storage import Store

SVG = "{http://www.w3.org/2000/svg}"



@pytest.fixture(scope="module")
def built(tmp_path_factory):
    store = Store(str(tmp_path_factory.mktemp("results")))
    write_run(store, "run1")
    return report.build_report(store, "run1", tmp_path_factory.mktemp("report"))


def test_report_writes_every_file(built):
    assert set(built) == {"curves", "agent_share", "markdown", "html", "best_of_k"}
    for key in ("curves", "agent_share"):
        svg = ET.parse(built[key]).getroot()  # well-formed XML, an SVG document
        assert svg.tag == f"{SVG}svg" and built[key].suffix == ".svg"


def test_html_is_self_contained(built):
    page = built["html"].read_text()
    assert "run1" in page and page.count("<svg ") == 2 and "<img" not in page  # the plots inline
    assert built["curves"].read_text() in page
    assert "&quot;n&quot;: 2" in page  # the run config, pretty-printed and escaped


def test_markdown_has_config_and_tables(built):
    md = built["markdown"].read_text()
    assert "![Best reward vs generations, tokens and server seconds (95 % bootstrap bands)](curves.svg)" in md
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
    assert made["md"]["key"] == "toa-report-run-1" and made["md"]["markdown"].count("data:image/svg+xml;base64,") == 2
    first = made["md"]["markdown"].split("data:image/svg+xml;base64,", 1)[1].split(")", 1)[0]
    assert base64.b64decode(first) == built["curves"].read_bytes()
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


def test_curves_have_a_band_per_method_and_curve_in_each_panel(tmp_path):
    """The figure as drawn: three panels (k, completion tokens, server seconds), each with one
    line and one shaded band per method and curve."""
    store = Store(str(tmp_path / "results"))
    write_run(store, "run1")
    path = report.plot_curves(report.load_tables(store, "run1"), tmp_path / "curves.svg", "run1")
    svg = ET.parse(path).getroot()
    texts = [t.text for t in svg.iter(f"{SVG}text")]
    assert [x for x in texts if x and x.split(" ")[0] in ("generations", "completion", "server")] == [
        "generations per prompt (k)", "completion tokens per prompt (first k generations)",
        "server seconds per prompt (first k generations)"]
    bands = [b for b in svg.iter(f"{SVG}polygon") if b.get("class") == "band"]
    lines = [line for line in svg.iter(f"{SVG}polyline") if line.get("class") == "line"]
    assert len(bands) == len(lines) == 3 * 4  # 3 panels x 2 methods x (expected, first k)
    assert sum(line.get("stroke-dasharray") is not None for line in lines) == 3 * 2  # first k: dashed
    # random's expected curve against k: its band spans the interval 0.4 .. 0.9 at k = 3. The
    # first panel's y scale, from its first two y ticks (the panels are drawn in order):
    (v0, p0), (v1, p1) = [(float(t.text), float(t.get("y")) - 4) for t in svg.iter(f"{SVG}text")
                          if t.get("text-anchor") == "end"][:2]
    value = lambda pixel: v0 + (pixel - p0) * (v1 - v0) / (p1 - p0)
    spans = {tuple(round(value(float(p.split(",")[1])), 3) for p in (max(pts, key=y), min(pts, key=y)))
             for b in bands[:4] for pts in [b.get("points").split()] for y in [lambda p: float(p.split(",")[1])]}
    assert (0.4, 0.9) in spans


def test_nice_ticks_are_round_and_cover_the_range():
    from toa.svgplot import nice_ticks

    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(1, 32, integer=True) == [10, 20, 30]
    assert nice_ticks(1, 4, integer=True) == [1, 2, 3, 4]  # k: no fractional ticks
    assert nice_ticks(0.37, 0.41) == [0.37, 0.38, 0.39, 0.4, 0.41]
    assert nice_ticks(3.0, 3.0)[0] <= 3.0 <= nice_ticks(3.0, 3.0)[-1]  # a flat range still gets ticks


def test_report_of_an_unknown_run_is_one_message_and_exit_2(tmp_path, capsys):
    from toa import cli

    store = Store(str(tmp_path / "results"))
    write_run(store, "run1")
    for command in ("report", "export"):
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "nope", "--root", store.root])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "run 'nope' has no" in err and "Traceback" not in err
