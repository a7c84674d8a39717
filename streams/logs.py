"""Structured logs: one ``key=value`` line per record, including the ``extra`` fields a call passes.

``log.info("batch", extra={"records": 2000, "seconds": 0.04})`` prints
``ts=2026-11-21T20:00:00.123Z level=info logger=streams.runtime.worker msg=batch records=2000 seconds=0.04``.
"""

from __future__ import annotations

import logging
import time

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def _value(value: object) -> str:
    text = str(value)
    return f'"{text}"' if (" " in text or "=" in text or not text) else text


class LogfmtFormatter(logging.Formatter):
    """Formats records as logfmt, with the record's extras as fields and the traceback last."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        fields = [
            f"ts={stamp}", f"level={record.levelname.lower()}", f"logger={record.name}",
            f"msg={_value(record.getMessage())}",
        ]
        fields += [f"{key}={_value(value)}" for key, value in vars(record).items() if key not in _STANDARD]
        line = " ".join(fields)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def log_handler() -> logging.Handler:
    """A stderr handler with the logfmt formatter."""
    handler = logging.StreamHandler()
    handler.setFormatter(LogfmtFormatter())
    return handler


def configure(level: str | int = "INFO") -> None:
    """Send every logger's records to stderr as logfmt at ``level``."""
    root = logging.getLogger()
    root.handlers[:] = [log_handler()]
    root.setLevel(level.upper() if isinstance(level, str) else level)
