"""The analysis views (sql/analysis.sql) on a hand-built run, against a real DuckDB.

The run (`write_run` in helpers.py, also used by the report and export tests), rewards in generation order:
    random  p1: a 0.5, b 0.1, a 0.9, b <call failed>      p2: a 0.4, b 0.4 (a tie)
    toa     p1: a 0.3 -> b 0.6 (refines it) -> a 0.2 (refines 0.6); b 0.7 (refines 0.3)
            p2: the method raised (a method_error row)
Every successful generation costs 10 + 5 tokens, the failed one 0. Budget: n=2 x 2 agents = 4.
"""

from __future__ import annotations

import pytest
from helpers import sample, write_run

from toa.db import connect, query
from toa.rows import frame
from toa.storage import Store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = Store(str(tmp_path_factory.mktemp("results")))
    write_run(s)
    return s


def rows(store, sql, *params):
    return query(store, sql, list(params)).rows()


def test_every_view_answers_on_an_empty_root(tmp_path):
    con = connect(Store(str(tmp_path)))
    for view in ("best_of_k", "best_of_k_prefix", "reward_vs_tokens", "reward_vs_tokens_summary", "agent_best_share",
                 "call_stats", "tree_widths", "tree_stats", "dpo_margins", "dpo_margin_summary", "run_budget"):
        assert con.execute(f"select count(*) from {view}").fetchone() == (0,)


def test_best_of_k_is_the_expected_max_of_a_random_subset(store):
    got = rows(store, "select k, best_reward, prompts, tokens from best_of_k where run_id = ? and method = 'random' order by k", "run1")
    assert [k for k, *_ in got] == [1, 2, 3, 4]  # the configured budget, n * agents
    # p1 scored [0.1, 0.5, 0.9] (its failed call is not a candidate); p2 [0.4, 0.4] is 0.4 for every k
    p1 = [0.5, (0.5 * 1 + 0.9 * 2) / 3, 0.9, 0.9]  # k=4 > 3 scored: the best of all it has
    assert [b for _, b, _, _ in got] == pytest.approx([(x + 0.4) / 2 for x in p1], abs=1e-12)
    assert all(n == 2 for _, _, n, _ in got)
    assert [t for *_, t in got] == pytest.approx([12.5, 25, 37.5, 50])  # k * 75 tokens / 6 generations


def test_best_of_k_matches_brute_force_on_many_samples(tmp_path):
    # N = 60 exercises the lgamma path far beyond what small-integer binomials would show
    import itertools
    import random

    rng = random.Random(7)
    rewards = [round(rng.uniform(-3, 3), 3) for _ in range(60)]
    store = Store(str(tmp_path))
    store.write_frame(frame("samples", [sample("big", "m", "p", f"s{i}", i, "a", r) for i, r in enumerate(rewards)]),
                      store.path("samples", "run=big", "b.parquet"))
    got = dict(rows(store, "select k, best_reward from best_of_k where run_id = ?", "big"))
    assert len(got) == 60 and got[60] == pytest.approx(max(rewards))
    small = rewards[:8]  # brute force over every subset where that is cheap

    def brute(values, k):
        subsets = list(itertools.combinations(values, k))
        return sum(map(max, subsets)) / len(subsets)

    store.write_frame(frame("samples", [sample("small", "m", "p", f"s{i}", i, "a", r) for i, r in enumerate(small)]),
                      store.path("samples", "run=small", "b.parquet"))
    got_small = dict(rows(store, "select k, best_reward from best_of_k where run_id = ?", "small"))
    assert [got_small[k] for k in range(1, 9)] == pytest.approx([brute(small, k) for k in range(1, 9)], abs=1e-9)
    sorted_r = sorted(rewards)
    assert got[1] == pytest.approx(sum(rewards) / 60) and got[59] == pytest.approx(sorted_r[-1] - (sorted_r[-1] - sorted_r[-2]) / 60)


def test_best_of_k_prefix_follows_generation_order(store):
    got = rows(store, "select k, best_reward, prompts, tokens from best_of_k_prefix where run_id = ? and method = 'random' order by k", "run1")
    # p1 in order: 0.5, 0.1, 0.9, <failed>;  p2: 0.4, 0.4
    assert [b for _, b, _, _ in got] == pytest.approx([0.45, 0.45, 0.65, 0.65])
    assert [t for *_, t in got] == pytest.approx([15, 30, 37.5, 37.5])  # p1 spends 45, p2 stops at 30
    toa = rows(store, "select k, best_reward, prompts from best_of_k_prefix where run_id = ? and method = 'toa' order by k", "run1")
    assert toa == [(1, pytest.approx(0.3), 1), (2, pytest.approx(0.6), 1), (3, pytest.approx(0.6), 1), (4, pytest.approx(0.7), 1)]


def test_budget_falls_back_to_what_was_generated_without_a_runs_row(tmp_path):
    store = Store(str(tmp_path))
    write_run(store, "norow", with_runs_row=False)
    assert rows(store, "select method, budget from run_budget order by method") == [("random", 4), ("toa", 4)]


def test_reward_vs_tokens(store):
    per_prompt = rows(store, "select prompt_id, best_reward, generations, tokens from reward_vs_tokens "
                             "where run_id = ? and method = 'random' order by prompt_id", "run1")
    assert per_prompt == [("p1", 0.9, 4, 45), ("p2", 0.4, 2, 30)]
    summary = query(store, "select * from reward_vs_tokens_summary where run_id = ?", ["run1"]).to_dicts()
    by = {r["method"]: r for r in summary}
    assert by["random"]["best_reward"] == pytest.approx(0.65) and by["random"]["tokens_per_prompt"] == 37.5
    assert by["toa"]["prompts"] == 1 and by["toa"]["tokens"] == 60  # the failed prompt spent nothing


def test_agent_best_share_breaks_ties_by_generation_order(store):
    got = rows(store, "select method, agent, best_prompts, prompts, share from agent_best_share where run_id = ? "
                      "order by method, agent", "run1")
    assert got == [("random", "a", 2, 2, 1.0), ("random", "b", 0, 2, 0.0),  # p2's tie goes to a, generated first
                   ("toa", "a", 0, 1, 0.0), ("toa", "b", 1, 1, 1.0)]


def test_call_stats_from_samples_and_attempts(store):
    got = {r["agent"]: r for r in query(store, "select * from call_stats where run_id = ? and method = 'random'",
                                        ["run1"]).to_dicts()}
    a, b = got["a"], got["b"]
    assert (a["calls"], a["replayed"], a["call_errors"], a["error_rate"]) == (3, 1, 0, 0.0)
    assert (a["latency_mean_s"], a["latency_p50_s"]) == (pytest.approx(2.0), pytest.approx(2.0))
    assert a["latency_p95_s"] == pytest.approx(2.9)  # linear interpolation between 2.0 and 3.0
    assert (a["attempts"], a["attempt_error_rate"]) == (0, None)  # no stored attempts for a
    assert (b["calls"], b["call_errors"], b["error_rate"]) == (3, 1, pytest.approx(1 / 3))
    assert (b["prompt_tokens"], b["completion_tokens"]) == (20, 10)
    assert (b["attempts"], b["failed_attempts"], b["attempt_error_rate"]) == (3, 2, pytest.approx(2 / 3))
    assert b["attempt_latency_p50_s"] == pytest.approx(1.0)


def test_tree_stats(store):
    got = query(store, "select * from tree_stats where run_id = ? and method = 'toa'", ["run1"]).to_dicts()
    assert len(got) == 1  # p2's method_error row is not a tree
    t = got[0]
    assert (t["depth"], t["depths"], t["widths"], t["max_width"]) == (6, [2, 4, 6], [1, 2, 1], 2)
    # t2 (0.6) beat t1 (0.3); t3 (0.2) did not beat t2; t4 (0.7) beat t1
    assert (t["refinements"], t["improved"], t["improve_rate"]) == (3, 2, pytest.approx(2 / 3))
    assert (t["nodes"], t["node_depth"]) == (3, 1)
    flat = query(store, "select refinements, improve_rate, nodes from tree_stats where run_id = ? and method = 'random' "
                        "order by prompt_id", ["run1"]).rows()
    assert flat == [(0, None, None), (0, None, None)]


def test_dpo_margins(store):
    pairs = rows(store, "select method, prompt_id, chosen_reward, rejected_reward, margin from dpo_margins "
                        "where run_id = ? order by method", "run1")
    # rejected = 3rd ranked: random p1 0.9 vs 0.1 (p2's tie is no pair), toa p1 0.7 vs 0.3
    assert pairs == [("random", "p1", 0.9, 0.1, pytest.approx(0.8)), ("toa", "p1", 0.7, 0.3, pytest.approx(0.4))]
    summary = rows(store, "select method, pairs, mean_margin, p50_margin, min_margin, max_margin from dpo_margin_summary "
                          "where run_id = ?", "run1")
    assert summary[0] == ("random", 1, pytest.approx(0.8), pytest.approx(0.8), pytest.approx(0.8), pytest.approx(0.8))
