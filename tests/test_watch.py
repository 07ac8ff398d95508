"""The server watchdog's decisions (toa.servers.watch), fed metric pages and times directly."""

from __future__ import annotations

import pytest

from toa.servers.watch import Load, StallDetector, parse_metrics

# Shaped like vLLM 0.32's /metrics (two models on one page, to check the model filter).
PAGE = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="smollm2"} 49.0
vllm:num_requests_running{engine="0",model_name="other"} 3.0
vllm:num_requests_waiting{engine="0",model_name="smollm2"} 47.0
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="smollm2"} 1234.0
vllm:prompt_tokens_total{engine="0",model_name="smollm2"} 5000.0
vllm:generation_tokens_created{engine="0",model_name="smollm2"} 1.7e9
python_gc_objects_collected_total{generation="0"} 100.0
"""


def test_parse_metrics_reads_one_models_load():
    assert parse_metrics(PAGE, "smollm2") == Load(running=49, waiting=47, generated=1234, prompted=5000)
    assert parse_metrics(PAGE, None).running == 52  # all models summed
    assert parse_metrics("python_gc_objects_collected_total 1\n", "m") is None  # not a vLLM server


def load(running=0, generated=0, prompted=0):
    return Load(running=running, generated=generated, prompted=prompted)


def test_running_requests_without_tokens_for_the_limit_is_a_stall():
    d = StallDetector("smollm2", stall_after_s=60, min_tokens_per_s=None)
    assert d.observe(0, load(49, 1000, 500)) is None
    assert d.observe(30, load(49, 1000, 500)) is None
    verdict = d.observe(61, load(49, 1000, 500))
    assert verdict.kind == "stalled"
    assert "server 'smollm2' stalled: 49 requests running" in verdict.message
    assert "no token generated in 61 s" in verdict.message and "vllm:generation_tokens_total=1000" in verdict.message


def test_tokens_or_prefill_moving_or_idle_is_never_a_stall():
    d = StallDetector("s", stall_after_s=60, min_tokens_per_s=None)
    d.observe(0, load(4, 10, 10))
    assert d.observe(50, load(4, 11, 10)) is None  # one token: progress
    assert d.observe(100, load(4, 11, 90)) is None  # a long prefill: progress
    assert d.observe(170, load(0, 11, 90)) is None  # idle
    assert d.observe(200, load(3, 11, 90)) is None  # busy again, 30 s since the idle reading
    assert d.observe(231, load(3, 11, 90)).kind == "stalled"


def test_slow_generation_with_many_requests_warns_once():
    d = StallDetector("g", stall_after_s=None, min_tokens_per_s=20, slow_window_s=30)
    assert d.observe(0, load(48, 0)) is None
    assert d.observe(15, load(48, 150)) is None  # window not over yet
    verdict = d.observe(30, load(48, 300))  # 10 tokens/s over 30 s
    assert verdict.kind == "slow" and "generates 10.0 tokens/s with 48 requests running (floor 20" in verdict.message
    assert d.observe(60, load(48, 400)) is None  # said once


def test_speed_is_not_judged_with_few_requests_or_when_fast():
    d = StallDetector("g", stall_after_s=None, min_tokens_per_s=20, slow_window_s=30)
    d.observe(0, load(1, 0))
    assert d.observe(40, load(1, 100)) is None  # one stream at 2.5 tokens/s: not judged
    d.observe(50, load(8, 100))
    assert d.observe(90, load(8, 4100)) is None  # 100 tokens/s


@pytest.mark.integration
def test_watchdog_records_from_the_engine_thread_reach_the_flow_runs_logs(prefect_api):
    """The engine logs from its own thread, outside any Prefect context: route_toa_logs puts
    those records in the flow run's logs (the Prefect UI), not only on a console."""
    import logging
    import threading

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.context import FlowRunContext
    from prefect.logging.handlers import APILogWorker

    from toa.tasks.logs import route_toa_logs

    @flow
    def watched():
        with route_toa_logs():
            thread = threading.Thread(target=lambda: logging.getLogger("toa.engine").warning("server 'x' is slow"))
            thread.start()
            thread.join()
        logging.getLogger("toa.engine").warning("after the flow's sampling: not routed")
        return FlowRunContext.get().flow_run.id

    flow_run_id = watched()
    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    messages = [log.message for log in logs]
    assert "server 'x' is slow" in messages
    assert not any("not routed" in m for m in messages)
