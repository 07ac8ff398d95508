"""The report of one run: plots, a Markdown and a self-contained HTML page, Prefect artifacts.

Everything comes from the SQL views (sql/analysis.sql, sql/summary.sql, sql/compare.sql) through
the queries in sql/queries/report_*.sql, so the report shows exactly what a user querying the
database sees:
- curves.svg: best reward against generations per prompt (k), against completion tokens and
  against server seconds per prompt (what the first k generations cost, in generation order),
  one line per method; solid = expected best of k random samples (`best_of_k`), dashed = best
  of the first k in generation order (`best_of_k_prefix`, the reference's curve); each with a
  shaded 95 % bootstrap interval over prompts (view `best_of_k_ci`);
- a pairwise table: every two methods at equal budget, the share of prompts where A's best beats
  B's (ties count half) and the mean difference of their best rewards, with 95 % bootstrap
  intervals (view `method_comparison`);
- agent_share.svg: per method, the share of prompts whose best response each agent wrote;
- report.md (images next to it), report.html (images inlined, one file to mail or archive),
  best_of_k.csv (the curve table, also the Prefect table artifact).

Plots are SVG text written by toa.svgplot (no global state: safe from a worker thread or a
Prefect task; see there why not matplotlib).
"""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from toa import svgplot
from toa.db import connect
from toa.errors import UnknownRun
from toa.sql import query_text
from toa.storage import Store

CURVE_STYLES = {"expected": "solid", "prefix": "dashed"}


@dataclass
class RunTables:
    """What the report shows, one DataFrame per view, already filtered to the run."""

    config: dict[str, Any] | None
    summary: pl.DataFrame
    best_of_k: pl.DataFrame
    prefix: pl.DataFrame
    tokens: pl.DataFrame
    agent_share: pl.DataFrame
    calls: pl.DataFrame
    trees: pl.DataFrame
    dpo: pl.DataFrame
    accuracy: pl.DataFrame | None = None  # verifiable sources only (verdicts exist)
    compare_curves: pl.DataFrame | None = None  # best_of_k_ci: both curves with their intervals
    compare_pairs: pl.DataFrame | None = None  # method_comparison, each pair once
    cost: pl.DataFrame | None = None  # method_cost: tokens, server seconds, money, prefix-cache hit rate


# The report's tables, one query file each (sql/queries/report_<name>.sql); each binds the run id.
TABLES = ("summary", "best_of_k", "prefix", "tokens", "agent_share", "calls", "trees", "dpo", "accuracy",
          "compare_curves", "compare_pairs", "cost")


def load_tables(store: Store, run_id: str) -> RunTables:
    con = connect(store)
    try:
        frames = {name: con.sql(query_text(f"report_{name}"), params=[run_id]).pl() for name in TABLES}
        configs = con.sql(query_text("report_config"), params=[run_id]).pl()["config_json"].to_list()
    finally:
        con.close()
    if frames["summary"].is_empty():
        raise UnknownRun(f"run {run_id!r} has no samples in {store.url}; `toa sql \"select distinct run_id from samples\"` lists the runs there")
    return RunTables(config=json.loads(configs[0]) if configs and configs[0] else None, **frames)


# -- plots (SVG text: toa.svgplot) -----------------------------------------------------------
# The curves' x axes: (column of compare_curves, axis label, panel title).
CURVE_AXES = (("k", "generations per prompt (k)", "Best reward vs generations"),
              ("completion_tokens", "completion tokens per prompt (first k generations)", "Best reward vs tokens"),
              ("server_s", "server seconds per prompt (first k generations)", "Best reward vs server seconds"))
# The two curves: (style key, reward column of compare_curves, its interval's columns).
CURVE_KINDS = (("expected", "best_reward", "best_reward_lo", "best_reward_hi"),
               ("prefix", "prefix_reward", "prefix_reward_lo", "prefix_reward_hi"))
CURVE_LEGEND = [("expected best of k random samples", "#4d4d4d", CURVE_STYLES["expected"]),
                ("best of first k in generation order", "#4d4d4d", CURVE_STYLES["prefix"]),
                ("95 % bootstrap interval over prompts", "#4d4d4d", "band")]


def plot_curves(t: RunTables, path: Path, run_id: str) -> Path:
    """Three panels, one figure: best reward vs k, vs completion tokens and vs server seconds per
    prompt, each curve with its 95 % bootstrap band (the interval at each k, shaded between)."""
    methods = t.summary["method"].to_list()
    color = svgplot.colors(methods)
    curves = t.compare_curves if t.compare_curves is not None and not t.compare_curves.is_empty() else None
    panels = []
    for x, xlabel, title in CURVE_AXES:
        panel = svgplot.Panel(title, xlabel, "best reward (mean over prompts)", integer_x=x == "k",
                              legend=CURVE_LEGEND if x == "k" else [])
        for kind, y, lo, hi in CURVE_KINDS if curves is not None else ():
            for method in methods:
                mine = curves.filter(pl.col("method") == method).drop_nulls([x, y]).sort(x)
                panel.lines.append(svgplot.Line(mine[x].to_list(), mine[y].to_list(), color[method], CURVE_STYLES[kind]))
                band = mine.drop_nulls([lo, hi])  # a k whose every resample was empty has no interval
                panel.bands.append(svgplot.Band(band[x].to_list(), band[lo].to_list(), band[hi].to_list(), color[method]))
        panels.append(panel)
    legend = [(m, color[m], "solid") for m in methods]
    path.write_text(svgplot.figure(panels, f"toa run {run_id}", legend, "method"), encoding="utf-8")
    return path


def plot_agent_share(t: RunTables, path: Path, run_id: str) -> Path:
    """Grouped bars: one group per method, one bar per agent, height = share of best responses."""
    methods = t.summary["method"].to_list()
    agents = sorted(set(t.agent_share["agent"].to_list()))
    color = svgplot.colors(agents)
    width = 0.8 / max(1, len(agents))
    panel = svgplot.Panel("", "method", "share of prompts won", xticks=list(enumerate(methods)), ylim=(0.0, 1.12))
    for j, agent in enumerate(agents):
        mine = t.agent_share.filter(pl.col("agent") == agent)
        share = dict(zip(mine["method"].to_list(), mine["share"].to_list()))
        for i, method in enumerate(methods):
            value = share.get(method) or 0.0
            panel.bars.append(svgplot.Bar(i + (j - (len(agents) - 1) / 2) * width, width, value, color[agent], f"{value:.2f}"))
    title = f"Which agent wrote the best response (run {run_id})"
    path.write_text(svgplot.figure([panel], title, [(a, color[a], "box") for a in agents], "agent",
                                   panel_width=max(420, 90 * len(methods) * max(1, len(agents)))), encoding="utf-8")
    return path


# -- tables ----------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 10_000 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def curve_table(df: pl.DataFrame) -> pl.DataFrame:
    """k down the side, one best-reward column per method: the curves as a readable table."""
    if df.is_empty():
        return pl.DataFrame({"k": []})
    return df.pivot(on="method", index="k", values="best_reward").sort("k")


def _interval(value: Any, lo: Any, hi: Any) -> str:
    """A value with its interval, "0.62 [0.58, 0.66]"; the value alone when there is no interval."""
    if value is None:
        return ""
    if lo is None or hi is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]"


def pairs_table(df: pl.DataFrame | None) -> pl.DataFrame:
    """The paired comparison as the report shows it: one row per pair, each estimate with its
    95 % interval in brackets."""
    if df is None or df.is_empty():
        return pl.DataFrame()
    return pl.DataFrame([{
        "method A": r["method_a"], "method B": r["method_b"], "k": r["k"], "prompts": r["prompts"],
        "A wins / ties / B wins": f"{r['wins']} / {r['ties']} / {r['losses']}",
        "win rate of A [95 % CI]": _interval(r["win_rate"], r["win_rate_lo"], r["win_rate_hi"]),
        "mean difference A - B [95 % CI]": _interval(r["mean_diff"], r["mean_diff_lo"], r["mean_diff_hi"]),
    } for r in df.iter_rows(named=True)])


def budget_table(df: pl.DataFrame | None) -> pl.DataFrame:
    """Each method's curves at its largest k (its budget), with their 95 % intervals and cost."""
    if df is None or df.is_empty():
        return pl.DataFrame()
    last = df.sort("k").group_by("method", maintain_order=True).last().sort("method")
    return pl.DataFrame([{
        "method": r["method"], "k": r["k"], "prompts": r["prompts"],
        "expected best of k [95 % CI]": _interval(r["best_reward"], r["best_reward_lo"], r["best_reward_hi"]),
        "best of first k [95 % CI]": _interval(r["prefix_reward"], r["prefix_reward_lo"], r["prefix_reward_hi"]),
        "completion tokens": r["completion_tokens"], "server seconds": r["server_s"],
    } for r in last.iter_rows(named=True)])


def cost_table(df: pl.DataFrame | None) -> pl.DataFrame:
    """method_cost as the report shows it: money to 6 significant digits (a fraction of a cent
    stays visible; the tables' 4 decimals would round it to 0)."""
    if df is None or df.is_empty():
        return pl.DataFrame()
    return df.with_columns(pl.col("money").map_elements(lambda v: f"{v:.6g}", return_dtype=pl.Utf8))


def markdown_table(df: pl.DataFrame) -> str:
    if df.width == 0 or df.is_empty():
        return "_(none)_\n"
    head = "| " + " | ".join(df.columns) + " |\n|" + "---|" * df.width + "\n"
    return head + "".join("| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row) + " |\n" for row in df.rows())


def html_table(df: pl.DataFrame) -> str:
    if df.width == 0 or df.is_empty():
        return "<p><em>(none)</em></p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in df.rows())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def sections(t: RunTables) -> list[tuple[str, str, pl.DataFrame]]:
    """(title, explanation, table) in report order; the Markdown and the HTML render the same list."""
    return [
        ("Methods", "Per method at equal budget (method_summary).", t.summary),
        ("Best of k (expected, random subsets)", "Mean over prompts of the expected best reward of k samples "
         "drawn at random from the prompt's scored samples (view best_of_k).", curve_table(t.best_of_k)),
        ("Best of k (first k in generation order)", "Mean over prompts of the best reward among the first k "
         "generations (view best_of_k_prefix).", curve_table(t.prefix)),
        ("Best of k at the budget, with intervals",
         ("Each method at its largest k: both curves with their 95 % bootstrap intervals over prompts (view "
          "best_of_k_ci), and the mean completion tokens and server seconds (the calls' latency_s, a request's "
          "shared by its generations) of the first k generations."),
         budget_table(t.compare_curves)),
        ("Paired comparison at equal budget",
         ("Every two methods on the prompts both answered, at k = the smaller budget: win rate = share of prompts "
          "where A's best reward beats B's, ties counting half; mean difference = mean of A's best minus B's best; "
          "95 % bootstrap intervals over prompts in brackets (view method_comparison; B vs A mirrors A vs B)."),
         pairs_table(t.compare_pairs)),
        ("Reward vs tokens", "Mean best reward and tokens spent per prompt (reward_vs_tokens_summary).", t.tokens),
        ("Agent share of best responses", "agent_best_share.", t.agent_share),
        ("Calls", "Per method and agent (call_stats); latency in seconds.", t.calls),
        ("Cost and compute", "Per method (method_cost, sql/cost.sql): prompt tokens (a request's prompt once for its "
         "n choices) and completion tokens; server_seconds as the servers reported them (timed_generations of the "
         "generations; empty if none did); request_seconds = server seconds, else client latency; money at the "
         "agents' prices (empty without a price); prefix_cache_hit_rate from the servers' vLLM counters over the "
         "method's batches (shared by whatever else ran on the server meanwhile; empty without /metrics).",
         cost_table(t.cost)),
        ("Trees and refinement", "Depth, width and how often a refinement beat its parent (tree_stats).", t.trees),
        ("DPO pair margins", "chosen - rejected reward (dpo_margin_summary).", t.dpo),
    ] + ([("Accuracy at budget", "Verifiable prompts: share of prompts answered correctly with k generations, "
           "by the reward model's best of k (expected over random subsets), by majority vote over the first k, "
           "and pass@k (an oracle bound); sample_accuracy = share of correct generations (accuracy_at_budget).",
           t.accuracy)] if t.accuracy is not None and not t.accuracy.is_empty() else [])


# -- documents -------------------------------------------------------------------------------
def _config_text(t: RunTables) -> str:
    return json.dumps(t.config, indent=2, ensure_ascii=False) if t.config is not None else "(no runs row for this run)"


def render_markdown(t: RunTables, run_id: str, images: dict[str, str]) -> str:
    """`images` maps a caption to an image reference (a relative path, or a data URI)."""
    parts = [f"# toa report: run {run_id}\n"]
    parts += [f"![{caption}]({ref})\n" for caption, ref in images.items()]
    for title, note, df in sections(t):
        parts.append(f"## {title}\n\n{note}\n\n{markdown_table(df)}")
    parts.append(f"## Run config\n\n```json\n{_config_text(t)}\n```\n")
    return "\n".join(parts)


def _data_uri(path: Path) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


HTML_STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}svg{max-width:100%;height:auto}
pre{background:#f6f6f6;padding:1em;overflow:auto}"""


def render_html(t: RunTables, run_id: str, images: dict[str, Path]) -> str:
    title = html.escape(f"toa report: run {run_id}")
    body = [f"<h1>{title}</h1>"]
    # the SVG documents inline: the page stays one file, and its text is searchable
    body += [f'<figure>{p.read_text(encoding="utf-8")}<figcaption>{html.escape(c)}</figcaption></figure>'
             for c, p in images.items()]
    for name, note, df in sections(t):
        body.append(f"<h2>{html.escape(name)}</h2><p>{html.escape(note)}</p>{html_table(df)}")
    body.append(f"<h2>Run config</h2><pre>{html.escape(_config_text(t))}</pre>")
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{HTML_STYLE}</style></head><body>{''.join(body)}</body></html>\n")


def build_report(store: Store, run_id: str, out_dir: str | Path) -> dict[str, Path]:
    """Write the plots, report.md, report.html and best_of_k.csv for one run; returns their paths
    under the keys curves, agent_share, markdown, html, best_of_k."""
    t = load_tables(store, run_id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"curves": plot_curves(t, out / "curves.svg", run_id),
             "agent_share": plot_agent_share(t, out / "agent_share.svg", run_id)}
    captions = {"Best reward vs generations, tokens and server seconds (95 % bootstrap bands)": paths["curves"],
                "Agent share of best responses": paths["agent_share"]}
    t.best_of_k.write_csv(out / "best_of_k.csv")
    paths["best_of_k"] = out / "best_of_k.csv"
    paths["markdown"] = out / "report.md"
    paths["markdown"].write_text(render_markdown(t, run_id, {c: p.name for c, p in captions.items()}), encoding="utf-8")
    paths["html"] = out / "report.html"
    paths["html"].write_text(render_html(t, run_id, captions), encoding="utf-8")
    return paths


# -- Prefect ---------------------------------------------------------------------------------
def artifact_key(prefix: str, run_id: str) -> str:
    """Prefect artifact keys allow only lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{prefix}-{run_id}".lower())


def publish_artifacts(paths: dict[str, Path], run_id: str) -> None:
    """Attach the report to the current flow run: the Markdown (plots inlined as data URIs, since
    the Prefect UI cannot reach local files) and the best-of-k table."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    markdown = Path(paths["markdown"]).read_text(encoding="utf-8")
    for key in ("curves", "agent_share"):
        name = Path(paths[key]).name
        markdown = markdown.replace(f"]({name})", f"]({_data_uri(Path(paths[key]))})")
    create_markdown_artifact(key=artifact_key("toa-report", run_id), markdown=markdown,
                             description=f"toa run {run_id}: report (files in {Path(paths['html']).parent})")
    table = pl.read_csv(paths["best_of_k"]).to_dicts()
    create_table_artifact(key=artifact_key("toa-best-of-k", run_id), table=table,
                          description=f"toa run {run_id}: expected best reward of k samples, per method")
