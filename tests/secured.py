"""Secured NATS for tests: NKEYs, operator/account/user JWTs and certificates, all made at test
time into temporary directories (nothing secret is committed).

Keys come from the official ``nkeys`` package (fresh random ed25519 seeds encoded by it). A NATS
JWT is three base64url parts, ``header.claims.signature``, with header
``{"typ": "JWT", "alg": "ed25519-nkey"}`` and the signature made over ``header.claims`` with the
issuer's NKEY (an operator signs accounts, an account signs users). No Python library for NATS
JWTs installs from PyPI here, so the claims are written below; ``nsc`` makes the same files.
"""

import base64
import hashlib
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys


@dataclass(frozen=True)
class Key:
    seed: bytes
    public: str

    def sign(self, data: bytes) -> bytes:
        kp = nkeys.from_seed(bytearray(self.seed))
        try:
            signature: bytes = kp.sign(data)
        finally:
            kp.wipe()
        return signature


def new_key(prefix: int) -> Key:
    """A fresh NKEY of one kind: nkeys.PREFIX_BYTE_OPERATOR, _ACCOUNT or _USER."""
    seed = bytes(nkeys.encode_seed(os.urandom(32), prefix))
    kp = nkeys.from_seed(bytearray(seed))
    public = kp.public_key.decode()
    kp.wipe()
    return Key(seed, public)


def operator_key() -> Key:
    return new_key(nkeys.PREFIX_BYTE_OPERATOR)


def account_key() -> Key:
    return new_key(nkeys.PREFIX_BYTE_ACCOUNT)


def user_key() -> Key:
    return new_key(nkeys.PREFIX_BYTE_USER)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def encode_jwt(issuer: Key, subject: str, name: str, nats: dict[str, Any], iat: int = 0) -> str:
    """A NATS JWT (v2 claims) for ``subject``, signed by ``issuer``."""
    claims: dict[str, Any] = {
        "iat": iat or int(time.time()),
        "iss": issuer.public,
        "name": name,
        "sub": subject,
        "nats": {"version": 2, **nats},
    }
    # jti: an id of the claims (the Go library hashes the claims without it, base32).
    digest = hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = issuer.sign(f"{header}.{body}".encode())
    return f"{header}.{body}.{_b64(signature)}"


def operator_jwt(op: Key) -> str:
    return encode_jwt(op, op.public, "test-operator", {"type": "operator"})


# An account with JetStream on and no other limits.
_UNLIMITED = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
    "mem_storage": -1,
    "disk_storage": -1,
    "streams": -1,
    "consumer": -1,
}


def account_jwt(
    op: Key, account: Key, revocations: dict[str, int] | None = None, jetstream: bool = True
) -> str:
    limits = dict(_UNLIMITED)
    if not jetstream:  # the system account
        for name in ("mem_storage", "disk_storage", "streams", "consumer"):
            limits.pop(name)
    nats: dict[str, Any] = {"type": "account", "limits": limits}
    if revocations:
        nats["revocations"] = revocations
    return encode_jwt(op, account.public, "test-account", nats)


def user_jwt(
    account: Key,
    user: Key,
    name: str = "kloudmeter",
    permissions: dict[str, Any] | None = None,
    iat_offset: int = 0,
) -> str:
    """A user of ``account``; ``iat_offset`` moves its issue time (revocations cover users
    issued at or before the revocation's time)."""
    nats: dict[str, Any] = {"type": "user", "subs": -1, "data": -1, "payload": -1}
    nats.update(permissions or {})
    return encode_jwt(account, user.public, name, nats, iat=int(time.time()) + iat_offset)


def creds_text(jwt: str, user: Key) -> str:
    """A credentials file in the layout ``nsc generate creds`` writes."""
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user.seed.decode()}\n"
        "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


def write_secret(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


# --- certificates (openssl) ---------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory: Path, name: str = "ca") -> tuple[Path, Path]:
    """A self-signed CA valid for a day: (certificate, key)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "1",
        "-subj", f"/CN=kloudmeter test {name}", cwd=directory,
    )  # fmt: skip
    return cert, key


def make_cert(
    directory: Path, ca: tuple[Path, Path], name: str, *, server: bool
) -> tuple[Path, Path]:
    """A certificate signed by ``ca``: for a server on 127.0.0.1/localhost, or a client."""
    cert, key, csr = (directory / f"{name}.pem", directory / f"{name}-key.pem",
                      directory / f"{name}.csr")  # fmt: skip
    ext = directory / f"{name}.ext"
    if server:
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    else:
        ext.write_text(f"subjectAltName=DNS:{name}\nextendedKeyUsage=clientAuth\n")
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}", cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-out", str(cert), "-days", "1", "-extfile", str(ext),
        cwd=directory,
    )  # fmt: skip
    key.chmod(0o600)
    return cert, key
