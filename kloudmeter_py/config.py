"""Settings: one frozen value, built from the environment by the CLI and directly by tests."""

import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

import msgspec

from kloudmeter_py.errors import ConfigError

_STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str = "nats://127.0.0.1:4222"
    # Name of the event stream, and the first token of every subject it owns.
    stream: str = "meters"
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    # Width in seconds of the finest summary window.
    interval: int = 60
    # Fixed at setup: events are spread over this many partitions by subject. A worker
    # behind works through one partition's backlog at a time and holds its keys only
    # (core.rounds.focus): 16 rather than 4 made that a quarter as many. On the wide bench
    # shape (a million events, 10,000 subjects over 30 days, the same hour): two workers'
    # CPU 67.4 -> 53.9-54.6 s and peak RSS 183 -> 154-165 MB a worker at the same rate; one
    # worker 69.3 -> 48.4-50.7 s, 197 -> 172-175 MB, 0.16 -> 0.178-0.192 of the raw baseline;
    # the live shape unchanged (docs/performance-history.md).
    partitions: int = 16
    # How long summaries are kept after their window closes: minute level (seconds),
    # hour level (seconds), day level (days).
    minute_retention: int = 7200
    hour_retention: int = 2 * 86400
    day_retention_days: int = 400
    # Most events folded in one write round, and how long a round may gather them.
    batch_size: int = 50_000
    flush_ms: int = 1000
    # Under load, summary windows (and, while a backlog waits, readings) are written at most
    # this often, or when the key cache is full; 0 writes them every round. 30 s rather than
    # 5 s halved the KV writes of a wide backlog (1M events: 2.77 -> 1.35 an event, nats-server
    # CPU 137 -> 74 s). Both intervals stay well below the consumer's 120 s ack wait: a
    # message is acknowledged only after its round and the summary flush.
    summary_flush_ms: int = 30_000
    # The worker's cache of key states (readings and summaries), in MB (an estimate).
    cache_mb: int = 192
    # Summary pages and readings a worker holds between flushes while events wait, in MB (an
    # estimate): beyond it the pages are written (and the readings too where they are half of
    # it; the checkpoint waits for the flush) and let go (core.rounds.spills). With the
    # round size (core.rounds.round_limit), what bounds a worker's memory on a wide
    # backlog, where a page is seldom touched twice before the flush; 0 writes them after
    # every such round. Also what a runner's key cache must hold before the runner
    # writes it and lets it go at a turn between partitions (three quarters of it where the
    # next partition's keys are not held: core.rounds.lets_go). See
    # docs/performance-history.md.
    spill_mb: int = 12
    # A directory a worker appends a line of its memory to every 100 ms (worker.memtrace),
    # memory-<worker id>.jsonl; empty: none. For finding what sets a worker's peak.
    memory_trace: str = ""
    # Largest HTTP request body accepted.
    max_body_bytes: int = 1024 * 1024
    # Longest a read (a query, a listing, a rebuild) may work before it answers 503.
    read_timeout_ms: int = 30_000
    # Stream duplicate window (seconds) for event ids.
    dedup_window: int = 120
    # Worker-side dedup of event ids for this many seconds (0 = only the stream's window).
    dedup_horizon: int = 0
    # How long raw events are kept (seconds, 0 = forever).
    retention: int = 0
    # Exact distinct values kept per unique-count reading.
    unique_limit: int = 10_000
    data_dir: str = ".kloudmeter"
    # Seconds before a dead worker's partitions move to another worker (fixed at setup).
    lease_ttl: int = 10
    # API tokens: off by default; KLOUDMETER_AUTH=on turns them on, and so does an admin token.
    auth: bool = False
    admin_token: str | None = None
    # Serve without tokens on a non-loopback address (refused unless this is set).
    allow_no_auth: bool = False
    # The usage summary's lifecycle events and where their location is.
    usage_event_type: str = "lifecycle"
    usage_location: str = "$.location"
    # Replicas for streams and buckets (3 on a cluster).
    replicas: int = 1
    # Secured NATS, for every connection (nats-py and the worker's lean one): a JWT
    # credentials file or an NKEY seed file (not both), and client TLS: certificate and key
    # (mutual TLS, together) and the CA that signed the server's certificate. Paths; the files
    # are read and checked at start by store.credentials.
    nats_creds: str | None = None
    nats_nkey_seed: str | None = None
    nats_tls_cert: str | None = None
    nats_tls_key: str | None = None
    nats_tls_ca: str | None = None

    def __post_init__(self) -> None:
        if not _STREAM_NAME.fullmatch(self.stream):
            raise ConfigError(
                f"METER_NATS_STREAM: {self.stream!r} is not a valid stream name "
                "(1-32 of A-Z a-z 0-9 _ -)"
            )
        for var, value, low, high in (
            ("HTTP_SERVER_PORT", self.http_port, 0, 65535),
            ("METER_INTERVAL", self.interval, 1, 3600),
            ("METER_MINUTE_RETENTION", self.minute_retention, 1, 366 * 86400),
            ("METER_HOUR_RETENTION", self.hour_retention, 1, 3660 * 86400),
            ("METER_DAY_RETENTION_DAYS", self.day_retention_days, 1, 36500),
            ("METER_PARTITIONS", self.partitions, 1, 1024),
            ("METER_BATCH_SIZE", self.batch_size, 1, 1_000_000),
            ("METER_FLUSH_MS", self.flush_ms, 0, 20_000),
            ("METER_SUMMARY_FLUSH_MS", self.summary_flush_ms, 0, 30_000),
            ("METER_CACHE_MB", self.cache_mb, 1, 1_000_000),
            ("METER_SPILL_MB", self.spill_mb, 0, 1_000_000),
            ("METER_MAX_BODY_BYTES", self.max_body_bytes, 1024, 64 * 1024 * 1024),
            ("METER_READ_TIMEOUT_MS", self.read_timeout_ms, 1, 3_600_000),
            ("METER_DEDUP_WINDOW", self.dedup_window, 1, 10 * 365 * 86400),
            ("METER_RETENTION", self.retention, 0, 100 * 365 * 86400),
            ("METER_DEDUP_HORIZON", self.dedup_horizon, 0, 100 * 365 * 86400),
            ("METER_UNIQUE_LIMIT", self.unique_limit, 1, 1_000_000),
            ("METER_REPLICAS", self.replicas, 1, 5),
            ("METER_LEASE_TTL", self.lease_ttl, 2, 3600),
        ):
            if not low <= value <= high:
                raise ConfigError(f"{var}: {value} is out of range {low}..{high}")
        if 3600 % self.interval:
            raise ConfigError(
                f"METER_INTERVAL: {self.interval} must divide an hour evenly "
                "(for example 1, 10, 30, 60, 300)"
            )
        if self.retention and self.dedup_window > self.retention:
            raise ConfigError("METER_DEDUP_WINDOW: may not exceed METER_RETENTION")
        if self.admin_token is not None and len(self.admin_token) < 16:
            raise ConfigError("KLOUDMETER_ADMIN_TOKEN: use at least 16 characters")
        from kloudmeter_py.core.paths import PathError, compile_path

        try:
            compile_path(self.usage_location)
        except PathError as exc:
            raise ConfigError(f"KLOUDMETER_USAGE_LOCATION: {exc}") from None
        if self.nats_creds and self.nats_nkey_seed:
            raise ConfigError(
                "NATS_NKEY_SEED: set either NATS_CREDS (a user JWT and its seed) or "
                "NATS_NKEY_SEED (an NKEY user's seed), not both"
            )
        if bool(self.nats_tls_cert) != bool(self.nats_tls_key):
            missing = "NATS_TLS_KEY" if self.nats_tls_cert else "NATS_TLS_CERT"
            raise ConfigError(
                f"{missing}: a client certificate needs both NATS_TLS_CERT and NATS_TLS_KEY"
            )
        parsed = urlparse(self.nats_url.split(",")[0])
        if parsed.scheme not in ("nats", "tls", "ws", "wss") or not parsed.hostname:
            raise ConfigError(f"NATS_URL: {self.nats_url!r} is not a nats:// URL")

    def summary_retention(self, level: str) -> int:
        """Seconds a summary of ``level`` is kept after its window closes."""
        return {
            "minute": self.minute_retention,
            "hour": self.hour_retention,
            "day": self.day_retention_days * 86400,
        }[level]

    @property
    def auth_enabled(self) -> bool:
        return self.auth or self.admin_token is not None

    def check_exposure(self) -> None:
        """Refuse to serve without tokens anywhere but loopback, unless told explicitly."""
        loopback = self.http_host in ("127.0.0.1", "localhost", "::1") or self.http_host.startswith(
            "127."
        )
        if not loopback and not self.auth_enabled and not self.allow_no_auth:
            raise ConfigError(
                f"HTTP_SERVER_HOST: {self.http_host} is not loopback and API tokens are off; "
                "set KLOUDMETER_AUTH=on (with KLOUDMETER_ADMIN_TOKEN or `kloudmeter token "
                "create --admin`), or KLOUDMETER_ALLOW_NO_AUTH=1 to serve without tokens"
            )

    @property
    def nats_host(self) -> str:
        return urlparse(self.nats_url.split(",")[0]).hostname or "127.0.0.1"

    @property
    def nats_port(self) -> int:
        return urlparse(self.nats_url.split(",")[0]).port or 4222

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: Any) -> "Settings":
        values: dict[str, Any] = {}
        for var, field, kind in _ENV:
            raw = environ.get(var)
            if raw is None or raw == "":
                continue
            if kind is bool:
                lowered = raw.strip().lower()
                if lowered not in ("1", "0", "true", "false", "on", "off", "yes", "no"):
                    raise ConfigError(f"{var}: {raw!r} is not on/off")
                values[field] = lowered in ("1", "true", "on", "yes")
            elif kind is int:
                try:
                    values[field] = int(raw.strip())
                except ValueError:
                    raise ConfigError(f"{var}: {raw!r} is not an integer") from None
            else:
                values[field] = raw.strip()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def child_env(settings: "Settings") -> dict[str, str]:
    """The environment variables that give a child process (``kloudmeter up --workers``'
    extra workers) these settings, command-line overrides included."""
    env: dict[str, str] = {}
    for var, field, kind in _ENV:
        value = getattr(settings, field)
        if value is None:
            continue
        if kind is bool:
            env[var] = "on" if value else "off"
        else:
            env[var] = str(value)
    return env


def default_workers(partitions: int) -> int:
    """How many worker processes ``kloudmeter up`` and ``kloudmeter bench`` run unless told:
    one per CPU this process may use, at most one per partition (a worker beyond them would
    hold no lease), at least one.

    A worker is one Python process and folds on one core at most. On the wide bench shape
    (10,000 subjects, a month of event times) on a 2-core machine, one worker cleared a
    million events at 7,625 events/s (0.123 of the raw JetStream baseline), two at
    10,918-11,623 (0.183-0.191), the same hour; since each of two reads only its own
    partitions (a consumer per partition, worker.runner), 16,860-18,940 (0.22-0.256). On the
    live shape, with the bench's publisher and nats-server on the same two cores, two used
    about as much CPU as one and reached 0.599-0.698 of the baseline against 0.59 for one
    (docs/performance-history.md).
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, partitions))


# The secured-NATS settings: environment variable and Settings field (all paths to files).
NATS_AUTH: tuple[tuple[str, str], ...] = (
    ("NATS_CREDS", "nats_creds"),
    ("NATS_NKEY_SEED", "nats_nkey_seed"),
    ("NATS_TLS_CERT", "nats_tls_cert"),
    ("NATS_TLS_KEY", "nats_tls_key"),
    ("NATS_TLS_CA", "nats_tls_ca"),
)

_ENV: tuple[tuple[str, str, type], ...] = (
    ("NATS_URL", "nats_url", str),
    ("METER_NATS_STREAM", "stream", str),
    ("HTTP_SERVER_HOST", "http_host", str),
    ("HTTP_SERVER_PORT", "http_port", int),
    ("METER_INTERVAL", "interval", int),
    ("METER_MINUTE_RETENTION", "minute_retention", int),
    ("METER_HOUR_RETENTION", "hour_retention", int),
    ("METER_DAY_RETENTION_DAYS", "day_retention_days", int),
    ("METER_PARTITIONS", "partitions", int),
    ("METER_BATCH_SIZE", "batch_size", int),
    ("METER_FLUSH_MS", "flush_ms", int),
    ("METER_SUMMARY_FLUSH_MS", "summary_flush_ms", int),
    ("METER_CACHE_MB", "cache_mb", int),
    ("METER_SPILL_MB", "spill_mb", int),
    ("METER_MEMORY_TRACE", "memory_trace", str),
    ("METER_MAX_BODY_BYTES", "max_body_bytes", int),
    ("METER_READ_TIMEOUT_MS", "read_timeout_ms", int),
    ("METER_DEDUP_WINDOW", "dedup_window", int),
    ("METER_RETENTION", "retention", int),
    ("METER_DEDUP_HORIZON", "dedup_horizon", int),
    ("METER_UNIQUE_LIMIT", "unique_limit", int),
    ("KLOUDMETER_DATA_DIR", "data_dir", str),
    ("METER_REPLICAS", "replicas", int),
    ("METER_LEASE_TTL", "lease_ttl", int),
    ("KLOUDMETER_AUTH", "auth", bool),
    ("KLOUDMETER_USAGE_EVENT_TYPE", "usage_event_type", str),
    ("KLOUDMETER_USAGE_LOCATION", "usage_location", str),
    ("KLOUDMETER_ADMIN_TOKEN", "admin_token", str),
    ("KLOUDMETER_ALLOW_NO_AUTH", "allow_no_auth", bool),
    *((var, field, str) for var, field in NATS_AUTH),
)
