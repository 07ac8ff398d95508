"""The seeded kill -9 campaign of docs/design.md §4.2 ("a crash loses only what was in flight"),
shared by tests/test_crash_points.py and benchmarks/crash_points.py.

Real processes only, no vLLM: `toa run`, `toa export`, `toa report` and `toa evolve` run as
subprocesses (own process group) against agents attached to tests/openai_double.py (in this
process, its `slow` mode stretching sampling) and, for the server-start phase, a launched
server (tests/crash_server.py, a slow-starting, request-counting stand-in for vLLM). The reward
is a custom function (`slow_length` below) that takes a little time, so rewards are in flight.

Each kill point (POINTS) waits for its phase's marker (a log line, a file appearing in the
results root, a request at a server), then a seeded random delay (cut short in a `toa run`
round when the run's last step is next: RUN_ENDING), then SIGKILLs the process group. After
the points of a round, the same command runs again and must finish (exit 0).

Definitions (as tests/test_faults.py's kill test):
- a request is *in flight at a kill* when that kill is the first after its arrival and the
  request was not answered more than GRACE_S before it (finished calls reach the journal within milliseconds; the grace
  counts a just-answered call as in flight, like that test's "busiest second before the kill").
  A server notes a request's arrival when its handler starts reading it, which can be just
  after the kill of the process that sent it (its bytes were already in the socket): a request
  arriving up to SENT_S after a kill is that kill's. No process of the next attempt can send
  one that soon (Python's start-up alone takes longer);
- *repeated* generations = generations the servers served for the runs' calls minus the ok call
  rows recorded; they must not exceed the generations in flight at the kills. Each repeat is
  charged to the kill that caught its request in flight (`attribute_repeats`), and the table
  also shows the stricter *unanswered* count (not answered at all at the kill);
- a *lost finished call* = a finished generation without a record: per request content (the
  messages and seed as sent, which is how a server request is matched to its call rows), the
  generations answered and not in flight at the next kill must not exceed the ok call rows
  recorded for it; requests matching no recorded call are probes (readiness, identity) and
  are left out of every count;
- *duplicates*: rows sharing a content key within one results root (calls and rewards read
  raw, since their views deduplicate, keyed within their batch partition, where a call is
  recorded once; a next evolve iteration asking the same call again in its own batch is not
  one); keys per table in TABLE_KEYS;
- *corrupt shard*: a .parquet file pyarrow cannot read.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from openai_double import OpenAIDouble, _handler

TESTS = Path(__file__).resolve().parent
KEY = "sk-crash-key"
GRACE_S = 1.0  # see "in flight" above
SENT_S = 0.5  # likewise
PROMPTS, N, BATCH = 8, 2, 4  # per round: 2 batches, 2 methods (random, toa)
SLOW_S = 0.3  # each answer of the slow double path and of the launched stand-in
ROUND_SEEDS = {"launched": 0, "attached": 1, "evolve": 2}  # each results root its own run seed: no shared calls
SEED_ENV, DEFAULT_SEED = "TOA_CRASH_SEED", 20261130
# In the `toa run` rounds a kill lands before the run's last step (finish-run, which records the
# run as finished): a kill after it finds nothing left to do, so the round's next points would
# have nothing to kill. A delay is cut short when this marker appears (on a fast CPU the rest of
# a resumed run once took less than the 0.68 s a point still had to wait).
RUN_ROUNDS = ("launched", "attached")
RUN_ENDING = "line:Task run 'publish-report-.*Finished"


async def slow_length(prompt: str, response: str, reference: str | None) -> float:
    """The campaign's reward (custom kind): the response length, after a short wait, so that a
    kill can find rewards in flight."""
    import asyncio

    await asyncio.sleep(0.2)
    return float(len(response))


# -- the kill points --------------------------------------------------------------------------
@dataclass(frozen=True)
class Point:
    round: str  # which command/config (ROUNDS)
    phase: str
    trigger: str  # the marker waited for (kinds in Attempt.triggered)
    max_delay_s: float  # the kill comes uniform(0, max_delay_s) after the marker


# round "launched": `toa run`, agents: the launched stand-in + the slow double path
# round "attached": `toa run`, both agents attached (the head start runs), then `toa export`/`toa report`
# round "evolve":   `toa evolve --iterations 1`, both agents attached
POINTS: tuple[Point, ...] = (
    Point("launched", "server start", "server:start", 1.2),            # stand-in loading, not listening
    Point("launched", "server start", "server:listen", 0.2),           # readiness poll / probe generation
    Point("launched", "prompt loading", "line:Task run 'plan-run", 0.3),
    Point("launched", "sampling", "request", 1.5),
    Point("launched", "rewarding", "file:rewards/*/journal-*.jsonl", 0.8),
    Point("launched", "dataset building", "line:Flow run 'sampling-.*Finished", 0.4),
    Point("launched", "export", "file:exports/*/*/sft.jsonl", 0.3),
    Point("launched", "report", "line:Task run 'summarize.*Finished", 0.5),
    Point("attached", "prompt loading", "start", 2.0),                 # imports, config, prompts, head start
    Point("attached", "sampling", "request", 1.0),                     # the head start, before Prefect
    Point("attached", "sampling", "line:Beginning subflow run 'sampling-", 1.5),
    Point("attached", "rewarding", "file:rewards/*/journal-*.jsonl", 0.8),
    Point("attached", "sampling", "file:calls/*/part-*.parquet", 1.0),
    Point("attached", "dataset building", "line:Flow run 'sampling-.*Finished", 0.4),
    Point("attached", "export", "file:exports/*/*/sft.jsonl", 0.3),
    Point("attached", "report", "line:Task run 'summarize.*Finished", 0.8),
    Point("export", "export", "start", 3.0),                            # `toa export <run_id>`
    Point("export", "export", "out:sft*", 0.2),
    Point("report", "report", "start", 0.4),                            # `toa report <run_id>`
    Point("report", "report", "out:curves*", 0.05),
    Point("evolve", "sampling", "request", 1.5),                        # iteration 0
    Point("evolve", "evolve", "file:calls/batch=evolve-*/journal-*.jsonl", 1.0),
    Point("evolve", "evolve", "file:evolve/*/iter=1/manifest.json", 1.5),  # iteration 1 sampling
    Point("evolve", "report", "line:Task run 'summarize.*Finished", 1.5),
)


# -- servers ----------------------------------------------------------------------------------
@dataclass
class Request:
    server: str
    arrived: float
    body: dict
    answered: float | None = None

    @property
    def generations(self) -> int:
        return int(self.body.get("n") or 1)

    def match_key(self) -> str:
        return json.dumps([self.body.get("messages"), self.body.get("seed")], sort_keys=True)


class TimedDouble(OpenAIDouble):
    """tests/openai_double.py with each request's answer time kept too (wall clock)."""

    def __init__(self, api_key: str, slow_s: float):
        super().__init__(api_key, slow_s=slow_s)
        self.timed: list[Request] = []
        base, timed = _handler(self), self.timed

        class Timed(base):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.rfile = io.BytesIO(raw)  # the double's own handler reads it again
                req = Request("double", time.time(), json.loads(raw or b"{}"))
                timed.append(req)
                try:
                    super().do_POST()
                finally:
                    req.answered = time.time()

        self.server.RequestHandlerClass = Timed


def launched_requests(log: Path) -> tuple[list[Request], list[dict]]:
    """(chat requests, start/listen events) from the stand-in's log."""
    if not log.exists():
        return [], []
    reqs, answers, events = {}, {}, []
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if e["ev"] == "req":
            reqs[e["id"]] = Request("launched", e["t"], e["body"])
        elif e["ev"] == "ans":
            answers[e["id"]] = e["t"]
        else:
            events.append(e)
    for rid, req in reqs.items():
        req.answered = answers.get(rid)
    return list(reqs.values()), events


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return any(alive(int(p.name)) for p in Path("/proc").iterdir()
               if p.name.isdigit() and _pgid(int(p.name)) == pgid)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


# -- one attempt: start a command, wait for a marker, kill ----------------------------------------
class Attempt:
    """A command running in its own process group, its output collected line by line."""

    def __init__(self, cmd: list[str], env: dict, root: Path, campaign: Campaign, out_dir: Path | None = None):
        self.root, self.campaign, self.out_dir = root, campaign, out_dir
        self.started = time.time()
        self.lines: list[str] = []
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True, text=True, errors="replace")
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.requests_before = campaign.request_count()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def triggered(self, trigger: str) -> bool:
        kind, _, arg = trigger.partition(":")
        if kind == "start":
            return True
        if kind == "line":
            return any(re.search(arg, line) for line in list(self.lines))
        if kind == "file":
            return any(p.stat().st_mtime >= self.started - 0.01 for p in self.root.glob(arg) if p.exists())
        if kind == "out":
            return self.out_dir is not None and any(p.stat().st_mtime >= self.started - 0.01
                                                    for p in self.out_dir.rglob(arg) if p.exists())
        if kind == "request":
            return self.campaign.request_count() > self.requests_before
        if kind == "server":
            return any(e["ev"] == arg and e["t"] >= self.started for e in self.campaign.server_events())
        raise ValueError(f"unknown trigger {trigger!r}")

    def wait(self, timeout_s: float) -> int:
        rc = self.proc.wait(timeout_s)
        self.reader.join(10)
        return rc


@dataclass
class Kill:
    number: int
    point: Point
    delay_s: float  # waited after the trigger (the seeded delay, or less: RUN_ENDING)
    at: float  # wall clock of the SIGKILL
    in_flight: int = 0  # generations, filled in by `account`
    unanswered: int = 0  # of those, generations the server had not answered at the kill
    repeated: int = 0  # generations made again because of this kill (see `attribute_repeats`)
    leaked: list[str] = field(default_factory=list)  # processes of the run still alive afterwards


@dataclass
class Figures:
    kills: list[Kill]
    missed: list[str]  # points whose command finished before its kill
    in_flight: int
    repeated: int
    served: int
    recorded_calls_n: int  # ok call rows recorded (one per generation made and kept)
    lost: list[str]
    duplicates: dict[str, int]
    corrupt: list[str]
    leaked: list[str]
    reruns: dict[str, int]  # round -> exit status of its final run
    seconds: float

    def table(self) -> str:
        lines = ["| # | round | phase | trigger | delay s | in flight | unanswered | repeated |",
                 "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {k.number} | {k.point.round} | {k.point.phase} | `{k.point.trigger}` | {k.delay_s:.2f} | "
                  f"{k.in_flight} | {k.unanswered} | {k.repeated} |" for k in self.kills]
        lines += ["", "| phase | kills | in flight | unanswered | repeated |", "|---|---|---|---|---|"]
        for phase in dict.fromkeys(k.point.phase for k in self.kills):
            of = [k for k in self.kills if k.point.phase == phase]
            lines.append(f"| {phase} | {len(of)} | {sum(k.in_flight for k in of)} | {sum(k.unanswered for k in of)} | "
                         f"{sum(k.repeated for k in of)} |")
        summary = (f"served generations {self.served} for {self.recorded_calls_n} recorded calls; "
                   f"missed points {self.missed or 'none'}; duplicates by table {self.duplicates}; "
                   f"corrupt shards {len(self.corrupt)}; processes left running {len(self.leaked)}; "
                   f"final reruns {self.reruns}; {self.seconds:.0f} s")
        lines += ["", summary]
        lines.append(f"crash points: {len(self.kills)} kills, {self.repeated} calls repeated of {self.in_flight} in flight, "
                     f"{len(self.lost)} lost, {sum(self.duplicates.values())} duplicates")
        return "\n".join(lines)


# -- the campaign ---------------------------------------------------------------------------------
class Campaign:
    """Runs POINTS in order under `workdir` (results roots, run files, logs) with `env` (a
    PREFECT_API_URL, or none: then each toa command starts its own temporary API)."""

    def __init__(self, workdir: Path, env: dict, seed: int, log: Callable[[str], None] = lambda s: None):
        self.workdir, self.seed, self.log = workdir, seed, log
        self.rng = random.Random(seed)
        self.server_log = workdir / "launched-server.jsonl"
        self.env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")])),
                    "CRASH_SERVER_LOG": str(self.server_log), "CRASH_SERVER_SLOW_S": str(SLOW_S),
                    "CRASH_SERVER_START_S": "1.5", "TOA_CRASH_KEY": KEY}
        self.kills: list[Kill] = []
        self.missed: list[str] = []
        self.reruns: dict[str, int] = {}
        self.run_ids: dict[str, str] = {}
        self.double: TimedDouble | None = None

    # servers
    def request_count(self) -> int:
        """Sampling requests so far: greedy ones are readiness or identity probes, not calls."""
        return sum(1 for r in self.all_requests() if r.body.get("temperature") not in (0, 0.0))

    def server_events(self) -> list[dict]:
        return launched_requests(self.server_log)[1]

    def all_requests(self) -> list[Request]:
        return list(self.double.timed) + launched_requests(self.server_log)[0]

    # files
    def root(self, name: str) -> Path:
        return self.workdir / f"results-{name}"

    def run_file(self, name: str, launched: bool) -> Path:
        agents = [("l", None)] if launched else [("b", "ok")]
        agents.insert(0, ("a", "slow"))
        lines = [f"results_root = {json.dumps(str(self.root(name)))}", 'methods = ["random", "toa"]', f"n = {N}",
                 f"batch_size = {BATCH}", f"seed = {self.seed % 1000 + ROUND_SEEDS[name]}", "[prompts]", f"limit = {PROMPTS}",
                 "[reward]", 'kind = "custom"', 'function = "crash_campaign:slow_length"',
                 "[method_options.toa]", "width = 2"]
        for alias, mode in agents:
            lines += ["[[agents]]", f'alias = "{alias}"', "max_concurrency = 4"]
            if mode is None:
                lines += ["[agents.launch]", f"model = {json.dumps(str(self.model_dir()))}", 'device = "cpu"',
                          f"python = {json.dumps(str(self.server_python()))}", "startup_timeout_s = 60"]
            else:
                lines += ["[agents.endpoint]", f'base_url = "{self.double.url(mode)}"', 'model = "m"',
                          'api_key_env = "TOA_CRASH_KEY"']
            lines += ["[agents.sampling]", "max_tokens = 8"]
        path = self.workdir / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def model_dir(self) -> Path:
        folder = self.workdir / "model"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "torch_dtype": "float32"}')
        (folder / "model.safetensors").write_bytes(b"not weights")
        return folder

    def server_python(self) -> Path:
        path = self.workdir / "crash-server-python"
        path.write_text(f'#!/bin/sh\nexec {sys.executable} {TESTS / "crash_server.py"} "$@"\n')
        path.chmod(0o755)
        return path

    def commands(self) -> dict[str, tuple[list[str], Path, Path | None]]:
        """round -> (argv, results root, output folder of export/report)."""
        toa = [sys.executable, "-m", "toa.cli"]
        run_id = self.run_ids.get("attached", "?")
        attached = self.run_file("attached", launched=False)
        out = self.workdir / "out"
        return {
            "launched": ([*toa, "run", "--config", str(self.run_file("launched", launched=True))], self.root("launched"), None),
            "attached": ([*toa, "run", "--config", str(attached)], self.root("attached"), None),
            "export": ([*toa, "export", run_id, "--root", str(self.root("attached")), "--out", str(out / "export")],
                       self.root("attached"), out / "export"),
            "report": ([*toa, "report", run_id, "--root", str(self.root("attached")), "--out", str(out / "report")],
                       self.root("attached"), out / "report"),
            "evolve": ([*toa, "evolve", "--config", str(self.run_file("evolve", launched=False)), "--set", 'methods=["random"]',
                        "--iterations", "1", "--evolve", "fraction=0.5", "--evolve", "evolutions=2",
                        "--evolve", "max_tokens=8"], self.root("evolve"), None),
        }

    # running
    def run(self) -> Figures:
        t0 = time.time()
        with TimedDouble(KEY, slow_s=SLOW_S) as self.double:
            rounds = list(dict.fromkeys(p.round for p in POINTS))
            for name in rounds:
                for point in (p for p in POINTS if p.round == name):
                    self.kill_at(point)
                self.finish(name)
            figures = self.account(time.time() - t0)
            with open(self.workdir / "double-requests.jsonl", "w", encoding="utf-8") as fh:  # for a post-mortem
                fh.writelines(json.dumps(vars(r)) + "\n" for r in self.double.timed)
        (self.workdir / "kills.json").write_text(json.dumps([{**vars(k), "point": vars(k.point)} for k in self.kills]))
        return figures

    def kill_at(self, point: Point, tries: int = 6) -> None:
        """Kill at `point`; a command that ends before its kill (the short `toa export` and
        `toa report`) is run again with half the delay, up to `tries` times (on a fast CPU
        `toa export` once ended within three tries' delays: 3.0 x u, then halved twice)."""
        scale = 1.0
        for _ in range(tries):
            missed = self._kill_once(point, self.rng.uniform(0.0, point.max_delay_s) * scale)
            if missed is None:
                return
            scale /= 2
        self.missed.append(missed)

    def _kill_once(self, point: Point, delay: float) -> str | None:
        """None when the kill landed, else why not."""
        cmd, root, out = self.commands()[point.round]
        attempt = Attempt(cmd, self.env, root, self, out)
        deadline = time.monotonic() + 180
        while not attempt.triggered(point.trigger):
            if attempt.proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.02)  # polling for the marker, not waiting for readiness
        triggered = time.monotonic()
        while time.monotonic() < triggered + delay and attempt.proc.poll() is None:
            if point.round in RUN_ROUNDS and attempt.triggered(RUN_ENDING):
                break
            time.sleep(0.01)
        waited = time.monotonic() - triggered
        label = f"{point.round}/{point.phase}/{point.trigger}"
        if attempt.proc.poll() is not None:
            attempt.wait(10)
            self.log(f"missed {label} (exit {attempt.proc.returncode}):\n{attempt.output()[-1500:]}")
            return f"{label}: exit {attempt.proc.returncode} before the kill"
        at = time.time()
        os.killpg(attempt.proc.pid, signal.SIGKILL)
        attempt.wait(30)
        kill = Kill(len(self.kills) + 1, point, waited, at)
        kill.leaked = self.leftovers(attempt.proc.pid, attempt.started)
        self.kills.append(kill)
        self.log(f"kill {kill.number}: {label} after {waited:.2f} s of {delay:.2f} (+{at - attempt.started:.1f} s from start)")
        return None

    def leftovers(self, pgid: int, since: float) -> list[str]:
        """Processes of the killed command still alive once the guard had its time: its own
        group, and the launched servers it started (they must exit by themselves, README)."""
        servers = {e["pid"] for e in self.server_events() if e["ev"] == "start" and e["t"] >= since - 1}
        deadline = time.monotonic() + 20  # guard: 0.2 s poll + 5 s grace, on a busy machine
        while time.monotonic() < deadline and (group_alive(pgid) or any(alive(p) for p in servers)):
            time.sleep(0.1)
        leaked = [f"group {pgid}"] if group_alive(pgid) else []
        leaked += [f"server pid {p}" for p in servers if alive(p)]
        for pid in [pgid, *servers]:  # whatever is left must not disturb the next attempt
            try:
                os.killpg(_pgid(pid) or pid, signal.SIGKILL)
            except OSError:
                pass
        return leaked

    def finish(self, name: str) -> None:
        cmd, root, _ = self.commands()[name]
        attempt = Attempt(cmd, self.env, root, self)
        try:
            rc = attempt.wait(600)
        except subprocess.TimeoutExpired:
            os.killpg(attempt.proc.pid, signal.SIGKILL)
            rc = attempt.wait(30)
        self.reruns[name] = rc
        self.log(f"rerun {name}: exit {rc}" + ("" if rc == 0 else f"\n{attempt.output()[-4000:]}"))
        found = re.findall(r"^run ([0-9a-f]{16})$", attempt.output(), re.MULTILINE)
        if found:
            self.run_ids[name] = found[-1]

    # accounting
    def account(self, seconds: float) -> Figures:
        roots = [self.root(n) for n in ROUND_SEEDS]
        recorded = recorded_calls(roots)
        requests = [r for r in self.all_requests() if r.match_key() in recorded]  # probes match no call
        kill_times = sorted(k.at for k in self.kills)
        for kill in self.kills:
            caught = [r for r in requests if first_kill_after(r, kill_times) == kill.at and in_flight(r, kill.at)]
            kill.in_flight = sum(r.generations for r in caught)
            kill.unanswered = sum(r.generations for r in caught if r.answered is None or r.answered > kill.at)
        repeats = attribute_repeats(requests, kill_times, recorded)
        for kill in self.kills:
            kill.repeated = repeats[kill.at]
        served = sum(r.generations for r in requests)
        rows = sum(recorded.values())
        return Figures(kills=self.kills, missed=self.missed, in_flight=sum(k.in_flight for k in self.kills),
                       repeated=served - rows, served=served, recorded_calls_n=rows,
                       lost=lost_calls(requests, kill_times, recorded), duplicates=duplicates(roots),
                       corrupt=corrupt_shards(roots), leaked=[x for k in self.kills for x in k.leaked],
                       reruns=self.reruns, seconds=seconds)


def attribute_repeats(requests: list[Request], kill_times: list[float], recorded: Counter) -> Counter:
    """kill time -> generations repeated because of it: per (messages, seed), the generations
    served beyond those recorded, charged to the kills that caught its requests in flight."""
    extra = Counter()
    for r in requests:
        extra[r.match_key()] += r.generations
    extra.subtract(recorded)
    charged: Counter = Counter()
    for r in sorted(requests, key=lambda r: r.arrived):
        kill = first_kill_after(r, kill_times)
        if kill is not None and in_flight(r, kill) and extra[r.match_key()] > 0:
            take = min(extra[r.match_key()], r.generations)
            extra[r.match_key()] -= take
            charged[kill] += take
    return charged


def first_kill_after(req: Request, kill_times: list[float]) -> float | None:
    return next((t for t in kill_times if t >= req.arrived - SENT_S), None)


def in_flight(req: Request, kill_at: float) -> bool:
    return req.arrived <= kill_at + SENT_S and (req.answered is None or req.answered > kill_at - GRACE_S)


def lost_calls(requests: list[Request], kill_times: list[float], recorded: dict[str, int]) -> list[str]:
    """Finished calls without a record (see the module doc): per (messages, seed), the
    generations served and not in flight at the next kill must not exceed the recorded rows."""
    finished: Counter = Counter()
    for r in requests:
        kill = first_kill_after(r, kill_times)
        if r.answered is not None and (kill is None or not in_flight(r, kill)):
            finished[r.match_key()] += r.generations
    return [f"{n} finished, {recorded[key]} recorded: {key[:160]}" for key, n in finished.items() if n > recorded[key]]


def recorded_calls(roots: list[Path]) -> Counter:
    """(messages, seed) as sent -> ok call rows recorded for it (raw shards: a call made again
    in another batch partition, e.g. by the next evolve iteration, is recorded again)."""
    import polars as pl

    out: Counter = Counter()
    for root in roots:
        files = [str(p) for p in (root / "calls").rglob("*.parquet") if p.name != "_schema.parquet"]
        if not files:
            continue
        df = pl.concat([pl.read_parquet(f, columns=["request_json", "seed", "status"]) for f in files])
        for request, seed, status in df.iter_rows():
            if status == "ok":
                out[json.dumps([json.loads(request)["messages"], seed], sort_keys=True)] += 1
    return out


# content keys per table, within one results root; calls and rewards (read raw: their views
# deduplicate) within one batch partition, where a call is recorded once
TABLE_KEYS = {
    "calls": "partition, call_key", "rewards": "partition, reward_key",
    "samples": "run_id, method, sample_id", "tree_nodes": "run_id, method, prompt_id, node_id",
    "sft": "run_id, method, prompt_id", "dpo": "run_id, method, prompt_id, chosen_id, rejected_id",
    "prompts": "source, prompt_id", "evolutions": "evolve_id, iteration, prompt_id, step, call_key",
    "evolve_iterations": "evolve_id, iteration",
}


def duplicates(roots: list[Path]) -> dict[str, int]:
    """Rows beyond the first per content key, per table, summed over the results roots; calls
    count ok rows only (a failed attempt before a success is history, not a duplicate)."""
    import duckdb

    out: Counter = Counter()
    con = duckdb.connect()
    for root in roots:
        for table, key in TABLE_KEYS.items():
            if not any(p.name != "_schema.parquet" for p in (root / table).rglob("*.parquet")):
                out[table] += 0
                continue
            where = "where status = 'ok'" if table == "calls" else ""
            n, k = con.execute(
                f"select count(*), count(distinct ({key})) from (select *, regexp_replace(filename, '/[^/]*$', '') "
                f"as partition from read_parquet(?, union_by_name = true, hive_partitioning = false, filename = true)) "
                f"{where}", [str(root / table / "**" / "*.parquet")]).fetchone()
            out[table] += n - k
    return dict(out)


def corrupt_shards(roots: list[Path]) -> list[str]:
    import pyarrow.parquet as pq

    bad = []
    for root in roots:
        for path in root.rglob("*.parquet"):
            try:
                pq.read_table(path)
            except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
                bad.append(f"{path}: {type(exc).__name__}: {exc}")
    return bad


def export_lines(root_or_out: Path) -> dict[str, int]:
    """JSONL files under a folder -> duplicate lines in each (by prompt_id, else the whole line)."""
    out = {}
    for path in root_or_out.rglob("*.jsonl"):
        rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        keys = [json.loads(r).get("prompt_id", r) if r.startswith("{") else r for r in rows]
        out[str(path)] = len(keys) - len(set(map(str, keys)))
    return out


def campaign_seed() -> int:
    return int(os.environ.get(SEED_ENV, DEFAULT_SEED))
