"""Run configuration: typed pydantic models, loaded with pydantic-settings.

Precedence (lowest first): defaults < run file (TOML or YAML) < TOA_* environment variables
(nested with "__", e.g. TOA_N=4, TOA_REWARD__KIND=math) < explicit overrides (CLI `--set`,
flow parameters). The defaults are the embedded CPU run: two real small models served by vLLM
(SmolLM2-135M-Instruct and Gemma 3 270M, both shipped in PyPI packages), the packaged prompt
set with reference answers, and a sentence-embedding similarity reward.

Fields that change results feed the run fingerprint (toa.plan.run_id); fields marked
operational (concurrency, timeouts, retries, where results go) do not, so changing them resumes
the same run. Validation builds each method once with its options checked (toa.methods.base);
the run plan (toa.plan) keeps those instances.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)
from pydantic_settings import EnvSettingsSource, SettingsConfigDict

from toa.methods import Method, method_class, method_names
from toa.prompts import DEFAULT_PROMPTS, PromptSource
from toa.reward.config import RewardConfig
from toa.run_file import (
    OPERATIONAL,
    ConfigError,
    ResultsFields,
    deep_merge,
    explain,
    read_run_file,
)
from toa.runners import TaskRunnerConfig
from toa.servers.spec import AttachSpec, LaunchSpec, place_cpu_servers


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature (paper: 0.7).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (paper: 1.0).")
    max_tokens: int = Field(128, gt=0, description="Completion length cap (paper: 2048; 128 keeps the CPU default quick).")
    stop: list[str] | None = Field(None, description="Stop strings.")

    def request_fields(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class GlobalLimit(BaseModel):
    """Per-endpoint limits shared by every process and machine that talks to one Prefect API."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Prefect global concurrency limit held by each request to this endpoint; every worker that names it shares it. The rate limit is `<name>-rate`.",
                      pattern=r"^[A-Za-z0-9_.:-]+$")
    concurrency: int | None = Field(None, gt=0, description="Requests in flight across all workers: toa creates the limit `name` with this many slots, or updates it. None with requests_per_minute: no concurrency slot; None without it: `name` must already exist in Prefect and is used as set there.")
    requests_per_minute: float | None = Field(None, gt=0, description="Request rate across all workers: toa creates or updates `<name>-rate`, a limit whose slots decay at this rate (bursts of up to one second's worth).")
    timeout_s: float | None = Field(None, gt=0, description="Longest wait for a slot before the call fails (recorded as an error row); None waits as long as it takes.")


class Price(BaseModel):
    """What an endpoint's calls cost, per token, per GPU-hour of server time, or both (summed).
    Read by sql/cost.sql (from the run's `runs` row) and by the progress bar's projection."""

    model_config = ConfigDict(extra="forbid")
    input_per_1m: float | None = Field(None, ge=0, description="Per 1M prompt tokens (the prompt of a request with n choices counts once).")
    output_per_1m: float | None = Field(None, ge=0, description="Per 1M completion tokens.")
    gpu_hour: float | None = Field(None, ge=0, description="Per GPU-hour of the endpoint's server time: a request's server_s where the server reports it, else its client latency (an upper bound: batched requests overlap).")
    gpus: int = Field(1, gt=0, description="GPUs of the endpoint's server: an hour of its time costs gpu_hour x gpus.")
    currency: str = Field("USD", min_length=1, description="Label of these prices; agents priced in different currencies get no summed money.")

    @model_validator(mode="after")
    def _some_price(self) -> Price:
        if self.input_per_1m is None and self.output_per_1m is None and self.gpu_hour is None:
            raise ValueError("a price needs input_per_1m, output_per_1m or gpu_hour")
        return self

    def call_cost(self, prompt_tokens: int, completion_tokens: int, seconds: float, request_choices: int | None) -> float:
        """One recorded choice's cost; the n choices of one request share its prompt and its
        seconds (sql/cost.sql computes the same)."""
        share = 1 / (request_choices or 1)
        return ((self.input_per_1m or 0) * prompt_tokens * share / 1e6 + (self.output_per_1m or 0) * completion_tokens / 1e6
                + (self.gpu_hour or 0) * self.gpus * seconds * share / 3600)


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alias: str = Field(description="Name of this agent in samples, labels and datasets.", pattern=r"^[A-Za-z0-9_.-]+$")
    launch: LaunchSpec | None = Field(None, description="Start a model server for this agent (vLLM).")
    endpoint: AttachSpec | None = Field(None, description="Use an existing OpenAI-compatible endpoint.")
    block: str | None = Field(None, description="Name of a toa ModelEndpoint Prefect block to attach to.")
    sampling: SamplingParams = Field(default_factory=SamplingParams, description="Sampling parameters for this agent.")
    max_concurrency: int = Field(64, gt=0, description="Requests in flight to this endpoint; with adaptive_concurrency, the ceiling of the adaptive limit.", json_schema_extra=OPERATIONAL)
    adaptive_concurrency: bool | None = Field(None, description="Learn the requests in flight by AIMD (toa.aimd): start at 8 (at most max_concurrency), +1 per window of successes, halve on a 429/503, a timeout or a vLLM queue (requests waiting) above 8; never above max_concurrency. None: on for servers toa did not launch (endpoint, block), off for launched ones.", json_schema_extra=OPERATIONAL)
    timeout_s: float = Field(300.0, gt=0, description="Per-request timeout.", json_schema_extra=OPERATIONAL)
    retries: int = Field(4, ge=0, description="Retries on transient failures (exponential backoff).", json_schema_extra=OPERATIONAL)
    stall_timeout_s: float | None = Field(60.0, gt=0, description="A server that reports running requests (vLLM /metrics) but generates no token for this long is stalled: its calls fail at once with an error row saying what it reported. None: no stall watch.", json_schema_extra=OPERATIONAL)
    min_tokens_per_s: float | None = Field(20.0, gt=0, description="With several requests running, a server generating fewer tokens per second than this gets one warning naming the likely causes (dtype, cores, memory). None: no speed warning.", json_schema_extra=OPERATIONAL)
    global_limit: GlobalLimit | None = Field(None, description="Limits on this endpoint that hold across processes and machines (Prefect global concurrency limits); max_concurrency still limits each process.", json_schema_extra=OPERATIONAL)
    price: Price | None = Field(None, description="What this endpoint's calls cost (view method_cost, sql/cost.sql; the progress bar's projected cost). None: not counted (free).", json_schema_extra=OPERATIONAL)

    @model_validator(mode="after")
    def _one_source(self) -> AgentConfig:
        given = [k for k in ("launch", "endpoint", "block") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"agent {self.alias!r} needs exactly one of launch, endpoint, block (got {given or 'none'})")
        return self


def default_agents() -> list[AgentConfig]:
    return [
        AgentConfig(alias="smollm2", launch=LaunchSpec(model="embedded:smollm2-135m-instruct")),
        AgentConfig(alias="gemma3", launch=LaunchSpec(model="embedded:gemma3-270m")),
    ]


class RunConfig(ResultsFields):
    """One synthesis run. See the module docstring for sources and precedence; the results
    fields (results_root, storage_options, results_block) are declared in toa.run_file."""

    model_config = SettingsConfigDict(env_prefix="TOA_", env_nested_delimiter="__", extra="forbid")

    name: str = Field("toa", description="Human label for the run (not part of the fingerprint).", json_schema_extra=OPERATIONAL)
    agents: list[AgentConfig] = Field(default_factory=default_agents, min_length=1, description="Policy models, in this fixed order.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Reward model that scores every response.")
    prompts: PromptSource = Field(default_factory=lambda: PromptSource(path=DEFAULT_PROMPTS), description="Prompt set.")
    methods: list[str] = Field(["random", "parallel_ensemble"], min_length=1, description="Sampling methods to run, by registry name.")
    method_options: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Per-method options, e.g. {toa = {tau = 1.0}}.")
    n: int = Field(2, gt=0, description="Samples per agent; every method spends n * len(agents) generations per prompt.")
    seed: int = Field(0, description="Run seed; a call's seed derives from (method, model, request, run seed, call slot).")
    batch_size: int = Field(16, gt=0, description="Prompts per (method, batch) task. Part of the fingerprint: the call cache is partitioned by batch.")
    dpo_rank: int | None = Field(None, gt=1, description="DPO rejected = the response ranked r-th by reward; default scales the paper's 30-of-160 to the budget.")
    prompt_concurrency: int = Field(64, gt=0, description="Prompts of one batch in flight at once.", json_schema_extra=OPERATIONAL)
    task_retries: int = Field(2, ge=0, description="Prefect retries of a failed (method, batch) task.", json_schema_extra=OPERATIONAL)
    task_runner: TaskRunnerConfig = Field(default_factory=TaskRunnerConfig, description="Where the (method, batch) tasks run: Prefect threads in the flow process, or a Dask cluster (toa.runners).", json_schema_extra=OPERATIONAL)
    head_start: bool = Field(True, description="`toa run` with every server attached: start the first (method, batch) unit while Prefect starts, for the flow to adopt (toa.head_start).", json_schema_extra=OPERATIONAL)
    accept_changed_models: list[str] = Field(default_factory=list, description="Aliases of attached endpoints ('reward' for the reward model's) whose behavioural fingerprint may differ from the one recorded with their calls in results_root: their recorded calls are replayed anyway and the acceptance is recorded (who, when, old, new) under <results_root>/identity/ (toa.identity). Without it such a run stops before any call, naming the endpoint. `toa run --accept-changed-model ALIAS`.", json_schema_extra=OPERATIONAL)
    _methods: dict[str, Method] = PrivateAttr(default_factory=dict)  # built by _check, once

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        aliases = [a.alias for a in self.agents]
        if len(set(aliases)) != len(aliases):
            raise ValueError(f"agent aliases must be unique, got {aliases}")
        unknown = [m for m in self.methods if m not in method_names()]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; known: {method_names()}")
        unknown_aliases = [a for a in self.accept_changed_models if a not in aliases and a != "reward"]
        if unknown_aliases:
            raise ValueError(f"accept_changed_models names no agent {unknown_aliases}; agents: {aliases} "
                             "(or 'reward' for the reward model's endpoint)")
        typos = [m for m in self.method_options if m not in method_names()]
        if typos:
            raise ValueError(f"method_options for unknown method(s) {typos}; known: {method_names()}")
        self._methods = _build_methods(self.methods, self.method_options, len(self.agents), self.n)
        return self

    @property
    def method_objects(self) -> dict[str, Method]:
        """The run's methods, one instance each, built and checked when the config was validated."""
        return self._methods

    @property
    def budget(self) -> int:
        return self.n * len(self.agents)

    @property
    def rejected_rank(self) -> int:
        """Paper: best of 160 vs the 30th ranked; scaled to this budget, at least 2."""
        return self.dpo_rank or max(2, round(self.budget * 30 / 160))

    def fingerprint_fields(self) -> dict[str, Any]:
        """The fields that change results. Method options are left to toa.plan.run_id, which
        takes them validated, defaults filled in."""
        return {k: v for k, v in _result_fields(self).items() if k != "method_options"}


REWARD_SERVER = "(reward)"  # key of the reward model's launched server beside the agents' aliases (never an alias)


def launch_specs(cfg: RunConfig) -> dict[str, LaunchSpec]:
    """Every server the run launches: the agents' (by alias) and the reward model's."""
    specs = {a.alias: a.launch for a in cfg.agents if a.launch is not None}
    if cfg.reward.kind == "vllm" and cfg.reward.launch is not None:
        specs[REWARD_SERVER] = cfg.reward.launch
    return specs


def place_servers(cfg: RunConfig) -> RunConfig:
    """`cfg` with each launched CPU server's cores assigned (toa.servers.spec.place_cpu_servers).
    Operational: cores change speed, not results, so the run id is the same."""
    placed = place_cpu_servers(launch_specs(cfg))
    agents = [a.model_copy(update={"launch": placed[a.alias]}) if a.launch is not None else a for a in cfg.agents]
    update: dict[str, Any] = {"agents": agents}
    if REWARD_SERVER in placed and cfg.reward.launch is not None:
        update["reward"] = cfg.reward.model_copy(update={"launch": placed[REWARD_SERVER]})
    return cfg.model_copy(update=update)


def _result_fields(model: BaseModel) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, info in type(model).model_fields.items():
        if (info.json_schema_extra or {}) == OPERATIONAL:
            continue
        out[name] = _result_value(getattr(model, name))
    return out


def _result_value(value: Any) -> Any:
    if isinstance(value, BaseModel):
        # A part that knows which of its fields change results says so (prompt source, reward,
        # server specs); otherwise every field not marked operational counts.
        return value.fingerprint() if hasattr(value, "fingerprint") else _result_fields(value)
    if isinstance(value, list):
        return [_result_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _result_value(v) for k, v in value.items()}
    return value if not hasattr(value, "get_secret_value") else None  # secrets never fingerprinted


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Resolve defaults < file < environment < overrides into a validated RunConfig.

    Layers are deep-merged (a file that sets `reward.kind` keeps the other reward defaults; a
    list such as `agents` is replaced whole). `overrides` take dotted keys, list items by index
    ("agents.0.sampling.max_tokens": 64). A bad config raises ConfigError listing every bad
    field with its location and the offending value.
    """
    merged = _defaults()
    deep_merge(merged, read_run_file(path) if path else {})
    deep_merge(merged, EnvSettingsSource(RunConfig)())
    for key, value in (overrides or {}).items():
        _set_dotted(merged, key, value)
    try:
        return RunConfig.model_validate(merged)  # validates only: BaseSettings sources are not re-read
    except ValidationError as exc:
        raise ConfigError(explain(exc, path)) from None


def _defaults() -> dict[str, Any]:
    out = {}
    for name, info in RunConfig.model_fields.items():
        value = info.get_default(call_default_factory=True)
        if isinstance(value, BaseModel):
            value = value.model_dump(exclude_unset=True)
        elif isinstance(value, list):
            value = [v.model_dump(exclude_unset=True) if isinstance(v, BaseModel) else v for v in value]
        out[name] = value
    return out


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node: Any = tree
    for part in parents:
        if isinstance(node, list):
            node = node[_index(node, part, dotted)]
        else:
            node = node.setdefault(part, {})
    if isinstance(node, list):
        node[_index(node, leaf, dotted)] = value
    elif isinstance(node, dict) and isinstance(value, dict) and isinstance(node.get(leaf), dict):
        deep_merge(node[leaf], value)
    else:
        node[leaf] = value


def _build_methods(methods: list[str], options: dict[str, dict[str, Any]], m: int, n: int) -> dict[str, Method]:
    """Each method once, its options validated (a typo fails here rather than in every batch)
    and its budget checked against M agents and n samples (TOA's width): before anything starts."""
    built = {}
    for name in methods:
        try:
            built[name] = method_class(name).from_options(options.get(name, {}))
        except ValueError as exc:
            raise ValueError(f"method_options.{exc}") from None
        try:
            built[name].check_budget(m, n)
        except ValueError as exc:
            raise ValueError(f"methods: {exc}") from None
    for name in set(options) - set(methods):  # options of a method not run: still checked
        try:
            method_class(name).from_options(options[name])
        except ValueError as exc:
            raise ValueError(f"method_options.{exc}") from None
    return built


def _index(items: list, part: str, dotted: str) -> int:
    """A list position in a dotted override: an index, or for agents their alias."""
    if part.isdigit() and int(part) < len(items):
        return int(part)
    aliases = [item.get("alias") for item in items if isinstance(item, dict)]
    if part in aliases:
        return aliases.index(part)
    if any(aliases):
        raise ConfigError(f"override {dotted!r}: no agent with alias {part!r}; "
                          f"agents: {', '.join(str(a) for a in aliases)} (or an index 0..{len(items) - 1})")
    raise ConfigError(f"override {dotted!r}: {part!r} is not an index of a {len(items)}-item list")
