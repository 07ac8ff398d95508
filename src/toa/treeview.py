"""Readable views of one stored TOA search tree (docs/methods.md §5; tables in `toa.rows`).

A tree is the `tree_nodes` rows of one (run_id, method, prompt_id), joined to its `samples`
rows through a response node's `sample_id`. Three entry points:

- `tree_frames(samples, nodes, prompt_id, run_id=None, method="toa")` cuts both tables down to
  one tree, and refuses to guess when several runs hold a tree for that prompt.
- `render_text(nodes, samples)`: an indented box-drawing tree, one line per node.
- `render_html(nodes, samples, title)`: a self-contained page (inline SVG + <details> list; no
  script, no external CSS, no network) that stays readable up to a few hundred nodes.

What is shown, and why:
- Agent nodes never visited beyond their initial visit (visits == 1 and n_values == 0) are most
  of a TOA tree (every response node spawns 2M of them) and say nothing, so by default they are
  collapsed into one "… k unvisited agent nodes" line per parent. Prior copies carry their
  twin's visits and values, so they count as visited and stay.
- The best response is the one with the highest RAW reward among ok samples (what SFT picks),
  not the highest node value; on equal rewards the first created wins, so exactly one ★.
- `value` is the mean of the backed-up values; a leaf response node has none (shown "n/a"),
  which is why the HTML colours response nodes by raw reward (min-max within the tree) rather
  than by value: by value most of them would have no colour at all.
- Children in creation order (`created`), the order the search made them.

Plain Python on Polars frames; walks are iterative, so deep trees (max_depth unset) do not hit
the recursion limit.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from toa.rows import OK

__all__ = ["tree_frames", "render_text", "render_html"]

NEWLINE_MARK = "⏎"
BEST_MARK = "★"


# ---------------------------------------------------------------------------- selection
def tree_frames(samples: pl.DataFrame, nodes: pl.DataFrame, prompt_id: str, run_id: str | None = None,
                method: str = "toa") -> tuple[pl.DataFrame, pl.DataFrame]:
    """(samples, nodes) of one tree, in the argument order. With run_id None exactly one run
    must hold a tree for this prompt and method; otherwise a ValueError lists the run_ids."""
    mine = nodes.filter((pl.col("prompt_id") == prompt_id) & (pl.col("method") == method))
    runs = sorted(mine.get_column("run_id").unique().to_list())
    if run_id is None:
        if len(runs) != 1:
            found = f"run_ids to choose from: {', '.join(runs)}" if runs else "no run holds one"
            raise ValueError(f"tree for prompt {prompt_id!r}, method {method!r}: {found}")
        run_id = runs[0]
    elif run_id not in runs:
        raise ValueError(f"run {run_id!r} holds no {method!r} tree for prompt {prompt_id!r}; "
                         f"run_ids to choose from: {', '.join(runs) or 'none'}")
    keep = (pl.col("run_id") == run_id) & (pl.col("method") == method) & (pl.col("prompt_id") == prompt_id)
    return samples.filter(keep), mine.filter(pl.col("run_id") == run_id)


# ---------------------------------------------------------------------------- the model
@dataclass
class _Tree:
    """One tree as the renderers read it: rows by node_id, children in creation order."""

    rows: dict[str, dict[str, Any]]
    children: dict[str, list[str]]  # visible children only
    hidden: dict[str, int]  # parent node_id -> collapsed unvisited agent children
    root: str
    samples: dict[str, dict[str, Any]]  # sample_id -> samples row
    best: str | None = None  # node_id of the best response
    shown: list[str] = field(default_factory=list)  # visible node_ids, depth-first


def _unvisited(row: dict[str, Any]) -> bool:
    # §5: visits start at 1 and only a backup adds values; prior copies inherit both.
    return row["kind"] == "agent" and row["visits"] == 1 and not row["n_values"]


def _ok_reward(sample: dict[str, Any] | None) -> float | None:
    """The raw reward if the sample and its score are ok; errors are never read as 0."""
    if not sample or sample.get("status") != OK or sample.get("reward_status", OK) != OK:
        return None
    return sample.get("reward")


def _build(nodes: pl.DataFrame, samples: pl.DataFrame, hide_unvisited: bool) -> _Tree:
    rows = {r["node_id"]: r for r in nodes.sort("created").iter_rows(named=True)}
    if len(rows) != nodes.height:
        raise ValueError("duplicate node_id: pass one tree (see tree_frames)")
    roots = [nid for nid, r in rows.items() if r["parent_id"] is None]
    if len(roots) != 1:
        raise ValueError(f"expected one tree with one root, found {len(roots)} roots (see tree_frames)")
    tree = _Tree(rows, {nid: [] for nid in rows}, {}, roots[0],
                 {r["sample_id"]: r for r in samples.iter_rows(named=True)})
    for nid, r in rows.items():  # rows are in creation order, so children lists are too
        parent = r["parent_id"]
        if parent is None:
            continue
        if parent not in rows:
            raise ValueError(f"node {nid} names a parent {parent} that is not in the tree")
        if hide_unvisited and _unvisited(r):
            tree.hidden[parent] = tree.hidden.get(parent, 0) + 1
        else:
            tree.children[parent].append(nid)
    tree.shown = _depth_first(tree)
    tree.best = _best(tree)
    return tree


def _depth_first(tree: _Tree) -> list[str]:
    order, stack = [], [tree.root]
    while stack:
        nid = stack.pop()
        order.append(nid)
        stack.extend(reversed(tree.children[nid]))
    return order


def _best(tree: _Tree) -> str | None:
    best, best_reward = None, None
    # creation order and a strict >, so the first of equal maxima wins and ★ appears once
    for nid in sorted(tree.shown, key=lambda n: tree.rows[n]["created"]):
        reward = _reward_of(tree, nid)
        if reward is not None and (best_reward is None or reward > best_reward):
            best, best_reward = nid, reward
    return best


def _reward_of(tree: _Tree, nid: str) -> float | None:
    row = tree.rows[nid]
    if row["kind"] != "response":
        return None
    return _ok_reward(tree.samples.get(row["sample_id"]))


# ---------------------------------------------------------------------------- text
def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def snippet(text: str | None, width: int) -> str:
    """One line of at most `width` characters (+ "…" when cut); newlines become ⏎."""
    if text is None:
        return "(no text)"
    flat = text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", NEWLINE_MARK)
    return flat if len(flat) <= width else flat[:width] + "…"


def _head(tree: _Tree, nid: str) -> str:
    """A node's numbers, without the response text."""
    r = tree.rows[nid]
    head = f"{nid} {r['kind']}" + (f" {r['agent']}" if r["agent"] else "")
    line = f"{head} d={r['depth']} visits={r['visits']} value={_num(r['value'])}"
    if r["kind"] != "response":
        return line
    sample = tree.samples.get(r["sample_id"])
    if sample is None:  # a join that fails is shown, not hidden: it means mismatched frames
        return f"{line} reward=? (sample {r['sample_id']} missing)"
    return f"{line} reward={_num(_ok_reward(sample))}"


def _label(tree: _Tree, nid: str, width: int) -> str:
    r = tree.rows[nid]
    sample = tree.samples.get(r["sample_id"]) if r["kind"] == "response" else None
    if sample is None:
        return _head(tree, nid)
    star = f" {BEST_MARK}" if nid == tree.best else ""
    return f'{_head(tree, nid)}{star} "{snippet(sample.get("text"), width)}"'


def _summary(count: int) -> str:
    return f"… {count} unvisited agent node{'s' if count != 1 else ''}"


def render_text(nodes: pl.DataFrame, samples: pl.DataFrame, width: int = 60, hide_unvisited: bool = True) -> str:
    """One prompt's tree as box-drawing text: the root first, 3 columns of indent per depth."""
    tree = _build(nodes, samples, hide_unvisited)
    lines = [_label(tree, tree.root, width)]
    # stack of (node_id or None for a summary line, parent_id, prefix of the parent's children, is_last)
    stack = _child_entries(tree, tree.root, "")
    while stack:
        nid, parent, prefix, last = stack.pop()
        branch = "└─ " if last else "├─ "
        text = _summary(tree.hidden[parent]) if nid is None else _label(tree, nid, width)
        lines.append(prefix + branch + text)
        if nid is not None:
            stack.extend(_child_entries(tree, nid, prefix + ("   " if last else "│  ")))
    return "\n".join(lines)


def _child_entries(tree: _Tree, nid: str, prefix: str) -> list[tuple[str | None, str, str, bool]]:
    """A node's displayed children, reversed for the stack; the summary line comes last
    (collapsed nodes are agent leaves, so moving them after their siblings loses nothing)."""
    kids: list[str | None] = list(tree.children[nid]) + ([None] if tree.hidden.get(nid) else [])
    entries = [(kid, nid, prefix, i == len(kids) - 1) for i, kid in enumerate(kids)]
    return entries[::-1]


# ---------------------------------------------------------------------------- html
DX, DY, MARGIN = 18, 64, 28  # px per leaf, per depth level, around the drawing


def _layout(tree: _Tree) -> dict[str, tuple[float, float]]:
    """Tidy-enough layout: leaves at consecutive x in depth-first order, a parent centred over
    its first and last child, y by depth. Post-order walk without recursion."""
    xs: dict[str, float] = {}
    leaf = 0
    stack: list[tuple[str, bool]] = [(tree.root, False)]
    while stack:
        nid, done = stack.pop()
        kids = tree.children[nid]
        if not kids:
            xs[nid], leaf = float(leaf), leaf + 1
        elif done:
            xs[nid] = (xs[kids[0]] + xs[kids[-1]]) / 2
        else:
            stack.append((nid, True))
            stack.extend((k, False) for k in reversed(kids))
    return {nid: (MARGIN + x * DX, MARGIN + tree.rows[nid]["depth"] * DY) for nid, x in xs.items()}


def _colour(t: float | None) -> str:
    """Red (0) -> yellow -> green (1); grey when there is no reward to show."""
    return "#9e9e9e" if t is None else f"hsl({120 * t:.0f},70%,42%)"


def _scale(tree: _Tree) -> dict[str, float]:
    """Raw reward -> [0, 1] by min-max within this tree (0.5 when all rewards are equal)."""
    rewards = {nid: r for nid in tree.shown if (r := _reward_of(tree, nid)) is not None}
    if not rewards:
        return {}
    lo, hi = min(rewards.values()), max(rewards.values())
    return {nid: (r - lo) / (hi - lo) if hi > lo else 0.5 for nid, r in rewards.items()}


def _tooltip(tree: _Tree, nid: str) -> str:
    text = _head(tree, nid) + (f" {BEST_MARK} best" if nid == tree.best else "")
    if tree.hidden.get(nid):
        text += f"\n({_summary(tree.hidden[nid])} hidden)"
    r = tree.rows[nid]
    sample = tree.samples.get(r["sample_id"]) if r["kind"] == "response" else None
    if sample and sample.get("text") is not None:  # the full text, newlines kept, on hover
        text += "\n\n" + sample["text"]
    return text


def _svg_node(tree: _Tree, nid: str, pos: tuple[float, float], scale: dict[str, float]) -> str:
    r, (x, y) = tree.rows[nid], pos
    esc = html.escape
    if r["kind"] == "response":
        best = nid == tree.best
        shape = (f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{8 if best else 6}" fill="{_colour(scale.get(nid))}" '
                 f'class="{"best" if best else "resp"}"/>')
        if best:
            shape += f'<text x="{x:.1f}" y="{y + 24:.1f}" class="star">{BEST_MARK}</text>'
    elif r["kind"] == "root":
        shape = f'<circle cx="{x:.1f}" cy="{y:.1f}" r="7" class="root"/>'
    else:
        shape = f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" class="agent"/>'
    if tree.hidden.get(nid):  # a visible trace of what was collapsed
        shape += f'<text x="{x + 6:.1f}" y="{y - 6:.1f}" class="more">+{tree.hidden[nid]}</text>'
    link = f' href="#d-{esc(nid)}"' if r["kind"] == "response" else ""
    return (f'<a{link}><g id="{esc(nid)}"><title>{esc(_tooltip(tree, nid))}</title>{shape}</g></a>')


def _svg(tree: _Tree) -> str:
    pos = _layout(tree)
    scale = _scale(tree)
    edges = [f'<line x1="{pos[p][0]:.1f}" y1="{pos[p][1]:.1f}" x2="{pos[c][0]:.1f}" y2="{pos[c][1]:.1f}"/>'
             for p in tree.shown for c in tree.children[p]]
    width = 2 * MARGIN + max(x for x, _ in pos.values())
    height = 2 * MARGIN + max(y for _, y in pos.values())
    body = "\n".join(_svg_node(tree, nid, pos[nid], scale) for nid in tree.shown)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}">\n<g class="edges">{"".join(edges)}</g>\n{body}\n</svg>')


def _details(tree: _Tree) -> str:
    esc, items = html.escape, []
    for nid in sorted(tree.shown, key=lambda n: tree.rows[n]["created"]):
        r = tree.rows[nid]
        if r["kind"] != "response":
            continue
        sample = tree.samples.get(r["sample_id"]) or {}
        star = f" {BEST_MARK} best" if nid == tree.best else ""
        head = (f"{nid} · {r['agent']} · depth {r['depth']} · reward {_num(_ok_reward(sample))} · "
                f"value {_num(r['value'])}{star}")
        text = sample.get("text")
        items.append(f'<details id="d-{esc(nid)}"{" open" if star else ""}><summary>{esc(head)}</summary>'
                     f'<pre>{esc(text if text is not None else "(no text)")}</pre></details>')
    return "\n".join(items)


_CSS = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
.scroll{overflow:auto;border:1px solid #ddd;max-height:75vh}
svg line{stroke:#bbb;stroke-width:1}
circle.agent{fill:#bdbdbd}
circle.root{fill:#333}
circle.resp{stroke:#333;stroke-width:.6}
circle.best{stroke:#d4a000;stroke-width:3}
text.star{fill:#d4a000;font-size:16px;text-anchor:middle}
text.more{fill:#999;font-size:9px}
pre{white-space:pre-wrap;background:#f6f6f6;padding:.5em;margin:.3em 0 .8em}
summary{cursor:pointer;font-family:monospace}
"""


def render_html(nodes: pl.DataFrame, samples: pl.DataFrame, title: str, hide_unvisited: bool = True) -> str:
    """A self-contained HTML page: the tree as inline SVG (hover a node for its numbers and
    text, click a response for its entry below) and every response text in a <details> list."""
    tree = _build(nodes, samples, hide_unvisited)
    n_resp = sum(1 for nid in tree.shown if tree.rows[nid]["kind"] == "response")
    best = _reward_of(tree, tree.best) if tree.best else None
    info = (f"{len(tree.rows)} nodes, {len(tree.shown)} drawn ({sum(tree.hidden.values())} unvisited agent "
            f"nodes hidden), {n_resp} responses; best raw reward {_num(best)} {BEST_MARK}. Response colour: "
            f"raw reward, red (lowest in this tree) to green (highest); small grey dots: agent nodes.")
    t = html.escape(title)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{t}</title>'
            f"<style>{_CSS}</style></head>\n<body><h1>{t}</h1><p>{html.escape(info)}</p>\n"
            f'<div class="scroll">{_svg(tree)}</div>\n<h2>Responses</h2>\n{_details(tree)}\n</body></html>\n')
