"""Structured logs: the access log (stdout) and operational events (stderr), JSON lines.

The access log is batched: lines are collected and written at most every
100 ms (or every 256 lines), so the event loop does one small write per
batch instead of one per request. Nothing here ever receives a secret:
callers pass names, ids and numbers.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import time
from typing import IO, Any, Final

import orjson

LEVELS: Final = {"debug": 10, "info": 20, "warning": 30, "error": 40}
#: Longest operational log line; longer ones have their text fields cut.
MAX_LINE: Final = 2048
_FIELD_CUT: Final = 200


@functools.lru_cache(maxsize=4)
def _second(sec: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))


#: ".000Z" to ".999Z": a timestamp's milliseconds looked up, not formatted (a fifth of the cost).
_MILLIS: Final = tuple(f".{ms:03d}Z" for ms in range(1000))


def _iso(ts: float) -> str:
    sec = int(ts)
    return _second(sec) + _MILLIS[int((ts - sec) * 1000) % 1000]


class OpLog:
    """Operational events on stderr: reloads, failovers, errors."""

    def __init__(self, level: str = "info", stream: IO[str] | None = None) -> None:
        self.level = LEVELS.get(level, 20)
        self._stream = stream

    def set_level(self, level: str) -> None:
        self.level = LEVELS.get(level, 20)

    def log(self, level: str, event: str, *, always: bool = False, **fields: Any) -> None:
        """One JSON line; `always` lines (startup facts scripts wait for) ignore the level."""
        if LEVELS[level] < self.level and not always:
            return
        record = {"ts": _iso(time.time()), "level": level, "event": event, **fields}
        line = orjson.dumps(record, default=str)
        if len(line) > MAX_LINE:
            line = orjson.dumps(_cut(record), default=str)[:MAX_LINE]  # bounded, whatever it held
        stream = self._stream or sys.stderr
        stream.write(line.decode(errors="replace") + "\n")
        stream.flush()

    def debug(self, event: str, **fields: Any) -> None:
        self.log("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self.log("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.log("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.log("error", event, **fields)


def _cut(record: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        if not isinstance(value, int | float | bool | None):
            value = str(value)
            if len(value) > _FIELD_CUT:
                value = value[:_FIELD_CUT] + "…"
        out[str(key)[:_FIELD_CUT]] = value
    out["truncated"] = True
    return out


class _LibraryLogs(logging.Handler):
    """Library log records (aiohttp, asyncio, ...) as operational-log JSON lines.

    A record's arguments and exception text are dropped: aiohttp's messages for a
    malformed request quote the raw request, access key included. What is kept:
    the logger, the exception type, and for aiohttp (whose messages are fixed
    templates like "Error handling request from %s") the unformatted template.
    """

    def __init__(self, oplog: OpLog) -> None:
        super().__init__(logging.WARNING)
        self._oplog = oplog

    def emit(self, record: logging.LogRecord) -> None:
        name = record.name
        aiohttp = name == "aiohttp" or name.startswith("aiohttp.")
        fields: dict[str, Any] = {"logger": name[:64]}
        if aiohttp and isinstance(record.msg, str):
            fields["message"] = record.msg[:_FIELD_CUT]
        if record.exc_info and record.exc_info[0] is not None:
            fields["error"] = record.exc_info[0].__name__
        level = "error" if record.levelno >= logging.ERROR else "warning"
        if name in ("aiohttp.server", "aiohttp.web"):
            # A caller's malformed request or a handler failure; not the sidecar failing.
            self._oplog.log("warning" if "error" in fields else level, "http_error", **fields)
        else:
            self._oplog.log(level, "library_log", **fields)

    def handleError(self, record: logging.LogRecord) -> None:
        """Never print logging's own traceback (it would quote the record)."""


def route_library_logs(oplog: OpLog) -> None:
    """Send every library's `logging` records through `oplog` instead of raw stderr lines.

    Call once per process (`sidecar serve`); it replaces the root logger's handlers.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_LibraryLogs(oplog))
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)


class AccessLog:
    """One JSON line per request on stdout, written in batches."""

    def __init__(self, enabled: bool = True, stream: IO[bytes] | None = None) -> None:
        self.enabled = enabled
        self._stream = stream
        self._buf: list[bytes] = []
        self._handle: asyncio.TimerHandle | None = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record["ts"] = _iso(record["ts"])
        self._buf.append(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
        if len(self._buf) >= 256:
            self.flush()
        elif self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(0.1, self.flush)

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if not self._buf:
            return
        data, self._buf = b"".join(self._buf), []
        stream = self._stream or sys.stdout.buffer
        stream.write(data)
        stream.flush()
