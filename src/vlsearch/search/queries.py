"""What a user types, turned into what the engine runs: compound queries, filters, sort and paging.

Compound queries (as rclip has them): ``"beach -people"`` subtracts a term, ``"2:dog 1:snow"`` weights
terms. A term starts at a word beginning with ``-``, ``+`` or ``N:`` and runs to the next such word, so
``"a dog on grass -snow"`` is two terms; a query without such words is one plain phrase.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

from vlsearch.errors import QueryError
from vlsearch.index.photos import PhotoFilter

SORTS = ("score", "date")
_WEIGHT = re.compile(r"^([+-]?)(\d+(?:\.\d*)?|\.\d+):(.*)$")


@dataclass
class Term:
    weight: float
    text: str


def parse_query(text: str) -> list[Term]:
    """Split a (checked) query into weighted terms; one term of weight 1 for a plain query."""
    terms: list[Term] = []
    for word in text.split():
        m = _WEIGHT.match(word)
        if m:
            sign = -1.0 if m.group(1) == "-" else 1.0
            terms.append(Term(sign * float(m.group(2)), m.group(3)))
        elif len(word) > 1 and word[0] in "+-":
            terms.append(Term(-1.0 if word[0] == "-" else 1.0, word[1:]))
        elif terms:
            terms[-1].text = f"{terms[-1].text} {word}".strip()
        else:
            terms.append(Term(1.0, word))
    terms = [t for t in terms if t.text and t.weight != 0]
    if not terms:
        raise QueryError(f"query {text!r} has no terms to search for")
    if all(t.weight < 0 for t in terms):
        raise QueryError("a query needs at least one term to look for, not only terms to subtract")
    return terms


def is_compound(terms: list[Term]) -> bool:
    return len(terms) > 1 or terms[0].weight != 1.0


def parse_date(value, name: str, end: bool = False) -> float | None:
    """'2021', '2021-07', '2021-07-04' or '2021-07-04T18:30' -> unix seconds (UTC, as EXIF times are
    stored). With ``end`` a partial date means its end: --before 2021 keeps everything before 2022."""
    if value in (None, ""):
        return None
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    for fmt, step in (("%Y", "year"), ("%Y-%m", "month"), ("%Y-%m-%d", "day")):
        try:
            d = datetime.strptime(text, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
        if end:
            if step == "year":
                d = d.replace(year=d.year + 1)
            elif step == "month":
                d = (d.replace(day=28) + timedelta(days=4)).replace(day=1)
            else:
                d = d + timedelta(days=1)
        return d.timestamp()
    try:
        d = datetime.fromisoformat(text)
    except ValueError as e:
        raise QueryError(f"{name} must be a date like 2021, 2021-07 or 2021-07-04, not {text!r}") from e
    return (d if d.tzinfo else d.replace(tzinfo=UTC)).timestamp()


def parse_near(value) -> tuple[float, float, float] | None:
    """'LAT,LON,KM' -> (lat, lon, km)."""
    if value in (None, ""):
        return None
    parts = value if isinstance(value, list | tuple) else str(value).split(",")
    try:
        lat, lon, km = (float(x) for x in parts)
    except (TypeError, ValueError) as e:
        raise QueryError(f"near must be LAT,LON,KM (e.g. 48.85,2.35,10), not {value!r}") from e
    if not (-90 <= lat <= 90 and -180 <= lon <= 180 and km > 0):
        raise QueryError(f"near {value!r}: latitude in [-90, 90], longitude in [-180, 180], km > 0")
    return lat, lon, km


def make_filter(after=None, before=None, folder=None, camera=None, near=None) -> PhotoFilter:
    """User-facing filter values (strings from the CLI, the API or the page) -> a checked PhotoFilter."""
    f = PhotoFilter(
        after=parse_date(after, "after"),
        before=parse_date(before, "before", end=True),
        folder=(str(folder).strip() or None) if folder else None,
        camera=(str(camera).strip() or None) if camera else None,
        near=parse_near(near),
    )
    if f.after is not None and f.before is not None and f.after >= f.before:
        raise QueryError("after must be earlier than before")
    return f


def check_sort(sort) -> str:
    sort = (sort or "score").strip().lower()
    if sort not in SORTS:
        raise QueryError(f"sort must be one of {', '.join(SORTS)}, not {sort!r}")
    return sort


def check_min_score(value) -> float | None:
    if value in (None, ""):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise QueryError("min_score must be a number (a cosine, -1..1)") from e
    if not -1.0 <= v <= 1.0:
        raise QueryError(f"min_score must be between -1 and 1, not {v}")
    return v


def check_offset(value) -> int:
    try:
        v = int(value or 0)
    except (TypeError, ValueError) as e:
        raise QueryError("offset must be a whole number") from e
    if v < 0:
        raise QueryError("offset must not be negative")
    return v


# -- cursors: the next page of the same query ----------------------------------------------------------
def query_fingerprint(text: str, f: PhotoFilter, sort: str, min_score) -> str:
    blob = json.dumps([text, asdict(f), sort, min_score], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def make_cursor(offset: int, fingerprint: str) -> str:
    raw = json.dumps({"o": offset, "q": fingerprint}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def read_cursor(cursor: str, fingerprint: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
        offset, fp = int(data["o"]), str(data["q"])
    except Exception as e:  # noqa: BLE001 - any malformed cursor is the user's to fix
        raise QueryError("cursor is not one this server returned") from e
    if fp != fingerprint:
        raise QueryError("cursor belongs to another query, filters or sort: start again without it")
    return check_offset(offset)
