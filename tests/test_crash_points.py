"""kill -9 anywhere (docs/design.md §4.2, §4.4): a seeded campaign (tests/crash_campaign.py)
SIGKILLs real `toa run`, `toa export`, `toa report` and `toa evolve` processes at 24 points over
every phase, reruns each after its points, and checks across all kills: no lost finished call,
no duplicate row in any table, no corrupt shard, repeated model calls no more than the calls in
flight, no process of a killed run left running. No vLLM: agents attached to
tests/openai_double.py and a launched stand-in (tests/crash_server.py); a real Prefect API.

The points (round = command and config; trigger = the marker waited for; the kill comes a
seeded uniform(0, max delay) after it; seed: $TOA_CRASH_SEED, default 20261130):

| round    | phase            | trigger                                           | max delay s |
|----------|------------------|---------------------------------------------------|-------------|
| launched | server start     | stand-in process started (loading, not listening) | 1.2 |
| launched | server start     | stand-in listening (readiness poll, probe)        | 0.2 |
| launched | prompt loading   | log line: task plan-run finished                  | 0.3 |
| launched | sampling         | a new chat request at a server                    | 1.5 |
| launched | rewarding        | a rewards journal appears                         | 0.8 |
| launched | dataset building | log line: sampling subflow finished               | 0.4 |
| launched | export           | exports/run=*/<method>/sft.jsonl written          | 0.3 |
| launched | report           | log line: task summarize finished                 | 0.5 |
| attached | prompt loading   | process start (imports, config, prompts)          | 2.0 |
| attached | sampling         | a new chat request (the head start, before Prefect)| 1.0 |
| attached | sampling         | log line: sampling subflow begins                 | 1.5 |
| attached | rewarding        | a rewards journal appears                         | 0.8 |
| attached | sampling         | a calls shard written                             | 1.0 |
| attached | dataset building | log line: sampling subflow finished               | 0.4 |
| attached | export           | exports/run=*/<method>/sft.jsonl written          | 0.3 |
| attached | report           | log line: task summarize finished                 | 0.8 |
| export   | export           | `toa export <run>` started                        | 3.0 |
| export   | export           | its first sft file written                        | 0.2 |
| report   | report           | `toa report <run>` started                        | 0.4 |
| report   | report           | its curves plot written                           | 0.05 |
| evolve   | sampling         | a new chat request (iteration 0)                  | 1.5 |
| evolve   | evolve           | an evolve calls journal appears                   | 1.0 |
| evolve   | evolve           | iteration 1 manifest written (its sampling starts)| 1.5 |
| evolve   | report           | log line: task summarize finished                 | 1.5 |

The table is crash_campaign.POINTS; a test below keeps the two in step. In the `toa run`
rounds a delay ends early when the run's last step is next (crash_campaign.RUN_ENDING): a kill
after it would leave the round's next points nothing to kill. A command that ends before its
kill (the sub-second `toa export` / `toa report`) is started again with half the delay, up to
6 times; a point still missed fails the test. Definitions (in flight, repeated, lost,
duplicate, corrupt): tests/crash_campaign.py. About 2 minutes on 2 cores; the same campaign
prints its figures with `python benchmarks/crash_points.py`.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from crash_campaign import POINTS, PROMPTS, Campaign, N, campaign_seed, export_lines

from toa.db import query
from toa.storage import Store

PHASES = {"server start", "prompt loading", "sampling", "rewarding", "dataset building", "export", "report", "evolve"}


def test_the_documented_table_is_the_campaign():
    rows = re.findall(r"^\| (\w+) +\| ([a-z ]+?) +\|.*\| ([\d.]+) \|$", __doc__, re.MULTILINE)
    assert [(r, p, float(d)) for r, p, d in rows] == [(p.round, p.phase, p.max_delay_s) for p in POINTS]
    assert len(POINTS) >= 20 and {p.phase for p in POINTS} == PHASES


@pytest.mark.integration
@pytest.mark.timeout(1200)  # about 6 min on 2 busy cores; each wait inside has its own deadline
def test_kill9_at_every_phase_loses_nothing_duplicates_nothing(prefect_api, tmp_path):
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    campaign = Campaign(tmp_path, env, campaign_seed(), print)
    figures = campaign.run()
    print("\n" + figures.table())

    assert figures.reruns == {"launched": 0, "attached": 0, "export": 0, "report": 0, "evolve": 0}
    assert not figures.missed, figures.missed  # every point killed a live process
    assert len(figures.kills) >= 20 and {k.point.phase for k in figures.kills} == PHASES
    assert figures.lost == []
    assert figures.corrupt == []
    assert figures.duplicates and not any(figures.duplicates.values()), figures.duplicates
    assert figures.leaked == []  # the runs' own processes and the servers they launched are gone
    assert 0 <= figures.repeated <= figures.in_flight
    assert figures.recorded_calls_n > 0 and figures.served >= figures.recorded_calls_n

    for name in ("launched", "attached"):  # each run complete after its kills
        run_id = campaign.run_ids[name]
        store = Store(str(campaign.root(name)))
        samples = query(store, "select count(*) as n, count(*) filter (where status = 'ok' and reward_status = 'ok') "
                               "as good from samples where run_id = ?", [run_id])
        assert samples.rows() == [(PROMPTS * 2 * N * 2, PROMPTS * 2 * N * 2)]  # 2 methods, n per agent, 2 agents
        assert query(store, "select count(*) as n from sft where run_id = ?", [run_id])["n"][0] == PROMPTS * 2
    out = tmp_path / "out"
    assert (out / "report" / "report.md").is_file()
    assert any((out / "export").rglob("sft*")) and not any(export_lines(out / "export").values())
    assert not any(export_lines(campaign.root("attached") / "exports").values())
    iterations = query(Store(str(campaign.root("evolve"))), "select iteration from evolve_iterations order by 1")
    assert iterations["iteration"].to_list() == [0, 1]
    assert Path(tmp_path / "launched-server.jsonl").is_file()  # the launched server was really started


# -- the campaign's checks can fail: each on a made-up case (no processes) ----------------------
def _req(seed: int, arrived: float, answered: float | None, n: int = 1):
    from crash_campaign import Request

    return Request("double", arrived, {"messages": [{"role": "user", "content": "q"}], "seed": seed, "n": n}, answered)


def test_a_finished_call_asked_again_is_lost_and_an_in_flight_one_is_a_repeat():
    from collections import Counter

    from crash_campaign import attribute_repeats, lost_calls

    kill = 10.0
    finished_early = [_req(1, 1.0, 2.0), _req(1, 12.0, 12.1)]  # answered 8 s before the kill, asked again
    in_flight = [_req(2, 9.5, None), _req(2, 12.0, 12.1)]  # unanswered at the kill, asked again
    recorded = Counter({finished_early[0].match_key(): 1, in_flight[0].match_key(): 1})
    lost = lost_calls(finished_early + in_flight, [kill], recorded)
    assert lost == [f"2 finished, 1 recorded: {finished_early[0].match_key()}"]  # seed 2's repeat is no loss
    # the repeat charged to the kill is seed 2's in-flight call; seed 1's is a loss, not a kill's cost
    assert attribute_repeats(finished_early + in_flight, [kill], recorded) == Counter({kill: 1})


def test_a_request_the_server_reads_just_after_a_kill_is_that_kills_not_a_loss():
    # Seen in CI: a request sent as its process was killed reached the server's handler 10 ms
    # after the kill, was answered, and was counted as a finished call asked again.
    from collections import Counter

    from crash_campaign import attribute_repeats, lost_calls

    kill = 10.0
    sent_at_kill = [_req(1, kill + 0.01, kill + 0.3), _req(1, 19.0, 19.3)]  # the rerun asks it again
    recorded = Counter({sent_at_kill[0].match_key(): 1})
    assert lost_calls(sent_at_kill, [kill], recorded) == []
    assert attribute_repeats(sent_at_kill, [kill], recorded) == Counter({kill: 1})
    late = [_req(1, kill + 2.0, kill + 2.3), _req(1, 19.0, 19.3)]  # a new process's, answered, asked again
    assert lost_calls(late, [kill], recorded) == [f"2 finished, 1 recorded: {late[0].match_key()}"]


def test_duplicate_rows_and_corrupt_shards_are_found(tmp_path):
    import polars as pl
    from crash_campaign import corrupt_shards, duplicates

    part = tmp_path / "samples" / "run=r" / "method=m"
    part.mkdir(parents=True)
    rows = pl.DataFrame({"run_id": ["r"], "method": ["m"], "sample_id": ["s1"]})
    rows.write_parquet(part / "a.parquet")
    rows.write_parquet(part / "b.parquet")  # the same sample in a second shard
    (part / "c.parquet").write_bytes(b"PAR1 cut short")
    assert [p.split(":")[0] for p in corrupt_shards([tmp_path])] == [str(part / "c.parquet")]
    (part / "c.parquet").unlink()
    assert duplicates([tmp_path])["samples"] == 1


def test_a_run_rounds_kill_comes_before_the_runs_last_step(tmp_path, monkeypatch):
    # Seen in CI on a fast CPU: a resumed `toa run` finished within a point's delay, so the
    # round's next three points found a finished run and had nothing to kill. A real process
    # that prints the marker of the run's last step and then would run on for a minute:
    from crash_campaign import KEY, SLOW_S, Point, TimedDouble

    script = ("import time; print(\"Task run 'publish-report-1' - Finished in state Completed()\", flush=True); "
              "time.sleep(60)")
    campaign = Campaign(tmp_path, dict(os.environ), seed=0)
    for round_name in ("attached", "export"):  # a `toa run` round, and one that is not
        monkeypatch.setattr(campaign, "commands", lambda: {round_name: ([sys.executable, "-c", script], tmp_path, None)})
        with TimedDouble(KEY, slow_s=SLOW_S) as campaign.double:
            delay = 30.0 if round_name == "attached" else 2.0
            assert campaign._kill_once(Point(round_name, "report", "start", delay), delay) is None
    cut, full = campaign.kills
    assert cut.delay_s < 10  # killed once the marker showed, not after 30 s
    assert 2.0 <= full.delay_s < 10 and not cut.leaked and not full.leaked
