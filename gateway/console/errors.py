"""Every error the console answers, mapped to HTTP in one place: JSON for the console's fetch() endpoints,
a page for a browser's navigation."""

from __future__ import annotations

from typing import Any

STATUS = {
    "bad_request": 400,
    "unauthorized": 401,
    "csrf_failed": 403,
    "forbidden": 403,
    "not_found": 404,
    "syntax_error": 422,
    "invalid_name": 400,
    "invalid_archive": 422,
    "no_version": 404,
    "request_too_large": 413,
    "rate_limited": 429,
    "busy": 503,
    "unavailable": 503,
}


class ConsoleError(Exception):
    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code, self.message, self.extra = code, message, extra

    @property
    def status(self) -> int:
        return STATUS.get(self.code, 500)
