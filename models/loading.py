"""How a model setting (hub id or local directory) is resolved, loaded and fingerprinted.

Shared by the detector and the embedder so that a hub model and a locally built one take exactly
the same code path.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")

# Files whose bytes define a model's behaviour; everything else in a model directory (READMEs,
# training args) may change without changing a single output.
_FINGERPRINT_SUFFIXES = (".json", ".safetensors", ".bin", ".txt", ".model")


class ModelLoadError(RuntimeError):
    """A configured model cannot be loaded: missing directory, unknown hub id, no network."""


def looks_like_path(name_or_dir: str | os.PathLike[str]) -> bool:
    """True for settings meant as a filesystem path rather than a hub id.

    Hub ids are ``owner/name`` or ``name``; anything absolute, relative with ``./`` or ``../``,
    home-relative, or an existing directory is a path. Deciding this up front lets a typo in a
    path fail with "no such directory" instead of a confusing hub lookup of ``/models/clip``.
    """
    text = os.fspath(name_or_dir)
    if isinstance(name_or_dir, Path) or Path(text).expanduser().is_dir():
        return True
    return text.startswith(("/", "./", "../", "~", ".\\")) or text.count("/") > 1


def pretrained_kwargs(name_or_dir: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """The ``from_pretrained`` argument and keyword arguments for a setting.

    A local directory is loaded with ``local_files_only=True`` so that a missing file there is an
    error rather than a silent download attempt.
    """
    if looks_like_path(name_or_dir):
        path = Path(os.fspath(name_or_dir)).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"model directory {path} does not exist")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a model directory (no config.json)")
        return str(path.resolve()), {"local_files_only": True}
    return os.fspath(name_or_dir), {}


def quiet_progress_bars() -> None:
    """Weight loading and saving draw progress bars on the terminal; they are chatter unless
    the ``models`` log is at DEBUG."""
    if logging.getLogger("models").isEnabledFor(logging.DEBUG):
        return
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_pretrained(loader: Callable[..., T], name_or_dir: str, what: str, **kwargs: Any) -> T:
    """``loader(name_or_dir, **kwargs)`` with failures turned into one clear ``ModelLoadError``."""
    quiet_progress_bars()
    try:
        return loader(name_or_dir, **kwargs)
    except (OSError, ValueError) as exc:
        hint = (
            ""
            if kwargs.get("local_files_only")
            else " (hub ids need network access or a warm Hugging Face cache; offline, build local"
            " models with `flickd models build DIR` and point the setting at DIR/detector or"
            " DIR/clip)"
        )
        reason = " ".join(str(exc).split())  # one line: the hub's messages span several
        raise ModelLoadError(f"cannot load {what} from {name_or_dir!r}: {reason}{hint}") from exc


def resize_rule(processor: Any, min_side: int = 1) -> tuple[int, int | None, int]:
    """``(shortest_edge, longest_edge or None, min_side)``: how an image processor resizes
    (``flickd.fetching.geometry.ResizeRule``), read from its ``size`` (a dict, or transformers
    5's ``SizeDict``). A fixed output size reads as its short and long side, no minimum."""
    size = processor.size

    def get(key: str) -> int | None:
        value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        return int(value) if value else None

    shortest, longest = get("shortest_edge"), get("longest_edge")
    if shortest:
        return shortest, longest, min_side
    height, width = get("height") or get("max_height"), get("width") or get("max_width")
    if height and width:
        return min(height, width), max(height, width), 0
    raise ModelLoadError(f"unsupported image processor size {size!r}")


def fingerprint_dir(directory: Path) -> str:
    """sha256 over the files of a model directory that define its behaviour."""
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if not path.is_file() or not path.name.endswith(_FINGERPRINT_SUFFIXES):
            continue
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _hash_state_dict(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _hub_commit(repo_id: str) -> str | None:
    """The commit of the cached snapshot a hub model was loaded from (``…/snapshots/<sha>/``)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a transformers dependency
        return None
    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return Path(cached).parent.name
    return None


def model_version(name_or_dir: str, loaded_from: str, model: torch.nn.Module) -> str:
    """A string that changes whenever the weights do: ``<setting>@<12 hex>``.

    Local directories hash their config and weight files; hub models use the cached snapshot's
    commit; anything else hashes the loaded parameters. Stored next to every embedding so an
    index never mixes vectors from two different models.
    """
    path = Path(loaded_from)
    if path.is_dir():
        tag = fingerprint_dir(path)[:12]
    else:
        tag = (_hub_commit(loaded_from) or _hash_state_dict(model))[:12]
    return f"{name_or_dir}@{tag}"
