"""How a job stops. Ctrl-C, a scheduler's SIGTERM and a closed terminal's SIGHUP all end it the same
way: KeyboardInterrupt in the driver, so its run is marked KILLED and the command exits 130.

A stop that comes while the driver writes to MLflow waits for that write (``writing``). A write
to MLflow's sqlite store that KeyboardInterrupt cut short kept the database locked while the stop
was handled: closing the run failed after 20 s ("database is locked"), and a stopped job's driver
was killed by Ray with its run still RUNNING.

A stop that comes while Ray Tune or RLlib trains (``safe_points``) takes effect at the next safe
point (``safe_point``): between two of Tune's steps (a Tune callback), before an RL iteration.
Raised anywhere in their code, KeyboardInterrupt could leave a lock held (Python runs a signal
handler between any two bytecodes, also between a lock's acquire and the ``with`` that would
release it), or an algorithm's state half-updated for the checkpoint saved on the way out. CI saw
a stopped sweep's driver hang for good at its exit, on the queue lock of Tune's TensorBoard logger.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_writes = 0  # how deep the main thread is in ``writing`` blocks
_safe_point_blocks = 0  # how deep in ``safe_points`` blocks
_at_safe_points = False  # in one that has reached a safe point (it will again)
_deferred: list[int] = []  # the stop signals that came meanwhile


class StoppedSafely(KeyboardInterrupt):
    """A stop raised at a safe point (or after the last one): what the work holds is whole."""


def _interrupt(signum, frame) -> None:
    # (a third stop while one write is waiting, a second on the way to a safe point: the user insists)
    if (_writes and len(_deferred) < 2) or (_at_safe_points and not _deferred):
        _deferred.append(signum)
        return
    _deferred.clear()
    raise KeyboardInterrupt


def on_signals() -> dict:
    """Stop signals raise KeyboardInterrupt (ray.init installs its own SIGTERM handler, which exits
    mid-job without cleaning up; this replaces it). Returns the handlers it replaced (none off the
    main thread, where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, _interrupt) for signum in STOP_SIGNALS}


def restore(previous: dict) -> None:
    for signum, handler in previous.items():
        if handler is not None:  # (None: a handler not set from Python)
            signal.signal(signum, handler)


@contextmanager
def signals_stop_the_job() -> Iterator[None]:
    """For a whole job, Ray's block and what follows it (logging, registering): every stop signal
    ends it as Ctrl-C does, not halfway through a registration."""
    previous = on_signals()
    try:
        yield
    finally:
        restore(previous)


@contextmanager
def writing() -> Iterator[None]:
    """A stop that comes during the block takes effect when it ends. (Signals reach Python only in
    the main thread: elsewhere there is nothing to hold back.)"""
    global _writes
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _writes += 1
    try:
        yield
    finally:
        _writes -= 1
        if not _writes and _deferred and not _at_safe_points:  # (else: at the next safe point)
            _deferred.clear()
            raise KeyboardInterrupt


@contextmanager
def safe_points() -> Iterator[None]:
    """A block whose work calls ``safe_point`` now and then (a Tuner's ``fit()`` with a callback
    that does, an RL training loop): once it has, a stop waits for the next one. (A stop before
    the first, as Tune sets up, raises at once.)"""
    global _at_safe_points, _safe_point_blocks
    _safe_point_blocks += 1
    try:
        yield
    except BaseException:
        _deferred.clear()  # (it failed, or a stop came through: the stop is taken)
        raise
    finally:
        _safe_point_blocks -= 1
        _at_safe_points = False
    if _deferred:  # (a stop that came after the last safe point)
        _deferred.clear()
        raise StoppedSafely


def safe_point() -> None:
    """No lock held, no state half-updated: a stop that came since the last one is raised here."""
    global _at_safe_points
    if not _safe_point_blocks or threading.current_thread() is not threading.main_thread():
        return  # (outside a block, a stop is raised where it comes, as ever)
    _at_safe_points = True
    if _deferred and not _writes:
        _at_safe_points = False  # (first: a stop that comes as this one is raised is not left queued)
        _deferred.clear()
        raise StoppedSafely


def stacks_on(signum: int) -> None:
    """Signal ``signum`` prints every thread's stack on the process's own stderr, and the process goes
    on (an embedding program's sys.stderr may have no file behind it; with no stderr at all, the
    signal does nothing)."""
    import faulthandler
    import sys

    try:
        faulthandler.register(signum, file=sys.__stderr__, all_threads=True)
    except (AttributeError, ValueError, OSError):
        signal.signal(signum, signal.SIG_IGN)


def keep_tune_from_ending_quietly() -> None:
    """Ray Tune takes SIGUSR1 for every run (even with its SIGINT handler off): its run then ends as
    if it had finished, and a half-run sweep would be promoted. In a deepyard driver's Tune run,
    SIGUSR1 prints every thread's stack instead, as SIGUSR2 always does."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGUSR1"):
        stacks_on(signal.SIGUSR1)
