"""The service's public names, re-exported from the modules that hold them since the serve split
(issue 14), so ``vlsearch.serve.app.create_app`` and the rest keep importing from here.

routes (``create_app``, page/login/search routes), images (image routes), service (``Service``),
admission (``Scheduler``, ``ModelPool``), gate (``Gate``, ``Guard``), errors, encoding, openapi, limits.
"""

from __future__ import annotations

from vlsearch.serve.admission import ModelPool, Scheduler
from vlsearch.serve.encoding import (
    PIL_SUFFIX,
    decode_upload,
    hit_kind,
    image_url,
    jsonable,
    make_search_options,
    parse_flag,
    raw_query_param,
)
from vlsearch.serve.errors import STATUS_OF, ApiError, Busy, Unavailable
from vlsearch.serve.gate import Guard, check_write, too_large
from vlsearch.serve.images import IMAGE_TYPES
from vlsearch.serve.limits import (
    MAX_EXPLAINED,
    MAX_EXPLAINED_WORDS,
    MAX_ID_CHARS,
    MAX_UPLOAD_BYTES,
    MAX_UPLOAD_FILES,
    MAX_UPLOAD_PIXELS,
    ServeSettings,
)
from vlsearch.serve.openapi import ERRORS, UPLOAD_ERRORS
from vlsearch.serve.routes import CSP, STATIC, create_app
from vlsearch.serve.service import Service

__all__ = [
    "CSP",
    "ERRORS",
    "IMAGE_TYPES",
    "MAX_EXPLAINED",
    "MAX_EXPLAINED_WORDS",
    "MAX_ID_CHARS",
    "MAX_UPLOAD_BYTES",
    "MAX_UPLOAD_FILES",
    "MAX_UPLOAD_PIXELS",
    "PIL_SUFFIX",
    "STATIC",
    "STATUS_OF",
    "UPLOAD_ERRORS",
    "ApiError",
    "Busy",
    "Guard",
    "ModelPool",
    "Scheduler",
    "ServeSettings",
    "Service",
    "Unavailable",
    "check_write",
    "create_app",
    "decode_upload",
    "hit_kind",
    "image_url",
    "jsonable",
    "make_search_options",
    "parse_flag",
    "raw_query_param",
    "too_large",
]
