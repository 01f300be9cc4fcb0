"""``nemoforge run``'s console: each stage's start, progress, messages and end; the rest in per-task log files.

kfp.local streams each task's output through ``print`` (4 spaces of indent per line) to ``sys.stdout`` and logs its
own task status through the root logger to ``sys.stdout`` too, in colour. Inside the task, ``kfp.dsl.executor_main``
logs at INFO to its stdout through ``logging.basicConfig`` as ``[KFP Executor <time> INFO]: ...``; one of these
records is the whole executor input (the recipe JSON, input and output paths) as indented JSON over many lines, and
the stages' own ``logging`` records take the same prefix. Nothing outside that subprocess can set the level of its
``basicConfig``, so the lines are sorted on their way to the console:

- every line of a task (from kfp.local's ``Executing task 'NAME'`` to its outputs) goes to ``LOG_DIR/NAME.log``,
  without colour codes;
- the console gets kfp.local's start, end and failure lines, the stages' own lines (a stage's ``logging`` record
  without its executor prefix), not the executor's own records (the executor input, module paths), nor kfp.local's
  ``outputs:`` dump (each artifact's metadata) or blank lines;
- a progress bar (tqdm's ``desc: 40%|####  | 4/10 [...]``; kfp.local reads the task's output line by line, so every
  update arrives as a line) is redrawn in place on a terminal; elsewhere (a file, a pipe) and in the log it is
  written every :data:`BAR_EVERY_S` seconds and in its last state;
- the task logs are line-buffered: ``tail -f`` follows a running task;
- colour codes reach only a terminal.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_EXECUTOR_RECORD = re.compile(r"\[KFP Executor [^\]]* (?P<level>[A-Z]+)\]: (?P<message>.*)")
_EXECUTOR_OWN = (
    "Looking for component ",
    "--component_module_path is not specified",
    "Loading KFP component ",
    "Got executor_input:",
    "Did not write output file",
    "Wrote executor output file to ",
)
"""How the executor's own records (``kfp/dsl/executor_main.py``) begin; any other record is a stage's."""
_JSON_RECORD = "Got executor_input:"
"""The record followed by its JSON (``json.dumps(indent=4)``: it ends with ``}`` at column 0)."""
_TASK_START = re.compile(r" - INFO - Executing task '(?P<task>[^']+)'$")
_TASK_OUTPUTS = re.compile(r" - INFO - Task '[^']+' (outputs:|has no outputs)$")
_STREAMED = " - INFO - Streamed logs:"
_RULE = re.compile(r"^-{20,}$")
_BAR = re.compile(r"^(?P<desc>[^|]*?)\s*\d{1,3}%\|")
"""A tqdm bar: its description, then the percentage and the bar's opening ``|``."""
BAR_EVERY_S = 30.0
"""Off a terminal and in the log: how often a running bar's state is written (its last state is always)."""


def plain(text: str) -> str:
    """``text`` without ANSI escape sequences (colours, cursor moves)."""
    return _ANSI.sub("", text)


class TaskConsole(io.TextIOBase):
    """A write-only text stream that sorts kfp.local's output, whole lines at a time (see the module docstring).

    Args:
        console: where the console's lines go (the real stdout).
        log_dir: the task logs' directory (created on the first task).
        tty: ``console`` is a terminal: keep colours and redraw progress bars in place.
        progress: show progress bars on the console at all.
        clock: seconds, for :data:`BAR_EVERY_S`.
    """

    def __init__(self, console: TextIO, log_dir: Path, *, tty: bool, progress: bool = True, clock=time.monotonic):
        self._console = console
        self._log_dir = log_dir
        self._tty = tty
        self._progress = progress
        self._pending = ""
        self._log: TextIO | None = None  # the current task's log file
        self._in_outputs = False  # inside kfp.local's "outputs:" dump (until the rule that ends the task)
        self._json_end: str | None = None  # inside the executor-input JSON: the line that ends it
        self._bar: tuple[str, str] | None = None  # the last progress bar line not yet written: (desc, line)
        self._bar_drawn = False  # a bar is on the terminal's current line, without a newline
        self._clock = clock
        self._bar_written_s = 0.0  # when the current bar's state was last written off the terminal
        self._bar_written = ""  # that state's line

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self._tty

    def write(self, text: str) -> int:
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            self._route(line)
        return len(text)

    def flush(self) -> None:
        self._console.flush()
        if self._log is not None:
            self._log.flush()

    def finish(self) -> None:
        """Route a last line that has no newline, write a pending bar, close the task log and flush."""
        if self._pending:
            self._route(self._pending)
            self._pending = ""
        self._end_bar()
        self._close_log()
        self.flush()

    # ------------------------------------------------------------------------------------------------
    def _to_console(self, line: str) -> None:
        self._end_bar()
        self._console.write((line if self._tty else plain(line)) + "\n")

    def _to_log(self, line: str) -> None:
        if self._log is not None:
            self._log.write(plain(line) + "\n")

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def _end_bar(self) -> None:
        """Finish the bar: a newline after the one drawn in place, or its last state written out."""
        if self._bar_drawn:
            self._console.write("\n")
            self._bar_drawn = False
        if self._bar is not None:
            _, line = self._bar
            self._bar = None
            if line == self._bar_written:
                return
            self._to_log(line)
            if self._progress and not self._tty:
                self._console.write(plain(line) + "\n")

    def _route(self, line: str) -> None:
        text = plain(line)
        body = text.lstrip(" ")
        if self._json_end is not None:
            self._to_log(line)
            if text == self._json_end:
                self._json_end = None
            return
        if (start := _TASK_START.search(text)) is not None:
            self._close_log()
            self._log_dir.mkdir(parents=True, exist_ok=True)
            self._log = open(self._log_dir / f"{start['task']}.log", "a", encoding="utf-8", buffering=1)  # noqa: SIM115
            self._in_outputs = False
            self._to_log(line)
            self._to_console(line)
        elif _RULE.match(text):
            self._end_bar()
            self._to_log(line)
            self._close_log()
            self._in_outputs = False
            self._to_console(line)
        elif self._in_outputs or _TASK_OUTPUTS.search(text) or text.endswith(_STREAMED) or not body:
            self._in_outputs = self._in_outputs or _TASK_OUTPUTS.search(text) is not None
            self._to_log(line)
        elif (record := _EXECUTOR_RECORD.match(body)) is not None:
            self._to_log(line)
            message = record["message"]
            if message.startswith(_EXECUTOR_OWN):
                if message.rstrip().endswith(_JSON_RECORD):
                    self._json_end = text[: len(text) - len(body)] + "}"
                return
            indent = text[: len(text) - len(body)]
            self._to_console(indent + (message if record["level"] == "INFO" else f"{record['level']}: {message}"))
        elif (bar := _BAR.match(body)) is not None:
            self._progress_bar(bar["desc"], line)
        else:
            self._to_log(line)
            self._to_console(line)

    def _progress_bar(self, desc: str, line: str) -> None:
        now = self._clock()
        if self._bar is None or self._bar[0] != desc:
            self._end_bar()
            self._bar_written_s = now
        elif now - self._bar_written_s >= BAR_EVERY_S:  # a long bar: its state now, off the terminal and in the log
            self._bar_written_s, self._bar_written = now, line
            self._to_log(line)
            if self._progress and not self._tty:
                self._console.write(plain(line) + "\n")
        self._bar = (desc, line)
        if self._progress and self._tty:
            self._console.write("\r\x1b[K" + line)
            self._bar_drawn = True


@contextlib.contextmanager
def task_console(log_dir: Path, *, progress: bool = True) -> Iterator[None]:
    """Within the block, ``sys.stdout`` passes through a :class:`TaskConsole` writing task logs under ``log_dir``.

    Raises:
        OSError: a task log under ``log_dir`` cannot be opened for appending.
    """
    stream = TaskConsole(sys.stdout, log_dir, tty=sys.stdout.isatty(), progress=progress)
    try:
        with contextlib.redirect_stdout(stream):
            yield
    finally:
        stream.finish()
