"""What can go wrong talking to Kinesis, and which failures a retry can help: one AWS call retried while throttled
or unreachable (`call`), then `LogUnavailable`."""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import stamina

from gamestream.log.base import LogUnavailable

RETRYABLE_CODES = {"ProvisionedThroughputExceededException", "ThrottlingException", "LimitExceededException",
                   "InternalFailure", "InternalFailureException", "ServiceUnavailable",
                   "ServiceUnavailableException", "KMSThrottlingException", "RequestTimeout",
                   "RequestTimeoutException", "SlowDown"}
# a stream being created, updated or deleted: the caller waits (LogUnavailable)
STREAM_BUSY_CODES = ("ResourceInUseException", "ResourceNotFoundException")


class EntriesFailed(Exception):
    """Some entries of a PutRecords call came back with an ErrorCode (throttled, InternalFailure)."""

    def __init__(self, codes: collections.Counter) -> None:
        super().__init__(", ".join(f"{code} ×{count}" for code, count in codes.items()))
        self.codes = codes


def error_code(error: BaseException) -> str:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def transient(error: BaseException) -> bool:
    """Worth retrying the same call: throttling, a server-side failure, a connection or read timeout."""
    import botocore.exceptions as bx

    if isinstance(error, EntriesFailed):
        return True
    if isinstance(error, (bx.ConnectionError, bx.HTTPClientError)):  # EndpointConnectionError, ReadTimeout, …
        return True
    if isinstance(error, bx.ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return error_code(error) in RETRYABLE_CODES or status >= 500
    return False


def unavailable(error: BaseException, what: str) -> LogUnavailable:
    return LogUnavailable(f"the Kinesis log is unavailable ({what}): {type(error).__name__}: {error}")


def call(what: str, function: Callable[..., Any], /, *, timeout: float, passthrough: tuple[str, ...] = (),
         **kwargs: Any) -> Any:
    """One AWS call, retried while throttled or unreachable for up to `timeout` seconds, then LogUnavailable;
    also LogUnavailable for a stream being created or updated (ResourceInUse, ResourceNotFound) unless the
    caller handles that code itself (`passthrough`)."""
    retrying = stamina.retry(on=transient, attempts=None, timeout=timeout, wait_initial=0.05, wait_max=1.0,
                             wait_jitter=0.1)(function)
    try:
        return retrying(**kwargs)  # returns, or raises once the retries are spent: no way past it
    except Exception as error:
        code = error_code(error)
        if code in passthrough:
            raise
        if transient(error) or code in STREAM_BUSY_CODES:
            raise unavailable(error, what) from error
        raise
