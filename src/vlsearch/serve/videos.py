"""The service's video parts: ``GET /videos/{id}`` (the file, with HTTP range requests, so a browser can
seek to a moment) and ``GET /videos/{id}?frame=T`` (the frame at T seconds as a JPEG thumbnail), and the
video fields of a search result."""

from __future__ import annotations

import io
from pathlib import Path
from urllib.parse import quote

from fastapi import Query
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

VIDEO_TYPES = {
    ".mp4": "video/mp4",
    ".m4v": "video/x-m4v",
    ".mov": "video/quicktime",
    ".mkv": "video/x-matroska",
    ".webm": "video/webm",
    ".avi": "video/x-msvideo",
}
THUMB_SIDE = 480


def video_url(video_id: str) -> str:
    return "/videos/" + quote(video_id, safe="/")


def video_fields(hit) -> dict:
    """What a video hit adds to a search result: kind, the moment, the file and the thumbnail URLs."""
    url = video_url(hit.id)
    return {
        "kind": "video",
        "t_start": hit.t_start,
        "t_end": hit.t_end,
        "t_frame": hit.t_frame,
        "video_url": url,
        "url": f"{url}?frame={hit.t_frame:.3f}",
    }


def thumbnail(path: str, t: float) -> bytes:
    from PIL import Image

    from vlsearch.data.video import frame_at

    img = Image.fromarray(frame_at(path, t))
    img.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def register(app, service, api_error) -> None:
    from vlsearch.errors import QueryError
    from vlsearch.index.videos import video_by_id

    @app.get(
        "/videos/{video_id:path}",
        summary="A video of the index (HTTP range requests), or with ?frame=T its frame at T s as JPEG",
        response_class=Response,
        responses={200: {"content": {"video/*": {}, "image/jpeg": {}}}, 206: {"description": "a byte range"}},
    )
    async def get_video(
        video_id: str, frame: str | None = Query(None, description="seconds: the frame shown then, as JPEG")
    ):
        if len(video_id) > 4096 or "\x00" in video_id:
            raise api_error(404, "no such video in the index", video_id[:200])
        rec = await run_in_threadpool(video_by_id, service.engine.index, video_id)
        if rec is None:
            raise api_error(404, "no such video in the index", video_id[:200])
        path = Path(rec.path)
        if not path.is_file() or not service.servable(path):
            raise api_error(404, "the video file of this index entry is missing on disk", rec.id)
        headers = {"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"}
        if frame is None:
            media = VIDEO_TYPES.get(path.suffix.lower(), "application/octet-stream")
            return FileResponse(path, media_type=media, headers=headers)
        try:
            t = float(frame)
        except ValueError as e:
            raise QueryError("frame must be a number of seconds") from e
        if not 0 <= t <= max(rec.duration, 0) + 1:
            raise QueryError(f"frame must be between 0 and {rec.duration:.1f} seconds")
        try:
            data = await run_in_threadpool(thumbnail, str(path), t)
        except ValueError as e:
            raise api_error(409, "the video file cannot be decoded any more", str(e)) from e
        return Response(data, media_type="image/jpeg", headers=headers)
