"""The warm server's wire: length-prefixed JSON messages over a Unix socket, the first of a run's
carrying its three standard streams (SCM_RIGHTS); then single bytes, the stop signals a run's
process got, one way, and its child's exit status the other."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Mapping
from typing import Any

_HEADER = struct.Struct("!I")


def peer_uid(conn: socket.socket) -> int:
    """The user of the process at the other end of a Unix socket (SO_PEERCRED: pid, uid, gid)."""
    return struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]


def send(conn: socket.socket, message: Mapping[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    payload = _HEADER.pack(len(data)) + data
    if fds:
        sent = socket.send_fds(conn, [payload], fds)
        payload = payload[sent:]
    conn.sendall(payload)


def receive(conn: socket.socket, fds: list[int] | None = None) -> dict[str, Any] | None:
    """One message (None at end of stream); the descriptors sent with it are appended to `fds`."""
    head = b""
    while len(head) < _HEADER.size:
        if fds is not None and not head:
            chunk, received, _, _ = socket.recv_fds(conn, _HEADER.size, 8)
            fds.extend(received)
        else:
            chunk = conn.recv(_HEADER.size - len(head))
        if not chunk:
            return None
        head += chunk
    (size,) = _HEADER.unpack(head)
    data = b""
    while len(data) < size:
        chunk = conn.recv(min(size - len(data), 1 << 20))
        if not chunk:
            return None
        data += chunk
    return json.loads(data)
