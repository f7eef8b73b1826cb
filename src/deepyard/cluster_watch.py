"""`deepyard cluster up --idle-stop SECONDS`: a process beside the local cluster that takes it down
once nothing has used it for that long, so a cluster kept for quick jobs does not outlive its use.

Busy means a job on it (a `deepyard run` driver connected, or a submitted job) that has not ended,
or a Serve application (its controller): what a user would lose; or a `deepyard run` that chose to
join it in the last two minutes (its driver connects after its data check). The watcher's pid is in
the state file; `deepyard cluster down` stops it too, and it leaves by itself when the cluster is gone.

    python -m deepyard.cluster_watch SECONDS     (started by ``local_cluster.up``, in DEEPYARD_HOME's cluster)
"""

from __future__ import annotations

import sys
import time

POLL_S = 2.0
UNFINISHED = {"PENDING", "RUNNING"}
JOINING_S = 120.0  # a command that chose to join this long ago may still be checking its data


def busy(address: str) -> bool:
    """Is anything using the cluster at this dashboard address? (Unreachable counts as busy: a
    dashboard slow to answer is no reason to stop a cluster.)"""
    from ray.util.state import list_actors, list_jobs

    try:
        if any(job.status in UNFINISHED for job in list_jobs(address=address, raise_on_missing_output=False)):
            return True
        serving = list_actors(address=address, filters=[("class_name", "=", "ServeController"),
                                                        ("state", "=", "ALIVE")], raise_on_missing_output=False)
        return bool(serving)
    except Exception:  # (the state API's errors are of many kinds; the next poll asks again)
        return True


def _joined_within(seconds: float) -> bool:
    from deepyard import local_cluster

    try:
        return time.time() - local_cluster.joined_marker().stat().st_mtime < seconds
    except FileNotFoundError:
        return False


def watch(idle_stop_s: float) -> str:
    """Poll until the cluster has been idle for ``idle_stop_s`` (then take it down) or is gone."""
    from deepyard import local_cluster

    local_cluster.use_token_auth()
    idle_since = time.monotonic()
    while True:
        time.sleep(POLL_S)
        state = local_cluster.read_state()
        if state is None or not local_cluster.alive(state["nodes"][0]):
            return "the cluster is gone"
        if busy(state["address"]) or _joined_within(JOINING_S):
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since >= idle_stop_s:
            stopped = local_cluster.down()["stopped_nodes"]
            return f"idle for {idle_stop_s:g} s: {stopped} node(s) stopped"


if __name__ == "__main__":
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {watch(float(sys.argv[1]))}", flush=True)
