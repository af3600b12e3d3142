"""Limits that work cannot catch: a child process killed at the deadline, and the checked values of limits.

A method's merge runs in a worker process of its own, watched from outside (:mod:`mergebench.worker`); this
module holds what that shares (:class:`MethodTimeout`, :func:`check_seconds`) and :func:`run_limited`, which runs
other work in a forked child of this process: building a suite with every thread while this process keeps one
(:func:`reserve_threads`: GNU OpenMP cannot be used again in a forked child once its parent used its thread
pool, so the command line keeps the parent at one thread before any parallel work when a time limit is set, and
a worker then gets the threads set aside).

``run_limited(work, seconds)`` runs ``work(release)`` in the child; the parent waits for its result and, at the
deadline, kills the child's whole process group with SIGKILL, which nothing in the child can catch or delay, and
raises :class:`MethodTimeout`. The work can end the limited part early by calling ``release()``.
"""

from __future__ import annotations

import math
import os
import signal
import time
import traceback
from typing import Any, Callable

from mergebench.errors import InputError

_child_threads: int | None = None  # set by reserve_threads: the threads a forked child may use


class MethodTimeout(RuntimeError):
    """The limited work ran past its deadline and its process was killed."""


class ChildFailed(RuntimeError):
    """The child process raised, or died without a result (killed by a signal, out of memory)."""

    def __init__(self, message: str, type_name: str = "ChildFailed", child_traceback: str = ""):
        super().__init__(message)
        self.type_name, self.child_traceback = type_name, child_traceback


def check_seconds(value, what: str = "time limit") -> float | None:
    """``None`` (no limit) or a positive, finite number of seconds; anything else is an :class:`InputError`."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a positive number of seconds, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(seconds) or seconds <= 0:
        raise InputError(f"{what} must be a positive number of seconds, got {value!r}")
    return seconds


def reserve_threads() -> None:
    """Keep this (parent) process at one torch thread and give the others to the forked children.

    Call it before any multi-threaded torch work (the command line does, first thing, when a time limit is set);
    later calls change nothing. Without it a forked child runs single-threaded (see the module docstring)."""
    global _child_threads
    if _child_threads is None:
        import torch

        _child_threads = torch.get_num_threads()
        torch.set_num_threads(1)


def _child_main(conn, work: Callable, threads: int | None):
    os.setpgid(0, 0)  # its own process group: the parent kills everything it started at the deadline
    if threads:
        import torch
        torch.set_num_threads(threads)

    def release():
        conn.send(("release",))

    try:
        conn.send(("result", work(release)))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent, which decides
        conn.send(("error", type(e).__name__, str(e), traceback.format_exc(limit=8)))
    finally:
        conn.close()


def _kill(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # not (yet) a group leader, or gone
        if proc.is_alive():
            proc.kill()
    proc.join()


def run_limited(work: Callable[[Callable[[], None]], Any], seconds: float | None, what: str, start: str = "fork",
                poll_s: float = 0.5) -> Any:
    """``work(release)`` in a child process, killed after ``seconds`` unless it called ``release()`` first
    (``seconds=None``: no deadline, e.g. to build a suite with all the threads :func:`reserve_threads` kept).

    Returns what ``work`` returned (it must pickle). Raises :class:`MethodTimeout` at the deadline, and
    :class:`ChildFailed` when ``work`` raised (with its type name, message and traceback) or the child died.
    With ``start="spawn"`` the work itself must pickle (a module-level function, e.g. via functools.partial).
    """
    import multiprocessing as mp

    ctx = mp.get_context(start)
    receive, send = ctx.Pipe(duplex=False)
    threads = (_child_threads if _child_threads is not None else 1) if start == "fork" else None
    proc = ctx.Process(target=_child_main, args=(send, work, threads), name=f"mergebench: {what}")
    proc.start()
    send.close()
    deadline = None if seconds is None else time.monotonic() + seconds
    finished = False
    try:
        while True:
            wait = poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic()))
            if receive.poll(wait):
                try:
                    message = receive.recv()
                except EOFError:  # the child is gone without a word
                    proc.join()
                    code = proc.exitcode
                    how = (f"was killed by signal {-code} ({signal.Signals(-code).name})" if code and code < 0
                           else f"exited with code {code}")
                    raise ChildFailed(f"the process running {what} {how} before it finished (out of memory, or a "
                                      f"crash in native code?)") from None
                if message[0] == "release":
                    deadline = None
                elif message[0] == "result":
                    finished = True
                    proc.join()
                    return message[1]
                else:
                    _, type_name, text, child_tb = message
                    finished = True
                    proc.join()
                    raise ChildFailed(text, type_name, child_tb)
            elif deadline is not None and time.monotonic() >= deadline:
                raise MethodTimeout(f"{what} exceeded its time limit of {seconds:g} s")
    finally:
        if not finished:
            _kill(proc)
        receive.close()
