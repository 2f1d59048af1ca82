"""Tracks: detections of one item across sampled frames become one track (models/tracks.py)."""

from __future__ import annotations

import numpy as np
import pytest

from models.tracks import Observation, Tracker, box_iou, build_tracks

RULES = {"min_iou": 0.3, "min_similarity": 0.85, "max_gap": 2}


def _unit(seed: int, dim: int = 32) -> np.ndarray:
    vector = np.random.default_rng(seed).normal(size=dim)
    return vector / np.linalg.norm(vector)


def _near(vector: np.ndarray, seed: int, noise: float = 0.1) -> np.ndarray:
    """``vector`` seen again: a little noise, cosine well above 0.85."""
    noisy = vector + noise * np.random.default_rng(seed).normal(size=vector.shape) / 5
    return noisy / np.linalg.norm(noisy)


def _box(x: float, y: float = 100.0, w: float = 80.0, h: float = 160.0):
    return (x, y, x + w, y + h)


def _members(tracks, observations) -> list[list[int]]:
    """Each track as the frames of its members (a frame appears once per track)."""
    return [[observations[m].frame for m in track.members] for track in tracks]


def test_two_items_crossing_keep_their_tracks():
    """A walks fast (50 px a frame) past B, who stands still: around the crossing B's box
    overlaps A's last box more than A's own next box does, so overlap alone would swap them;
    their looks keep them apart."""
    a, b = _unit(1), _unit(2)
    frames = []
    observations: list[Observation] = []
    for f in range(9):
        pair = [
            Observation(f, _box(260.0), "upperbody", _near(b, 100 + f)),  # B listed first
            Observation(f, _box(60.0 + 50 * f), "upperbody", _near(a, 200 + f)),
        ]
        observations += pair
        frames.append((f, False, pair))
    # The trap is real: at frame 5 A's last box (frame 4, x=260) is B's box, A is at x=310.
    assert box_iou(_box(260.0), _box(260.0)) > box_iou(_box(260.0), _box(310.0))
    tracks = build_tracks(frames, **RULES)
    assert len(tracks) == 2
    for track in tracks:
        assert track.frames == list(range(9))
        looks = {
            bool(observations[m].vector @ a > observations[m].vector @ b) for m in track.members
        }
        assert len(looks) == 1, "a track mixes A and B"
    assert {bool(t.query_vector @ a > t.query_vector @ b) for t in tracks} == {True, False}


def test_crossing_with_equal_looks_goes_by_overlap():
    """Two items that look alike are told apart by where their boxes are."""
    look = _unit(3)
    tracker = Tracker(**RULES)
    left, right = [], []
    for f in range(5):
        ids = tracker.add_frame(
            f,
            [
                Observation(f, _box(400.0 + 5 * f), "shoe", _near(look, 10 + f, 0.01)),
                Observation(f, _box(10.0 + 5 * f), "shoe", _near(look, 20 + f, 0.01)),
            ],
        )
        right.append(ids[0])
        left.append(ids[1])
    assert len(set(right)) == len(set(left)) == 1 and right[0] != left[0]


def test_item_gone_for_a_short_gap_rejoins_its_track_a_longer_one_starts_a_new_track():
    look = _unit(4)
    present = [0, 1, 4, 5, 9]  # gap of 2 frames (2, 3): rejoins; gap of 3 (6-8): new track
    observations = [Observation(f, _box(100), "dress", _near(look, f)) for f in present]
    frames = [(f, False, [o for o in observations if o.frame == f]) for f in range(10)]
    tracks = build_tracks(frames, **RULES)
    assert _members(tracks, observations) == [[0, 1, 4, 5], [9]]


def test_item_returning_elsewhere_rejoins_by_its_look():
    look = _unit(5)
    observations = [
        Observation(0, _box(10), "bag", _near(look, 0)),
        Observation(2, _box(500), "bag", _near(look, 1)),  # no overlap at all, same look
    ]
    frames = [(0, False, observations[:1]), (1, False, []), (2, False, observations[1:])]
    (track,) = build_tracks(frames, **RULES)
    assert track.frames == [0, 2]


def test_labels_that_differ_never_join_however_alike():
    look = _unit(6)
    observations = [
        Observation(0, _box(100), "upperbody", look),
        Observation(1, _box(100), "lowerbody", look),  # same box, same vector, other label
        Observation(2, _box(100), "lowerbody", look),
        Observation(3, (0.0, 0.0, 640.0, 360.0), None, look, whole_image=True),
        Observation(4, (0.0, 0.0, 640.0, 360.0), "lowerbody", look, whole_image=True),
    ]
    frames = [(o.frame, False, [o]) for o in observations]
    tracks = build_tracks(frames, **RULES)
    assert _members(tracks, observations) == [[0], [1, 2], [3], [4]]


def test_a_scene_cut_splits_a_track():
    look = _unit(7)
    observations = [Observation(f, _box(100), "dress", look) for f in range(4)]
    frames = [(o.frame, o.frame == 2, [o]) for o in observations]  # a cut at frame 2
    tracks = build_tracks(frames, **RULES)
    assert _members(tracks, observations) == [[0, 1], [2, 3]]


def test_whole_frame_crops_join_by_look_only():
    """A whole-frame crop's box is the frame: after a cross-fade to another product (no cut
    detected) the boxes still coincide, but the look does not."""
    a, b = _unit(8), _unit(9)
    frame_box = (0.0, 0.0, 640.0, 360.0)
    looks = [a, a, a, b, b]
    observations = [
        Observation(f, frame_box, None, _near(v, f), whole_image=True) for f, v in enumerate(looks)
    ]
    tracks = build_tracks([(o.frame, False, [o]) for o in observations], **RULES)
    assert _members(tracks, observations) == [[0, 1, 2], [3, 4]]


def test_unlike_detections_with_overlapping_boxes_join_a_look_alike_without():
    a, b = _unit(10), _unit(11)
    tracker = Tracker(**RULES)
    first = tracker.add_frame(0, [Observation(0, _box(100), "dress", a)])
    # Same place, other look: the boxes overlap (IoU 0.6), so it is taken as the same item.
    second = tracker.add_frame(1, [Observation(1, _box(120), "dress", b)])
    assert second == first
    # Far away and unlike the track's mean (a+b): a new track.
    third = tracker.add_frame(2, [Observation(2, _box(600), "dress", _unit(12))])
    assert third != first


def test_query_vector_is_the_normalised_mean():
    vectors = [_unit(20), _unit(21), _unit(22)]
    observations = [Observation(f, _box(100), "dress", v) for f, v in enumerate(vectors)]
    (track,) = build_tracks(
        [(o.frame, False, [o]) for o in observations], min_iou=0.3, min_similarity=2, max_gap=2
    )
    mean = np.mean(vectors, axis=0)
    np.testing.assert_allclose(track.query_vector, mean / np.linalg.norm(mean), rtol=1e-6)
    assert track.query_vector.dtype == np.float32
    assert np.linalg.norm(track.query_vector) == pytest.approx(1.0, abs=1e-6)


def test_box_iou():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_frames_not_analysed_carry_the_last_analysed_frames_tracks():
    """Video search analyses a shot's first frame and carries its items over the sampled frames
    that did not move: the tracks span those frames, their mean embedding unchanged."""
    a, b = _unit(20), _unit(21)
    tracker = Tracker(**RULES)
    first = [Observation(0, _box(100), "dress", a), Observation(0, _box(400), "upperbody", b)]
    assert tracker.add_frame(0, first, scene_change=True) == [0, 1]
    before = [t.query_vector.copy() for t in tracker.tracks]
    assert tracker.carry(1) == [0, 1]
    assert tracker.carry(2) == [0, 1]
    assert [t.frames for t in tracker.tracks] == [[0, 1, 2], [0, 1, 2]]
    # Members are numbered after the observations so far, two a carried frame here.
    assert [t.members for t in tracker.tracks] == [[0, 2, 4], [1, 3, 5]]
    assert [t.carried for t in tracker.tracks] == [2, 2]
    for track, vector in zip(tracker.tracks, before, strict=True):
        np.testing.assert_array_equal(track.query_vector, vector)
    # More than max_gap carried frames later, the next analysed frame still continues the
    # track: it was last seen in the frame just before.
    for frame in range(3, 7):
        tracker.carry(frame)
    assert tracker.add_frame(7, [Observation(7, _box(110), "dress", _near(a, 7))]) == [0]
    # Only the tracks of the last analysed frame are carried (the top was not seen at 7).
    assert tracker.carry(8) == [0]
    # A scene change on a carried frame ends every track: nothing is carried after it.
    assert tracker.carry(9, scene_change=True) == []
    assert tracker.carry(10) == []
    assert tracker.add_frame(11, [Observation(11, _box(110), "dress", a)]) == [2]
