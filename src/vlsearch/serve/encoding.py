"""Parsing request values and encoding responses: strict query-string text, flags, uploads, and the
JSON bodies of the search routes (numpy values made plain, floats rounded)."""

from __future__ import annotations

import json
import re
import time
from urllib.parse import parse_qsl, quote

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from vlsearch.data.safe_decode import decode
from vlsearch.errors import QueryError
from vlsearch.search.queries import check_min_score, check_offset, check_sort, make_filter
from vlsearch.serve.limits import MAX_UPLOAD_PIXELS
from vlsearch.serve.videos import video_fields

PIL_SUFFIX = {
    "HEIF": ".heic",
    "JPEG": ".jpg",
    "PNG": ".png",
    "GIF": ".gif",
    "BMP": ".bmp",
    "WEBP": ".webp",
    "TIFF": ".tif",
}


# -- parsing ----------------------------------------------------------------------------------------------
def raw_query_param(request: Request, name: str) -> str | None:
    """A query-string value decoded strictly as UTF-8 (Starlette would silently replace bad bytes)."""
    pairs = parse_qsl(
        request.scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True, encoding="latin-1"
    )
    for key, value in pairs:
        if key == name:
            try:
                return value.encode("latin-1").decode("utf-8")
            except UnicodeDecodeError as e:
                raise QueryError(f"{name} is not valid UTF-8 text") from e
    return None


def parse_flag(value: str | None, name: str) -> bool:
    """Exactly what the schema says: 0 or 1 (an absent flag is 0)."""
    if value is None or value == "0":
        return False
    if value == "1":
        return True
    raise QueryError(f"{name} must be 0 or 1, not {value[:20]!r}")


def parse_whole(value: str | None, name: str, default: int) -> int:
    """A query-string integer spelt as the schema says (digits, an optional minus): no blanks, no
    spaces, no "+5" or "5_0" that Python's int() would take; absent is ``default``."""
    if value is None:
        return default
    if not re.fullmatch(r"-?[0-9]+", value):
        raise QueryError(f"{name} must be a whole number, not {value[:20]!r}")
    return int(value)


def make_search_options(after, before, folder, camera, near, sort, offset, cursor, min_score) -> dict:
    """The /search filter, sort and paging parameters, checked (QueryError -> 400)."""
    return {
        "filters": make_filter(after, before, folder, camera, near),
        "sort": check_sort(sort),
        "offset": check_offset(parse_whole(offset, "offset", 0)),
        "cursor": cursor or None,
        "min_score": check_min_score(min_score),
    }


def decode_upload(data: bytes):
    """Open an uploaded image fully (truncated files fail here): allowed formats only, bounded pixels,
    scans and time (vlsearch.data.safe_decode); 415 for other formats."""
    return decode(data, what="upload", max_pixels=MAX_UPLOAD_PIXELS)


# -- encoding ---------------------------------------------------------------------------------------------
def jsonable(x, digits: int = 4):
    """Explanations and timings come as numpy: plain JSON values, floats to ``digits`` significant digits
    (heat-map values are small: 196 of them sum to 1)."""
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist(), digits)
    if isinstance(x, dict):
        return {str(k): jsonable(v, digits) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v, digits) for v in x]
    if isinstance(x, bool | np.bool_):
        return bool(x)
    if isinstance(x, int | np.integer):
        return int(x)
    if isinstance(x, float | np.floating):
        v = float(x)
        return float(f"{v:.{digits}g}") if np.isfinite(v) else None
    return x


def image_url(image_id: str) -> str:
    return "/images/" + quote(image_id, safe="/")


def hit_kind(hit) -> dict:
    """kind "image", or for a video its moment, file and thumbnail (vlsearch.serve.videos)."""
    if getattr(hit, "kind", "image") != "video":
        return {"kind": "image"}
    return video_fields(hit)


def search_body(service, result, text, k, rerank, explain, wait_ms, t0, tags=None) -> Response:
    """The /search response, built and serialised on a worker thread (explanations are big)."""
    hits = []
    explanations = result.explanations if explain else None
    for i, h in enumerate(result.hits):
        item = {
            "rank": result.offset + i + 1,
            "row": h.row,
            "id": h.id,
            "url": image_url(h.id),
            "score": h.score,
            "taken": h.taken,
            "folder": h.folder,
            "camera": h.camera,
        }
        item.update(hit_kind(h))
        if rerank:
            item["fast_score"], item["slow_score"] = h.fast_score, h.slow_score
            if not np.isfinite(h.slow_score):
                item["note"] = "not re-ranked: the image file is gone, so this keeps its Fast score"
        if explanations is not None and explanations[i] is not None:
            item["explanation"] = explanations[i]
        if tags is not None:
            item["concepts"] = [{"name": n, "weight": w} for n, w in tags[i]]
        hits.append(item)
    timings = dict(result.timings_ms)
    timings["queue"] = wait_ms
    timings["server"] = (time.perf_counter() - t0) * 1e3
    body = {
        "query": text,
        "k": k,
        "rerank": rerank,
        "n_images": len(service.engine.index.images),
        "n_matching": result.n_matching,
        "offset": result.offset,
        "next_offset": result.next_offset,
        "next_cursor": result.next_cursor,
        "results": hits,
        "timings_ms": timings,
    }
    return Response(json.dumps(jsonable(body), allow_nan=False), media_type="application/json")


def image_search_body(images, caps, cap_rows, k, wait_ms, t0) -> JSONResponse:
    """The /search/image response: similar images, and captions with the image each belongs to."""
    return JSONResponse(
        jsonable(
            {
                "k": k,
                "images": [
                    {
                        "rank": i,
                        "row": h.row,
                        "id": h.id,
                        "url": image_url(h.id),
                        "score": h.score,
                        **hit_kind(h),
                    }
                    for i, h in enumerate(images.hits, 1)
                ],
                "captions": [
                    {
                        "rank": i,
                        "text": c.text,
                        "score": c.score,
                        "image_id": cap_rows[c.image_row].id,
                        "image_url": image_url(cap_rows[c.image_row].id),
                    }
                    for i, c in enumerate(caps.hits if caps else [], 1)
                ],
                "timings_ms": {
                    "images": images.timings_ms.get("total"),
                    "captions": caps.timings_ms.get("total") if caps else None,
                    "queue": wait_ms,
                    "server": (time.perf_counter() - t0) * 1e3,
                },
            }
        )
    )
