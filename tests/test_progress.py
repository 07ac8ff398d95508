"""Progress: the pure helpers (ETA, formatting, the thread-safe tracker) as unit tests, and the
flow on real vLLM servers (attached `embedded_servers`) with a real Prefect API, reading back
the progress artifact, the per-batch events and the per-method table artifact."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from toa.tasks.progress import (
    Snapshot,
    Tracker,
    prompt_done,
    describe,
    eta_seconds,
    format_eta,
    listen,
)



def test_eta_extrapolates_the_rate_of_worked_prompts():
    assert eta_seconds(elapsed_s=10, done=5, total=20) == pytest.approx(30)
    # 10 prompts were skipped (done by an earlier run, in no time): the rate is 5 per 10 s
    assert eta_seconds(elapsed_s=10, done=15, total=25, skipped=10) == pytest.approx(20)


def test_eta_is_zero_when_done_and_unknown_without_a_rate():
    assert eta_seconds(5, 20, 20) == 0.0
    assert eta_seconds(5, 0, 20) is None
    assert eta_seconds(0, 3, 20) is None
    assert eta_seconds(5, 10, 20, skipped=10) is None  # everything so far was skipped


@pytest.mark.parametrize("seconds, text", [(None, "unknown"), (0, "0s"), (59.4, "59s"), (61, "1m 01s"),
                                           (3599, "59m 59s"), (3725, "1h 02m")])
def test_format_eta(seconds, text):
    assert format_eta(seconds) == text


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_tracker_counts_prompts_of_running_and_finished_batches():
    clock = Clock()
    t = Tracker({("random", "b1"): 4, ("random", "b2"): 4, ("moa", "b1"): 2}, clock=clock)
    assert t.snapshot() == Snapshot(0, 10, 0, 3, 0, None)
    clock.now = 2.0
    t.prompt_done(("random", "b1"), 1)
    t.prompt_done(("random", "b1"), 3)
    snap = t.snapshot()
    assert (snap.done, snap.eta_s) == (3, pytest.approx(7 * 2 / 3))
    t.finish(("random", "b1"), 4)
    t.prompt_done(("random", "b1"), 1)  # a late tick of a finished batch changes nothing
    t.prompt_done(("other", "b9"), 1)  # nor one of a batch of another run
    assert t.snapshot().done == 4 and t.snapshot().batches_done == 1


def test_a_retried_batch_starts_its_count_over():
    t = Tracker({("random", "b1"): 4})
    t.prompt_done(("random", "b1"), 3)
    t.prompt_done(("random", "b1"), 0)  # the attempt failed; the retry starts
    assert t.snapshot().done == 0


def test_failed_batches_are_not_done_and_skipped_ones_do_not_set_the_rate():
    clock = Clock()
    t = Tracker({("a", "1"): 2, ("a", "2"): 2, ("a", "3"): 2}, clock=clock)
    t.finish(("a", "1"), 2, skipped=True)
    clock.now = 4.0
    t.finish(("a", "2"), 2)
    snap = t.snapshot()
    assert snap.eta_s == pytest.approx(4.0)  # 2 worked prompts in 4 s, 2 left
    t.finish(("a", "3"), 0, failed=True)
    snap = t.snapshot()
    assert (snap.done, snap.total, snap.batches_done, snap.failed_batches) == (4, 6, 3, 1)
    assert snap.percent == pytest.approx(100 * 4 / 6)
    assert "4 / 6 prompts" in describe("r1", snap) and "1 failed" in describe("r1", snap)


def test_engine_prompt_hook_reaches_listeners_of_its_own_run_only():
    from toa.tasks import progress

    seen = []
    t = Tracker({("random", "b1"): 2})
    progress._TRACKERS["r1"] = t
    try:
        with listen(seen.append):
            prompt_done("r1", "random", "b1", 1)
            prompt_done("r2", "random", "b1", 2)  # another run's batch of the same key: not this tracker
        prompt_done("r1", "random", "b1", 2)  # after the listener left: not seen
    finally:
        del progress._TRACKERS["r1"]
    assert [s.done for s in seen] == [1] and t.snapshot().done == 2


def test_cli_bar_listens_only_when_shown(capsys):
    from toa.tasks import progress

    from toa.cli import _progress_bar

    with _progress_bar(False, []):
        assert progress._LISTENERS == []  # not a terminal (CI logs): no bar
    t = Tracker({("random", "b1"): 2})
    with _progress_bar(True, []):
        assert len(progress._LISTENERS) == 1
        t.finish(("random", "b1"), 2)
        progress._notify(t)
    assert progress._LISTENERS == []
    assert "2/2" in capsys.readouterr().out


def test_log_lines_print_through_the_bars_console_never_on_its_line(capsys):
    """Prefect's console handler prints through the bar's own console while the bar shows (so
    rich puts the line above the bar), and gets its console back afterwards."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    from toa.cli import _progress_bar

    handler = PrefectConsoleHandler()
    own = handler.console
    record = logging.LogRecord("prefect.test", logging.INFO, __file__, 1, "a log line", None, None)
    with _progress_bar(True, [handler]):
        assert handler.console is not own
        handler.emit(record)
    assert handler.console is own
    lines = capsys.readouterr().out.splitlines()
    assert any(line.strip() == "a log line" for line in lines), lines  # a line of its own


# -- the flow on real servers ---------------------------------------------------------------

N_PROMPTS = 2
LIMIT_NAME = "toa-progress-test-smollm2"


@pytest.fixture(scope="module")
def progress_run(prefect_api, embedded_servers, tmp_path_factory):
    from helpers import attached_agents
    from toa.flows.synthesize import toa

    agents = attached_agents(embedded_servers, max_tokens=16)
    agents[0]["global_limit"] = {"name": LIMIT_NAME, "concurrency": 1}  # the real path, end to end
    seen: list[Snapshot] = []
    start = time.perf_counter()
    with listen(seen.append):
        result = toa(n=1, limit=N_PROMPTS, results_root=str(tmp_path_factory.mktemp("progress")),
                     overrides={"batch_size": 1, "agents": agents})
    return result, seen, time.perf_counter() - start



def _read(coro_fn):
    from prefect.client.orchestration import get_client

    async def run():
        async with get_client() as client:
            return await coro_fn(client)
    return asyncio.run(run())


@pytest.mark.integration
def test_progress_artifact_ends_at_100_percent(progress_run):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    result, seen, _ = progress_run
    key = f"toa-progress-{result['run_id']}"
    arts = _read(lambda c: c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))))
    assert len(arts) == 1 and arts[0].type == "progress"
    assert float(arts[0].data) == pytest.approx(100.0)
    assert f"**{2 * N_PROMPTS} / {2 * N_PROMPTS} prompts**" in arts[0].description
    # the in-process listener (what the CLI bar shows) moved up to the total, per prompt
    assert seen[-1].done == seen[-1].total == 2 * N_PROMPTS and seen[-1].eta_s == 0.0
    assert [s.done for s in seen] == sorted(s.done for s in seen)


@pytest.mark.integration
def test_one_event_per_finished_batch(progress_run):
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    result, _, _ = progress_run
    run_id = result["run_id"]
    flt = EventFilter(event=EventNameFilter(prefix=["toa.batch."]),
                      resource=EventResourceFilter(id_prefix=[f"toa.batch.{run_id}."]))
    deadline = time.monotonic() + 30  # events reach the API asynchronously (websocket)
    while True:
        events = _read(lambda c: c.read_events(filter=flt, limit=50)).events
        if len(events) >= 2 * N_PROMPTS or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(events) == 2 * N_PROMPTS
    assert {e.event for e in events} == {"toa.batch.completed"}
    assert {e.resource["toa.method"] for e in events} == {"random", "parallel_ensemble"}
    for e in events:
        assert e.payload["batch"]["prompts"] == 1 and e.payload["batch"]["calls_failed"] == 0
        assert e.payload["run"]["prompts_total"] == 2 * N_PROMPTS
        assert any(r.role == "flow-run" for r in e.related)
    assert max(e.payload["run"]["prompts_done"] for e in events) == 2 * N_PROMPTS


@pytest.mark.integration
def test_summary_table_artifact_and_the_global_limit(progress_run):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    result, _, seconds = progress_run
    key = f"toa-summary-{result['run_id']}"
    arts = _read(lambda c: c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))))
    assert len(arts) == 1 and arts[0].type == "table"
    table = json.loads(arts[0].data)
    assert {r["method"] for r in table} == {"random", "parallel_ensemble"}
    assert all(r["prompts"] == N_PROMPTS and r["new_calls"] > 0 for r in table)
    limit = _read(lambda c: c.read_global_concurrency_limit_by_name(LIMIT_NAME))
    assert limit.limit == 1 and limit.active_slots == 0  # created by toa; every slot released
    print(f"progress flow run: {seconds:.1f}s")
