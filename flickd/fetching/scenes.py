"""Scene changes and gradual transitions, from colour histograms of small frame thumbnails.

:class:`SceneDetector` sees every decoded frame's histogram (:func:`histogram` of a
:func:`thumbnail`) and says whether it starts a new scene, or lies inside a gradual
transition (a cross-fade, a whip pan, a camera that swings), where the picture is still
changing fast and is no scene at all.

* A *cut*: the frame differs from the frame decoded just before it by at least the threshold,
  and the next frame differs from it by less than a quarter of that. It starts a scene.
* A *transition*: the frame differs from its predecessor by a quarter of the threshold or more
  (``TRANSITION_STEP``) and so does the next frame from it: the picture is on its way
  somewhere. It *settles* at the first frame that the next one differs from by less than that
  (at the end of a cross-fade: the first frame showing the new shot alone). That frame starts a
  scene when it is at least the threshold away from the last frame kept before the transition
  began; otherwise the change came back to where it was and nothing new started.
* Otherwise a frame starts a scene when it drifted the threshold away from the last kept frame
  (a slow change that got there without a fast step).

Why a transition is no scene change, and its frames are not analysed: in a cross-fade two shots
are blended, so a frame of it shows neither product as the catalog does and a detector reads
boxes off the mix; its items would start tracks of one or two frames that match nothing. Every
frame of a fade used to be far enough from the last kept one to count as a new scene, and each
was analysed: on bench/video.py's 60 s 720p clip the one half-second fade gave 4 of the 39
analysed frames and 15 one-frame tracks, none matching either product. Measured on that clip:
consecutive frames within a shot (slow pan or zoom, mild noise) differ by at most 0.055, the
frames of the fade by 0.10-0.23, and cuts by 0.62 or more; the threshold is 0.35, a quarter of
it 0.0875.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Thumbnails the scene detector compares: wide enough for a stable histogram (48x27 = 1296
# pixels at 16:9), small enough that scaling every decoded frame costs next to nothing. AREA
# scaling averages each thumbnail pixel over many source pixels, so sensor noise and grain do
# not move the histogram.
THUMB_WIDTH = 48
HIST_BINS = 16  # per RGB channel
# A frame that differs from its predecessor by this fraction of the scene threshold or more is
# inside a transition (see the module).
TRANSITION_STEP = 0.25


@dataclass(frozen=True)
class SceneVerdict:
    scene_change: bool  # the frame starts a new scene
    transition: bool = False  # the frame is inside a gradual transition (never a scene change)


class SceneDetector:
    """Feed it each decoded frame's histogram, in order (:meth:`step`), judge each frame once
    the next one's step is known (:meth:`judge`: one frame of look-ahead, so that the first
    frame of a fast fade is not taken for a cut), and tell it which frames were kept
    (:meth:`kept`). The first frame starts the first scene."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.previous: np.ndarray | None = None  # the frame decoded before
        self.last_kept: np.ndarray | None = None
        self.before: np.ndarray | None = None  # the last kept frame before a transition began

    def step(self, hist: np.ndarray) -> float:
        """The distance of this frame from the one decoded before it (0 for the first)."""
        previous, self.previous = self.previous, hist
        return distance(hist, previous) if previous is not None else 0.0

    def judge(self, hist: np.ndarray, step: float, next_step: float | None) -> SceneVerdict:
        """The verdict on a frame of ``step`` whose successor's step is ``next_step`` (None for
        the last frame of the stream: a jump there is taken for a transition, never a cut)."""
        if self.last_kept is None:
            return SceneVerdict(True)
        threshold = self.threshold
        fast = threshold * TRANSITION_STEP
        # Stable: the next frame barely differs, this is the picture that stays (the last
        # frame of a stream is not, whatever it shows).
        stable = next_step is not None and next_step < fast
        if step >= threshold and stable:  # a cut: the picture jumped, and stays
            self.before = None
            return SceneVerdict(True)
        if step >= fast and not stable:  # on its way somewhere, and going on
            if self.before is None:
                self.before = self.last_kept
            return SceneVerdict(False, transition=True)
        if self.before is not None:  # the first frame after a transition that stays
            before, self.before = self.before, None
            return SceneVerdict(distance(hist, before) >= threshold)
        return SceneVerdict(distance(hist, self.last_kept) >= threshold)

    def kept(self, hist: np.ndarray) -> None:
        self.last_kept = hist


def thumbnail(frame: Any) -> np.ndarray:
    """A small AREA-scaled RGB thumbnail (THUMB_WIDTH wide) of a decoded PyAV frame."""
    height = max(8, round(THUMB_WIDTH * frame.height / max(1, frame.width)))
    thumb: np.ndarray = frame.reformat(
        width=THUMB_WIDTH, height=height, format="rgb24", interpolation="AREA"
    ).to_ndarray()
    return thumb


def histogram(thumb: np.ndarray) -> np.ndarray:
    """Per-channel colour histogram of a thumbnail, each summing to 1."""
    bins = (thumb.reshape(-1, 3) >> 4).astype(np.intp)  # 256 levels -> 16 bins
    counts = np.stack([np.bincount(bins[:, c], minlength=HIST_BINS) for c in range(3)])
    return counts / bins.shape[0]


def distance(a: np.ndarray, b: np.ndarray) -> float:
    """Total-variation distance (0 = same colours, 1 = disjoint), averaged over channels."""
    return float(np.abs(a - b).sum() / 2 / a.shape[0])
