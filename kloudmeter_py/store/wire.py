"""A lean NATS client connection for the worker's hot path: reading pulled events and writing
KV batches; the gateway uses it too, for bulk KV reads and for publishing ingested events
(store.ingest).

nats-py does everything else here (setup, KV reads, leases, the gateway's other calls). On the
hot path it costs most of the worker's time: per received message it parses the headers,
builds a ``Msg``, queues it and runs a coroutine; per published message it validates and
encodes a header dict. This connection parses the protocol as it arrives
(``store.protocol.Parser``, pure, no I/O) and hands each message to a plain function, and it
builds each published message's bytes in one step (``store.protocol``'s encoders); what is
here is the I/O. It speaks only what the worker needs: CONNECT (user and password or token
from the URL; a JWT or NKEY user's signed nonce and a client certificate from
``store.credentials``; TLS for ``tls://`` or when the server asks), SUB, UNSUB, PUB, HPUB,
MSG, HMSG, PING and PONG. Any trouble closes it, and the worker's partitions start again from
their checkpoints on a new one.
"""

import asyncio
import functools
import itertools
import json
import re
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast
from urllib.parse import unquote, urlsplit

from kloudmeter_py import __version__
from kloudmeter_py.store.credentials import NatsCredentials, NatsRefused
from kloudmeter_py.store.protocol import (
    Parser,
    encode_connect,
    encode_pub,
    encode_sub,
    encode_unsub,
    hpub_parts,
    status_of,
)


class WireError(Exception):
    """The connection failed, was closed, or the server refused something."""


class WireMsg:
    """One delivered message. ``headers`` is the raw header block (b"" when there is none)."""

    __slots__ = ("data", "headers", "reply", "subject")

    def __init__(self, subject: str, reply: str, headers: bytes, data: bytes) -> None:
        self.subject = subject
        self.reply = reply
        self.headers = headers
        self.data = data

    def status(self) -> str | None:
        """The status code of a server status message (``NATS/1.0 408 ...``), else None."""
        return status_of(self.headers, self.data)


Handler = Callable[[WireMsg], None]


class Wire(asyncio.Protocol):
    def __init__(self) -> None:
        self._parser = Parser(self._on_msg, self._on_line)
        self.data_received = self._parser.feed  # type: ignore[method-assign]
        self._subs: dict[bytes, Handler] = {}
        self._sids = itertools.count(1)
        self._pongs: list[asyncio.Future[None]] = []
        self._info: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes | memoryview] = []
        self._writable = asyncio.Event()
        self._writable.set()
        self._inbox_prefix = ""
        self._replies: dict[str, asyncio.Future[bytes]] = {}
        self._reply_ids = itertools.count(1)
        self.error: WireError | None = None

    # --- connecting ---------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        name: str,
        timeout: float = 5.0,
        credentials: NatsCredentials | None = None,
    ) -> "Wire":
        """Connect to the first server of a comma-separated NATS URL list that answers.
        A server that refuses ``credentials`` raises NatsRefused naming the setting."""
        creds = credentials or NatsCredentials()
        errors = []
        for server in [u.strip() for u in url.split(",") if u.strip()]:
            try:
                async with asyncio.timeout(timeout):
                    return await cls._connect_one(server, name, creds)
            except (OSError, TimeoutError, WireError, ssl.SSLError) as exc:
                refused = creds.refusal(exc)
                if refused is not None:
                    raise NatsRefused(refused) from exc
                errors.append(f"{server}: {exc!r}")
        raise WireError("could not connect: " + "; ".join(errors))

    @classmethod
    async def _connect_one(cls, server: str, name: str, creds: NatsCredentials) -> "Wire":
        if "://" not in server:
            server = "nats://" + server
        parts = urlsplit(server)
        if parts.scheme not in ("nats", "tls"):
            raise WireError(f"unsupported URL scheme {parts.scheme!r}")
        host = parts.hostname or "127.0.0.1"
        port = parts.port or 4222
        loop = asyncio.get_running_loop()
        transport, wire = await loop.create_connection(cls, host, port)
        try:
            info = await wire._info
            if parts.scheme == "tls" or info.get("tls_required"):
                context = creds.tls or ssl.create_default_context()
                upgraded = await loop.start_tls(transport, wire, context, server_hostname=host)
                if upgraded is None:
                    raise WireError("TLS upgrade failed")
                wire._transport = upgraded
            options: dict[str, Any] = {
                "verbose": False,
                "pedantic": False,
                "headers": True,
                "no_responders": True,
                "protocol": 1,
                "lang": "python-kloudmeter",
                "version": __version__,
                "name": name,
            }
            if parts.username and parts.password is not None:
                options["user"] = unquote(parts.username)
                options["pass"] = unquote(parts.password)
            elif parts.username:
                options["auth_token"] = unquote(parts.username)
            options.update(creds.connect_fields(info))
            wire._write(encode_connect(options))
            await wire.flush()
            wire._inbox_prefix = f"_INBOX.km{id(wire):x}{next(wire._reply_ids)}"
            wire.subscribe(wire._inbox_prefix + ".*", wire._on_reply)
        except BaseException:
            transport.close()
            raise
        return wire

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports do not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)
        # 1 MB, not 4: a flush or spill writes pages of several MB at once, and what waits
        # here is held twice for a moment (joined, then the transport's copy); a loopback or
        # LAN server drains 1 MB long before a batch's writes are all queued.
        self._transport.set_write_buffer_limits(high=1 << 20)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(WireError(f"connection lost: {exc!r}" if exc else "connection closed"))

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def data_received(self, data: bytes) -> None:  # replaced by the parser's feed
        self._parser.feed(data)

    def _on_msg(self, sid: bytes, subject: str, reply: str, headers: bytes, data: bytes) -> None:
        handler = self._subs.get(sid)
        if handler is not None:
            handler(WireMsg(subject, reply, headers, data))

    def _on_line(self, line: bytes) -> bool:
        if line == b"PING":
            self._write(b"PONG\r\n")
        elif line == b"PONG":
            if self._pongs:
                fut = self._pongs.pop(0)
                if not fut.done():
                    fut.set_result(None)
        elif line.startswith(b"INFO "):
            if not self._info.done():
                self._info.set_result(json.loads(line[5:]))
        elif line.startswith(b"-ERR"):
            self._fail(WireError(line[5:].decode("utf-8", "replace").strip(" '")))
            return False
        # +OK and anything unknown: nothing to do
        return True

    # --- using it -----------------------------------------------------------------------

    def _fail(self, error: WireError) -> None:
        if self.error is None:
            self.error = error
        for pong in self._pongs:
            if not pong.done():
                pong.set_exception(self.error)
        for answer in self._replies.values():
            if not answer.done():
                answer.set_exception(self.error)
        self._pongs.clear()
        self._replies.clear()
        if not self._info.done():
            self._info.set_exception(self.error)
        self._writable.set()
        if self._transport is not None:
            self._transport.close()

    def _write(self, *data: bytes | memoryview) -> None:
        """Queue ``data``; what is queued goes out in one write when the loop next turns."""
        if self.error is not None:
            raise self.error
        if not self._out:
            asyncio.get_running_loop().call_soon(self._send)
        self._out.extend(data)

    def _send(self) -> None:
        if self._out and self.error is None and self._transport is not None:
            self._transport.write(b"".join(self._out))
        self._out.clear()

    async def drain(self) -> None:
        """Send what is queued and wait while the socket's send buffer is full."""
        self._send()
        await self._writable.wait()
        if self.error is not None:
            raise self.error

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until the server has read everything sent so far (a PING answered)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pongs.append(fut)
        self._write(b"PING\r\n")
        async with asyncio.timeout(timeout):
            await fut

    def subscribe(self, subject: str, handler: Handler) -> bytes:
        sid = str(next(self._sids)).encode()
        self._subs[sid] = handler
        self._write(encode_sub(subject, sid))
        return sid

    def unsubscribe(self, sid: bytes) -> None:
        self._subs.pop(sid, None)
        if self.error is None:
            self._write(encode_unsub(sid))

    def publish(self, subject: str, payload: bytes, reply: str = "") -> None:
        self._write(encode_pub(subject, payload, reply))

    def hpublish(
        self, subject: str, headers: bytes, payload: "bytes | memoryview", reply: str = ""
    ) -> None:
        """Publish with a complete header block (``NATS/1.0\r\n`` ... ``\r\n\r\n``): its
        pieces are queued as they are and joined once, with the rest of the write."""
        self._write(*hpub_parts(subject, headers, payload, reply))

    def new_inbox(self) -> str:
        return f"{self._inbox_prefix}x.{next(self._reply_ids)}"

    def new_reply(self) -> tuple[str, "asyncio.Future[bytes]"]:
        """A reply subject and the future its first answer resolves."""
        token = str(next(self._reply_ids))
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._replies[token] = fut
        return f"{self._inbox_prefix}.{token}", fut

    def forget_reply(self, subject: str) -> None:
        self._replies.pop(subject.rsplit(".", 1)[-1], None)

    def _on_reply(self, msg: WireMsg) -> None:
        fut = self._replies.pop(msg.subject.rsplit(".", 1)[-1], None)
        if fut is None or fut.done():
            return
        status = msg.status()
        if status is not None and status.startswith("503"):
            fut.set_exception(WireError("no responders"))
        else:
            fut.set_result(msg.data)

    async def last_values(
        self, stream: str, subjects: list[str], timeout: float = 10.0, batch: int = 0
    ) -> dict[str, tuple[bytes | None, int]]:
        """The last message of each subject in one direct-get request (``multi_last``, nats-server
        2.11+, streams with allow_direct): subject -> (data, sequence). A subject with nothing
        stored is absent; a KV delete marker gives (None, its sequence). WireError when the
        server cannot answer this way. ``subjects`` may hold wildcards; then ``batch`` (default:
        one per subject) bounds the messages answered."""
        out: dict[str, tuple[bytes | None, int]] = {}
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_msg(msg: WireMsg) -> None:
            if done.done():
                return
            status = msg.status()
            if status is not None:
                if status.startswith(("204", "404")):  # end of batch / nothing found
                    done.set_result(None)
                else:
                    done.set_exception(WireError(f"direct get refused: {status}"))
                return
            subject, seq, deleted = "", 0, False
            for line in msg.headers.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name == b"Nats-Subject":
                    subject = value.strip().decode()
                elif name == b"Nats-Sequence":
                    seq = int(value)
                elif name == b"KV-Operation":
                    deleted = True
            out[subject] = (None if deleted else msg.data, seq)

        inbox = self.new_inbox()
        sid = self.subscribe(inbox, on_msg)
        try:
            request = json.dumps({"multi_last": subjects, "batch": batch or len(subjects)}).encode()
            self.publish(f"$JS.API.DIRECT.GET.{stream}", request, reply=inbox)
            async with asyncio.timeout(timeout):
                await done
        finally:
            self.unsubscribe(sid)
        return out

    async def messages_from(
        self, stream: str, seq: int, batch: int, subject: str, timeout: float = 10.0
    ) -> tuple[list[tuple[int, str, int, bytes]], int]:
        """Up to ``batch`` stored messages from stream sequence ``seq`` on, under the filter
        ``subject``, in stream order, in one direct-get request (``batch`` with
        ``next_by_subj``, nats-server 2.11+, streams with allow_direct): (sequence, subject,
        stored time in epoch ns, data) each, and the messages under the filter left after the
        last one answered (``Nats-Num-Pending``; the server may end an answer early, by
        size). WireError when the server cannot answer this way."""
        out: list[tuple[int, str, int, bytes]] = []
        pending = [0]
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_msg(msg: WireMsg) -> None:
            if done.done():
                return
            headers = dict(_NATS_HEADER.findall(msg.headers))
            if b"Nats-Num-Pending" in headers:
                pending[0] = int(headers[b"Nats-Num-Pending"])
            status = msg.status()
            if status is not None:
                if status.startswith("204"):  # end of batch
                    done.set_result(None)
                elif status.startswith("404"):  # nothing (more) under the filter
                    pending[0] = 0
                    done.set_result(None)
                else:
                    done.set_exception(WireError(f"direct get refused: {status}"))
                return
            stamp = headers.get(b"Nats-Time-Stamp")
            out.append(
                (
                    int(headers.get(b"Nats-Sequence", 0)),
                    headers.get(b"Nats-Subject", b"").decode(),
                    0 if stamp is None else _epoch_ns(stamp.decode()),
                    msg.data,
                )
            )

        inbox = self.new_inbox()
        sid = self.subscribe(inbox, on_msg)
        try:
            request = json.dumps({"seq": seq, "batch": batch, "next_by_subj": subject}).encode()
            self.publish(f"$JS.API.DIRECT.GET.{stream}", request, reply=inbox)
            async with asyncio.timeout(timeout):
                await done
        finally:
            self.unsubscribe(sid)
        return out, pending[0]

    async def close(self) -> None:
        if self.error is None and self._transport is not None:
            self._fail(WireError("connection closed"))


# A direct get's header lines (``Nats-Sequence: 12``): name -> value.
_NATS_HEADER = re.compile(rb"(Nats-[A-Za-z-]+):[ \t]*([^\r\n]*)")


@functools.lru_cache(maxsize=256)
def _epoch_seconds(whole: str) -> int:
    """``YYYY-MM-DDTHH:MM:SS`` in UTC as epoch seconds (messages stored in one second share
    it: cached)."""
    return int(datetime.fromisoformat(whole).replace(tzinfo=UTC).timestamp())


def _epoch_ns(stamp: str) -> int:
    """A ``Nats-Time-Stamp`` header (RFC 3339 in UTC with up to nanoseconds, as Go writes
    it) in epoch nanoseconds."""
    whole, _, rest = stamp.rstrip("Z").partition(".")
    fraction = rest[:9]
    ns = int(fraction.ljust(9, "0")) if fraction.isdigit() else 0
    return _epoch_seconds(whole) * 1_000_000_000 + ns
