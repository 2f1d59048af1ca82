"""Which torch device the vision models run on, and the mixed precision that goes with it."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

_logged: set[str] = set()
_logged_lock = threading.Lock()


class DeviceUnavailableError(RuntimeError):
    """The configured device (``FLICKD_DEVICE``) does not exist on this machine."""


def select_device(setting: str | None = None) -> torch.device:
    """The device to run on: ``setting`` when given (``"cpu"``, ``"cuda"``, ``"cuda:1"``), else CUDA
    when present, else CPU.

    An explicit CUDA setting on a machine without it raises instead of silently falling back: a GPU
    worker quietly running on CPU would look healthy while being a hundred times slower.
    """
    if setting is not None and setting.strip():
        device = torch.device(setting.strip())
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise DeviceUnavailableError(f"FLICKD_DEVICE={setting!r} but CUDA is not available")
            index = device.index if device.index is not None else 0
            if index >= torch.cuda.device_count():
                raise DeviceUnavailableError(
                    f"FLICKD_DEVICE={setting!r} but only {torch.cuda.device_count()} CUDA device(s)"
                )
        source = "FLICKD_DEVICE"
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        source = "auto"
    _log_once(device, source)
    return device


def _log_once(device: torch.device, source: str) -> None:
    key = f"{device}/{source}"
    with _logged_lock:
        if key in _logged:
            return
        _logged.add(key)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        log.info("vision models run on %s (%s, %s)", device, name, source)
    else:
        log.info("vision models run on %s (%s)", device, source)


_mixed_precision = True  # process-wide policy, set from settings when models are loaded


def set_mixed_precision(enabled: bool) -> None:
    """Turn reduced precision on CUDA on or off for this process (FLICKD_MIXED_PRECISION)."""
    global _mixed_precision
    _mixed_precision = enabled


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced-precision dtype used on ``device``, or None for full float32 (CPU, or
    mixed precision turned off).

    bf16 where the GPU supports it (Ampere and later): same exponent range as float32, so no
    overflow in attention logits; fp16 on older cards.
    """
    if device.type != "cuda" or not _mixed_precision:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@contextlib.contextmanager
def autocast_context(device: torch.device) -> Iterator[None]:
    """Mixed precision on CUDA, nothing on CPU (CPU autocast is slower than float32 there)."""
    dtype = autocast_dtype(device)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type="cuda", dtype=dtype):
        yield


_BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16"}


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (the Linux CPU flags say so)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return bool(_BF16_CPU_FLAGS & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False
