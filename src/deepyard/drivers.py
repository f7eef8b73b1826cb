"""Which process drives a run, and whether it still does.

A driver killed with SIGKILL (an OOM kill, a laptop that sleeps for good) cannot close its MLflow
run: it stayed RUNNING forever. Each job's run is tagged with its driver (host, pid and the
process's start time, so that a reused pid is not mistaken for it), and the next command on the
same experiment closes the runs whose driver is gone, as KILLED with the reason.
"""

from __future__ import annotations

import os
import socket

TAG = "deepyard.driver"


def this_process() -> str:
    import psutil

    return f"{socket.gethostname()} {os.getpid()} {psutil.Process().create_time():.2f}"


def is_gone(driver: str) -> bool:
    """True if ``driver`` (a TAG value) ran on this host and its process no longer runs. A driver on
    another host is never called gone: from here nobody can tell."""
    import psutil

    try:
        host, pid, started = driver.split()
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    try:
        return f"{psutil.Process(int(pid)).create_time():.2f}" != started
    except (psutil.NoSuchProcess, ValueError):
        return True


def describe(driver: str) -> str:
    host, pid, *_ = driver.split() + ["?", "?"]
    return f"pid {pid} on {host}"
