"""The comparison views (sql/compare.sql): best-of-k curves with bootstrap intervals over prompts
and paired comparisons of methods, against a real DuckDB file (create_views writes the views and
the bootstrap_count macro into it; queries open it read-only).

Two kinds of data: the hand-built run of test_analysis_sql.py (`write_run`, known per-prompt
values), and synthetic runs written here: prompts p0..p{n-1}, each method's rewards per prompt
in generation order, drawn from a seeded random.Random so every run of the tests sees the same
numbers.
"""

from __future__ import annotations

import math
import random
import statistics

import pytest
from helpers import sample_row_dict, write_run

from toa.db import connect, create_views, database_path, query
from toa.rows import frame
from toa.storage import Store

CI_VIEWS = ("prompt_curves", "best_of_k_ci", "method_comparison")


def rows(store, sql, *params):
    return query(store, sql, list(params)).rows()


def write_method(store: Store, run_id: str, method: str, rewards: dict[str, list[float]], *,
                 latency: float = 1.0) -> None:
    """One method's samples: per prompt, one generation per reward, in that generation order,
    each 7 completion tokens and its own latency (latency, latency + 1, ...: one request each)."""
    samples = [sample_row_dict(run_id=run_id, method=method, prompt_id=prompt, sample_id=f"{method}-{prompt}-{i}",
                               order=i, reward=reward, completion_tokens=7, latency_s=latency + i)
               for prompt, values in rewards.items() for i, reward in enumerate(values)]
    store.write_frame(frame("samples", samples), store.path("samples", f"run={run_id}", f"{method}.parquet"))


def random_rewards(rng: random.Random, prompts: int, per_prompt: int, shift: float = 0.0) -> dict[str, list[float]]:
    """Rewards of a prompt = its difficulty + noise, so prompts differ (the bootstrap's variance)."""
    out = {}
    for p in range(prompts):
        difficulty = rng.gauss(0, 1)
        out[f"p{p}"] = [round(difficulty + shift + rng.gauss(0, 0.5), 6) for _ in range(per_prompt)]
    return out


def synthetic_store(root, prompts: int, per_prompt: int = 6, seed: int = 1) -> Store:
    """Run "syn": method "a" and method "b" (b's rewards 0.2 lower on average), same prompts."""
    store = Store(str(root))
    rng = random.Random(seed)
    write_method(store, "syn", "a", random_rewards(rng, prompts, per_prompt, shift=0.2))
    write_method(store, "syn", "b", random_rewards(rng, prompts, per_prompt))
    create_views(store)
    return store


@pytest.fixture(scope="module")
def hand_built(tmp_path_factory):
    store = Store(str(tmp_path_factory.mktemp("results")))
    write_run(store)
    create_views(store)
    return store


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("small"), prompts=40)


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("large"), prompts=640)


def test_views_live_in_the_database_file(hand_built):
    assert database_path(hand_built).exists()
    con = connect(hand_built)
    try:
        assert con.execute("select current_database()").fetchone() == ("toa",)  # the file, not memory
        assert con.execute("select bootstrap_count(0::UBIGINT), bootstrap_count(18446744073709551615::UBIGINT)").fetchone() == (0, 10)
    finally:
        con.close()


def test_every_view_answers_on_an_empty_root(tmp_path):
    con = connect(Store(str(tmp_path)))
    try:
        for view in CI_VIEWS:
            assert con.execute(f"select count(*) from {view}").fetchone() == (0,)
        assert con.execute("select resamples, seed from bootstrap_settings").fetchone() == (1000, 2412)
    finally:
        con.close()


def test_bootstrap_counts_are_poisson_one(tmp_path):
    """The resample counts: mean 1, variance 1, P(0) = 1/e (200k hashed draws)."""
    con = connect(Store(str(tmp_path)))
    try:
        mean, var, zeros = con.execute("select avg(c), var_pop(c), avg((c = 0)::DOUBLE) from "
                                       "(select bootstrap_count(hash(i, 99)) as c from range(200000) t(i))").fetchone()
    finally:
        con.close()
    assert mean == pytest.approx(1, abs=0.01) and var == pytest.approx(1, abs=0.02)
    assert zeros == pytest.approx(math.exp(-1), abs=0.005)


def test_prompt_curves_cost_in_generation_order(hand_built):
    got = rows(hand_built, "select k, best_reward, prefix_reward, completion_tokens, server_s from prompt_curves "
                           "where run_id = ? and method = 'random' and prompt_id = 'p1' order by k", "run1")
    # p1 in order: a 0.5 (1 s), b 0.1 (1 s), a 0.9 (3 s), b <failed> (1 s, 0 tokens). b's two
    # generations share a latency of 1.0: one request, so each is charged half of it.
    assert [r[2] for r in got] == [0.5, 0.5, 0.9, 0.9]
    assert [r[3] for r in got] == [5, 10, 15, 15]  # completion tokens only; the failed call has none
    assert [r[4] for r in got] == pytest.approx([1.0, 1.5, 4.5, 5.0])
    assert [r[1] for r in got] == pytest.approx([0.5, (0.5 + 0.9 * 2) / 3, 0.9, 0.9])  # expected best of k random


def test_point_estimates_equal_the_analysis_views(hand_built):
    ci = {(m, k): (b, p) for m, k, b, p in rows(hand_built, "select method, k, best_reward, prefix_reward "
                                                            "from best_of_k_ci where run_id = ?", "run1")}
    expected = {(m, k): b for m, k, b in rows(hand_built, "select method, k, best_reward from best_of_k where run_id = ?", "run1")}
    prefix = {(m, k): b for m, k, b in rows(hand_built, "select method, k, best_reward from best_of_k_prefix where run_id = ?", "run1")}
    assert set(ci) == set(expected) == set(prefix) and len(ci) == 8
    for key, (best, first_k) in ci.items():
        assert best == pytest.approx(expected[key]) and first_k == pytest.approx(prefix[key])


def test_intervals_contain_the_estimate_and_shrink_with_more_prompts(small, large):
    def curves(store):
        return query(store, "select * from best_of_k_ci where run_id = ? order by method, k", ["syn"]).to_dicts()

    few, many = curves(small), curves(large)
    assert len(few) == len(many) == 12  # 2 methods x k = 1..6
    for r in few + many:
        assert r["resamples"] == 1000
        assert r["best_reward_lo"] < r["best_reward"] < r["best_reward_hi"]
        assert r["prefix_reward_lo"] < r["prefix_reward"] < r["prefix_reward_hi"]
    for f, m in zip(few, many):
        # 16 times the prompts: about a quarter of the width (the spread of a mean goes as 1/sqrt(n))
        for col in ("best_reward", "prefix_reward"):
            ratio = (m[f"{col}_hi"] - m[f"{col}_lo"]) / (f[f"{col}_hi"] - f[f"{col}_lo"])
            assert 0.15 < ratio < 0.4, (f["method"], f["k"], col, ratio)


def test_interval_width_matches_the_spread_of_a_mean(large):
    """A bootstrap percentile interval of a mean over n prompts is about mean +- 1.96 s / sqrt(n);
    checked on the paired differences (a - b of the best rewards)."""
    best = {(m, p): r for m, p, r in rows(large, "select method, prompt_id, max(reward) from samples "
                                                 "where run_id = ? group by all", "syn")}
    diffs = [best["a", p] - best["b", p] for m, p in best if m == "a"]
    (lo, hi, mean), = rows(large, "select mean_diff_lo, mean_diff_hi, mean_diff from method_comparison "
                                  "where run_id = ? and method_a = 'a' and method_b = 'b'", "syn")
    assert mean == pytest.approx(statistics.fmean(diffs))
    half_width = 1.96 * statistics.pstdev(diffs) / math.sqrt(len(diffs))
    assert (hi - lo) / 2 == pytest.approx(half_width, rel=0.15)
    assert lo < mean < hi


def test_a_method_against_itself_ties_everywhere(small):
    got = query(small, "select * from method_comparison where run_id = ? and method_a = method_b order by method_a",
                ["syn"]).to_dicts()
    assert [r["method_a"] for r in got] == ["a", "b"]
    for r in got:
        assert (r["prompts"], r["wins"], r["ties"], r["losses"]) == (40, 0, 40, 0)
        assert (r["win_rate"], r["win_rate_lo"], r["win_rate_hi"]) == (0.5, 0.5, 0.5)  # zero width
        assert (r["mean_diff"], r["mean_diff_lo"], r["mean_diff_hi"]) == (0.0, 0.0, 0.0)


def test_a_method_better_on_every_prompt_wins_with_certainty(tmp_path):
    store = Store(str(tmp_path))
    rewards = random_rewards(random.Random(3), prompts=30, per_prompt=4)
    write_method(store, "r", "strong", {p: [v + 1.0 for v in values] for p, values in rewards.items()})
    write_method(store, "r", "weak", rewards)
    create_views(store)
    by = {(r["method_a"], r["method_b"]): r for r in query(store, "select * from method_comparison where run_id = ?", ["r"]).to_dicts()}
    strong = by["strong", "weak"]
    assert (strong["win_rate"], strong["win_rate_lo"], strong["win_rate_hi"]) == (1.0, 1.0, 1.0)
    assert (strong["wins"], strong["ties"], strong["losses"]) == (30, 0, 0)
    assert strong["mean_diff"] == pytest.approx(1.0) and strong["mean_diff_lo"] == pytest.approx(1.0)
    weak = by["weak", "strong"]  # the mirror image
    assert (weak["win_rate"], weak["win_rate_lo"], weak["win_rate_hi"]) == (0.0, 0.0, 0.0)
    assert weak["mean_diff_hi"] == pytest.approx(-1.0)


def test_ties_count_half_and_mirror(large):
    store_rows = query(large, "select * from method_comparison where run_id = ? and method_a <> method_b", ["syn"]).to_dicts()
    by = {(r["method_a"], r["method_b"]): r for r in store_rows}
    ab, ba = by["a", "b"], by["b", "a"]
    assert ab["win_rate"] == pytest.approx((ab["wins"] + 0.5 * ab["ties"]) / ab["prompts"])
    assert 0.5 < ab["win_rate_lo"] < ab["win_rate"] < ab["win_rate_hi"]  # a is better, and surely so
    assert (ba["win_rate"], ba["win_rate_lo"], ba["win_rate_hi"]) == pytest.approx((1 - ab["win_rate"], 1 - ab["win_rate_hi"], 1 - ab["win_rate_lo"]))
    assert (ba["mean_diff_lo"], ba["mean_diff_hi"]) == pytest.approx((-ab["mean_diff_hi"], -ab["mean_diff_lo"]))


def test_a_tie_is_half_a_win(tmp_path):
    store = Store(str(tmp_path))
    write_method(store, "t", "x", {"p0": [0.9], "p1": [0.5], "p2": [0.5], "p3": [0.1]})
    write_method(store, "t", "y", {"p0": [0.1], "p1": [0.5], "p2": [0.5], "p3": [0.9]})
    create_views(store)
    got = rows(store, "select wins, ties, losses, win_rate, mean_diff from method_comparison "
                      "where run_id = ? and method_a = 'x' and method_b = 'y'", "t")
    assert got == [(1, 2, 1, 0.5, pytest.approx(0.0))]


def test_methods_are_compared_at_the_smaller_budget(tmp_path):
    """x made one generation more than y (as prs_feedback does): compared on the first 2 of each,
    x's third, better generation does not count."""
    store = Store(str(tmp_path))
    write_method(store, "u", "x", {"p0": [0.1, 0.2, 0.9], "p1": [0.3, 0.1, 0.9]})
    write_method(store, "u", "y", {"p0": [0.5, 0.4], "p1": [0.2, 0.2]})
    create_views(store)
    got = rows(store, "select k, prompts, wins, losses, mean_diff from method_comparison "
                      "where run_id = ? and method_a = 'x' and method_b = 'y'", "u")
    assert got == [(2, 2, 1, 1, pytest.approx(((0.2 - 0.5) + (0.3 - 0.2)) / 2))]


def test_only_prompts_both_methods_scored_are_compared(tmp_path):
    store = Store(str(tmp_path))
    write_method(store, "v", "x", {"p0": [0.9], "p1": [0.9], "p2": [None]})
    write_method(store, "v", "y", {"p0": [0.1], "p2": [0.5]})
    create_views(store)
    assert rows(store, "select prompts, win_rate from method_comparison where run_id = ? and method_a = 'x' "
                       "and method_b = 'y'", "v") == [(1, 1.0)]


def test_intervals_are_deterministic_and_follow_the_settings(small):
    sql = "select * from best_of_k_ci where run_id = ? order by method, k"
    pairs = "select * from method_comparison where run_id = ? order by method_a, method_b"
    first, again = query(small, sql, ["syn"]), query(small, sql, ["syn"])  # two connections
    assert first.rows() == again.rows()
    assert query(small, pairs, ["syn"]).rows() == query(small, pairs, ["syn"]).rows()
    con = connect(small)
    try:
        con.execute("SET VARIABLE toa_bootstrap_seed = 7")
        reseeded = con.sql(sql, params=["syn"]).pl()
        con.execute("SET VARIABLE toa_bootstrap_resamples = 50")
        fewer = con.sql(sql, params=["syn"]).pl()
    finally:
        con.close()
    # the estimates stay (summed in another prompt order: equal to rounding), the intervals move
    assert reseeded["best_reward"].to_list() == pytest.approx(first["best_reward"].to_list(), abs=1e-12)
    assert reseeded["best_reward_lo"].to_list() != first["best_reward_lo"].to_list()
    assert set(fewer["resamples"].to_list()) == {50}
