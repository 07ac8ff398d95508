"""toa's own log records (the engine's server watchdog, the reward service) in Prefect: they are
logged from toa's event-loop thread, outside any Prefect run context, so Prefect would neither
print them nor send them to the API. `route_toa_logs` gives the `toa` logger Prefect's handlers
(as Prefect does for its "extra loggers") and tags each record with the flow run."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

TOA_LOGGER = "toa"


class _FlowRunTag(logging.Filter):
    def __init__(self, flow_run_id):
        super().__init__()
        self.flow_run_id = flow_run_id

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "flow_run_id", None) is None:
            record.flow_run_id = self.flow_run_id
        return True


@contextmanager
def route_toa_logs() -> Iterator[None]:
    """While the flow runs: records of `toa.*` loggers at INFO and above go to Prefect's console
    and API handlers, attributed to the current flow run."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    logger = logging.getLogger(TOA_LOGGER)
    handlers = [h for h in logging.getLogger("prefect.extra").handlers if h not in logger.handlers]
    tag = _FlowRunTag(ctx.flow_run.id if ctx and ctx.flow_run else None)
    level = logger.level
    logger.addFilter(tag)
    for h in handlers:
        logger.addHandler(h)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for h in handlers:
            logger.removeHandler(h)
        logger.removeFilter(tag)
        logger.setLevel(level)
