from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.build import (
    SPECS,
    build_clip_tokenizer,
    build_offline_models,
    learn_bpe,
    main,
    parameter_counts,
)
from models.loading import fingerprint_dir
from tests.models_fixtures import tiny_models, torch_single_thread

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_learn_bpe_is_deterministic_and_complete() -> None:
    words = ["navy", "blue", "cardigan", "shoes", "shoe", "aaa", "a", "an"]
    merges = learn_bpe(words)
    assert merges == learn_bpe(reversed(words))
    tokenizer = build_clip_tokenizer(words)
    for word in words:
        assert tokenizer.tokenize(word) == [f"{word}</w>"]


def test_tiny_models_are_saved_loadable_dirs(tiny_models: dict[str, Path]) -> None:
    detector, clip = tiny_models["detector"], tiny_models["clip"]
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert (detector / name).is_file()
        assert (clip / name).is_file()
    assert (clip / "tokenizer.json").is_file()
    config = json.loads((detector / "config.json").read_text())
    assert config["model_type"] == "yolos" and config["id2label"]["23"] == "shoe"
    counts = parameter_counts(tiny_models)
    assert 0 < counts["detector"] < 200_000 and 0 < counts["clip"] < 500_000


def test_same_seed_same_weights(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    again = build_offline_models(tmp_path / "again", "tiny", seed=0)
    for kind in ("detector", "clip"):
        assert fingerprint_dir(again[kind]) == fingerprint_dir(tiny_models[kind])


def test_base_spec_matches_the_real_architectures() -> None:
    base = SPECS["base"]
    assert (base.det_hidden, base.det_layers, base.det_heads, base.det_tokens) == (384, 12, 6, 100)
    assert base.det_image_size == (512, 864)
    assert (base.vis_hidden, base.vis_layers, base.vis_patch, base.vis_image) == (768, 12, 32, 224)
    assert (base.txt_hidden, base.txt_layers, base.projection) == (512, 12, 512)


def test_cli_builds_another_seed(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    tiny_models: dict[str, Path],
) -> None:
    assert main([str(tmp_path / "m"), "--size", "tiny", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    detector = tmp_path / "m" / "detector"
    assert f"FLICKD_DETECTOR_MODEL={detector}" in out
    assert fingerprint_dir(detector) != fingerprint_dir(tiny_models["detector"])


def test_unknown_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="size"):
        build_offline_models(tmp_path, "huge")  # type: ignore[arg-type]
