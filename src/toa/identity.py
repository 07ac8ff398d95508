"""Model identity you can trust: what a call key's "model identity" stands for (docs/design.md
§4.1, §4.4), and the check that stops a changed model from having its predecessor's answers
replayed as its own.

Launched and local models (a vLLM server toa starts, a transformers reward model) are named by
the CONTENT of their folder: sha256 of every file that decides what the model computes (weights,
tokenizer files, chat templates, config.json, generation_config.json, custom code; top level
only, as vLLM and transformers read them), so a same-size fine-tune copied into the same folder
is a new model. Hashing is done once per file version: digests are remembered in
`${TOA_HOME:-~/.cache/toa}/identity/file-digests.json`, keyed by the file's real path, size,
mtime_ns, ctime_ns and inode (ctime and inode too, because `cp -p` or `touch -d` can put an old
mtime on new bytes, but nothing can set ctime back).

Attached endpoints cannot be hashed; they carry an optional declared `revision` (in their
identity, toa.servers.attach) and a behavioural fingerprint (`toa.servers.attach.fingerprint`).
The fingerprint is recorded per endpoint identity (and probe kind) in the results root,
`<root>/identity/endpoints/<sha of both, 16 hex>.json`, since the calls recorded there are
keyed by that identity. `verify_attached` runs where endpoints are attached, before any call
is replayed: a fingerprint that differs from the recorded one refuses the run (`ModelChanged`,
exit 2) unless the endpoint's alias is listed in `accept_changed_models` (operational: not in
the run id), and an acceptance is appended to the record (who, when, old, new). A mismatch is
probed again up to `MAX_PROBES` times in all before it counts (a hosted API that is not quite
deterministic at temperature 0 must not refuse every run), and probes are remembered in this
process for `PROBE_TTL_S`, so the head start and the flow of one `toa run` probe once.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toa.errors import UserError
from toa.servers.attach import (
    LOGPROB_DECIMALS,
    Fingerprint,
    ProbeUnanswered,
    attach,
    fingerprint,
)
from toa.servers.spec import Endpoint
from toa.storage import toa_home

if TYPE_CHECKING:
    from toa.storage import Store

RunConfig = Any  # toa.config.RunConfig; not imported: toa.config -> reward -> this module

# ------------------------------------------------------------------ content hash of local models

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_HASHED_NAMES = {"config.json", "generation_config.json", "special_tokens_map.json", "added_tokens.json",
                 "merges.txt", "preprocessor_config.json"}
_HASHED_PREFIXES = ("tokenizer", "vocab", "chat_template")
_HASHED_SUFFIXES = (*WEIGHT_SUFFIXES, ".model", ".tiktoken", ".jinja", ".py")
READ_BYTES = 1 << 20  # 1 MiB reads: a little faster than hashlib.file_digest's 256 KiB here


def identity_files(folder: Path) -> list[Path]:
    """The files of a model folder that decide what it computes, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and _decides(p.name))


def _decides(name: str) -> bool:
    return (name in _HASHED_NAMES or name.startswith(_HASHED_PREFIXES) or name.endswith(_HASHED_SUFFIXES)
            or name.endswith(".index.json"))


def folder_digest(model: str | Path, cache_file: Path | None = None) -> str | None:
    """sha256 (hex) over the names and content digests of a model folder's identity files (a
    single file, e.g. a .gguf, is its own content); None when `model` is not a local path
    (a hub id vLLM resolves itself)."""
    path = Path(model).expanduser()
    if path.is_dir():
        files = identity_files(path)
    elif path.is_file():
        files = [path]
    else:
        return None
    digests = file_digests(files, cache_file)
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{digests[f]}\n".encode())
    return h.hexdigest()


def default_cache_file() -> Path:
    return toa_home() / "identity" / "file-digests.json"


def file_digests(files: Iterable[Path], cache_file: Path | None = None) -> dict[Path, str]:
    """sha256 of each file, from the digest cache where the file is unchanged since it was
    hashed (module docstring), else computed and added to the cache."""
    cache_file = cache_file or default_cache_file()
    known = _read_cache(cache_file)
    out, fresh = {}, {}
    for f in files:
        real = os.path.realpath(f)
        stamp = _stamp(real)
        entry = known.get(real)
        if entry is not None and entry.get("stamp") == stamp:
            out[f] = entry["sha256"]
            continue
        out[f] = _sha256_file(real)
        fresh[real] = {"stamp": stamp, "sha256": out[f]}
    if fresh:
        _save_cache(cache_file, fresh)
    return out


def _stamp(real: str) -> list[int]:
    st = os.stat(real)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _sha256_file(path: str) -> str:
    h, buf = hashlib.sha256(), bytearray(READ_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _read_cache(cache_file: Path) -> dict[str, Any]:
    try:
        data = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or damaged: hashing again is always right
    return data if isinstance(data, dict) else {}


_CACHE_LOCK = threading.Lock()


def _save_cache(cache_file: Path, fresh: dict[str, Any]) -> None:
    """Merge `fresh` into the cache file: re-read under a lock (other processes hash other
    models meanwhile), write a temporary file and rename it, so a reader never sees half."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with _CACHE_LOCK, open(cache_file.with_suffix(".lock"), "a") as gate:
            try:
                import fcntl

                fcntl.flock(gate, fcntl.LOCK_EX)
            except ImportError:  # pragma: no cover -- not POSIX: a lost update only means a rehash
                pass
            merged = _read_cache(cache_file) | fresh
            tmp = cache_file.with_name(f".{cache_file.name}.{uuid.uuid4().hex}.tmp")
            tmp.write_text(json.dumps(merged, indent=0, sort_keys=True))
            tmp.replace(cache_file)
    except OSError:
        pass  # a read-only home: the digests are right, only the next start hashes again


# ------------------------------------------------------------------ attached endpoints

RECORDS = ("identity", "endpoints")  # <root>/identity/endpoints/<key>.json
REWARD_ALIAS = "reward"  # how accept_changed_models names the reward model's endpoint
MAX_PROBES = 3  # probes of one endpoint before a mismatch counts (the first included)
PROBE_TTL_S = 60.0  # a probe answers for this long in this process (head start + flow of one `toa run`: one probe)


class ModelChanged(UserError):
    """An attached endpoint answers differently from when its recorded calls were made."""


@dataclass(frozen=True)
class Checked:
    """What `verify_attached` found for one endpoint: "recorded" (first seen), "same",
    "accepted" (changed, and accepted by the run's setting), or "unchecked" (the server did not
    answer the probe: `note` says why; the run goes on, its failing calls become error rows)."""

    alias: str
    identity: str
    outcome: str
    fingerprint: str | None
    previous: str | None = None
    note: str | None = None


_PROBES: dict[tuple, list[tuple[float, Fingerprint]]] = {}
_PROBES_LOCK = threading.Lock()
# Acceptances made by this process, by (record, new fingerprint): the flow after a head start
# that accepted a change still reports it, without recording it twice.
_ACCEPTED: dict[tuple, Checked] = {}


def verify_attached(cfg: RunConfig, endpoints: dict[str, Endpoint], run: str, store: Store | None = None) -> list[Checked]:
    """Check every attached endpoint of `endpoints` (agents) and the reward model's attached
    endpoint (judge, vllm) against the fingerprints recorded in the results root; raises
    ModelChanged for a changed one whose alias is not in `cfg.accept_changed_models`. `run`
    (a run or flow-run id) is written with an acceptance."""
    if store is None:
        from toa.storage import Store

        store = Store(cfg.results_root, cfg.storage_options)
    attached = {a.alias for a in cfg.agents if a.launch is None}
    checks = [(alias, ep, "chat") for alias, ep in endpoints.items() if alias in attached]
    reward = _reward_endpoint(cfg)
    if reward is not None:
        checks.append(reward)
    accept = set(cfg.accept_changed_models)
    return [check_endpoint(store, alias, ep, kind, accepted=alias in accept, run=run) for alias, ep, kind in checks]


def _reward_endpoint(cfg: RunConfig) -> tuple[str, Endpoint, str] | None:
    """The reward model's attached endpoint, as toa.reward.config.build_backend attaches it."""
    reward = cfg.reward
    if reward.kind not in ("judge", "vllm") or reward.endpoint is None:
        return None
    kind = "chat" if reward.kind == "judge" else "classify"
    return REWARD_ALIAS, attach(REWARD_ALIAS, reward.endpoint), kind


def check_endpoint(store: Store, alias: str, endpoint: Endpoint, kind: str = "chat", *,
                   accepted: bool = False, run: str = "") -> Checked:
    """Compare `endpoint`'s fingerprint with the one recorded for its identity (see
    `verify_attached`); record it when none is."""
    record_path = (*RECORDS, f"{_record_key(endpoint.identity, kind)}.json")
    record = store.read_json(*record_path) if store.exists(*record_path) else None
    try:
        seen = _probe(endpoint, kind, want=record)
    except ProbeUnanswered as exc:
        return Checked(alias, endpoint.identity, "unchecked", None, note=str(exc))
    if record is None:
        store.write_json(_new_record(alias, endpoint, kind, seen), *record_path)
        return Checked(alias, endpoint.identity, "recorded", seen.value)
    old = record["fingerprint"]
    if _matches(record, seen):
        return _ACCEPTED.get((store.path(*record_path), old)) or Checked(alias, endpoint.identity, "same", old)
    if not accepted:
        raise ModelChanged(_changed_message(alias, endpoint, record, seen))
    store.write_json(_accepted_record(record, alias, seen, run), *record_path)
    checked = Checked(alias, endpoint.identity, "accepted", seen.value, previous=old)
    _ACCEPTED[(store.path(*record_path), seen.value)] = checked
    return checked


def _matches(record: dict[str, Any], seen: Fingerprint) -> bool:
    """Whether a probe is the recorded model's: the same fingerprint, or an answer within
    `same_answer` of the recorded one."""
    return seen.value == record["fingerprint"] or same_answer(record.get("answer"), seen.answer)


def same_answer(recorded: dict[str, Any] | None, seen: dict[str, Any]) -> bool:
    """Whether two probe answers are one model's though their hashes differ: the same model name,
    text (scores) and finish reason, and every rounded logprob (score) at most one rounding step
    apart. Batch noise moves a value by ~1e-3, which now and then crosses a rounding boundary
    (-0.149 and -0.151 round to -0.1 and -0.2: 8 tokens, a few % of probes on a busy server); a
    different model changes the text or moves the values by far more."""
    if not isinstance(recorded, dict) or recorded.keys() != seen.keys():
        return False
    step = 10.0 ** -LOGPROB_DECIMALS + 1e-9
    for key in recorded:
        old, new = recorded[key], seen[key]
        if key in ("logprobs", "scores") and old and new:
            flat_old, flat_new = _numbers(old), _numbers(new)
            if len(flat_old) != len(flat_new) or not all(_close(a, b, step) for a, b in zip(flat_old, flat_new)):
                return False
        elif old != new:
            return False
    return True


def _close(a: Any, b: Any, step: float) -> bool:
    numbers = isinstance(a, (int, float)) and isinstance(b, (int, float))
    return abs(a - b) <= step if numbers else a == b


def _numbers(nested: Any) -> list[Any]:
    """The leaves of a nested list: tokens (str) and rounded values (float)."""
    if isinstance(nested, list):
        return [leaf for item in nested for leaf in _numbers(item)]
    return [nested]


def _record_key(identity: str, kind: str) -> str:
    # the probe kind too: one server probed as a chat model and as a classifier answers both
    return hashlib.sha256(f"{identity}\0{kind}".encode()).hexdigest()[:16]


def _probe(endpoint: Endpoint, kind: str, want: dict[str, Any] | None) -> Fingerprint:
    """The endpoint's fingerprint: one that matches the recorded probe `want` (its fingerprint,
    or an answer within `same_answer`) if any probe of this process (within PROBE_TTL_S) gave
    it, probing again while fewer than MAX_PROBES were made; else the latest probe. Raises
    ProbeUnanswered when no probe got an answer."""
    key = (endpoint.base_url, endpoint.model, endpoint.identity, kind,
           hashlib.sha256(endpoint.api_key.get_secret_value().encode()).hexdigest())
    with _PROBES_LOCK:
        now = time.monotonic()
        seen = [(t, fp) for t, fp in _PROBES.get(key, []) if now - t < PROBE_TTL_S]
        _PROBES[key] = seen
    while not seen or (want is not None and not any(_matches(want, fp) for _, fp in seen) and len(seen) < MAX_PROBES):
        try:
            seen.append((time.monotonic(), fingerprint(endpoint, kind)))
        except ProbeUnanswered:
            if not seen:
                raise
            break  # a mismatch already seen stands
    match = [fp for _, fp in seen if want is not None and _matches(want, fp)]
    return match[0] if match else seen[-1][1]


def _who() -> str:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no user name in a container without a passwd entry
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _new_record(alias: str, endpoint: Endpoint, kind: str, seen: Fingerprint) -> dict[str, Any]:
    return {"identity": endpoint.identity, "alias": alias, "base_url": endpoint.base_url, "model": endpoint.model,
            "probe": kind, "fingerprint": seen.value, "answer": seen.answer,
            "recorded_at": _now(), "recorded_by": _who(), "accepted_changes": []}


def _accepted_record(record: dict[str, Any], alias: str, seen: Fingerprint, run: str) -> dict[str, Any]:
    change = {"alias": alias, "old": record["fingerprint"], "new": seen.value, "old_answer": record.get("answer"),
              "new_answer": seen.answer, "at": _now(), "by": _who(), "run": run}
    return {**record, "fingerprint": seen.value, "answer": seen.answer,
            "accepted_changes": [*record.get("accepted_changes", []), change]}


def _changed_message(alias: str, endpoint: Endpoint, record: dict[str, Any], seen: Fingerprint) -> str:
    what = "the reward model" if alias == REWARD_ALIAS else f"agent {alias!r}"
    return (f"{what} at {endpoint.base_url} (model {endpoint.model!r}) answers differently from when its "
            f"recorded calls were made: fingerprint {record['fingerprint']} recorded {record.get('recorded_at', '?')}, "
            f"now {seen.value} (probe answer then {_said(record.get('answer'))}, now {_said(seen.answer)}). "
            f"Replaying those calls would pass the old model's answers off as this one's, so nothing was run. "
            f"If a different model is served there on purpose, declare it: set `revision` on the endpoint "
            f"(new calls, nothing replayed); or, to replay the recorded calls anyway, accept the change with "
            f"--accept-changed-model {alias} (run file: accept_changed_models = [\"{alias}\"]); "
            f"the acceptance is recorded in the results root under {'/'.join(RECORDS)}/.")


def _said(answer: Any) -> str:
    if not isinstance(answer, dict):
        return "unknown"
    shown = answer.get("text") if "text" in answer else answer.get("scores")
    return repr(shown)[:60]
