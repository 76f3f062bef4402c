"""Log records for operators: errors, retries and lifecycle, on stderr, as text or one JSON object per line.

Every module logs through `logging.getLogger(__name__)`; context goes in `extra=` (`partition`, `table`,
`version`, `offset`, …) so that the JSON format carries it as fields. Nothing logged may contain a key or a
request body: log what happened and where, never a credential.

    >>> import logging
    >>> from gamestream import logs
    >>> logs.setup("json")
    >>> logging.getLogger("gamestream.process.processor").warning("commit conflict", extra={"partition": 3})
    {"time": "...", "level": "WARNING", "logger": "gamestream.process.processor", "message": "commit conflict", "partition": 3}
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys

FORMATS = ("text", "json")
# attributes every LogRecord has; anything else on a record came from `extra=`
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def _extra(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the `extra=` fields, and the
    exception's type, message and traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_extra(record))
        if record.exc_info and record.exc_info[0] is not None:
            entry["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """`time level logger: message key=value …`, for a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = _extra(record)
        if extra:
            first, newline, rest = text.partition("\n")
            text = first + " " + " ".join(f"{k}={v}" for k, v in extra.items()) + newline + rest
        return text


def setup(format: str = "text", level: int | str = logging.INFO) -> None:
    """Sends gamestream's log records (and uvicorn's errors) to stderr in `format` (`text` or `json`)."""
    if format not in FORMATS:
        raise ValueError(f"log format {format!r}: choose one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if format == "json" else TextFormatter())
    # stamina would log a context-free WARNING per retry; our retry policies log their own, with the table,
    # partition and attempt, once per episode where a wait can last (lake.CommitRetries)
    logging.getLogger("stamina").setLevel(logging.ERROR)
    for name in ("gamestream", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
