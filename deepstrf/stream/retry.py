"""Retrying reads: transient remote errors are retried with exponential backoff.

Transient: timeouts, dropped connections, HTTP 5xx, throttling (429,
``SlowDown``, ``Throttling``...). Anything else (missing object, denied access,
corrupt chunk) is permanent and fails at once. Either way a read that fails
for good raises :class:`StreamReadError` naming what was being read.
"""

from __future__ import annotations

import errno
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ..errors import StoreError

T = TypeVar("T")

_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeoutException",
    "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests",
    "TooManyRequestsException", "ProvisionedThroughputExceededException", "BandwidthLimitExceeded",
}
_TRANSIENT_NAMES = {
    "ReadTimeoutError", "ConnectTimeoutError", "EndpointConnectionError", "ConnectionClosedError",
    "ServerDisconnectedError", "ClientConnectionError", "ClientOSError", "ClientPayloadError",
    "ServerTimeoutError", "IncompleteReadError", "ResponseStreamingError",
}
_TRANSIENT_ERRNOS = {errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED,
                     errno.EPIPE, errno.EAGAIN, errno.EHOSTUNREACH, errno.ENETUNREACH}
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class StreamReadError(StoreError):
    """A read failed for good (permanent error, or transient errors past the retry budget)."""


class TransientError(OSError):
    """Raise (or subclass) to mark an error as worth retrying."""


def _status(exc: BaseException) -> int | None:
    for attr in ("status", "status_code", "code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        value = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(value, int):
            return value
    return None


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return response.get("Error", {}).get("Code")
    return None


def is_transient(exc: BaseException) -> bool:
    """True if ``exc`` (or an exception it was raised from) looks temporary."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, TransientError):
            return True
        if isinstance(exc, _PERMANENT):
            return False
        if isinstance(exc, (TimeoutError, ConnectionError)):
            return True
        if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
            return True
        status = _status(exc)
        if status is not None and (status >= 500 or status == 429):
            return True
        if _error_code(exc) in _TRANSIENT_CODES or type(exc).__name__ in _TRANSIENT_NAMES:
            return True
        text = str(exc)
        if any(code in text for code in ("SlowDown", "Throttl", "503 Service", "500 Internal", "Too Many Requests")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a transient failure.

    Delays grow as ``base_delay * 2**attempt`` (capped at ``max_delay``) with
    full jitter; ``attempts`` counts the first try.
    """

    attempts: int = 6
    base_delay: float = 0.05
    max_delay: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_delay < 0 or self.max_delay < 0:
            raise ValueError(f"RetryPolicy needs attempts >= 1 and delays >= 0, got {self}")

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_delay, self.base_delay * 2 ** attempt))


def call_with_retries(fn: Callable[[], T], what: str, policy: RetryPolicy = RetryPolicy(),
                      on_retry: Callable[[BaseException], None] | None = None) -> T:
    """``fn()``, retried on transient errors; :class:`StreamReadError` naming ``what`` on failure."""
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised with context
            if isinstance(exc, StreamReadError):
                raise
            transient = is_transient(exc)
            if not transient or attempt + 1 == policy.attempts:
                kind = (f"transient error persisted after {policy.attempts} attempts" if transient
                        else "permanent error")
                if transient:
                    advice = " Check the network or raise the retry budget (retry=RetryPolicy(attempts=...))."
                elif isinstance(exc, StoreError):
                    advice = ""  # deepstrf's store errors say what to do already
                else:
                    advice = (" If the traceback above ends in code of yours (a transform, a select function), "
                              "the error is there; else check that the store exists, is complete and readable "
                              "with these storage_options (deepstrf verify URL).")
                raise StreamReadError(f"reading {what} failed ({kind}): {type(exc).__name__}: "
                                      f"{str(exc).rstrip('.')}.{advice}") from exc
            if on_retry is not None:
                on_retry(exc)
            time.sleep(policy.delay(attempt))
    raise AssertionError("unreachable: the loop returns or raises")
