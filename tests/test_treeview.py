"""toa.treeview on a real TOA tree: the actual method run on deterministic in-process fakes,
its output turned into `samples` / `tree_nodes` frames exactly as engine._write_outputs does."""

from __future__ import annotations

import asyncio
import re
from dataclasses import asdict
from html.parser import HTMLParser

import polars as pl
import pytest

from toa.methods import MethodContext, get_method
from toa.rows import MethodOutput, Prompt, frame, sample_row
from toa.treeview import render_html, render_text, tree_frames

from fakes import AGENTS, Q, FakeGenerate, FakeReward

SCRIPT_K = 3  # this generation's text carries markup that the HTML must escape


def body(k: int) -> str:
    return "<script>alert('x')</script> & more" if k == SCRIPT_K else "Rayleigh scattering " * 4


def run_toa(n=3, agents=AGENTS, gen=None, **options) -> MethodOutput:
    ctx = MethodContext(Prompt("p1", Q), tuple(agents), n, gen or FakeGenerate(body=body), FakeReward(), 0)
    return asyncio.run(get_method("toa", **options).run(ctx))


def frames(out: MethodOutput, run_id="r1", prompt_id="p1") -> tuple[pl.DataFrame, pl.DataFrame]:
    """(samples, nodes) as storage writes them (engine._write_outputs)."""
    keys = dict(run_id=run_id, method="toa", batch="b0")
    samples = frame("samples", [sample_row(s, prompt_id=prompt_id, **keys) for s in out.samples])
    nodes = frame("tree_nodes", [{**asdict(n), **keys, "prompt_id": prompt_id} for n in out.nodes])
    return samples, nodes


@pytest.fixture(scope="module")
def tree():
    out = run_toa(n=6, width=8)  # deep enough for refinements, prior copies and collapsed nodes
    samples, nodes = frames(out)
    return out, samples, nodes


def unvisited(n) -> bool:
    return n.kind == "agent" and n.visits == 1 and n.n_values == 0


def node_id_of(line: str) -> str:
    return re.search(r"\b(n\d+) (?:root|agent|response)\b", line).group(1)


def best_sample(out: MethodOutput):
    ok = [s for s in out.samples if s.generation.ok and s.score.ok]
    top = max(s.score.value for s in ok)
    return next(s for s in ok if s.score.value == top)  # first of equal maxima


# ---------------------------------------------------------------------------- text
def test_one_line_per_visited_node_plus_summaries(tree):
    out, samples, nodes = tree
    lines = render_text(nodes, samples).splitlines()
    hidden_parents = {n.parent_id for n in out.nodes if unvisited(n)}
    shown = [n for n in out.nodes if not unvisited(n)]
    assert hidden_parents and len(shown) < len(out.nodes)  # the fixture exercises collapsing
    summaries = [l for l in lines if "unvisited agent node" in l]
    assert len(summaries) == len(hidden_parents)
    assert len(lines) == len(shown) + len(hidden_parents)
    assert sorted(node_id_of(l) for l in lines if l not in summaries) == sorted(n.node_id for n in shown)
    counts = [int(re.search(r"… (\d+) unvisited", l).group(1)) for l in summaries]
    assert sum(counts) == len(out.nodes) - len(shown)


def test_root_first_and_children_in_creation_order(tree):
    out, samples, nodes = tree
    lines = render_text(nodes, samples, hide_unvisited=False).splitlines()
    assert len(lines) == len(out.nodes)
    assert lines[0].startswith("n0 root d=0 visits=") and out.nodes[0].kind == "root"
    order = [node_id_of(l) for l in lines]
    created = {n.node_id: n.created for n in out.nodes}
    parent = {n.node_id: n.parent_id for n in out.nodes}
    for nid in order:  # siblings appear in creation order
        sibs = [o for o in order if parent[o] == parent[nid]]
        assert [created[s] for s in sibs] == sorted(created[s] for s in sibs)


def test_depth_indentation_is_consistent(tree):
    out, samples, nodes = tree
    depth = {n.node_id: n.depth for n in out.nodes}
    for line in render_text(nodes, samples).splitlines():
        m = re.match(r"^((?:[│ ]  )*(?:[├└]─ )?)(.*)$", line)
        indent, rest = len(m.group(1)), m.group(2)
        if rest.startswith("…"):
            continue  # checked with its parent below
        assert indent == 3 * depth[node_id_of(line)], line
        assert f" d={depth[node_id_of(line)]} " in line
    for line in render_text(nodes, samples).splitlines():
        if "unvisited agent node" in line:
            assert (len(line) - len(line.lstrip("│ ├└─"))) % 3 == 0


def test_best_response_is_marked_once_and_is_the_max_reward(tree):
    out, samples, nodes = tree
    text = render_text(nodes, samples)
    assert text.count("★") == 1
    (line,) = [l for l in text.splitlines() if "★" in l]
    best = best_sample(out)
    node = next(n for n in out.nodes if n.node_id == node_id_of(line))
    assert node.kind == "response" and node.sample_id == best.generation.sample_id
    assert f"reward={best.score.value:.4f} ★" in line


def test_values_four_decimals_and_response_fields(tree):
    out, samples, nodes = tree
    lines = {node_id_of(l): l for l in render_text(nodes, samples).splitlines() if "unvisited" not in l}
    for n in out.nodes:
        if n.node_id in lines:
            want = "n/a" if n.value is None else f"{n.value:.4f}"
            assert f"visits={n.visits} value={want}" in lines[n.node_id]
            assert (" reward=" in lines[n.node_id]) == (n.kind == "response")


def test_truncation_and_newlines():
    out = run_toa()
    samples, nodes = frames(out)
    texts = {s.generation.sample_id: s.generation.text for s in out.samples}
    for width in (5, 12, 1000):
        for line in render_text(nodes, samples, width=width).splitlines():
            if " response " not in line:
                continue
            shown = re.search(r'"(.*)"$', line).group(1)
            assert "\n" not in shown
            node = next(n for n in out.nodes if n.node_id == node_id_of(line))
            full = texts[node.sample_id].replace("\n", "⏎")
            if len(full) > width:
                assert shown == full[:width] + "…"
            else:
                assert shown == full
    assert "⏎" in render_text(nodes, samples, width=1000)


def test_failed_samples_do_not_break_the_view():
    out = run_toa(n=6, width=8, gen=FakeGenerate(fail_k=frozenset({2, 9}), body=body))
    samples, nodes = frames(out)
    assert samples.filter(pl.col("status") == "error").height == 2
    text = render_text(nodes, samples)
    (line,) = [l for l in text.splitlines() if "★" in l]
    starred = next(n for n in out.nodes if n.node_id == node_id_of(line))
    assert starred.sample_id == best_sample(out).generation.sample_id
    assert len(text.splitlines()) <= len(out.nodes)  # failed plays add no node and no line


# ---------------------------------------------------------------------------- html
class Checker(HTMLParser):
    """Records tags, ids and text; fails on a closing tag that does not match its opener."""

    VOID = {"meta", "br", "hr", "img", "input", "link"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.tags, self.ids, self.data, self.errors = [], [], set(), [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.ids.update(v for k, v in attrs if k == "id")
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)
        self.ids.update(v for k, v in attrs if k == "id")

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)

    def handle_data(self, data):
        self.data.append(data)


def parse(page: str) -> Checker:
    c = Checker()
    c.feed(page)
    c.close()
    assert not c.errors and not c.stack, (c.errors, c.stack)
    return c


def test_html_is_well_formed_and_names_every_response(tree):
    out, samples, nodes = tree
    page = render_html(nodes, samples, title="p1 · toa")
    c = parse(page)
    assert c.tags.count("svg") == 1 and c.tags.count("details") == sum(n.kind == "response" for n in out.nodes)
    for n in out.nodes:
        if n.kind == "response":
            assert n.node_id in c.ids and f"d-{n.node_id}" in c.ids
        if unvisited(n):
            assert n.node_id not in c.ids  # collapsed like the text view
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing fetched
    assert "<script" not in page and "<link" not in page
    assert page.count("★") >= 2  # on the drawing and in the list
    best = best_sample(out)
    assert any(best.generation.text in d for d in c.data)  # full text, newlines kept


def test_html_escapes_response_text_and_title(tree):
    out, samples, nodes = tree
    assert any("<script>" in (s.generation.text or "") for s in out.samples)
    page = render_html(nodes, samples, title="<b>t</b> & co")
    c = parse(page)
    assert "script" not in c.tags and "b" not in c.tags
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in page
    assert any("<script>alert('x')</script>" in d for d in c.data)  # the text survives, as text


# ---------------------------------------------------------------------------- selection
def test_tree_frames_picks_one_tree():
    s1, n1 = frames(run_toa(), run_id="r1")
    s2, n2 = frames(run_toa(), run_id="r2")
    s3, n3 = frames(run_toa(), run_id="r1", prompt_id="p2")
    samples, nodes = pl.concat([s1, s2, s3]), pl.concat([n1, n2, n3])
    with pytest.raises(ValueError, match="r1, r2"):
        tree_frames(samples, nodes, "p1")
    with pytest.raises(ValueError, match="r1, r2"):
        tree_frames(samples, nodes, "p1", run_id="r9")
    with pytest.raises(ValueError, match="no run"):
        tree_frames(samples, nodes, "p1", method="moa")
    got_s, got_n = tree_frames(samples, nodes, "p1", run_id="r2")
    assert got_s.equals(s2) and got_n.equals(n2)
    got_s, got_n = tree_frames(samples, nodes, "p2")
    assert got_s.equals(s3) and got_n.equals(n3)
    assert render_text(got_n, got_s) == render_text(n1, s1)  # same content, same picture
    with pytest.raises(ValueError, match="tree_frames"):
        render_text(nodes, samples)  # several trees at once are refused, not merged
