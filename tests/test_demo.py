"""`flickd demo`, the README's one-command main job, end to end on the embedded default."""

from __future__ import annotations

from flickd.core.settings import Settings
from tests.conftest import run_flickd, settings_env


def test_demo_command_runs_everything_and_writes_a_report(tmp_path):
    env = settings_env(Settings())
    out = run_flickd(
        "demo", "--out", str(tmp_path / "demo"), "--products", "40", env=env, timeout=600
    )
    assert "fine-tuned CLIP" in out.stdout
    image_lines = [line for line in out.stdout.splitlines() if "'image of " in line]
    assert len(image_lines) == 3
    for line in image_lines:  # a catalog image finds its own product, as an exact match
        expected = line.split("'image of ")[1].split("'")[0]
        assert f": {expected} " in line and line.endswith("exact"), line
    report = (tmp_path / "demo" / "report.html").read_text()
    assert "Fine-tuning" in report and report.count("<figure>") >= 20
