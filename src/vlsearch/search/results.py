"""What a search returns (hits, caption hits, a page of results) and the limits every entry point checks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from vlsearch.errors import QueryError

MAX_K = 1000
MAX_RERANK = 200
MAX_DEPTH = 10_000  # how deep paging reaches


@dataclass
class Hit:
    row: int
    id: str
    path: str
    score: float
    fast_score: float | None = None
    slow_score: float | None = None
    kind: str = "image"  # or "video": then id/path are the video's, and the best moment is given
    t_start: float | None = None
    t_end: float | None = None
    t_frame: float | None = None  # the moment's best frame (its thumbnail)
    taken: float | None = None  # capture time, unix seconds (EXIF, else file mtime)
    folder: str | None = None
    camera: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.kind == "image":
            for key in ("kind", "t_start", "t_end", "t_frame"):
                d.pop(key)
        return d


@dataclass
class CaptionHit:
    row: int
    text: str
    image_row: int
    score: float


@dataclass
class SearchResult:
    hits: list
    timings_ms: dict = field(default_factory=dict)
    explanations: list | None = None
    concept_tags: list | None = None  # per hit, the ImageNet concepts behind it (the service, why=1)
    offset: int = 0
    next_offset: int | None = None  # None: this was the last page
    next_cursor: str | None = None
    n_matching: int | None = None  # images passing the filters (all images when unfiltered)


def check_k(k, limit: int = MAX_K, name: str = "k") -> int:
    try:
        k = int(k)
    except (TypeError, ValueError) as e:
        raise QueryError(f"{name} must be a whole number") from e
    if k < 1 or k > limit:
        raise QueryError(f"{name} must be between 1 and {limit}, not {k}")
    return k
