"""Where the (method, batch) tasks run: Prefect's thread pool in the flow process (the default)
or a Dask cluster through prefect-dask (a temporary local cluster of worker processes, or an
existing cluster by scheduler address).

The flow's code path is the same for both: the sampling subflow gets its task runner from
`build_task_runner(cfg.task_runner)` via `with_options`. Every task gets everything it needs as
arguments (config, endpoints, batch reference) and reads and writes only the results root, so
on Dask each worker process builds its own engine (clients, reward service) and the results
root must be storage that every worker reaches (a shared disk or s3://, gs://).

Only `TaskRunnerConfig` is imported by the config module; Prefect and Dask load lazily.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TaskRunnerConfig(BaseModel):
    """How the (method, batch) tasks of a run are executed. Operational: results do not depend
    on it, so switching runners resumes the same run."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["threads", "dask"] = Field("threads", description="threads: Prefect's thread pool in the flow process; dask: a Dask cluster (prefect-dask).")
    max_workers: int = Field(8, gt=0, description="threads: (method, batch) tasks in flight at once. Bounded because each task in flight holds its batch in memory (Prefect's own default is unbounded: every batch of the run at once, memory growing with the prompt count); the endpoint limits, not this, keep the servers busy.")
    address: str | None = Field(None, description="dask: scheduler address of an existing cluster, e.g. tcp://head:8786; unset: a temporary cluster is started for the run.")
    n_workers: int | None = Field(None, gt=0, description="dask, temporary cluster: worker processes (default: Dask's, from the CPU count).")
    threads_per_worker: int | None = Field(None, gt=0, description="dask, temporary cluster: tasks in flight per worker process (they share the worker's engine).")
    cluster_class: str | None = Field(None, description="dask, temporary cluster: import path of the cluster class (default distributed.LocalCluster; e.g. dask_jobqueue.SLURMCluster).")
    cluster_kwargs: dict[str, Any] = Field(default_factory=dict, description="dask, temporary cluster: more keyword arguments for the cluster class.")

    @model_validator(mode="after")
    def _consistent(self) -> TaskRunnerConfig:
        dask_only = [k for k in ("address", "n_workers", "threads_per_worker", "cluster_class") if getattr(self, k) is not None]
        dask_only += ["cluster_kwargs"] if self.cluster_kwargs else []
        if self.kind == "threads" and dask_only:
            raise ValueError(f"{dask_only} only apply to kind 'dask' (kind is 'threads')")
        if self.kind == "dask" and "max_workers" in self.model_fields_set:
            raise ValueError("max_workers only applies to kind 'threads'; for dask use n_workers/threads_per_worker")
        if self.address and len(dask_only) > 1:
            others = [k for k in dask_only if k != "address"]
            raise ValueError(f"address connects to an existing cluster; {others} only shape a temporary one")
        return self

    def cluster_options(self) -> dict[str, Any]:
        """Keyword arguments for the temporary cluster class."""
        given = {"n_workers": self.n_workers, "threads_per_worker": self.threads_per_worker}
        return {**{k: v for k, v in given.items() if v is not None}, **self.cluster_kwargs}


def build_task_runner(spec: TaskRunnerConfig):
    """A fresh (not yet started) Prefect task runner for this spec."""
    if spec.kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=spec.max_workers)
    from prefect_dask import DaskTaskRunner

    if spec.address:
        return DaskTaskRunner(address=spec.address)
    return DaskTaskRunner(cluster_class=spec.cluster_class or "distributed.LocalCluster",
                          cluster_kwargs=spec.cluster_options())


def shared_results_root(url: str) -> str:
    """A relative local results root made absolute, so that worker processes (whose working
    directory may differ) write where the flow reads. URLs with a scheme are left alone."""
    if "://" in url:
        return url
    return os.path.abspath(url)


def _is_dask(task_runner) -> bool:
    return type(task_runner).__name__ == "DaskTaskRunner"


@contextmanager
def api_for_workers(task_runner) -> Iterator[None]:
    """Dask workers report their task runs to the Prefect API named in the settings that travel
    with each task. A flow on Prefect's ephemeral API (no PREFECT_API_URL, e.g. a plain `toa
    run`) has its temporary server's URL only in memory; name it in the settings while tasks
    are submitted, or every worker process would start an ephemeral server of its own."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if not _is_dask(task_runner) or PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the process's ephemeral server (a singleton), if running
    if not server.running:
        yield
        return
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


def close_worker_engines(task_runner, close_engines: Callable[[], None]) -> dict[str, str]:
    """Run `close_engines` (the run's engines: clients, reward service, any reward server it
    launched) in every Dask worker process of a started runner: workers of an existing cluster
    outlive the run. Returns {worker address: "closed" or the error}; for the thread pool there
    is nothing to do here (the flow closes its own process's engines)."""
    client = getattr(task_runner, "_client", None) if _is_dask(task_runner) else None
    if client is None:  # never connected (nothing was submitted): no engines out there
        return {}
    try:
        done = client.run(close_engines, on_error="return")
    except Exception as exc:  # a lost cluster: nothing left to close there
        return {"cluster": f"{type(exc).__name__}: {exc}"}
    return {w: "closed" if r is None else f"{type(r).__name__}: {r}" for w, r in done.items()}


def lost_on_cluster(future) -> str | None:
    """Why a (method, batch) task on Dask ended with no final state of its own, or None.

    A worker process that dies mid-task never reports a state: the scheduler runs the task again
    on another worker (up to distributed's `scheduler.allowed-failures`, 3 by default), and the
    retried attempt replays the dead worker's journaled calls (toa.storage.ShardWriter.recover).
    Prefect's task retries never see a worker death. Only when the scheduler gives up
    (KilledWorker: the task took that many workers down with it) or the cluster is lost is there
    nothing to retry; then this names it, since the task run in the API still reads Running."""
    wrapped = getattr(future, "wrapped_future", None)
    if wrapped is None or type(wrapped).__module__.split(".")[0] != "distributed" or not wrapped.done():
        return None
    try:
        exc = wrapped.exception()
    except Exception as lost:  # noqa: BLE001 -- cancelled: the cluster or the connection to it went away
        exc = lost
    return None if exc is None else f"lost on the Dask cluster: {type(exc).__name__}: {exc}"
