"""The error tree. Only the worker loop and the gateway middleware turn these into acks or statuses.

KloudmeterError
 +-- InvalidInput      permanent: HTTP 400 (413 for size), or dead letter on the stream
 +-- Unauthorized      HTTP 401: no token, or one that is not valid (any more)
 +-- Forbidden         HTTP 403: a valid token whose role or tenant may not do this
 +-- NotFound          HTTP 404
 +-- Conflict          HTTP 409 (or a retry for a lost compare-and-set)
 +-- Unavailable       HTTP 503, or retry later in the worker
      +-- ReadTimeout   HTTP 503: a read passed its deadline (METER_READ_TIMEOUT_MS)
ConfigError            bad settings at start; the CLI prints it and exits 2
"""


class KloudmeterError(Exception):
    status = 500

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidInput(KloudmeterError):
    status = 400


class PayloadTooLarge(InvalidInput):
    status = 413


class Unauthorized(KloudmeterError):
    status = 401


class Forbidden(KloudmeterError):
    status = 403


class NotFound(KloudmeterError):
    status = 404


class Conflict(KloudmeterError):
    status = 409


class Unavailable(KloudmeterError):
    status = 503


class ReadTimeout(Unavailable):
    """A read (a query, a listing, a rebuild) passed its deadline and was stopped."""


class ConfigError(Exception):
    """A setting that cannot be used; the message names the variable."""
