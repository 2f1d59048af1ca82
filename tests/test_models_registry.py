from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from flickd.core.settings import Settings
from models import registry
from models.device import DeviceUnavailableError, autocast_context, autocast_dtype, select_device
from models.loading import ModelLoadError, looks_like_path
from tests.models_fixtures import tiny_models, torch_single_thread

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(autouse=True)
def _empty_registry() -> Iterator[None]:
    registry.clear()
    yield
    registry.clear()


def _settings(models: dict[str, Path], **overrides: object) -> Settings:
    values: dict[str, object] = {
        "device": "cpu",
        "detector_model": str(models["detector"]),
        "embedding_model": str(models["clip"]),
        **overrides,
    }
    return Settings(**values)  # type: ignore[arg-type]


def test_loaded_once_per_process(tiny_models: dict[str, Path]) -> None:
    settings = _settings(tiny_models)
    detector = registry.get_detector(settings)
    embedder = registry.get_embedder(settings)
    assert detector is not None
    assert registry.get_detector(settings) is detector
    assert registry.get_embedder(settings) is embedder
    assert detector.device == torch.device("cpu")


def test_threshold_follows_settings(tiny_models: dict[str, Path]) -> None:
    first = registry.get_detector(_settings(tiny_models, detection_threshold=0.5))
    second = registry.get_detector(_settings(tiny_models, detection_threshold=0.8))
    assert first is second and second is not None and second.threshold == 0.8


def test_detection_off(tiny_models: dict[str, Path]) -> None:
    assert registry.get_detector(_settings(tiny_models, detector_model="none")) is None
    assert registry.get_detector(_settings(tiny_models, detector_model=" None ")) is None


def test_forked_child_starts_empty(tiny_models: dict[str, Path]) -> None:
    settings = _settings(tiny_models)
    parent = registry.get_embedder(settings)
    registry._after_fork_in_child()  # what os.fork() runs in the child
    child = registry.get_embedder(settings)
    assert child is not parent
    assert registry.get_embedder(settings) is child


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_hook_is_registered(tiny_models: dict[str, Path]) -> None:
    settings = _settings(tiny_models)
    registry.get_detector(settings)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report the inherited cache size, touch nothing else
        os.write(write, str(len(registry._cache)).encode())
        os._exit(0)
    os.close(write)
    reported = os.read(read, 16).decode()
    os.waitpid(pid, 0)
    assert reported == "0" and len(registry._cache) == 1


def test_missing_model_path_is_a_clear_error(tmp_path: Path) -> None:
    settings = Settings(device="cpu", detector_model=str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        registry.get_detector(settings)
    settings = Settings(device="cpu", embedding_model="./no/such/clip")
    with pytest.raises(ModelLoadError, match="does not exist"):
        registry.get_embedder(settings)


def test_paths_and_hub_ids_are_told_apart(tmp_path: Path) -> None:
    assert looks_like_path(tmp_path)
    assert looks_like_path("/models/clip") and looks_like_path("./clip")
    assert looks_like_path("a/b/c")
    assert not looks_like_path("openai/clip-vit-base-patch32")
    assert not looks_like_path("valentinafeve/yolos-fashionpedia")


def test_select_device() -> None:
    assert select_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device(None).type == expected
    assert select_device("").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_explicit_cuda_without_cuda_fails_loudly() -> None:
    with pytest.raises(DeviceUnavailableError):
        select_device("cuda")


def test_autocast_only_on_cuda() -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu) is None
    with autocast_context(cpu):
        out = torch.ones(2, 2) @ torch.ones(2, 2)
    assert out.dtype == torch.float32
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        with autocast_context(cuda):
            out = torch.ones(2, 2, device=cuda) @ torch.ones(2, 2, device=cuda)
        assert out.dtype == autocast_dtype(cuda)


def test_unknown_hub_id_offline_is_a_clear_error() -> None:
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("online, an unknown hub id means minutes of retries; run with HF_HUB_OFFLINE=1")
    settings = Settings(device="cpu", embedding_model="nobody/no-such-clip")
    # The hint names the command that builds offline stand-ins (it used to name a module path
    # that does not exist).
    with pytest.raises(ModelLoadError, match=r"(?s)nobody/no-such-clip.*`flickd models build DIR`"):
        registry.get_embedder(settings)


def test_mixed_precision_setting_turns_autocast_off_for_cuda():
    import torch

    from models.device import autocast_dtype, set_mixed_precision

    try:
        set_mixed_precision(False)
        assert autocast_dtype(torch.device("cuda")) is None  # full float32 when asked
        set_mixed_precision(True)
        assert autocast_dtype(torch.device("cpu")) is None  # never on CPU
    finally:
        set_mixed_precision(True)
