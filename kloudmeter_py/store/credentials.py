"""Credentials for secured NATS: a JWT credentials file, an NKEY seed, client TLS.

One place reads and checks the files named by ``NATS_CREDS``, ``NATS_NKEY_SEED``,
``NATS_TLS_CERT``, ``NATS_TLS_KEY`` and ``NATS_TLS_CA``, so that both kinds of connection - nats-py
(``nats_py_options``) and the worker's lean one (``connect_fields``, ``tls``) - authenticate the
same way, and a setting that cannot work stops the program at start with a message naming it.
Signing uses the official ``nkeys`` package (ed25519); nothing here does crypto of its own.

Also here: ``refusal``, which turns what a refused connection raised (an authorization
violation, a TLS alert, an untrusted server certificate) into such a message, and
``connect_nats``, the nats-py connection that stops on one instead of retrying forever.
"""

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import json
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from nats.aio.client import Client

from kloudmeter_py.config import Settings
from kloudmeter_py.errors import ConfigError

log = structlog.get_logger(__name__)

_JWT_BLOCK = re.compile(
    r"-{3,}\s*BEGIN NATS USER JWT\s*-{3,}\s*\n\s*([A-Za-z0-9_=.-]+)\s*\n"
    r"\s*-{3,}\s*END NATS USER JWT"
)
_SEED_BLOCK = re.compile(
    r"-{3,}\s*BEGIN USER NKEY SEED\s*-{3,}\s*\n\s*(S[A-Z2-7]+)\s*\n\s*-{3,}\s*END USER NKEY SEED"
)
_SEED = re.compile(r"(?<![A-Z2-7])S[A-Z2-7]{57}(?![A-Z2-7])")


class NatsRefused(ConfigError):
    """The server refused this service's credentials or certificate (a start-up error)."""


@dataclass(frozen=True, repr=False)
class NatsCredentials:
    """What a connection presents to NATS. ``repr`` never shows the seed."""

    jwt: str | None = None
    # The user's seed and which setting it came from (NATS_CREDS or NATS_NKEY_SEED).
    seed: bytes | None = None
    seed_setting: str | None = None
    public_key: str | None = None
    tls: ssl.SSLContext | None = None
    # The settings these came from, to name them when the server refuses them.
    settings: Settings | None = None

    def __repr__(self) -> str:
        return (
            f"NatsCredentials(seed_setting={self.seed_setting!r}, "
            f"public_key={self.public_key!r}, tls={self.tls is not None})"
        )

    def sign(self, nonce: str) -> str:
        """The server's nonce signed with the user's seed, base64url as NATS expects."""
        import nkeys

        assert self.seed is not None
        kp = nkeys.from_seed(bytearray(self.seed))
        try:
            raw: bytes = kp.sign(nonce.encode())
        finally:
            kp.wipe()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    def connect_fields(self, info: dict[str, Any]) -> dict[str, str]:
        """The CONNECT fields for a server whose INFO is ``info``: ``jwt`` + ``sig`` for a
        credentials file, ``nkey`` + ``sig`` for an NKEY seed, nothing without a seed or a
        nonce to sign."""
        if self.seed is None:
            return {}
        nonce = info.get("nonce")
        if not nonce:
            # The server asks for no signature (it has no NKEY or JWT users): as nats-py does,
            # connect without one, and let the server decide.
            return {}
        fields = {"sig": self.sign(str(nonce))}
        if self.jwt is not None:
            fields["jwt"] = self.jwt
        else:
            assert self.public_key is not None
            fields["nkey"] = self.public_key
        return fields

    def refusal(self, exc: BaseException) -> str | None:
        """See the module's ``refusal``; None without settings."""
        return refusal(exc, self.settings) if self.settings is not None else None

    def nats_py_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect`` that present the same credentials."""
        options: dict[str, Any] = {}
        if self.seed is not None:
            # nats-py signs the nonce with a seed string (and sends its public key as ``nkey``),
            # or sends ``jwt`` instead when a JWT callback is given too.
            options["nkeys_seed_str"] = self.seed.decode()
            if self.jwt is not None:
                jwt = self.jwt
                options["user_jwt_cb"] = lambda: bytearray(jwt.encode())
        if self.tls is not None:
            options["tls"] = self.tls
        return options


def _read(setting: str, path: str) -> bytes:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{setting}: {path} does not exist")
    try:
        return p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc}") from None


def _read_text(setting: str, path: str, what: str) -> str:
    try:
        return _read(setting, path).decode()
    except UnicodeDecodeError:
        raise ConfigError(f"{setting}: {path} is not {what}") from None


def _check_seed(setting: str, path: str, seed: str) -> str:
    """The public key of a user seed, or a ConfigError naming ``setting``."""
    import nkeys

    try:
        # nkeys decodes a seed without checking its checksum: check it with nkeys' own CRC.
        raw = base64.b32decode(seed + "=" * (-len(seed) % 8))
        if len(raw) != 36 or nkeys.crc16_checksum(raw[:-2]) != raw[-2:]:
            raise ValueError("bad checksum")
        kp = nkeys.from_seed(bytearray(seed.encode()))
    except Exception:
        raise ConfigError(f"{setting}: {path} holds no valid NKEY seed") from None
    try:
        public: str = kp.public_key.decode()
    finally:
        kp.wipe()
    if not public.startswith("U"):
        raise ConfigError(
            f"{setting}: {path} holds a seed for {_KINDS.get(public[:1], 'another kind of key')}, "
            "not a user's (seeds starting SU)"
        )
    return public


_KINDS = {"A": "an account", "O": "an operator", "N": "a server", "C": "a cluster"}


def _jwt_claims(setting: str, path: str, token: str) -> dict[str, Any]:
    parts = token.split(".")
    if len(parts) != 3:
        raise ConfigError(f"{setting}: {path} holds no valid user JWT")
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError):
        raise ConfigError(f"{setting}: {path} holds no valid user JWT") from None
    if not isinstance(claims, dict):
        raise ConfigError(f"{setting}: {path} holds no valid user JWT")
    kind = (claims.get("nats") or {}).get("type") or claims.get("type")
    if kind != "user":
        raise ConfigError(f"{setting}: {path} holds a JWT of type {kind!r}, not a user JWT")
    return claims


def _load_creds(path: str) -> NatsCredentials:
    text = _read_text("NATS_CREDS", path, "a NATS credentials file")
    jwt_match = _JWT_BLOCK.search(text)
    seed_match = _SEED_BLOCK.search(text)
    if jwt_match is None or seed_match is None:
        raise ConfigError(
            f"NATS_CREDS: {path} is not a NATS credentials file (it needs a "
            "'BEGIN NATS USER JWT' block and a 'BEGIN USER NKEY SEED' block)"
        )
    token, seed = jwt_match.group(1), seed_match.group(1)
    claims = _jwt_claims("NATS_CREDS", path, token)
    public = _check_seed("NATS_CREDS", path, seed)
    if claims.get("sub") != public:
        raise ConfigError(f"NATS_CREDS: in {path}, the seed does not belong to the JWT's user")
    return NatsCredentials(
        jwt=token, seed=seed.encode(), seed_setting="NATS_CREDS", public_key=public
    )


def _load_seed(path: str) -> NatsCredentials:
    text = _read_text("NATS_NKEY_SEED", path, "an NKEY seed file")
    block = _SEED_BLOCK.search(text)
    seeds = [block.group(1)] if block else _SEED.findall(text)
    if len(seeds) != 1:
        raise ConfigError(
            f"NATS_NKEY_SEED: {path} is not an NKEY seed file (expected one seed, SU...)"
        )
    public = _check_seed("NATS_NKEY_SEED", path, seeds[0])
    return NatsCredentials(seed=seeds[0].encode(), seed_setting="NATS_NKEY_SEED", public_key=public)


def _tls_context(settings: Settings) -> ssl.SSLContext | None:
    if not (settings.nats_tls_ca or settings.nats_tls_cert):
        return None
    for setting, path in (
        ("NATS_TLS_CA", settings.nats_tls_ca),
        ("NATS_TLS_CERT", settings.nats_tls_cert),
        ("NATS_TLS_KEY", settings.nats_tls_key),
    ):
        if path:
            _read(setting, path)  # exists and is readable, else a message naming it
    try:
        context = ssl.create_default_context(cafile=settings.nats_tls_ca or None)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(
            f"NATS_TLS_CA: {settings.nats_tls_ca} holds no PEM CA certificate: {exc}"
        ) from None
    if settings.nats_tls_cert and settings.nats_tls_key:
        try:
            context.load_cert_chain(settings.nats_tls_cert, settings.nats_tls_key)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"NATS_TLS_CERT: {settings.nats_tls_cert} with NATS_TLS_KEY "
                f"{settings.nats_tls_key} is not a PEM certificate and its private key: {exc}"
            ) from None
    return context


def secured_setting(settings: Settings) -> str | None:
    """The first secured-NATS setting that is set, or None."""
    for name, value in (
        ("NATS_CREDS", settings.nats_creds),
        ("NATS_NKEY_SEED", settings.nats_nkey_seed),
        ("NATS_TLS_CERT", settings.nats_tls_cert),
        ("NATS_TLS_CA", settings.nats_tls_ca),
    ):
        if value:
            return name
    return None


def load(settings: Settings) -> NatsCredentials:
    """Read and check every secured-NATS file ``settings`` names. ConfigError names the setting
    of a file that is missing, unreadable or not what it should be."""
    if settings.nats_creds:
        base = _load_creds(settings.nats_creds)
    elif settings.nats_nkey_seed:
        base = _load_seed(settings.nats_nkey_seed)
    else:
        base = NatsCredentials()
    return dataclasses.replace(base, tls=_tls_context(settings), settings=settings)


def refusal(exc: BaseException, settings: Settings) -> str | None:
    """A start-up message naming the setting, when ``exc`` says that the server refused this
    service's credentials or certificate (or its certificate was not trusted); else None."""
    text = f"{type(exc).__name__}: {exc}".lower()
    where = settings.nats_url
    if "authorization" in text or "authentication" in text or "user_authentication" in text:
        if settings.nats_creds:
            setting = "NATS_CREDS"
            hint = "the user JWT is revoked, expired, or not signed by an account this server knows"
        elif settings.nats_nkey_seed:
            setting = "NATS_NKEY_SEED"
            hint = "the seed's public key is not a user of this server"
        else:
            setting = "NATS_URL"
            hint = "the user/password or token in the URL is wrong or missing"
        return f"{setting}: the NATS server at {where} refused authorization ({hint})"
    if isinstance(exc, ssl.SSLCertVerificationError) or "certificate verify failed" in text:
        return (
            f"NATS_TLS_CA: the certificate of the NATS server at {where} is not trusted "
            f"({exc}); set NATS_TLS_CA to the CA that signed it"
        )
    # TLS alerts the server sends when it does not accept the client's certificate (or gets
    # none): the worker's connection sees them inside a "connection lost" error, so by text.
    if any(alert in text for alert in _CERT_ALERTS):
        given = "the client certificate" if settings.nats_tls_cert else "no client certificate"
        return (
            f"NATS_TLS_CERT: the NATS server at {where} refused {given} ({exc}); it needs "
            "NATS_TLS_CERT and NATS_TLS_KEY signed by a CA it trusts"
        )
    if "tls required" in text or "secure connection" in text:
        return f"NATS_URL: the NATS server at {where} requires TLS ({exc})"
    return None


_CERT_ALERTS = (
    "certificate required",
    "bad certificate",
    "unknown ca",
    "certificate unknown",
    "unsupported certificate",
    "certificate expired",
    "certificate revoked",
    "access denied",
)


async def connect_nats(
    servers: list[str], *, name: str, settings: Settings | None, **kw: Any
) -> Client:
    """``nats.connect`` with the credentials ``settings`` names. While the first connection is
    being made, an error that means the server refused them (see ``refusal``) ends the attempt
    with NatsRefused: nats-py would otherwise retry such a server forever."""
    creds = load(settings) if settings is not None else NatsCredentials()
    outer: Callable[[Exception], Awaitable[None]] | None = kw.pop("error_cb", None)
    nc = Client()
    refused: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def on_error(exc: Exception) -> None:
        if settings is not None and not refused.done() and not nc.is_connected:
            message = refusal(exc, settings)
            if message is not None:
                refused.set_result(message)
        if outer is not None:
            await outer(exc)
        else:
            log.warning("nats.error", error=repr(exc))

    connecting: asyncio.Future[None] = asyncio.ensure_future(
        nc.connect(servers=servers, name=name, error_cb=on_error, **creds.nats_py_options(), **kw)
    )
    try:
        waiting: set[asyncio.Future[Any]] = {connecting, refused}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not connecting.done():
            raise NatsRefused(refused.result())
        connecting.result()
    except BaseException:
        connecting.cancel()
        with contextlib.suppress(BaseException):
            await connecting
        with contextlib.suppress(Exception):
            await nc.close()
        raise
    finally:
        if not refused.done():
            refused.cancel()
    return nc
