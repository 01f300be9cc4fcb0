"""``nemoforge run --quiet``: kfp.local's console output without the KFP executor's own log records.

kfp.local streams each task's output through ``print`` (4 spaces of indent per line) to ``sys.stdout``. Inside
the task, ``kfp.dsl.executor_main`` logs at INFO to its stdout through ``logging.basicConfig``, as
``[KFP Executor <time> INFO]: ...``; one of these records is the whole executor input (the recipe JSON, input
and output paths) as indented JSON over many lines. Nothing outside that subprocess can set the level of its
``basicConfig``, so the lines are sorted on their way to the console: an executor record, with the JSON lines
that continue it, goes to a log file; every other line (the stages' own messages, progress and errors,
kfp.local's task status and outputs) is printed as before.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

_EXECUTOR_RECORD = "[KFP Executor "
_JSON_RECORD_END = "Got executor_input:"
"""The executor record followed by its JSON (``json.dumps(indent=4)``: it ends with ``}`` at column 0)."""


class ExecutorLogFilter(io.TextIOBase):
    """A write-only text stream: whole lines to ``console``, except KFP executor records, which go to ``log``.

    Args:
        console: where the other lines go (the real stdout).
        log: where the executor's records go.
    """

    def __init__(self, console: TextIO, log: TextIO):
        self._console = console
        self._log = log
        self._pending = ""
        self._json_end: str | None = None  # while inside the executor-input JSON: the line that ends it

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self._console.isatty()

    def write(self, text: str) -> int:
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            self._route(line)
        return len(text)

    def flush(self) -> None:
        self._console.flush()
        self._log.flush()

    def finish(self) -> None:
        """Route a last line that has no newline, and flush."""
        if self._pending:
            self._route(self._pending)
            self._pending = ""
        self.flush()

    def _route(self, line: str) -> None:
        body = line.lstrip(" ")
        if self._json_end is not None:
            self._log.write(line + "\n")
            if line == self._json_end:
                self._json_end = None
        elif body.startswith(_EXECUTOR_RECORD):
            self._log.write(line + "\n")
            if body.rstrip().endswith(_JSON_RECORD_END):
                self._json_end = line[: len(line) - len(body)] + "}"
        else:
            self._console.write(line + "\n")


@contextlib.contextmanager
def executor_records_to(log_path: Path) -> Iterator[None]:
    """Within the block, ``sys.stdout`` passes through :class:`ExecutorLogFilter`, appending records to ``log_path``.

    Raises:
        OSError: ``log_path`` cannot be opened for appending.
    """
    with open(log_path, "a", encoding="utf-8") as log:
        stream = ExecutorLogFilter(sys.stdout, log)
        try:
            with contextlib.redirect_stdout(stream):
                yield
        finally:
            stream.finish()
