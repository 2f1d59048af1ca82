"""synthetic/video.py: the clips hold what their truth says, and the decoder finds its shot
boundaries as scene changes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flickd.core.settings import Settings
from flickd.fetching.video import SampledFrame, VideoLimits, open_video
from synthetic.catalog import Catalog
from synthetic.video import SUFFIXES, ClipTruth, catalog_images, make_clip
from tests.conftest import catalog_fixture

catalog = catalog_fixture(5, seed=5, dirname="synthetic_video_catalog")

LIMITS = VideoLimits.from_settings(Settings())
SAMPLE_GAP = 1 / LIMITS.max_fps  # one sampled frame


def _images(catalog: Catalog) -> list[tuple[str, Image.Image]]:
    return catalog_images(catalog)


@pytest.fixture(scope="module", params=["h264", "vp9"])
def clip(
    request: pytest.FixtureRequest, catalog: Catalog, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ClipTruth, list[SampledFrame]]:
    codec = request.param
    path = tmp_path_factory.mktemp("clip") / f"clip{SUFFIXES[codec]}"
    truth = make_clip(_images(catalog), path, codec=codec, seed=7)
    with open_video(path, LIMITS) as video:
        frames = list(video.frames())
    return truth, frames


def test_the_truth_describes_the_clip(clip: tuple[ClipTruth, list[SampledFrame]]) -> None:
    truth, _ = clip
    shots = truth.shots
    assert len(shots) == 5 and shots[0].start_s == 0.0
    assert shots[-1].end_s == pytest.approx(truth.duration_s)
    assert truth.frames == round(truth.duration_s * truth.fps)
    for shot in shots:
        assert 1.0 - 1 / truth.fps <= shot.end_s - shot.start_s <= 3.0 + 1 / truth.fps
    kinds = [t.kind for t in truth.transitions]
    assert kinds.count("fade") >= 1 and kinds.count("cut") >= 1
    for before, after, transition in zip(shots[:-1], shots[1:], truth.transitions, strict=True):
        if transition.kind == "cut":  # back to back
            assert after.start_s == pytest.approx(before.end_s) == transition.start_s
        else:  # the fade belongs to both shots
            assert after.start_s == transition.start_s < transition.end_s == before.end_s
            middle = (transition.start_s + transition.end_s) / 2
            assert truth.products_at(middle) == [before.product_id, after.product_id]


def test_each_shot_boundary_is_a_scene_change_within_one_sampled_frame(
    clip: tuple[ClipTruth, list[SampledFrame]],
) -> None:
    truth, frames = clip
    changes = [f.timestamp for f in frames if f.scene_change]
    assert changes[0] == 0.0
    for transition in truth.transitions:
        near = [
            t
            for t in changes
            if transition.start_s - SAMPLE_GAP <= t <= transition.end_s + SAMPLE_GAP
        ]
        assert near, f"no scene change near the {transition.kind} at {transition.start_s:.2f} s"
        if transition.kind == "cut":  # the new shot's very first frame
            assert transition.start_s == pytest.approx(
                min(near, key=lambda t: abs(t - transition.start_s)), abs=1e-3
            )
    # ... and nothing else is one: no scene change inside a shot's pan or zoom.
    for t in changes[1:]:
        assert any(
            tr.start_s - SAMPLE_GAP <= t <= tr.end_s + SAMPLE_GAP for tr in truth.transitions
        ), f"a scene change at {t:.2f} s, inside a shot"
    fades = [tr for tr in truth.transitions if tr.kind == "fade"]
    assert len(changes) <= 1 + len(truth.transitions) + len(fades)  # a fade: start and settle


def _centre(image: Image.Image, share: float) -> np.ndarray:
    """Mean colour of the centre ``share`` x ``share`` of the image."""
    w, h = image.size
    box = (round(w * (1 - share) / 2), round(h * (1 - share) / 2),
           round(w * (1 + share) / 2), round(h * (1 + share) / 2))  # fmt: skip
    return np.asarray(image.convert("RGB").crop(box), dtype=np.float32).reshape(-1, 3).mean(0)


def test_the_decoded_frames_show_the_product_the_truth_names(
    clip: tuple[ClipTruth, list[SampledFrame]], catalog: Catalog
) -> None:
    truth, frames = clip
    products = dict(_images(catalog))
    # The middle of the frame is the middle of the product image (placed at 78 % of the frame
    # height, centred, panned by at most 6 % of the width).
    centres = {pid: _centre(im, 0.2) for pid, im in products.items()}
    checked = 0
    for frame in frames:
        # By frame number: WebM timestamps are rounded to milliseconds, a cut's is not.
        on_screen = truth.products_at(frame.frame_number / truth.fps)
        if len(on_screen) != 1:
            continue  # mid-fade
        seen = _centre(frame.image, 0.2 * 0.78)
        nearest = min(centres, key=lambda pid: float(np.abs(centres[pid] - seen).sum()))
        assert nearest == on_screen[0], f"at {frame.timestamp:.2f} s"
        checked += 1
    assert checked >= len(frames) - 3


def test_gif_and_mov_clips_match_the_same_truth(catalog: Catalog, tmp_path: Path) -> None:
    images = catalog_images(catalog, ["p000002", "p000000", "p000004"])
    assert [pid for pid, _ in images] == ["p000002", "p000000", "p000004"]
    truths = [
        make_clip(images, tmp_path / f"c{SUFFIXES[c]}", codec=c, size=(160, 120), seed=3)
        for c in ("mov", "gif")
    ]
    assert truths[0].shots == truths[1].shots
    for truth in truths:
        with open_video(truth.path, LIMITS) as video:
            frames = list(video.frames())
            assert video.report.frames_decoded == truth.frames
        cuts = truth.cut_times()
        assert cuts and all(
            any(f.scene_change and abs(f.timestamp - cut) <= 0.011 for f in frames) for cut in cuts
        )


def test_the_seed_decides_the_clip(catalog: Catalog, tmp_path: Path) -> None:
    images = _images(catalog)[:3]
    a = make_clip(images, tmp_path / "a.mp4", seed=1, size=(64, 48))
    b = make_clip(images, tmp_path / "b.mp4", seed=1, size=(64, 48))
    c = make_clip(images, tmp_path / "c.mp4", seed=2, size=(64, 48))
    assert a.shots == b.shots and a.transitions == b.transitions
    assert a.shots != c.shots
