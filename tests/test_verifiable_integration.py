"""End to end: a GSM8K-style source through the `toa` flow on the real embedded vLLM servers,
scored by the default similarity reward (not the verifier): every generation gets a verdict and
the accuracy views return rows per method and k."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import attached_agents

from toa.db import query
from toa.storage import Store

pytestmark = pytest.mark.integration

GSM8K = str(Path(__file__).parent / "data" / "gsm8k_tiny.jsonl")


def test_accuracy_views_per_method(prefect_api, embedded_servers, tmp_path):
    from toa.flows.synthesize import toa

    result = toa(methods=["random", "parallel_ensemble"], n=1, limit=3, results_root=str(tmp_path),
                 overrides={"agents": attached_agents(embedded_servers, max_tokens=32),
                            "prompts": {"path": GSM8K, "preset": "gsm8k"}})
    store, run_id = Store(str(tmp_path)), result["run_id"]
    samples = query(store, "SELECT count(*) AS n FROM samples WHERE run_id = ? AND status = 'ok'", [run_id])["n"][0]
    verdicts = query(store, "SELECT * FROM verdicts WHERE run_id = ?", [run_id])
    assert verdicts.height == samples == 3 * 2 * 2
    assert set(verdicts["verifier"]) == {"math_verify:v2"}
    acc = query(store, "SELECT * FROM accuracy_at_budget WHERE run_id = ? ORDER BY method, k", [run_id])
    assert acc.select("method", "k").rows() == [("parallel_ensemble", 1), ("parallel_ensemble", 2),
                                                ("random", 1), ("random", 2)]
    assert set(acc["prompts"]) == {3}
    for col in ("best_of_k", "majority_vote", "pass_at_k"):
        assert acc[col].is_between(0.0, 1.0).all()
    assert (acc["pass_at_k"] >= acc["best_of_k"] - 1e-9).all()  # the oracle bounds the reward's pick
    report = Path(result["report"]) / "report.md"
    assert "## Accuracy at budget" in report.read_text()
