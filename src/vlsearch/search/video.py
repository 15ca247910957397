"""Video search on moment scores: a video's score aggregates its moments', a moment's span grows around a
peak frame, and the Slow model can rescore the best frames of the top videos.

Every function here works on plain arrays (scores per gallery row, the video a row belongs to, the rows'
(start, end) spans), so the engine, the evaluation and the bench share one implementation.

Aggregation (measured in the README's video section): ``max`` takes the best moment; ``topn`` smooths
the scores over time (3-frame moving average) and averages the best ``n`` of them, so a video wins by a
sustained match rather than one lucky frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlsearch.errors import QueryError
from vlsearch.index.videos import moment_spans, read_videos

AGGREGATES = ("max", "topn")
DEFAULT_AGGREGATE = "max"  # measured better on the slideshow gallery (README, Video search)
TOP_N = 3
SPAN_ALPHA = 0.5  # a moment extends over neighbours scoring above peak - alpha * (peak - video median)
RERANK_FRAMES = 3  # best frames per candidate video the Slow model rescores


@dataclass
class VideoLayout:
    """Which gallery rows are moments of which video, in time order."""

    ids: list[str]  # video ids
    paths: list[str]
    first: np.ndarray  # [V] first row of each video
    count: np.ndarray  # [V] number of moments
    t_start: np.ndarray  # [R] per gallery row (nan for photos)
    t_end: np.ndarray

    @classmethod
    def of_index(cls, index) -> VideoLayout:

        videos = read_videos(index)
        ts, te = moment_spans(index)
        return cls(
            [v.id for v in videos],
            [v.path for v in videos],
            np.array([v.first_row for v in videos], dtype=np.int64),
            np.array([v.n_rows for v in videos], dtype=np.int64),
            ts,
            te,
        )

    @property
    def n_videos(self) -> int:
        return len(self.ids)

    def rows(self, v: int) -> np.ndarray:
        return np.arange(self.first[v], self.first[v] + self.count[v])

    def video_rows_mask(self, n_rows: int) -> np.ndarray:
        mask = np.zeros(n_rows, dtype=bool)
        for v in range(self.n_videos):
            mask[self.first[v] : self.first[v] + self.count[v]] = True
        return mask


def smooth(scores: np.ndarray, width: int = 3) -> np.ndarray:
    """Moving average over time (edges padded with the edge value)."""
    if len(scores) < 2 or width < 2:
        return np.asarray(scores, dtype=np.float32)
    pad = width // 2
    s = np.pad(np.asarray(scores, dtype=np.float32), (pad, width - 1 - pad), mode="edge")
    return np.convolve(s, np.ones(width, np.float32) / width, mode="valid")


def aggregate(scores: np.ndarray, how: str = DEFAULT_AGGREGATE, n: int = TOP_N) -> float:
    """One video's score from its moments' scores (in time order)."""
    if len(scores) == 0:
        return -np.inf
    if how == "max":
        return float(np.max(scores))
    if how == "topn":
        s = np.sort(smooth(scores))[::-1]
        return float(s[: min(n, len(s))].mean())
    raise QueryError(f"unknown aggregate {how!r}: use one of {AGGREGATES}")


def aggregate_matrix(sim: np.ndarray, first, count, how: str = DEFAULT_AGGREGATE) -> np.ndarray:
    """sim [Q, rows] -> [Q, V] video scores."""
    out = np.empty((sim.shape[0], len(first)), dtype=np.float32)
    for v, (a, c) in enumerate(zip(first, count, strict=True)):
        block = sim[:, a : a + c]
        if how == "max":
            out[:, v] = block.max(1)
        else:
            out[:, v] = [aggregate(row, how) for row in block]
    return out


def grow_span(scores: np.ndarray, peak: int, alpha: float = SPAN_ALPHA) -> tuple[int, int]:
    """[lo, hi] frame indices around ``peak`` whose scores stay above the threshold (query-adaptive)."""
    thr = scores[peak] - alpha * (scores[peak] - float(np.median(scores)))
    lo = hi = peak
    while lo > 0 and scores[lo - 1] >= thr:
        lo -= 1
    while hi + 1 < len(scores) and scores[hi + 1] >= thr:
        hi += 1
    return lo, hi


@dataclass
class Moment:
    video: int  # index into the layout
    row: int  # gallery row of the peak frame (the thumbnail)
    t_start: float
    t_end: float
    t_frame: float
    score: float


def best_moment(layout: VideoLayout, v: int, scores: np.ndarray) -> Moment:
    """The span around video ``v``'s best frame; ``scores`` are its moments' scores in time order."""
    rows = layout.rows(v)
    peak = int(np.argmax(scores))
    lo, hi = grow_span(scores, peak)
    return Moment(
        v,
        int(rows[peak]),
        float(layout.t_start[rows[lo]]),
        float(layout.t_end[rows[hi]]),
        float(layout.t_start[rows[peak]]),
        float(scores[peak]),
    )


def top_moments(layout: VideoLayout, row_scores: np.ndarray, k: int) -> list[Moment]:
    """The k best moments over all videos: peaks in score order, each grown to its span, frames already
    inside a returned span suppressed (so one long match is one moment, not many)."""
    video_of = np.full(len(row_scores), -1, dtype=np.int64)
    for v in range(layout.n_videos):
        video_of[layout.first[v] : layout.first[v] + layout.count[v]] = v
    cand = np.flatnonzero(video_of >= 0)
    order = cand[np.argsort(-row_scores[cand], kind="stable")]
    used = np.zeros(len(row_scores), dtype=bool)
    out: list[Moment] = []
    for row in order:
        if used[row]:
            continue
        v = int(video_of[row])
        rows = layout.rows(v)
        s = row_scores[rows]
        peak = int(row - rows[0])
        lo, hi = grow_span(s, peak)
        lo = max(lo, _free_edge(used, rows, peak, -1))
        hi = min(hi, _free_edge(used, rows, peak, +1))
        used[rows[lo : hi + 1]] = True
        out.append(
            Moment(
                v,
                int(row),
                float(layout.t_start[rows[lo]]),
                float(layout.t_end[rows[hi]]),
                float(layout.t_start[row]),
                float(row_scores[row]),
            )
        )
        if len(out) >= k:
            break
    return out


def _free_edge(used: np.ndarray, rows: np.ndarray, peak: int, step: int) -> int:
    """The furthest frame index from ``peak`` in direction ``step`` before a frame already used."""
    i = peak
    while 0 <= i + step < len(rows) and not used[rows[i + step]]:
        i += step
    return i


def iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0


def rescore_videos(layout, row_scores, video_scores, candidates, slow_fn, weight, frames=RERANK_FRAMES):
    """Slow re-ranking of candidate videos: their ``frames`` best frames get Slow scores (one call of
    ``slow_fn(rows) -> scores``); a video's fused score is its Fast score plus ``weight`` x its best
    frame's Slow score. Returns (fused [len(candidates)], slow [len], best row per candidate)."""
    picks = []
    for v in candidates:
        rows = layout.rows(int(v))
        picks.append(rows[np.argsort(-row_scores[rows], kind="stable")[:frames]])
    flat = np.concatenate(picks) if picks else np.zeros(0, np.int64)
    slow = np.asarray(slow_fn(flat), dtype=np.float32) if len(flat) else np.zeros(0, np.float32)
    fused, best_slow, best_rows, at = [], [], [], 0
    for v, rows in zip(candidates, picks, strict=True):
        s = slow[at : at + len(rows)]
        at += len(rows)
        j = int(np.argmax(row_scores[rows] + weight * s))
        best_slow.append(float(s.max()))
        best_rows.append(int(rows[j]))
        fused.append(float(video_scores[int(v)]) + weight * float(s.max()))
    return np.array(fused, np.float32), np.array(best_slow, np.float32), best_rows
