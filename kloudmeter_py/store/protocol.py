"""The NATS client protocol as the lean connection (``store.wire``) speaks it, with no I/O:
a parser fed the bytes a server sends, and encoders of what a client sends.

``Parser.feed`` takes bytes as they arrive, in pieces of any size, and calls ``on_msg`` once
per complete MSG or HMSG (sid, subject, reply, header block, payload) and ``on_line`` for
every other line (PING, PONG, INFO, +OK, -ERR), keeping an incomplete tail for the next call.
Kept in one loop over the buffer with no per-message allocation beyond the message's own
slices: it runs for every delivered event and every acknowledgement.
"""

import json
from collections.abc import Callable
from typing import Any

OnMsg = Callable[[bytes, str, str, bytes, bytes], None]
OnLine = Callable[[bytes], bool]


class Parser:
    """Incremental parser of server-to-client protocol lines and messages."""

    __slots__ = ("_buf", "on_line", "on_msg")

    def __init__(self, on_msg: OnMsg, on_line: OnLine) -> None:
        self.on_msg = on_msg
        # on_line returns False to stop parsing (the connection is failing)
        self.on_line = on_line
        self._buf = b""

    def feed(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        pos = 0
        size = len(buf)
        on_msg = self.on_msg
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            op = buf[pos : pos + 4]
            if op == b"HMSG":
                args = buf[pos + 5 : eol].split(b" ")
                if len(args) == 5:
                    subject, sid, reply, hlen_b, tlen_b = args
                else:
                    subject, sid, hlen_b, tlen_b = args
                    reply = b""
                hlen = int(hlen_b)
                end = eol + 2 + int(tlen_b)
                if end + 2 > size:
                    break
                on_msg(
                    sid,
                    subject.decode(),
                    reply.decode(),
                    buf[eol + 2 : eol + 2 + hlen],
                    buf[eol + 2 + hlen : end],
                )
                pos = end + 2
            elif op == b"MSG ":
                args = buf[pos + 4 : eol].split(b" ")
                if len(args) == 4:
                    subject, sid, reply, tlen_b = args
                else:
                    subject, sid, tlen_b = args
                    reply = b""
                end = eol + 2 + int(tlen_b)
                if end + 2 > size:
                    break
                on_msg(sid, subject.decode(), reply.decode(), b"", buf[eol + 2 : end])
                pos = end + 2
            else:
                line = buf[pos:eol]
                pos = eol + 2
                if not self.on_line(line):
                    self._buf = b""
                    return
        self._buf = buf[pos:]


def encode_connect(options: dict[str, Any]) -> bytes:
    return b"CONNECT " + json.dumps(options).encode() + b"\r\n"


def encode_sub(subject: str, sid: bytes) -> bytes:
    return b"SUB %s %s\r\n" % (subject.encode(), sid)


def encode_unsub(sid: bytes) -> bytes:
    return b"UNSUB %s\r\n" % sid


def encode_pub(subject: str, payload: bytes, reply: str = "") -> bytes:
    if reply:
        return b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(), len(payload), payload)
    return b"PUB %s %d\r\n%s\r\n" % (subject.encode(), len(payload), payload)


def hpub_parts(
    subject: str, headers: bytes, payload: "bytes | memoryview", reply: str = ""
) -> tuple[bytes, bytes, "bytes | memoryview", bytes]:
    """A message with a complete header block (``NATS/1.0\\r\\n`` ... ``\\r\\n\\r\\n``), as the
    pieces that make it: a writer joins them once with whatever else it sends (a summary
    flush sends ~1 KB pages by the thousand; ``line + headers + payload`` copied each twice)."""
    hlen = len(headers)
    total = hlen + len(payload)
    if reply:
        line = b"HPUB %s %s %d %d\r\n" % (subject.encode(), reply.encode(), hlen, total)
    else:
        line = b"HPUB %s %d %d\r\n" % (subject.encode(), hlen, total)
    return line, headers, payload, b"\r\n"


def encode_hpub(subject: str, headers: bytes, payload: bytes, reply: str = "") -> bytes:
    """A message with a complete header block (``NATS/1.0\\r\\n`` ... ``\\r\\n\\r\\n``)."""
    return b"".join(hpub_parts(subject, headers, payload, reply))


def status_of(headers: bytes, data: bytes) -> str | None:
    """The status of a server status message (``NATS/1.0 408 ...``), else None."""
    if data or not headers.startswith(b"NATS/1.0 "):
        return None
    line = headers.split(b"\r\n", 1)[0]
    return line[9:].decode("ascii", "replace").strip()
