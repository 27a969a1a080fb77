"""Wire formats between the gateway worker, the fork server and a call's child process.

Child stdin (gateway -> child):   u32 length | JSON header | raw request body until EOF
Child fd 3  (child -> gateway):   u32 length | JSON header | raw response body until EOF
Control socket (gateway <-> fork server): one JSON object per SOCK_SEQPACKET message; a "spawn" message
carries the child's three pipe ends as SCM_RIGHTS.

Bodies travel as raw bytes after the JSON header: binary survives exactly and nothing is base64-inflated.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
from dataclasses import dataclass
from typing import Any

from runner import outcomes

_LEN = struct.Struct(">I")
MAX_HEADER = 1 << 20  # a header bigger than this is a protocol violation, not a big request

# fd numbers inside the child: 0 request, 1 and 2 captured output, 3 result. Nothing else is inherited.
CHILD_RESULT_FD = 3
SPAWN_FDS = 3  # stdin read end, output write end, result write end
CONTROL_MSG_MAX = 1 << 18


class ProtocolError(Exception):
    pass


def encode_frame(header: dict[str, Any]) -> bytes:
    data = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return _LEN.pack(len(data)) + data


def read_exact(fd: int, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, n - got)
        if not chunk:
            raise ProtocolError(f"unexpected EOF after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> tuple[dict[str, Any], bytes]:
    """Reads one header and the rest of the stream (the body) from a blocking fd."""
    (n,) = _LEN.unpack(read_exact(fd, _LEN.size))
    if n > MAX_HEADER:
        raise ProtocolError(f"header of {n} bytes is too large")
    header = json.loads(read_exact(fd, n))
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    return header, b"".join(chunks)


class BadFrame(ProtocolError):
    """A complete result frame the gateway must not believe: the call is a function_error."""


class Truncated(ProtocolError):
    """Less than a whole frame: the process died while writing (its exit report says why)."""


_STATUS = re.compile(r"^[1-5][0-9][0-9](?: [^\r\n\x00]{0,200})?$")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}$")
_BAD_VALUE = re.compile(r"[\r\n\x00]")
ERROR_OUTCOMES = frozenset({outcomes.NOT_FOUND, outcomes.NO_ENTRY_POINT, outcomes.FUNCTION_ERROR,
                            outcomes.MISSING_DEPENDENCY, outcomes.MEMORY_LIMIT, outcomes.OUTPUT_LIMIT})


@dataclass(frozen=True)
class ResponseFrame:
    status: str  # "200 OK"
    headers: list[tuple[str, str]]
    body: bytes


@dataclass(frozen=True)
class ErrorFrame:
    outcome: str
    message: str
    type: str | None
    traceback: str | None
    header: dict[str, Any]  # the whole header, for fields beyond these (each must be checked where it is used)


def parse_result(data: bytes) -> ResponseFrame | ErrorFrame:
    """Validates a child's whole result stream (fd 3) and returns what it says. The child runs user code, which
    can write anything on fd 3: every field is checked, and anything else is BadFrame (or Truncated)."""
    if len(data) < _LEN.size:
        raise Truncated("no result frame" if not data else "truncated frame length")
    (n,) = _LEN.unpack_from(data)
    if n > MAX_HEADER:
        raise BadFrame(f"result header of {n} bytes (the limit is {MAX_HEADER})")
    if len(data) < _LEN.size + n:
        raise Truncated(f"truncated result header ({len(data) - _LEN.size} of {n} bytes)")
    try:
        header = json.loads(data[_LEN.size:_LEN.size + n])
    except RecursionError:
        raise BadFrame("result header nested too deeply") from None
    except ValueError as e:
        raise BadFrame(f"result header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise BadFrame("result header is not a JSON object")
    body = data[_LEN.size + n:]
    kind = header.get("kind")
    if kind == "response":
        return ResponseFrame(_status(header.get("status")), _headers(header.get("headers")), body)
    if kind == "error":
        outcome = header.get("outcome")
        if outcome not in ERROR_OUTCOMES:
            raise BadFrame(f"error frame with outcome {str(outcome)[:40]!r}")
        fields = {k: header.get(k) for k in ("message", "type", "traceback")}
        if not all(v is None or isinstance(v, str) for v in fields.values()):
            raise BadFrame("error frame fields must be strings")
        return ErrorFrame(outcome, fields["message"] or "", fields["type"], fields["traceback"], header)
    raise BadFrame(f"result frame of kind {str(kind)[:40]!r}")


def _status(status: object) -> str:
    if isinstance(status, int) and not isinstance(status, bool) and 100 <= status <= 599:
        return str(status)
    if isinstance(status, str) and _STATUS.match(status):
        return status
    raise BadFrame(f"invalid response status {str(status)[:40]!r}")


def _headers(headers: object) -> list[tuple[str, str]]:
    if not isinstance(headers, list):
        raise BadFrame("response headers are not a list")
    out = []
    for item in headers:
        if not (isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            raise BadFrame("a response header is not a [name, value] pair of strings")
        name, value = item
        if not _TOKEN.match(name) or _BAD_VALUE.search(value):
            raise BadFrame(f"invalid response header {name[:40]!r}")
        out.append((name, value))
    return out


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def send_msg(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(msg, separators=(",", ":")).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


def recv_msg(sock: socket.socket, maxfds: int = 0) -> tuple[dict[str, Any] | None, list[int]]:
    """Returns (None, []) on EOF."""
    if maxfds:
        data, fds, _flags, _addr = socket.recv_fds(sock, CONTROL_MSG_MAX, maxfds)
    else:
        data, fds = sock.recv(CONTROL_MSG_MAX), []
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data), list(fds)
