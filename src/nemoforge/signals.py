"""SIGTERM and SIGINT: a command stops its whole process tree, and what was running says it was killed.

Kubernetes, systemd and most process managers stop a process with SIGTERM; a terminal's Ctrl-C sends SIGINT to
its foreground process group. ``nemoforge run`` runs each pipeline task as a child process (kfp.local's
SubprocessRunner), which may start children of its own (vLLM in its own session, torchrun ranks):

- in a task, :func:`interrupt_on_signals` turns either signal into a :class:`KeyboardInterrupt`, so the stage's
  ``with`` blocks run (its MLflow run ends KILLED, a vLLM server is stopped);
- in the command, :class:`ProcessTreeStop` forwards the signal to the running task, waits for it, then ends
  whatever is left of the process tree.

SIGKILL, a crash or a power cut leave no one to say how a run ended: each pipeline run records its command
(:func:`owner_id`), and the next ``nemoforge run`` ends the runs whose command is gone (:func:`owner_alive`).
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import psutil

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signal_name: str) -> int:
    """The shell's exit code for a command stopped by ``signal_name`` (``SIGINT`` -> 130, ``SIGTERM`` -> 143)."""
    return 128 + signal.Signals[signal_name].value


@contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """While inside: the first SIGTERM or SIGINT raises ``KeyboardInterrupt(<signal name>)``; later ones are ignored,
    so that the cleanup it starts (ending the MLflow run, stopping a server) is not cut short.

    SIGINT is set explicitly too: a process started in the background of a script inherits SIGINT ignored, and
    then Python installs no KeyboardInterrupt handler. The previous handlers are restored on leaving.
    """
    def interrupt(signum: int, frame: FrameType | None) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupt) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class ProcessTreeStop:
    """While inside: SIGTERM and SIGINT stop this process's children, then the command.

    The first signal goes to every process below this one in its process group, as a terminal's Ctrl-C reaches
    them (the running task, ``sh -c`` and the Python under it, which stops as :func:`interrupt_on_signals` says;
    a child that leads its own session, such as vLLM, is stopped by its parent), and the command goes on until
    the task has exited, so the caller sees the task fail and can record why (:attr:`signal_name`). With no child
    running, or on a second signal, it raises ``KeyboardInterrupt(<signal name>)`` at once. On leaving after a
    signal, every process of the tree seen at the signal or still below this one gets SIGTERM, and SIGKILL after
    ``grace_s``.

    Args:
        grace_s: how long the leftover processes get to exit after SIGTERM, in seconds.
    """

    def __init__(self, grace_s: float = 10.0):
        self.grace_s = grace_s
        self.signal_name: str | None = None
        self._tree: set[psutil.Process] = set()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> ProcessTreeStop:
        self._previous = {sig: signal.signal(sig, self._forward) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self.signal_name is not None:
            self._tree.update(psutil.Process(os.getpid()).children(recursive=True))
            end_processes(self._tree, self.grace_s)

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            raise KeyboardInterrupt(name)
        self.signal_name = name
        # seen now, before the task exits and its own children lose their parent
        self._tree.update(psutil.Process(os.getpid()).children(recursive=True))
        group = [proc for proc in self._tree if _process_group(proc) == os.getpgrp()]
        if not group:
            raise KeyboardInterrupt(name)
        for proc in group:
            with _gone_is_fine():
                proc.send_signal(signum)


def end_processes(processes: set[psutil.Process], grace_s: float) -> None:
    """SIGTERM to each process still running, SIGKILL to those still there ``grace_s`` seconds later."""
    for proc in processes:
        with _gone_is_fine():
            proc.terminate()
    _, alive = psutil.wait_procs(list(processes), timeout=grace_s)
    for proc in alive:
        with _gone_is_fine():
            proc.kill()
    psutil.wait_procs(alive, timeout=grace_s)


def _process_group(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except ProcessLookupError:
        return None


@contextmanager
def _gone_is_fine() -> Iterator[None]:
    """A process that exited meanwhile (or was never ours to signal) needs no stopping."""
    try:
        yield
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass


def owner_id() -> str:
    """This process as ``<host> <pid> <start time (epoch s)>``: unique, even once the pid is reused."""
    return f"{socket.gethostname()} {os.getpid()} {psutil.Process(os.getpid()).create_time():.2f}"


def owner_alive(owner: str) -> bool:
    """Whether the process of an :func:`owner_id` may still run: True for another host's (it cannot be seen)."""
    host, pid, started = owner.rsplit(" ", 2)
    if host != socket.gethostname():
        return True
    try:
        return f"{psutil.Process(int(pid)).create_time():.2f}" == started
    except psutil.NoSuchProcess:
        return False
