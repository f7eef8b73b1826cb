"""`deepyard cluster up --idle-stop SECONDS`: a process beside the local cluster that takes it down
once nothing has used it for that long, so a cluster kept for quick jobs does not outlive its use.

Busy means a job on it (a `deepyard run` driver connected, or a submitted job) that has not ended,
or a Serve application (its controller): what a user would lose; or a `deepyard run` that chose to
join it and still runs (its driver connects after the job's data check). The last check is made
under the cluster's lock, so no command joins a cluster going down. The watcher's pid is in the
state file; `deepyard cluster down` stops it too, and it leaves by itself when its cluster is gone.

    python -m deepyard.cluster_watch SECONDS     (started by ``local_cluster.up``, in DEEPYARD_HOME's cluster)
"""

from __future__ import annotations

import sys
import time

POLL_S = 2.0
UNFINISHED = {"PENDING", "RUNNING"}


def busy(state: dict) -> bool:
    """Is anything using the cluster? (Its dashboard not answering counts as busy: slow to answer
    is no reason to stop a cluster.)"""
    from ray.util.state import list_actors, list_jobs

    from deepyard import local_cluster

    if local_cluster.joining():
        return True
    try:
        if any(job.status in UNFINISHED for job in list_jobs(address=state["address"],
                                                              raise_on_missing_output=False)):
            return True
        serving = list_actors(address=state["address"], filters=[("class_name", "=", "ServeController"),
                                                                 ("state", "=", "ALIVE")],
                              raise_on_missing_output=False)
        return bool(serving)
    except Exception:  # (the state API's errors are of many kinds; the next poll asks again)
        return True


def watch(idle_stop_s: float) -> str:
    """Poll until the cluster has been idle for ``idle_stop_s`` (then take it down) or is gone."""
    from deepyard import local_cluster

    local_cluster.use_token_auth()
    head = (local_cluster.read_state() or {"nodes": [{}]})["nodes"][0]  # (the cluster this watcher was started for)
    idle_since = time.monotonic()
    while True:
        time.sleep(POLL_S)
        state = local_cluster.read_state()
        if state is None or state["nodes"][0] != head or not local_cluster.alive(head):
            return "the cluster is gone"
        if busy(state):
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since >= idle_stop_s:
            # (asked again under the lock: a command may have chosen to join it since)
            stopped = local_cluster.down(unless=busy)["stopped_nodes"]
            if stopped:
                return f"idle for {idle_stop_s:g} s: {stopped} node(s) stopped"
            idle_since = time.monotonic()


if __name__ == "__main__":
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {watch(float(sys.argv[1]))}", flush=True)
