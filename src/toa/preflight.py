"""Checks of what a run is given that can fail before anything starts: the prompt file is there
and its first rows have the expected shape, local model folders exist, attached endpoints
answer and accept their key. Each problem is a UserError naming the setting and the fix; the CLI
runs these before Prefect starts, the flow again first thing (a deployment run gets the same
message). Endpoints whose key or address lives in a Prefect block are checked when attached.

Only the head of the prompt file is read here (`HEAD_ROWS`); a bad row further down is found by
the prompt-loading task, with the same message.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import fsspec

from toa.config import RunConfig
from toa.errors import UserError
from toa.prompts import display_name, iter_prompts
from toa.rows import Prompt, SkippedRow
from toa.servers.spec import EMBEDDED_PREFIX

HEAD_ROWS = 100


class MissingInput(UserError, FileNotFoundError):
    """A file or folder the config names does not exist."""


def check_inputs(cfg: RunConfig) -> None:
    check_prompt_source(cfg)
    check_model_folders(cfg)
    check_endpoints(cfg)


def check_prompt_source(cfg: RunConfig) -> None:
    src = cfg.prompts
    try:
        fs, path = fsspec.core.url_to_fs(src.path, **src.storage_options)
        exists = fs.exists(path)
    except (OSError, ValueError, ImportError) as exc:
        raise MissingInput(f"prompts.path: cannot open {src.path!r}: {type(exc).__name__}: {exc}") from None
    if not exists:
        raise MissingInput(f"prompts.path: no such file {src.path!r}; give an existing JSONL, CSV or Parquet "
                           "file (--set prompts.path=FILE, or prompts.path in the run file)")
    head = list(islice(iter_prompts(src.model_copy(update={"limit": None})), HEAD_ROWS))  # fail mode raises here
    skipped = [item for item in head if isinstance(item, SkippedRow)]
    if head and not any(isinstance(item, Prompt) for item in head):
        first = skipped[0]
        raise UserError(f"{display_name(first.source)}:{first.line}: {first.reason} (and the next {len(head) - 1} rows "
                        "are bad too: is this the right file, and prompts.text_field the right field?)")


def check_model_folders(cfg: RunConfig) -> None:
    """A launch model given as a local path must be a folder (a hub id such as 'org/name' is
    left to vLLM)."""
    for agent in cfg.agents:
        model = agent.launch.model if agent.launch else None
        if model is None or model.startswith(EMBEDDED_PREFIX) or not model.startswith(("/", "./", "../", "~")):
            continue
        if not Path(model).expanduser().is_dir():
            raise MissingInput(f"agents.{agent.alias}.launch.model: no such model folder {model!r}")


def check_endpoints(cfg: RunConfig) -> None:
    from toa.servers.attach import attach, probe

    for agent in cfg.agents:
        if agent.endpoint is not None and agent.endpoint.api_key_block is None:
            probe(attach(agent.alias, agent.endpoint))
