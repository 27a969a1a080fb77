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
import socket
import struct
from typing import Any

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


def split_frame(data: bytes) -> tuple[dict[str, Any], bytes]:
    """Parses a complete frame that was read into memory by a select loop."""
    if len(data) < _LEN.size:
        raise ProtocolError("truncated frame")
    (n,) = _LEN.unpack_from(data)
    if n > MAX_HEADER or len(data) < _LEN.size + n:
        raise ProtocolError("truncated or oversized header")
    try:
        header = json.loads(data[_LEN.size : _LEN.size + n])
    except ValueError as e:
        raise ProtocolError(f"bad header: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not an object")
    return header, data[_LEN.size + n :]


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
