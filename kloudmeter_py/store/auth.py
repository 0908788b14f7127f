"""API users and tokens in the ``auth`` KV bucket. Tokens are shown once and stored as hashes.

Keys: ``user.<id>`` -> the user (id, name, tenant, role, token hash, created);
``token.<sha256 hex>`` -> the user id.
"""

import hashlib
import hmac
import secrets
import uuid
from datetime import UTC, datetime

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from kloudmeter_py.errors import InvalidInput, NotFound
from kloudmeter_py.store.kv import get_with_revision, scan
from kloudmeter_py.store.layout import Layout

ROLES = ("admin", "user")
_TENANT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


class User(msgspec.Struct, kw_only=True):
    id: str
    name: str
    tenant: str
    role: str
    tokenHash: str
    createdAt: datetime


class Principal(msgspec.Struct, frozen=True):
    """Who is calling: an admin may act for any tenant, a user only for its own."""

    user_id: str
    role: str
    tenant: str | None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


_user_decoder = msgspec.json.Decoder(User)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "km_" + secrets.token_urlsafe(32)


def check_tenant(tenant: str) -> str:
    if not tenant or len(tenant) > 128 or not set(tenant) <= _TENANT_CHARS:
        raise InvalidInput("tenant: 1-128 of A-Z a-z 0-9 _ -", field="tenant")
    return tenant


class AuthStore:
    def __init__(self, js: JetStreamContext, layout: Layout, admin_token: str | None = None):
        self.js = js
        self.layout = layout
        self._admin_hash = hash_token(admin_token) if admin_token else None
        self._kv: KeyValue | None = None

    async def kv(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.js.key_value(self.layout.auth_bucket)
        return self._kv

    async def create_user(self, name: str, tenant: str, role: str) -> tuple[User, str]:
        if role not in ROLES:
            raise InvalidInput(f"role: one of {', '.join(ROLES)}", field="role")
        check_tenant(tenant)
        token = new_token()
        user = User(
            id=uuid.uuid4().hex[:12],
            name=name or tenant,
            tenant=tenant,
            role=role,
            tokenHash=hash_token(token),
            createdAt=datetime.now(UTC),
        )
        kv = await self.kv()
        await kv.create(f"token.{user.tokenHash}", user.id.encode())
        await kv.create(f"user.{user.id}", msgspec.json.encode(user))
        return user, token

    async def list_users(self) -> list[User]:
        return [
            _user_decoder.decode(v)
            for _, v in await scan(self.js, self.layout.auth_bucket, "user.*")
        ]

    async def delete_user(self, user_id: str) -> None:
        if not user_id or not set(user_id) <= _TENANT_CHARS:
            raise NotFound("user not found", field="id")
        kv = await self.kv()
        value, revision = await get_with_revision(kv, f"user.{user_id}")
        if value is None:
            raise NotFound("user not found", field="id")
        user = _user_decoder.decode(value)
        # The token first: from here on it authenticates nobody.
        await kv.delete(f"token.{user.tokenHash}")
        try:
            await kv.delete(f"user.{user_id}", last=revision)
        except KeyWrongLastSequenceError:
            await kv.delete(f"user.{user_id}")

    async def authenticate(self, token: str) -> Principal | None:
        digest = hash_token(token)
        if self._admin_hash is not None and hmac.compare_digest(digest, self._admin_hash):
            return Principal(user_id="bootstrap-admin", role="admin", tenant=None)
        # The lookup is by hash: a stored hash can only match a token that hashes to it,
        # and no comparison of the secret itself happens here.
        value, _ = await get_with_revision(await self.kv(), f"token.{digest}")
        if value is None:
            return None
        user_value, _ = await get_with_revision(await self.kv(), f"user.{value.decode()}")
        if user_value is None:
            return None
        user = _user_decoder.decode(user_value)
        if not hmac.compare_digest(user.tokenHash, digest):
            return None
        return Principal(user_id=user.id, role=user.role, tenant=user.tenant)
