"""toa's own log records (the engine's server watchdog, the reward service) in Prefect: they are
logged from toa's event-loop thread, outside any Prefect run context, so Prefect would neither
print them nor send them to the API. `route_toa_logs` gives the `toa` logger Prefect's handlers
(as Prefect does for its "extra loggers"), each record tagged with the flow run."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

TOA_LOGGER = "toa"


class _ForFlowRun(logging.Handler):
    """Hands records to a Prefect handler as if logged inside the flow run (a filter on the
    `toa` logger would not see its children's records: logger filters apply only to records
    logged on that very logger)."""

    def __init__(self, target: logging.Handler, flow_run_id):
        super().__init__()
        self.target, self.flow_run_id = target, flow_run_id

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "flow_run_id", None) is None:
            record.flow_run_id = self.flow_run_id
        self.target.handle(record)


@contextmanager
def route_toa_logs() -> Iterator[None]:
    """While the flow runs: records of `toa.*` loggers at INFO and above go to Prefect's API
    handler (the flow run's logs) and, by propagation, to the console."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    flow_run_id = ctx.flow_run.id if ctx and ctx.flow_run else None
    logger = logging.getLogger(TOA_LOGGER)
    handlers = [_ForFlowRun(h, flow_run_id) for h in logging.getLogger("prefect.extra").handlers]
    level = logger.level
    for h in handlers:
        logger.addHandler(h)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for h in handlers:
            logger.removeHandler(h)
        logger.setLevel(level)
