"""Local Ray start/connect: ``--address`` / ``RAY_ADDRESS`` joins a cluster, otherwise a local one starts."""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

# Seen on Ray 2.60: the Train V2 controller polls its workers every 2 s by default, which adds up
# to 2 s after the last report and throttles checkpointed reports; 0.1 s costs nothing visible.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}


@contextmanager
def connected(address: str | None = None, ray_logs: bool = False) -> Iterator[None]:
    """Connect for the duration of a job; a cluster we started is shut down afterwards.

    Worker logs stay in Ray's session directory unless ``ray_logs``: a worker's failure reaches
    the driver as an exception with its traceback anyway.
    """
    import ray

    if ray.is_initialized():  # an embedding program (or a test session) already connected
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    previous = _stop_on_sigterm()
    for key, value in TRAIN_ENV.items():
        os.environ.setdefault(key, value)  # inherited by the raylet of a local cluster
    ray.init(
        address=address or "local",
        runtime_env={"env_vars": dict(TRAIN_ENV)} if address else None,
        logging_level="WARNING",
        log_to_driver=ray_logs,
    )
    _stop_on_sigterm()  # again: ray.init replaced it
    try:
        yield
    finally:
        ray.shutdown()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _stop_on_sigterm():
    """A scheduler's SIGTERM ends the job like Ctrl-C (run marked KILLED, exit code 130).

    ray.init installs its own handler, which exits mid-job without cleaning up; ours replaces it.
    Returns the handler it replaced (None off the main thread, where signals cannot be handled).
    """
    if threading.current_thread() is threading.main_thread():
        return signal.signal(signal.SIGTERM, _interrupt)
    return None
