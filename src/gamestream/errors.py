"""gamestream's own exceptions, split by what the caller can do about them (as dlt splits its errors).

- `TransientError`: waiting and trying the same thing again can succeed (a log electing a leader, an object store
  that does not answer, a full disk an operator is freeing, a commit that lost a race). Workers retry these;
  commands report them in one line and exit 2.
- `TerminalError`: trying again will not help until something is changed (a missing table, a log created with
  another partition count, a store without conditional writes, a held partition). Reported in one line, with what
  to do.
- `InvariantBroken`: a guarantee of gamestream's own does not hold (offsets that would go back, a txn version that
  would not grow). Never caused by input: it is a bug or a store changed behind our back, so it stops the worker
  with a traceback rather than risk a row written twice.

Errors of the libraries underneath (delta-rs, object_store, SQLite, NATS, boto3) are translated into these at the
boundary of the package that calls them (`gamestream.tables.lake` for Delta and object stores, each log backend for
its log); code above a boundary tells errors apart by class, never by message text.

Imports nothing of gamestream's (a core module: every package may import it).
"""

from __future__ import annotations

import errno
import sqlite3


class GamestreamError(Exception):
    """Every exception gamestream raises on purpose."""


class TransientError(GamestreamError):
    """Retrying the same call later can succeed; nothing was half-done (every write is atomic or idempotent)."""


class TerminalError(GamestreamError):
    """Retrying will not help: the message says what to change."""


class InvariantBroken(TerminalError):
    """One of gamestream's own guarantees would be broken by going on; the worker stops before it writes."""


class OffsetsWentBack(InvariantBroken):
    """A log position (a partition's offset, or a Delta txn version that records one) would go back or stay: the
    records between would be written twice. Positions only grow."""


class OutOfSpace(TransientError):
    """A write failed because the file system is full (or over quota); the same write succeeds once space is
    freed, and the failed one left nothing visible behind."""


_OUT_OF_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# What delta-rs ("… No space left on device (os error 28)") and SQLite ("database or disk is full") say.
_OUT_OF_SPACE_TEXTS = ("no space left on device", "disk quota exceeded", "database or disk is full",
                       f"os error {errno.ENOSPC})", f"os error {errno.EDQUOT})")


def is_out_of_space(error: BaseException) -> bool:
    """True for a write that failed because the file system is full (or over quota): `OutOfSpace`, Python's
    OSError, delta-rs' DeltaError, SQLite's SQLITE_FULL. Every layer that writes to a disk (the embedded log, lock
    files, Delta tables) asks this one predicate."""
    if isinstance(error, OutOfSpace):
        return True
    if isinstance(error, OSError) and error.errno in _OUT_OF_SPACE_ERRNOS:
        return True
    if isinstance(error, sqlite3.Error) and getattr(error, "sqlite_errorname", None) == "SQLITE_FULL":
        return True
    if isinstance(error, (OSError, sqlite3.Error)) or _is_delta_error(error):
        text = str(error).lower()
        return any(marker in text for marker in _OUT_OF_SPACE_TEXTS)
    return False


def _is_delta_error(error: BaseException) -> bool:
    """delta-rs' exceptions (their classes live in its compiled `_internal` module), without importing deltalake
    where no table is touched."""
    try:
        from deltalake.exceptions import DeltaError
    except ImportError:  # pragma: no cover - deltalake is a dependency
        return False
    return isinstance(error, DeltaError)
