"""Join the detections of one item in nearby sampled frames of a video into a track.

A detection continues a track when their labels agree (coarse label, and both detected or both
whole-frame crops) and either their boxes overlap (IoU ≥ ``min_iou``) or their embeddings are
alike (cosine with the track's mean ≥ ``min_similarity``), at most ``max_gap`` sampled frames
after the track was last seen. A whole-frame crop's box is the frame itself and says nothing
about what is in it, so such crops are joined by their embeddings alone. A scene change ends
every track: nothing continues across a cut.

Each frame's detections are assigned to the open tracks by the Hungarian method
(``scipy.optimize.linear_sum_assignment``) over the summed IoU and similarity, so two items
whose boxes cross are kept apart by what they look like, which a greedy best-first matcher
gets wrong whenever the first pair it takes is the wrong one. A track's query vector is the
L2-normalised mean of its members' embeddings.

A sampled frame that was not analysed (video search analyses a scene's first frame and the
frames that moved, not every one) is ``carry``-ed: the tracks seen in the last analysed frame
are extended to it with the same box, adding a member but no new evidence to the mean, so a
track's first and last frames still follow the shot while the models see it once or twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from models.boxes import Box

# Cost of a pair that may not join: larger than any real cost (at most 0), never chosen.
_FORBIDDEN = 1e6


@dataclass(frozen=True)
class Observation:
    """One detection (or whole-frame crop) of one sampled frame, with its embedding."""

    frame: int  # index of the sampled frame: 0, 1, 2 … with no holes
    box: Box  # x0, y0, x1, y1 pixels
    coarse_label: str | None
    vector: np.ndarray  # unit vector
    whole_image: bool = False


@dataclass
class Track:
    """Detections of one item; ``members`` are indices into the observations in the order
    they were given, so the caller can map them back to its own records."""

    track_id: int
    coarse_label: str | None
    whole_image: bool
    members: list[int] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)
    last_box: Box = (0.0, 0.0, 0.0, 0.0)
    _sum: np.ndarray | None = None
    carried: int = 0  # members that are carried-over frames (no embedding of their own)

    @property
    def last_frame(self) -> int:
        return self.frames[-1]

    @property
    def query_vector(self) -> np.ndarray:
        """The L2-normalised mean of the members' embeddings (float32)."""
        assert self._sum is not None, "a track always has a member"
        norm = float(np.linalg.norm(self._sum))
        return (self._sum / norm if norm > 0 else self._sum).astype(np.float32)

    def _add(self, member: int, observation: Observation) -> None:
        vector = np.asarray(observation.vector, dtype=np.float64)
        self._sum = vector.copy() if self._sum is None else self._sum + vector
        self.members.append(member)
        self.frames.append(observation.frame)
        self.last_box = observation.box


def box_iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class Tracker:
    """Feed it the sampled frames in order (``add_frame``); read ``tracks`` at the end."""

    def __init__(self, min_iou: float, min_similarity: float, max_gap: int) -> None:
        self.min_iou = min_iou
        self.min_similarity = min_similarity
        self.max_gap = max(0, max_gap)
        self.tracks: list[Track] = []
        self._open: list[Track] = []
        self._count = 0  # observations seen so far: the next one's member index
        self._last_seen: list[Track] = []  # the tracks of the last analysed frame

    def add_frame(
        self, frame: int, observations: Sequence[Observation], scene_change: bool = False
    ) -> list[int]:
        """Assign the frame's observations to tracks; the track id of each, in order."""
        if scene_change:
            self._open = []
        self._open = [t for t in self._open if frame - t.last_frame - 1 <= self.max_gap]
        self._last_seen = []
        assigned: list[Track | None] = [None] * len(observations)
        if self._open and observations:
            cost = self._costs(self._open, observations)
            for row, col in zip(*linear_sum_assignment(cost), strict=True):
                if cost[row, col] < _FORBIDDEN:
                    assigned[col] = self._open[row]
        ids = []
        for offset, (observation, track) in enumerate(zip(observations, assigned, strict=True)):
            if track is None:
                track = Track(len(self.tracks), observation.coarse_label, observation.whole_image)
                self.tracks.append(track)
                self._open.append(track)
            track._add(self._count + offset, observation)
            ids.append(track.track_id)
            self._last_seen.append(track)
        self._count += len(observations)
        return ids

    def carry(self, frame: int, scene_change: bool = False) -> list[int]:
        """A sampled frame that was not analysed: the tracks seen in the last analysed frame
        (if no scene change came since) go on through it with their last box. Each such track
        gets one member, numbered after the observations so far; their track ids, in order.
        The track's mean embedding is unchanged (the frame brought none)."""
        if scene_change:
            self._open, self._last_seen = [], []
        ids = []
        for track in self._last_seen:
            track.members.append(self._count)
            track.frames.append(frame)
            track.carried += 1
            self._count += 1
            ids.append(track.track_id)
        return ids

    def _costs(self, tracks: Sequence[Track], observations: Sequence[Observation]) -> np.ndarray:
        means = np.stack([t.query_vector for t in tracks])
        vectors = np.stack([np.asarray(o.vector, dtype=np.float32) for o in observations])
        similarity = means @ vectors.T
        cost = np.full((len(tracks), len(observations)), _FORBIDDEN)
        for i, track in enumerate(tracks):
            for j, observation in enumerate(observations):
                if (track.coarse_label, track.whole_image) != (
                    observation.coarse_label,
                    observation.whole_image,
                ):
                    continue
                iou = 0.0 if track.whole_image else box_iou(track.last_box, observation.box)
                sim = float(similarity[i, j])
                if iou >= self.min_iou or sim >= self.min_similarity:
                    cost[i, j] = -(iou + sim)
        return cost


def build_tracks(
    frames: Iterable[tuple[int, bool, Sequence[Observation]]],
    *,
    min_iou: float,
    min_similarity: float,
    max_gap: int,
) -> list[Track]:
    """Tracks of ``(frame, scene_change, observations)`` given in frame order."""
    tracker = Tracker(min_iou, min_similarity, max_gap)
    for frame, scene_change, observations in frames:
        tracker.add_frame(frame, observations, scene_change)
    return tracker.tracks
