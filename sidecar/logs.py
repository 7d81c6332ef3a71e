"""Structured logs: the access log (stdout) and operational events (stderr), JSON lines.

The access log is batched: lines are collected and written at most every
100 ms (or every 256 lines), so the event loop does one small write per
batch instead of one per request. Nothing here ever receives a secret:
callers pass names, ids and numbers.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from typing import IO, Any, Final

import orjson

LEVELS: Final = {"debug": 10, "info": 20, "warning": 30, "error": 40}


@functools.lru_cache(maxsize=4)
def _second(sec: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))


def _iso(ts: float) -> str:
    return f"{_second(int(ts))}.{int(ts % 1 * 1000):03d}Z"


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
        line = orjson.dumps({"ts": _iso(time.time()), "level": level, "event": event, **fields},
                            default=str)  # fmt: skip
        stream = self._stream or sys.stderr
        stream.write(line.decode() + "\n")
        stream.flush()

    def debug(self, event: str, **fields: Any) -> None:
        self.log("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self.log("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.log("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.log("error", event, **fields)


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
        self._buf.append(orjson.dumps(record) + b"\n")
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
