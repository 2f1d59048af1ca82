"""Once-per-process model loading for workers.

Models are loaded on first use, never at import time, and cached per (kind, name, device).

Fork safety: a CUDA context does not survive ``fork()``, and a model loaded in a parent is
duplicated, copy-on-write, into every child. So models must be loaded *in the worker process*
(Celery's prefork children, after the fork), never in the parent before it forks: the first task
in each child pays the load. As a safety net, a forked child starts with an empty cache and a
fresh lock (a lock held by a loading thread at fork time would otherwise stay locked forever in
the child); the models it inherited are kept referenced but never used, because freeing CUDA
memory through a context that belongs to the parent is itself unsafe.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from flickd.core.storage import STORE_PREFIX, storage_for
from models.device import select_device, set_mixed_precision

if TYPE_CHECKING:
    from flickd.core.settings import Settings
    from models.detector import Detector
    from models.embedder import Embedder
    from models.query_text import TextQueryEncoder

log = logging.getLogger(__name__)

DETECTION_OFF = "none"

_cache: dict[tuple[str, str, str], Any] = {}
_lock = threading.Lock()  # threaded workers must not load the same model twice
_inherited: list[Any] = []  # models a forked child got from its parent: kept, never used


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    _inherited.extend(_cache.values())
    _cache.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _cached(
    kind: str, name: str, device_setting: str | None, load: Callable[[str, torch.device], Any]
) -> Any:
    device = select_device(device_setting)
    key = (kind, name, str(device))
    with _lock:
        if key not in _cache:
            log.info("loading %s %s on %s (pid %d)", kind, name, device, os.getpid())
            _cache[key] = load(name, device)
        return _cache[key]


def get_detector(settings: Settings) -> Detector | None:
    """The process's detector, or None when detection is off (``FLICKD_DETECTOR_MODEL=none``):
    every image then yields one whole-image crop."""
    set_mixed_precision(settings.mixed_precision)
    name = settings.detector_model.strip()
    if name.lower() == DETECTION_OFF:
        return None

    def load(name: str, device: torch.device) -> Detector:
        from models.detector import Detector

        return Detector(
            name,
            device=device,
            threshold=settings.detection_threshold,
            batch_size=settings.analyze_batch_size,
        )

    detector: Detector = _cached("detector", name, settings.device, load)
    # The threshold is a per-call knob, not part of the weights: follow the current settings.
    detector.threshold = settings.detection_threshold
    return detector


def get_embedder(settings: Settings) -> Embedder:
    """The process's CLIP embedder named by the settings (the base model)."""
    return get_embedder_by_name(settings.embedding_model, settings)


def get_embedder_by_name(name: str, settings: Settings) -> Embedder:
    """A CLIP embedder by hub id, directory, or ``store:<key>`` (a fine-tuned version in the
    storage, fetched through the local cache), cached."""
    set_mixed_precision(settings.mixed_precision)

    def load(name: str, device: torch.device) -> Embedder:
        from models.embedder import Embedder

        files = stored_model_dir(name, settings)
        return Embedder(name, device=device, batch_size=settings.analyze_batch_size, files=files)

    return _cached("embedder", name.strip(), settings.device, load)


def get_text_query_encoder(name: str, settings: Settings) -> TextQueryEncoder:
    """The query text encoder (models/query_text.py: a bf16 text tower where the CPU has bf16)
    over the embedder ``name`` names, cached beside it."""
    embedder = get_embedder_by_name(name, settings)
    precision = settings.query_text_precision

    def load(_name: str, _device: torch.device) -> TextQueryEncoder:
        from models.query_text import TextQueryEncoder

        return TextQueryEncoder(embedder, precision)

    return _cached(f"query-text-{precision}", name.strip(), settings.device, load)


def stored_model_dir(name: str, settings: Settings) -> Path | None:
    """A local copy of the model version ``store:<key>`` names (None for any other name)."""
    if not name.startswith(STORE_PREFIX):
        return None
    return storage_for(settings).fetch_dir(name.removeprefix(STORE_PREFIX))


def local_model(name: str, settings: Settings) -> str:
    """What ``from_pretrained`` can load for a model name: a stored version's local copy."""
    files = stored_model_dir(name, settings)
    return str(files) if files is not None else name


def clear() -> None:
    """Drop every cached model (tests; freeing GPU memory before loading others)."""
    with _lock:
        _cache.clear()
