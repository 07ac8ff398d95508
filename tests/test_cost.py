"""Cost and compute accounting: the server time a reply carries, the calls' new columns (and old
shards without them), money per method in the views (sql/cost.sql) against a real DuckDB file,
the prefix-cache counters read around a unit, the projected cost of the progress bar, and the
report's Cost table.

The model server is an in-process fake (FakeVllm: a real HTTP server on 127.0.0.1 that answers
chat completions as vLLM with --enable-per-request-metrics does and publishes prefix-cache
counters at /metrics); transports of the request layer are in-process fakes too."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import polars as pl
import pytest
from helpers import write_run
from pydantic import SecretStr
from toa.tasks.progress import Snapshot, Tracker, describe, format_cost, projected_cost

from toa.calls import CallLayer, ClientPolicy, EndpointClient, _server_seconds
from toa.config import Price, load_config
from toa.db import connect, create_views, query
from toa.rows import SCHEMAS, CallRecord, RunRecord, frame
from toa.servers import Endpoint
from toa.storage import ShardWriter, Store
from toa.units import cache_growth, calls_cost

NEW_CALL_COLUMNS = ("server_s", "request_choices")


def length(prompt: str, response: str, reference: str | None) -> float:
    """A custom reward for the run on the fake server."""
    return float(len(response))


# -- what a reply says about the server's time -------------------------------------------------

def test_server_time_is_read_where_the_reply_carries_it():
    # vLLM 0.32 with --enable-per-request-metrics (n = 1): scheduled -> first token, first -> last token
    assert _server_seconds({"metrics": {"time_to_first_token_ms": 120.0, "generation_time_ms": 380.0,
                                        "queue_time_ms": 900.0}}) == pytest.approx(0.5)  # queue wait left out
    # llama.cpp's server
    assert _server_seconds({"timings": {"prompt_ms": 43.237, "predicted_ms": 238.74}}) == pytest.approx(0.281977)
    # vLLM without engine stats (all null), vLLM's default reply, a hosted API: unknown
    assert _server_seconds({"metrics": {"time_to_first_token_ms": None, "generation_time_ms": None}}) is None
    assert _server_seconds({"metrics": None, "usage": {"prompt_tokens": 3}}) is None
    assert _server_seconds({}) is None


class FakeTransport:
    """In-process chat server: replies carry vLLM's per-request `metrics` for n = 1 only (vLLM
    leaves them out for n > 1, where they would describe one of the n sequences)."""

    async def __call__(self, url: str, content: bytes) -> tuple[int, bytes]:
        n = json.loads(content).get("n", 1)
        reply = {"choices": [{"index": i, "finish_reason": "stop", "message": {"content": f"r{i}"}} for i in range(n)],
                 "usage": {"prompt_tokens": 9, "completion_tokens": 4 * n}}
        if n == 1:
            reply["metrics"] = {"time_to_first_token_ms": 50.0, "generation_time_ms": 200.0}
        return 200, json.dumps(reply).encode()


async def test_records_carry_the_server_time_and_their_requests_choice_count():
    endpoint = Endpoint(alias="a", base_url="http://fake/v1", model="m", api_key=SecretStr("k"), identity="fake")
    client = EndpointClient(endpoint, {"max_tokens": 8}, ClientPolicy(retries=0), transport=FakeTransport())
    records: list[CallRecord] = []
    generate = CallLayer({"a": client}, {}, records.append, run_seed=0).for_prompt("p")
    await generate("a", [{"role": "user", "content": "one"}], 1)
    await generate("a", [{"role": "user", "content": "three"}], 3)
    assert [(r.server_s, r.request_choices, r.prompt_tokens) for r in records] == \
        [(pytest.approx(0.25), 1, 9)] + [(None, 3, 9)] * 3


# -- old shards -----------------------------------------------------------------------------------

def old_call(key: str, **values) -> dict:
    """A `calls` row as toa wrote it before server_s and request_choices were kept."""
    row = {"call_key": key, "prompt_id": "p1", "agent": "a", "model": "m", "request_json": "{}", "seed": 1, "slot": 0,
           "text": "x", "finish_reason": "stop", "prompt_tokens": 10, "completion_tokens": 5, "latency_s": 2.0,
           "status": "ok", "error": None, "created_at": 1.0, "logprob": None}
    return {**row, **values}


def test_calls_recorded_before_the_new_columns_still_load(tmp_path):
    store = Store(str(tmp_path))
    old = frame("calls", [{**old_call("old"), "server_s": None, "request_choices": None}]).drop(*NEW_CALL_COLUMNS)
    store.write_frame(old, store.path("calls", "batch=b0", "part-old.parquet"))
    store.write_rows("calls", [CallRecord(**old_call("new", created_at=2.0), server_s=0.75, request_choices=2)],
                     "batch=b0", "part-new.parquet")
    # a journal line of a writer that died before the columns existed (recovered into a shard)
    journal = tmp_path / "calls" / "batch=b0" / "journal-dead.jsonl"
    journal.write_text(json.dumps(old_call("journaled", created_at=3.0)) + "\n")
    ShardWriter(store, "calls", "batch=b0")  # a new writer of the partition recovers dead writers' journals
    assert not journal.exists()

    assert frame("calls", [old_call("written-as-before")])["server_s"].to_list() == [None]  # a writer's old dict row
    loaded = {r["call_key"]: CallRecord(**r) for r in store.read("calls", "batch=b0").iter_rows(named=True)}
    assert {k: (r.server_s, r.request_choices) for k, r in loaded.items()} == \
        {"old": (None, None), "new": (0.75, 2), "journaled": (None, None)}

    create_views(store)  # the database file: the calls shards differ in columns, so read by name
    got = query(store, "select call_key, server_s, request_choices from calls order by created_at").rows()
    assert got == [("old", None, None), ("new", 0.75, 2), ("journaled", None, None)]


# -- money per method, in the views ---------------------------------------------------------------
# Run "priced": agent a costs 2 per 1M prompt tokens and 8 per 1M completion tokens; b 3.6 per
# GPU-hour on 2 GPUs (0.002 a second).
#   random: a asked once with n = 2 (prompt 100 once, completions 30 + 50, no server time, 4 s
#           latency); b once with n = 1 (prompt 40, completion 10, server 1.5 s of a 2 s call);
#           a failed call of b (costs nothing)
#   toa:    a, a call recorded before request_choices / server_s were kept (prompt 10,
#           completion 5, 1 s latency: a share of 1, client time)

PRICED = {"agents": [{"alias": "a", "price": {"input_per_1m": 2.0, "output_per_1m": 8.0, "currency": "USD"}},
                     {"alias": "b", "price": {"gpu_hour": 3.6, "gpus": 2, "currency": "USD"}}]}


def a_sample(run_id, method, sid, agent, prompt_tokens, completion_tokens, latency, status="ok"):
    from helpers import sample_row_dict

    return sample_row_dict(run_id=run_id, method=method, batch="b0", prompt_id="p1", sample_id=sid, agent=agent,
                           action=agent, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                           latency_s=latency, status=status)


def a_call(key, agent, prompt_tokens, completion_tokens, latency, server_s, choices, status="ok") -> CallRecord:
    return CallRecord(**old_call(key, agent=agent, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                 latency_s=latency, status=status), server_s=server_s, request_choices=choices)


def write_priced_run(store: Store, run_id: str, config: dict | None) -> None:
    samples = [a_sample(run_id, "random", f"{run_id}-a1", "a", 100, 30, 4.0),
               a_sample(run_id, "random", f"{run_id}-a2", "a", 100, 50, 4.0),
               a_sample(run_id, "random", f"{run_id}-b1", "b", 40, 10, 2.0),
               a_sample(run_id, "random", f"{run_id}-b2", "b", 0, 0, 9.0, status="error"),
               a_sample(run_id, "toa", f"{run_id}-t1", "a", 10, 5, 1.0)]
    calls = [a_call(f"{run_id}-a1", "a", 100, 30, 4.0, None, 2), a_call(f"{run_id}-a2", "a", 100, 50, 4.0, None, 2),
             a_call(f"{run_id}-b1", "b", 40, 10, 2.0, 1.5, 1), a_call(f"{run_id}-b2", "b", 0, 0, 9.0, None, 1, "error")]
    store.write_rows("samples", samples, f"run={run_id}", "b0.parquet")
    store.write_rows("calls", calls, "batch=b0", f"{run_id}.parquet")
    old = frame("calls", [{**old_call(f"{run_id}-t1", latency_s=1.0), "server_s": None, "request_choices": None}])
    store.write_frame(old.drop(*NEW_CALL_COLUMNS), store.path("calls", "batch=b0", f"{run_id}-old.parquet"))
    if config is not None:
        store.write_rows("runs", [RunRecord(run_id, 1.0, json.dumps(config), "{}", "rm")], f"run={run_id}", "1.parquet")


@pytest.fixture(scope="module")
def priced(tmp_path_factory):
    store = Store(str(tmp_path_factory.mktemp("results")))
    write_priced_run(store, "priced", PRICED)
    write_priced_run(store, "free", {"agents": [{"alias": "a"}, {"alias": "b", "price": None}]})
    mixed = {"agents": [PRICED["agents"][0], {"alias": "b", "price": {"gpu_hour": 1.0, "currency": "EUR"}}]}
    write_priced_run(store, "mixed", mixed)
    write_priced_run(store, "no-runs-row", None)
    create_views(store)  # a real toa.duckdb file, as a run leaves it
    return store


def method_cost(store, run_id):
    df = query(store, "select * from method_cost where run_id = ? order by method", [run_id])
    return {r["method"]: r for r in df.iter_rows(named=True)}


def test_money_per_method_is_exact_at_the_configured_prices(priced):
    got = method_cost(priced, "priced")
    random, toa = got["random"], got["toa"]
    # a: 2 x 100 / 1e6 (the shared prompt once) + 8 x 80 / 1e6; b: 3.6 x 2 x 1.5 s / 3600
    assert random["money"] == pytest.approx(0.0002 + 0.00064 + 0.003, abs=1e-15)
    assert toa["money"] == pytest.approx(2 * 10 / 1e6 + 8 * 5 / 1e6, abs=1e-15)
    assert (random["currency"], toa["currency"]) == ("USD", "USD")
    assert (random["generations"], random["input_tokens"], random["output_tokens"]) == (3, 140, 90)
    assert random["server_seconds"] == pytest.approx(1.5) and random["timed_generations"] == 1
    assert random["request_seconds"] == pytest.approx(4.0 + 1.5)  # a's 4 s request once, b's server time
    assert toa["server_seconds"] is None and toa["timed_generations"] == 0  # no server reported its time
    assert toa["request_seconds"] == pytest.approx(1.0)


def test_money_per_agent_prices_each_agent_alone(priced):
    rows = query(priced, "select agent, money, input_tokens from agent_cost where run_id = ? and method = 'random' "
                         "order by agent", ["priced"]).rows()
    assert [(a, round(m, 12), t) for a, m, t in rows] == [("a", 0.00084, 100), ("b", 0.003, 40)]


def test_money_is_null_without_a_price_or_with_two_currencies(priced):
    for run_id in ("free", "mixed", "no-runs-row"):
        got = method_cost(priced, run_id)
        assert got["random"]["money"] is None and got["random"]["currency"] is None, run_id
        assert got["random"]["input_tokens"] == 140  # the compute is counted all the same
    prices = query(priced, "select agent, currency from agent_prices where run_id = 'mixed' order by agent").rows()
    assert prices == [("a", "USD"), ("b", "EUR")]


def test_the_engines_cost_of_new_calls_matches_the_view():
    """toa.units.calls_cost (the progress bar's) prices calls as the view does."""
    prices = {"a": Price(input_per_1m=2.0, output_per_1m=8.0), "b": Price(gpu_hour=3.6, gpus=2)}
    calls = [a_call("a1", "a", 100, 30, 4.0, None, 2), a_call("a2", "a", 100, 50, 4.0, None, 2),
             a_call("b1", "b", 40, 10, 2.0, 1.5, 1), a_call("b2", "b", 0, 0, 9.0, None, 1, "error")]
    money, currency = calls_cost(calls, prices)
    assert money == pytest.approx(0.00384, abs=1e-15) and currency == "USD"
    assert calls_cost(calls, {}) == (None, None)
    assert calls_cost(calls, {"a": Price(output_per_1m=1.0), "b": Price(output_per_1m=1.0, currency="EUR")}) == (None, None)
    with pytest.raises(ValueError, match="a price needs"):
        Price(currency="USD")


# -- the prefix cache's counters around a unit ------------------------------------------------

def test_cache_growth_is_the_difference_or_unknown_never_zero():
    assert cache_growth((1000.0, 400.0), (1040.0, 430.0)) == (40.0, 30.0)
    assert cache_growth(None, (1040.0, 430.0)) == (None, None)  # no reading at the start
    assert cache_growth((1000.0, 400.0), None) == (None, None)
    assert cache_growth((1000.0, 400.0), (10.0, 5.0)) == (None, None)  # the server restarted between


class FakeVllm:
    """A fake vLLM OpenAI server (real HTTP on 127.0.0.1, in a thread): chat replies with the
    per-request `metrics` of --enable-per-request-metrics, and /metrics whose prefix-cache
    counters grow by 20 lookups and 15 hits per request (`counters=False`: a vLLM without them)."""

    def __init__(self, counters: bool = True):
        self.counters, self.queries, self.hits, self.posts = counters, 1000.0, 400.0, 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FakeVllm:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def page(self) -> str:
        lines = ['vllm:num_requests_running{engine="0",model_name="m"} 0.0',
                 'vllm:generation_tokens_total{engine="0",model_name="m"} 7.0']
        if self.counters:
            lines += [f'vllm:prefix_cache_queries_total{{engine="0",model_name="m"}} {self.queries}',
                      f'vllm:prefix_cache_hits_total{{engine="0",model_name="m"}} {self.hits}']
        return "\n".join(lines) + "\n"

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _send(self, data: bytes, kind: str = "application/json") -> None:
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                with fake.lock:
                    self._send(fake.page().encode(), "text/plain")

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with fake.lock:
                    fake.posts += 1
                    fake.queries += 20
                    fake.hits += 15
                n = body.get("n", 1)
                reply = {"choices": [{"index": i, "finish_reason": "stop", "message": {"content": f"answer {i}"}}
                                     for i in range(n)],
                         "usage": {"prompt_tokens": 20, "completion_tokens": 10 * n},
                         "metrics": {"time_to_first_token_ms": 100.0, "generation_time_ms": 400.0} if n == 1 else None}
                self._send(json.dumps(reply).encode())

        return Handler


async def test_prefix_cache_counters_are_read_from_metrics_or_left_unknown():
    from toa.engine import _prefix_cache_counters

    with FakeVllm() as server:
        assert await _prefix_cache_counters(server.url.removesuffix("/v1") + "/metrics", "k") == (1000.0, 400.0)
    with FakeVllm(counters=False) as server:  # other vLLM metrics, no prefix-cache counter
        assert await _prefix_cache_counters(server.url.removesuffix("/v1") + "/metrics", "k") is None
    assert await _prefix_cache_counters("http://127.0.0.1:9/metrics", "k") is None  # nothing listening


def run_unit(tmp_path, server: FakeVllm, price: dict | None):
    """One (method, batch) unit of `random` (n = 1, one agent, 2 prompts) on the fake server, and
    the run's `runs` row (what SQL reads the prices from)."""
    from toa.engine import close_engines, run_batch
    from toa.plan import RunPlan
    from toa.rows import Prompt

    cfg = load_config(None, {
        "results_root": str(tmp_path), "methods": ["random"], "n": 1,
        "reward": {"kind": "custom", "function": f"{__name__}:length"},
        "agents": [{"alias": "a", "endpoint": {"base_url": server.url, "model": "m", "api_key": "k"},
                    "stall_timeout_s": None, "min_tokens_per_s": None, "price": price}]})
    endpoints = {"a": Endpoint(alias="a", base_url=server.url, model="m", api_key=SecretStr("k"), identity="fake-m")}
    store = Store(str(tmp_path))
    store.write_rows("runs", [RunRecord("r1", 1.0, cfg.model_dump_json(), "{}", "rm")], "run=r1", "1.parquet")
    try:
        stats = run_batch(RunPlan(cfg, cfg.method_objects, "r1"), endpoints, "random", "b0",
                          [Prompt("p1", "Name a colour."), Prompt("p2", "Name a fruit.")], owner="test-cost")
    finally:
        close_engines("test-cost")
    return store, stats


def test_a_unit_records_its_prefix_cache_use_and_its_cost(tmp_path):
    price = {"input_per_1m": 1.0, "output_per_1m": 2.0, "gpu_hour": 3.6}
    with FakeVllm() as server:
        store, stats = run_unit(tmp_path, server, price)
        assert server.posts == 2
    # per call: 20 prompt tokens x 1 / 1e6 + 10 completion tokens x 2 / 1e6 + 3.6 x 0.5 s / 3600
    assert stats.cost == pytest.approx(2 * (20e-6 + 20e-6 + 0.0005), abs=1e-15) and stats.currency == "USD"
    assert store.read_json("done", "run=r1", "method=random", "b0.json")["cost"] == pytest.approx(stats.cost)
    rows = store.read("prefix_cache").to_dicts()
    assert [(r["run_id"], r["method"], r["batch"], r["agents"], r["queries"], r["hits"]) for r in rows] == \
        [("r1", "random", "b0", "a", 40.0, 30.0)]
    got = method_cost(store, "r1")["random"]
    assert got["money"] == pytest.approx(stats.cost, abs=1e-15)  # the view and the engine agree
    assert (got["cache_queries"], got["cache_hits"], got["prefix_cache_hit_rate"]) == (40.0, 30.0, 0.75)
    assert got["server_seconds"] == pytest.approx(1.0) and got["timed_generations"] == 2


def test_a_server_without_counters_leaves_the_hit_rate_null_and_no_price_no_cost(tmp_path):
    with FakeVllm(counters=False) as server:
        store, stats = run_unit(tmp_path, server, None)
    assert stats.cost is None and stats.currency is None
    assert store.read("prefix_cache").is_empty()
    got = method_cost(store, "r1")["random"]
    assert got["prefix_cache_hit_rate"] is None and got["cache_queries"] is None and got["money"] is None
    assert got["output_tokens"] == 20


# -- projected cost ------------------------------------------------------------------------------

def test_projected_cost_is_cost_so_far_plus_its_rate_for_the_prompts_left():
    assert projected_cost(0.30, costed_prompts=10, prompts_left=30) == pytest.approx(1.20)
    assert projected_cost(0.30, costed_prompts=10, prompts_left=0) == pytest.approx(0.30)
    assert projected_cost(None, costed_prompts=10, prompts_left=30) is None  # no price
    assert projected_cost(0.0, costed_prompts=0, prompts_left=30) is None  # nothing priced finished yet


def test_the_tracker_projects_from_worked_batches_only():
    t = Tracker({("random", "b1"): 4, ("random", "b2"): 4, ("toa", "b1"): 4, ("toa", "b2"): 4})
    assert t.snapshot().projected_cost is None
    t.finish(("random", "b1"), 4, skipped=True)  # an earlier run's: free now, and no rate
    t.finish(("random", "b2"), 4, cost=0.10, currency="USD")
    snap = t.snapshot()
    # 0.10 for 4 worked prompts; 8 prompts left at 0.025 each
    assert (snap.cost, snap.projected_cost, snap.currency) == (pytest.approx(0.10), pytest.approx(0.30), "USD")
    assert "cost ~$0.30 projected (~$0.10 so far)" in describe("r1", snap)
    unpriced = Tracker({("random", "b1"): 4})
    unpriced.finish(("random", "b1"), 4)
    assert unpriced.snapshot().projected_cost is None and "cost" not in describe("r1", unpriced.snapshot())


@pytest.mark.parametrize("amount, currency, text", [(0.42, "USD", "~$0.42"), (1234.5, "EUR", "~€1,234.50"),
                                                    (0.0123, "USD", "~$0.0123"), (3.0, "CHF", "~3.00 CHF"),
                                                    (None, "USD", "")])
def test_format_cost(amount, currency, text):
    assert format_cost(amount, currency) == text


def test_cli_bar_shows_the_projected_cost_next_to_the_eta(capsys):
    from toa.tasks import progress

    from toa.cli import _progress_bar

    t = Tracker({("random", "b1"): 2, ("random", "b2"): 2})
    with _progress_bar(True, []):
        t.finish(("random", "b1"), 2, cost=0.21, currency="USD")
        progress._notify(t)
    out = capsys.readouterr().out
    assert "ETA" in out and "cost ~$0.42" in out
    assert Snapshot(0, 1, 0, 1, 0, None).projected_cost is None  # older snapshots: no cost column value


# -- the report -----------------------------------------------------------------------------------

def test_the_report_has_the_cost_table(tmp_path):
    """The hand-built run of helpers.write_run, priced by a later `runs` row: a costs 1000 per 1M
    prompt tokens and 2000 per 1M completion tokens (0.02 per generation of 10 + 5 tokens), b 36
    per GPU-hour (0.01 a second of its calls' time: r2's recorded call 1.5 s, the others' 1 s)."""
    from toa import report

    store = Store(str(tmp_path))
    write_run(store, "run1")
    config = {"n": 2, "agents": [{"alias": "a", "price": {"input_per_1m": 1000, "output_per_1m": 2000, "currency": "USD"}},
                                 {"alias": "b", "price": {"gpu_hour": 36.0, "currency": "USD"}}]}
    store.write_rows("runs", [RunRecord("run1", 2.0, json.dumps(config), "{}", "rm")], "run=run1", "2.parquet")
    tables = report.load_tables(store, "run1")
    cost = {r["method"]: r for r in tables.cost.iter_rows(named=True)}
    assert cost["random"]["money"] == pytest.approx(3 * 0.02 + 0.015 + 0.01)
    assert cost["toa"]["money"] == pytest.approx(2 * 0.02 + 2 * 0.01)
    md = report.render_markdown(tables, "run1", {})
    section = md.split("## Cost and compute", 1)[1].split("\n## ", 1)[0]
    assert "| method | generations | input_tokens | output_tokens |" in section
    assert "| random | 5 | 50 | 25 |" in section and "| 0.085 | USD |" in section
    tiny = report.cost_table(tables.cost.with_columns(pl.lit(0.0000123).alias("money")))
    assert tiny["money"].to_list() == ["1.23e-05", "1.23e-05"]  # not rounded away to 0
    assert "Cost and compute" in report.render_html(tables, "run1", {})


def test_every_cost_view_answers_on_an_empty_root(tmp_path):
    con = connect(Store(str(tmp_path)))
    for view in ("prefix_cache", "agent_prices", "agent_cost", "method_cost"):
        assert con.execute(f"select count(*) from {view}").fetchone() == (0,)
    assert "prefix_cache" in SCHEMAS and pl.Schema(SCHEMAS["prefix_cache"])["queries"] == pl.Float64
