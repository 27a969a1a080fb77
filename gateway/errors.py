"""Every error the gateway answers, mapped to HTTP in one place. Bodies are JSON with a stable error code."""

from __future__ import annotations

from typing import Any

from flask import Response, json

from runner import outcomes

STATUS = {
    outcomes.NOT_FOUND: 404,
    outcomes.NO_ENTRY_POINT: 500,  # the function's own mistake, as an import error: not the client's
    outcomes.FUNCTION_ERROR: 500,
    outcomes.MISSING_DEPENDENCY: 500,
    outcomes.TIMEOUT: 504,
    outcomes.MEMORY_LIMIT: 502,
    outcomes.CRASHED: 502,
    outcomes.OUTPUT_LIMIT: 502,
    outcomes.BUSY: 503,
    outcomes.UNAVAILABLE: 503,
    "request_too_large": 413,
    "method_not_allowed": 405,
    "unsupported_media_type": 415,
    "bad_request": 400,
    "internal_error": 500,
    "admin_disabled": 404,
    "deps_failed": 422,
    "unauthorized": 401,
    "invalid_name": 400,
    "syntax_error": 422,
    "invalid_archive": 422,
    "no_version": 404,
    "callback_not_allowed": 400,
    "not_failed": 409,
}


# werkzeug's HTTP errors the platform itself raises (routing, request parsing), by status.
HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
              415: "unsupported_media_type"}


class GatewayError(Exception):
    """An error answered before or instead of running the function."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code, self.message, self.extra = code, message, extra


def exception_extra(result: Any, with_traceback: bool) -> dict[str, Any]:
    """The fields a failed call's body carries beside error/message: the exception's type (and its user-frames
    traceback when the profile says `traceback = true`), or how a crashed process ended."""
    if result.outcome in outcomes.WITH_EXCEPTION:
        return {"type": result.error_type, "traceback": result.traceback if with_traceback else None}
    if result.outcome == outcomes.CRASHED:
        return {"exitcode": result.exitcode, "signal": result.signal}
    return {}


def error_response(code: str, message: str, *, function: str | None, request_id: str,
                   **extra: Any) -> Response:
    body = {"error": code, "message": message, "function": function, "request_id": request_id}
    body.update({k: v for k, v in extra.items() if v is not None})
    resp = Response(json.dumps(body) + "\n", status=STATUS.get(code, 500), mimetype="application/json")
    if code == outcomes.BUSY:
        resp.headers["Retry-After"] = "1"
    return resp
