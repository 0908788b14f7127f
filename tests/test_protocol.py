"""The NATS protocol parser and encoders of the lean connection, with no server: messages come
out whole and in order however the bytes are cut."""

import pytest

from kloudmeter_py.store.protocol import (
    Parser,
    encode_hpub,
    encode_pub,
    encode_sub,
    encode_unsub,
    status_of,
)


def _hmsg(subject: bytes, sid: bytes, reply: bytes, headers: bytes, data: bytes) -> bytes:
    head = b"HMSG %s %s %s%d %d\r\n" % (
        subject,
        sid,
        reply + b" " if reply else b"",
        len(headers),
        len(headers) + len(data),
    )
    return head + headers + data + b"\r\n"


STREAM = (
    b'INFO {"server_id":"x","max_payload":1048576}\r\n'
    b"PING\r\n"
    b"MSG a.b 1 5\r\nhello\r\n"
    b"MSG a.c 2 _INBOX.r 0\r\n\r\n"
    + _hmsg(b"$JS.ACK.x", b"3", b"$JS.ACK.s.c.1.2.3.4.0", b"NATS/1.0\r\nK: v\r\n\r\n", b"world")
    + _hmsg(b"_INBOX.p", b"4", b"", b"NATS/1.0 408 t\r\n\r\n", b"")
    + b"MSG with.crlf 1 4\r\n\r\n\r\n\r\n"
    b"PONG\r\n"
    b"+OK\r\n"
)
EXPECTED_MSGS = [
    (b"1", "a.b", "", b"", b"hello"),
    (b"2", "a.c", "_INBOX.r", b"", b""),
    (b"3", "$JS.ACK.x", "$JS.ACK.s.c.1.2.3.4.0", b"NATS/1.0\r\nK: v\r\n\r\n", b"world"),
    (b"4", "_INBOX.p", "", b"NATS/1.0 408 t\r\n\r\n", b""),
    (b"1", "with.crlf", "", b"", b"\r\n\r\n"),
]
EXPECTED_LINES = [b'INFO {"server_id":"x","max_payload":1048576}', b"PING", b"PONG", b"+OK"]


def _parse(pieces: list[bytes]) -> tuple[list[tuple[object, ...]], list[bytes]]:
    msgs: list[tuple[object, ...]] = []
    lines: list[bytes] = []

    def on_line(line: bytes) -> bool:
        lines.append(line)
        return True

    parser = Parser(lambda *m: msgs.append(m), on_line)
    for piece in pieces:
        parser.feed(piece)
    return msgs, lines


def test_every_frame_comes_out_once_in_order() -> None:
    """Messages (with and without reply, headers, empty or CRLF-holding payloads) and lines."""
    assert _parse([STREAM]) == (EXPECTED_MSGS, EXPECTED_LINES)


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_any_cut_in_two_gives_the_same_frames(cut: int) -> None:
    """TCP may cut anywhere: a frame split between two reads is kept until it is whole."""
    assert _parse([STREAM[:cut], STREAM[cut:]]) == (EXPECTED_MSGS, EXPECTED_LINES)


def test_byte_by_byte_gives_the_same_frames() -> None:
    assert _parse([STREAM[i : i + 1] for i in range(len(STREAM))]) == (
        EXPECTED_MSGS,
        EXPECTED_LINES,
    )


def test_an_error_line_stops_parsing() -> None:
    """-ERR: the connection fails; nothing after it is delivered."""
    msgs: list[object] = []
    parser = Parser(lambda *m: msgs.append(m), lambda line: not line.startswith(b"-ERR"))
    parser.feed(b"-ERR 'Authorization Violation'\r\nMSG a 1 1\r\nx\r\n")
    assert msgs == []


def test_encoders_write_what_the_parser_reads() -> None:
    """A published message, as a server would deliver it, parses back to the same parts."""
    assert encode_sub("a.>", b"7") == b"SUB a.> 7\r\n"
    assert encode_unsub(b"7") == b"UNSUB 7\r\n"
    assert encode_pub("s", b"xy") == b"PUB s 2\r\nxy\r\n"
    assert encode_pub("s", b"xy", "r") == b"PUB s r 2\r\nxy\r\n"
    headers = b"NATS/1.0\r\nNats-Expected-Last-Subject-Sequence: 5\r\n\r\n"
    frame = encode_hpub("$KV.b.k", headers, b"[1]", "r")
    assert frame.startswith(b"HPUB $KV.b.k r %d %d\r\n" % (len(headers), len(headers) + 3))
    delivered = b"H" + frame[1:].replace(b"PUB $KV.b.k r", b"MSG $KV.b.k 9 r", 1)
    assert _parse([delivered])[0] == [(b"9", "$KV.b.k", "r", headers, b"[1]")]


@pytest.mark.parametrize(
    ("headers", "data", "status"),
    [
        (b"NATS/1.0 408 Request Timeout\r\n\r\n", b"", "408 Request Timeout"),
        (b"NATS/1.0 100 Idle Heartbeat\r\n\r\n", b"", "100 Idle Heartbeat"),
        (b"NATS/1.0\r\nK: v\r\n\r\n", b"", None),
        (b"NATS/1.0 408 x\r\n\r\n", b"payload", None),
        (b"", b"", None),
    ],
)
def test_status_of(headers: bytes, data: bytes, status: str | None) -> None:
    assert status_of(headers, data) == status
