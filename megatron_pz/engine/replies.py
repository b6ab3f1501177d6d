"""The embedded server's response bodies: one function for every endpoint's reply and one for its errors."""
from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response


def reply(status: int, payload: Any) -> Response:
    """``bytes`` as text/plain, ``str`` as UTF-8 text, anything else as JSON (``json.dumps``: NaN/Inf allowed)."""
    if isinstance(payload, bytes):
        return Response(payload, status, media_type="text/plain")
    if isinstance(payload, str):
        return Response(payload.encode(), status, media_type="text/plain; charset=utf-8")
    return Response(json.dumps(payload).encode(), status, media_type="application/json")


def error_reply(status: int, message: str) -> Response:
    return reply(status, {"error": {"message": message}})
