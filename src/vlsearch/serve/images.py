"""The image routes: ``GET /images/{id}`` (a file of the index, by id or row), ``POST /images`` (add
uploads; write token) and ``DELETE /images/{id}`` (remove; write token)."""

from __future__ import annotations

from pathlib import Path

from fastapi import File, Request, UploadFile
from fastapi import Path as FPath
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from vlsearch.data.photo import BROWSER_UNSHOWN, display_jpeg
from vlsearch.data.safe_decode import UnsupportedFormat
from vlsearch.errors import QueryError
from vlsearch.serve.encoding import decode_upload
from vlsearch.serve.errors import ApiError
from vlsearch.serve.gate import check_write
from vlsearch.serve.limits import MAX_ID_CHARS, MAX_UPLOAD_FILES
from vlsearch.serve.openapi import ERRORS, UPLOAD_ERRORS

IMAGE_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
    ".webp": "image/webp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".heic": "image/heic",
    ".heif": "image/heif",
}


def register(app, service, settings) -> None:
    """Add the image routes to ``app``; called by create_app after the search routes (route order)."""

    @app.get(
        "/images/{image_id:path}",
        summary="An image of the index, by id (or row number)",
        response_class=Response,
        responses={200: {"content": {"image/*": {}}}, **ERRORS},
    )
    async def get_image(
        image_id: str = FPath(
            ..., description=f"an image id or row (ids over {MAX_ID_CHARS} characters: 404)"
        ),
    ):
        if len(image_id) > MAX_ID_CHARS or "\x00" in image_id:
            raise ApiError(404, "no such image in the index", image_id[:200])
        rec = await run_in_threadpool(service.lookup_image, image_id)
        if rec is None:
            raise ApiError(404, "no such image in the index", image_id[:200])
        path = Path(rec.path)
        if not path.is_file() or not service.servable(path):
            raise ApiError(404, "the image file of this index entry is missing on disk", rec.id)
        if path.suffix.lower() in BROWSER_UNSHOWN:  # HEIC, TIFF: an upright JPEG the page can show
            data = await run_in_threadpool(display_jpeg, path)
            return Response(
                data,
                media_type="image/jpeg",
                headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"},
            )
        return FileResponse(
            path,
            media_type=IMAGE_TYPES.get(path.suffix.lower(), "application/octet-stream"),
            headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"},
        )

    @app.post(
        "/images",
        status_code=201,
        summary="Add images to the index (needs 'Authorization: Bearer TOKEN')",
        responses=UPLOAD_ERRORS,
    )
    async def add_images(request: Request, files: list[UploadFile] = File(..., description="image files")):
        denied = check_write(settings.write_token, request.headers.get("authorization"))
        if denied is not None:
            return denied
        if len(files) > MAX_UPLOAD_FILES:
            raise QueryError(f"at most {MAX_UPLOAD_FILES} files per request")
        uploads = [(f.filename or f"file{i}", await f.read()) for i, f in enumerate(files)]
        bad = []
        for name, data in uploads:
            try:
                await run_in_threadpool(decode_upload, data)
            except QueryError as e:
                bad.append(
                    {"filename": name, "reason": str(e), "unsupported": isinstance(e, UnsupportedFormat)}
                )
        if bad:
            status = 415 if all(b.pop("unsupported") for b in bad) else 400
            for b in bad:
                b.pop("unsupported", None)
            raise ApiError(status, f"{len(bad)} of {len(uploads)} upload(s) are not readable images", bad)
        result, _ = await service.pool.run(service.add_images, uploads, heavy=True)
        return JSONResponse(result, status_code=201)

    @app.delete(
        "/images/{image_id:path}",
        summary="Remove an image from the index, by id (needs 'Authorization: Bearer TOKEN')",
        responses=ERRORS,
    )
    async def remove_image(request: Request, image_id: str = FPath(..., description="an image id")):
        denied = check_write(settings.write_token, request.headers.get("authorization"))
        if denied is not None:
            return denied
        if len(image_id) > MAX_ID_CHARS or "\x00" in image_id:
            raise ApiError(404, "no such image in the index", image_id[:200])
        removed, _ = await service.pool.run(service.remove_images, [image_id], heavy=True)
        if not removed:
            raise ApiError(404, "no such image in the index", image_id[:200])
        return {"removed": removed, "n_images": len(service.engine.index.images)}
