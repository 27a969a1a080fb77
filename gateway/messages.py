"""HTTP request -> the message a child receives; a child's result -> the HTTP response."""

from __future__ import annotations

from flask import Request, Response

from gateway.errors import GatewayError
from runner.supervisor import CallResult

# The CGI/WSGI keys a function's request is rebuilt from. Everything else in the gateway's environ (the
# socket, gunicorn objects, the server's own state) stays in the gateway.
_CGI_KEYS = ("REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "CONTENT_TYPE", "SERVER_NAME",
             "SERVER_PORT", "SERVER_PROTOCOL", "REMOTE_ADDR", "REMOTE_PORT", "RAW_URI", "REQUEST_URI",
             "wsgi.url_scheme")
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer",
                         "upgrade", "proxy-authenticate", "proxy-authorization"})


def read_body(request: Request, limit_kb: int) -> bytes:
    """Reads the whole body, refusing more than the function's max_request_kb before reading it all."""
    limit = limit_kb * 1024
    declared = request.content_length
    if declared is not None and declared > limit:
        raise GatewayError("request_too_large", f"the request body ({declared} bytes) exceeds "
                           f"max_request_kb ({limit_kb} KiB)")
    # A chunked body has no declared length: read one byte past the limit to know.
    data = request.stream.read(limit + 1)
    if len(data) > limit:
        raise GatewayError("request_too_large", f"the request body exceeds max_request_kb ({limit_kb} KiB)")
    return data


def environ_message(request: Request, body: bytes, trusted_proxies: frozenset[str] = frozenset()) -> dict[str, str]:
    env = request.environ
    msg = {k: v for k, v in env.items() if k.startswith("HTTP_") and isinstance(v, str)}
    msg.pop("HTTP_TRANSFER_ENCODING", None)  # the body below is complete and has a length
    for key in _CGI_KEYS:
        value = env.get(key)
        if isinstance(value, str):
            msg[key] = value
    if body or "CONTENT_LENGTH" in env or env.get("HTTP_TRANSFER_ENCODING"):
        msg["CONTENT_LENGTH"] = str(len(body))
    if env.get("REMOTE_ADDR") in trusted_proxies:
        # As werkzeug's ProxyFix(x_for=1, x_proto=1): the last X-Forwarded-For entry is the one our proxy added.
        forwarded = env.get("HTTP_X_FORWARDED_FOR", "").split(",")[-1].strip()
        if forwarded:
            msg["REMOTE_ADDR"] = forwarded
            msg.pop("REMOTE_PORT", None)
        proto = env.get("HTTP_X_FORWARDED_PROTO", "").split(",")[-1].strip().lower()
        if proto in ("http", "https"):
            msg["wsgi.url_scheme"] = proto
    return msg


def to_response(result: CallResult) -> Response:
    headers = [(k, v) for k, v in result.headers if k.lower() not in _HOP_BY_HOP]
    return Response(result.body, status=result.status, headers=headers)
