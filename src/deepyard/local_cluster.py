"""`deepyard cluster up|down|status`: a real multi-node Ray cluster on this machine.

A head and N worker nodes, each its own raylet (`ray start --block` in a session of its own), on
127.0.0.1 only, with ports picked free. Every node gets the same environment: this project's
Python first on PATH, MLflow's tracking URI and a checkpoint store on the shared local disk, so
that jobs submitted to it (`deepyard submit`) track and checkpoint where `deepyard run` does. The
state file (``$DEEPYARD_HOME/cluster/state.json``) names the addresses and the node processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from deepyard import settings
from deepyard.cluster_queue import JOB_START_TIMEOUT_S, TOKENS, quota_resources
from deepyard.errors import BadInput, DeepyardError

HOST = "127.0.0.1"


def state_dir() -> Path:
    path = settings.home() / "cluster"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _state_file() -> Path:
    return state_dir() / "state.json"


def _write_state(state: dict[str, Any]) -> None:
    """All at once (a reader never sees half a file)."""
    partial = _state_file().with_suffix(".partial")
    partial.write_text(json.dumps(state, indent=2))
    os.replace(partial, _state_file())


@contextmanager
def _locked(exclusive: bool) -> Iterator[None]:
    """Starting or stopping the cluster holds this exclusively; a command deciding to join it,
    shared: it never joins a cluster halfway up or halfway down."""
    import fcntl

    with (state_dir() / "cluster.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield


def read_state() -> dict[str, Any] | None:
    path = _state_file()
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise BadInput(f"{path} is not a cluster state file; remove it (and any leftover `ray` processes)") from None


_HANDED_OUT: set[int] = set()  # ports given to nodes that may not have bound them yet


def _free_port() -> int:
    """A free port, never one handed out before in this process: the kernel may offer a port again
    as soon as the probe closes, and two of a node's components on one port kill it at start."""
    while True:
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            port = probe.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def _started_at(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def alive(node: dict[str, Any]) -> bool:
    """Is this node's process still the one we started (not a reused pid after a reboot, not a zombie)?"""
    import psutil

    try:
        process = psutil.Process(node["pid"])
        return process.create_time() == node.get("started_at") and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def node_environment() -> dict[str, str]:
    """What every node's processes (and so every job's driver) see."""
    from deepyard import tracking
    from deepyard.settings import NODE_ENV, TRAIN_ENV

    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, **TRAIN_ENV, **NODE_ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "MLFLOW_TRACKING_URI": tracking.tracking_uri(), "DEEPYARD_HOME": str(settings.home()),
            "DEEPYARD_STORAGE": settings.storage_path(None), "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token",  # Ray's token in ~/.ray/auth_token (made if missing)
            # `deepyard jobs stop`: the driver's SIGTERM handler closes its MLflow run and stops its
            # workers; Ray's default 3 s before SIGKILL can cut that short
            "RAY_JOB_STOP_WAIT_TIME_S": "30",
            # a job queued for the cluster's quota may wait hours: Ray fails one PENDING for 15 min
            "RAY_JOB_START_TIMEOUT_SECONDS": JOB_START_TIMEOUT_S,
            # `ray start --block` drains its node for up to 30 s on SIGTERM (for a load balancer in
            # front of Serve); `cluster down` stops every node of this machine's cluster anyway, and
            # waited out 16 s a node before its SIGKILL
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def is_local(address: str | None) -> bool:
    """Is ``address`` (its GCS address or its dashboard URL) the cluster `deepyard cluster up` started?"""
    state = read_state() if address else None
    return state is not None and address in (state["gcs_address"], state["address"])


def code_identity() -> dict[str, str]:
    """What a cluster's workers run: this Python, this Ray, and deepyard from this folder (a cluster
    whose nodes would import another checkout's deepyard, or run another Ray, is not joined)."""
    import ray

    import deepyard

    return {"python": sys.executable, "ray_version": ray.__version__,
            "deepyard_path": str(Path(deepyard.__file__).resolve().parent)}


def joinable(footprint: dict[str, float], worker_cpus: float = 0.0) -> tuple[str | None, str | None]:
    """The GCS address of the cluster `deepyard cluster up` started, for a job that needs
    ``footprint`` (CPU, GPU), ``worker_cpus`` of them on one node, to join instead of starting a
    cluster of its own; else None, and why not where a cluster is up but this job should not use
    it. A join is recorded (``record_join``)."""
    with _locked(exclusive=False):
        try:
            state = read_state()
        except BadInput as error:
            return None, str(error)
        if state is None or not alive(state["nodes"][0]):
            return None, None
        here = code_identity()
        for key, what in (("python", "Python"), ("ray_version", "Ray"), ("deepyard_path", "deepyard")):
            if state.get(key) != here[key]:
                differs = (f"runs {what} {state[key]}, this command {here[key]}" if state.get(key)
                           else "was started by an older deepyard")
                return None, (f"the local cluster at {state['gcs_address']} {differs}; `deepyard cluster down` and "
                              "up again to use it")
        cpus = state.get("cpus", 0)
        if not _fits(footprint, cpus):
            asked = ", ".join(f"{value:g} {name}" for name, value in footprint.items() if value)
            return None, f"the job asks for {asked}; the local cluster at {state['gcs_address']} has {cpus:g} CPUs"
        if worker_cpus > (largest := state.get("largest_node_cpus", cpus)):
            return None, (f"each of the job's workers asks for {worker_cpus:g} CPUs; the local cluster's largest "
                          f"node has {largest:g}")
        record_join()
        return state["gcs_address"], None


def record_join() -> None:
    """This process will use the cluster: its driver connects seconds later, after the job's data
    check, and the idle watcher must not take the cluster down in between (``joining``)."""
    folder = state_dir() / "joining"
    folder.mkdir(exist_ok=True)
    me = os.getpid()
    (folder / str(me)).write_text(json.dumps({"pid": me, "started_at": _started_at(me)}))


def joining() -> list[int]:
    """The processes that chose to join the cluster and still run (the others' records are removed)."""
    folder, live = state_dir() / "joining", []
    for record in folder.glob("*") if folder.is_dir() else []:
        try:
            process = json.loads(record.read_text())
        except (OSError, ValueError):
            process = None
        if process and alive(process):
            live.append(process["pid"])
        else:
            record.unlink(missing_ok=True)
    return live


def fits_here(footprint: dict[str, float]) -> bool:
    """Would a job that needs ``footprint`` fit a one-node cluster of this machine's CPUs?"""
    return _fits(footprint, os.cpu_count() or 1)


def _fits(footprint: dict[str, float], cpus: float) -> bool:
    return footprint.get("GPU", 0) == 0 and footprint.get("CPU", 0) <= cpus


def authenticate(address: str | None) -> None:
    """Joining the local cluster (token-authenticated: ``node_environment``) must send Ray's token."""
    if is_local(address):
        use_token_auth()


def use_token_auth() -> None:
    """Talk to the local cluster as a token-authenticated one (it is: ``node_environment``); the
    Ray SDKs then send the token from ~/.ray/auth_token as a header. A user's own setting wins."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    _enable_token_auth()  # sets RAY_AUTH_MODE=token and refreshes Ray's cached config


def _node_ports() -> list[str]:
    """Ports each raylet would otherwise take at fixed defaults (two nodes on one host would clash)."""
    return [f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"]


def _ensure_token() -> None:
    """Ray's token for the cluster: the user's (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token),
    else a new one saved in ~/.ray/auth_token. Ray's command prints it; the output is dropped."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or \
            (Path.home() / ".ray" / "auth_token").is_file():
        return
    ray = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray, "get-auth-token", "--generate"], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def _start_node(args: list[str], log: Path, env: dict[str, str], temp_dir: str) -> subprocess.Popen:
    """One node; its own temp dir, because nodes sharing one on a host share (and clean up) each
    other's runtime-env files: a job's working directory vanished under its driver that way. With
    a worker host, its raylet starts workers through it (``ray_node``)."""
    from deepyard import job_client

    ray = ([sys.executable, "-m", "deepyard.ray_node"] if job_client.WORKER_HOST_ENV in env
           else [str(Path(sys.executable).parent / "ray")])
    with log.open("ab") as out:
        process = subprocess.Popen([*ray, "start", "--block", "--disable-usage-stats", f"--node-ip-address={HOST}",
                                    f"--temp-dir={temp_dir}", *args, *_node_ports()],
                                   stdout=out, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)  # Ctrl-C in this terminal leaves the cluster up
    return process


def _marker(name: str) -> str:
    """A custom resource only this node has: how a node id is matched to its process."""
    return f"deepyard_{name}"


def up(workers: int = 1, cpus_per_node: int | None = None, head_cpus: int | None = None,
       timeout_s: float = 120.0, idle_stop_s: float | None = None, wait_for_host: bool = True) -> dict[str, Any]:
    """Start the head and ``workers`` worker nodes; returns the state (``address`` is what to submit to).
    ``head_cpus=0`` keeps training off the head (jobs' drivers need no CPU). ``idle_stop_s``: a
    watcher takes the cluster down once nothing has used it for that long (``cluster_watch``).
    ``wait_for_host``: return once the job host and the worker host listen (``job_host``; they import beside the
    nodes' start).
    One command at a time starts it (a lock in the state's folder): of two, the second finds it up
    instead of starting another whose state file would hide the first's processes."""
    with _locked(exclusive=True):
        state = _up(workers, cpus_per_node, head_cpus, timeout_s, idle_stop_s)
    for host in (state.get("host"), state.get("worker_host")) if wait_for_host else ():
        if host:
            _wait_for_host(host, timeout_s)
    return state


def _up(workers: int, cpus_per_node: int | None, head_cpus: int | None, timeout_s: float,
        idle_stop_s: float | None) -> dict[str, Any]:
    if (state := read_state()) is not None and any(alive(n) for n in state["nodes"]):
        raise BadInput(f"a local cluster is already up at {state['address']}; `deepyard cluster down` first")
    _ensure_token()
    cpus = cpus_per_node or max(1, (os.cpu_count() or 2) // (workers + 1))
    gcs_port, dashboard_port, client_port = _free_port(), _free_port(), _free_port()
    env = node_environment()
    logs = state_dir()
    # short: Ray's socket paths under it must stay within the OS's ~107 characters
    temp_root = tempfile.mkdtemp(prefix="dy-ray-")
    head_cpus = cpus if head_cpus is None else head_cpus
    quota = quota_resources(head_cpus + workers * cpus)  # the queue's: every CPU (deepyard submit waits for them)
    host = _start_job_host(logs / "host.log")  # (its imports go on while the nodes start)
    from deepyard import job_client

    worker_host = _start_worker_host(logs / "workers.log", env)
    if worker_host:
        env = {**env, job_client.WORKER_HOST_ENV: worker_host["socket"]}
    head = _start_node(["--head", f"--port={gcs_port}", f"--num-cpus={head_cpus}", "--include-dashboard=true",
                        f"--resources={json.dumps({_marker('head'): 1, **quota})}",
                        f"--dashboard-host={HOST}", f"--dashboard-port={dashboard_port}",
                        f"--ray-client-server-port={client_port}"], logs / "head.log", env, f"{temp_root}/head")
    state = {"address": f"http://{HOST}:{dashboard_port}", "gcs_address": f"{HOST}:{gcs_port}",
             "cpus_per_node": cpus, "cpus": head_cpus + workers * cpus,
             "largest_node_cpus": max(head_cpus, cpus if workers else 0), "storage": env["DEEPYARD_STORAGE"],
             "tracking_uri": env["MLFLOW_TRACKING_URI"], "temp_dir": temp_root, **code_identity(),
             "nodes": [{"name": "head", "role": "head", "pid": head.pid, "started_at": _started_at(head.pid),
                        "log": str(logs / "head.log")}],
             **({"host": host} if host else {}), **({"worker_host": worker_host} if worker_host else {})}
    processes = [head]
    _write_state(state)
    try:
        _wait_for_nodes(state, processes, 1, timeout_s)
        for index in range(workers):
            log = logs / f"worker-{index}.log"
            name = f"worker_{index}"
            processes.append(_start_node([f"--address={state['gcs_address']}", f"--num-cpus={cpus}",
                                          f"--resources={json.dumps({_marker(name): 1})}"], log, env,
                                         f"{temp_root}/{name}"))
            pid = processes[-1].pid
            state["nodes"].append({"name": name, "role": "worker", "pid": pid, "started_at": _started_at(pid),
                                   "log": str(log)})
            _write_state(state)
        _wait_for_nodes(state, processes, 1 + workers, timeout_s)
        if idle_stop_s is not None:
            state["idle_stop_s"] = idle_stop_s
            state["watcher"] = _start_watcher(idle_stop_s, env, logs / "watcher.log")
            _write_state(state)
    except BaseException:
        _down()
        raise
    return state


def _start_watcher(idle_stop_s: float, env: dict[str, str], log: Path) -> dict[str, Any]:
    return _start_beside("watcher", ["-m", "deepyard.cluster_watch", str(idle_stop_s)], log, env)


def _start_beside(name: str, args: list[str], log: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """A Python process of the cluster's own (``sys.executable`` ``args``), in a session of its own,
    logging to ``log``; its record for the state file."""
    with log.open("ab") as out:
        process = subprocess.Popen([sys.executable, *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return {"name": name, "pid": process.pid, "started_at": _started_at(process.pid), "log": str(log)}


def _start_job_host(log: Path) -> dict[str, Any] | None:
    """The job host (``job_host``), with the environment this command got from its shell: the one
    `deepyard run` commands of this shell bring (a command that brings another runs alone)."""
    from deepyard import job_client

    if os.environ.get(job_client.ENABLED_ENV) == "0" or not job_client.SUPPORTED:
        return None
    path = job_client.socket_path(str(settings.home()))
    Path(path).unlink(missing_ok=True)  # (a host killed outright left its socket)
    return {**_start_beside("job host", job_client.host_command(path)[1:], log,
                            job_client.command_env()), "socket": path}


def _start_worker_host(log: Path, env: dict[str, str]) -> dict[str, Any] | None:
    """The worker host (``job_host``, kind "worker"): Ray workers of this cluster's nodes are forked
    from it (``ray_worker``). It has the nodes' environment, which is what their workers start with."""
    from deepyard import job_client

    if os.environ.get(job_client.ENABLED_ENV) == "0" or not job_client.SUPPORTED:
        return None
    path = os.path.join(os.path.dirname(job_client.socket_path(str(settings.home()))), "workers.sock")
    Path(path).unlink(missing_ok=True)
    return {**_start_beside("worker host", job_client.host_command(path, "worker")[1:], log, env), "socket": path}


def _wait_for_host(host: dict[str, Any], timeout_s: float) -> None:
    """Until the host listens: the next `deepyard run` (or Ray worker) is served by it. A host that
    does not is no reason to fail the cluster: commands run in their own processes, and Ray starts
    its workers its own way, as they would without it."""
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(host["socket"]):
        if not alive(host) or time.monotonic() > deadline:
            print(f"note: the {host['name']} did not start (see {host['log']}); " + (
                "Ray starts its workers its own way" if host["name"] == "worker host"
                else "`deepyard run` commands run in their own processes"), file=sys.stderr)
            return
        time.sleep(0.1)


def stop_job_host(host: dict[str, Any] | None, timeout_s: float = 60.0) -> None:
    """SIGTERM: the host stops taking commands, passes SIGTERM to the drivers it runs (their runs
    end KILLED, as on Ctrl-C) and exits once they have; past ``timeout_s`` (a driver's exit
    handlers alone may take 30 s), SIGKILL to its drivers and to it."""
    import psutil

    if not host or not alive(host):
        return
    os.kill(host["pid"], signal.SIGTERM)
    if not _ended_within(host, timeout_s):
        try:
            for process in [*psutil.Process(host["pid"]).children(), psutil.Process(host["pid"])]:
                process.kill()
        except psutil.Error:
            pass


def _wait_for_nodes(state: dict[str, Any], processes: list[subprocess.Popen], count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        for node, process in zip(state["nodes"], processes):
            if process.poll() is not None:
                raise DeepyardError(f"the {node['name']} node exited while starting; see {node['log']}")
        try:
            if sum(n["state"] == "ALIVE" for n in nodes(state)) >= count:
                return
        except Exception:  # the dashboard is still starting
            pass
        if time.monotonic() > deadline:
            raise DeepyardError(f"the cluster did not have {count} live nodes after {timeout_s:.0f} s; "
                                f"see the logs in {state_dir()}")
        time.sleep(0.5)


def nodes(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The cluster's nodes as its dashboard reports them: id, state, address, resources."""
    from ray.util.state import list_nodes

    use_token_auth()
    found = list_nodes(address=state["address"], limit=1000, raise_on_missing_output=False)
    return [{"node_id": n.node_id, "state": n.state, "is_head": n.is_head_node, "ip": n.node_ip,
             "name": next((k.removeprefix("deepyard_") for k in n.resources_total
                           if k.startswith("deepyard_") and k not in TOKENS.values()), None),
             "resources": {k: v for k, v in n.resources_total.items() if not k.startswith(("deepyard_", "node:"))}}
            for n in found]


def status() -> dict[str, Any]:
    state = read_state()
    if state is None:
        raise BadInput("no local cluster is up; start one with `deepyard cluster up`")
    try:
        live = [n for n in nodes(state) if n["state"] == "ALIVE"]
    except Exception as error:  # its dashboard is gone: stopped, crashed, or a reboot ago
        raise BadInput(f"the local cluster at {state['address']} does not answer ({type(error).__name__}); "
                       "`deepyard cluster down` clears it, then `deepyard cluster up`") from None
    cpus = sum(n["resources"].get("CPU", 0) for n in live)
    return {**{k: state[k] for k in ("address", "gcs_address", "storage", "tracking_uri")},
            "nodes": live, "alive_nodes": len(live), "cpus": cpus, "idle_stop_s": state.get("idle_stop_s"),
            "job_host": _host_status(state.get("host")), "worker_host": _host_status(state.get("worker_host"))}


def _host_status(host: dict[str, Any] | None) -> dict[str, Any] | None:
    if not host:
        return None
    return {"pid": host["pid"], "alive": alive(host), "listening": os.path.exists(host["socket"]),
            "log": host["log"]}


def stop_node(node: dict[str, Any], timeout_s: float = 16.0) -> None:
    """SIGTERM to a node's `ray start --block`: it stops its raylet and that node's workers; SIGKILL
    after ``timeout_s`` (the grace period of Ray's own `ray stop`)."""
    if not alive(node):
        return
    _signal(node, signal.SIGTERM)
    if not _ended_within(node, timeout_s):
        _signal(node, signal.SIGKILL)


def _ended_within(process: dict[str, Any], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while alive(process) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(process)


def _signal(node: dict[str, Any], signum: int) -> None:
    try:
        os.killpg(node["pid"], signum)  # the node's session: `ray start`, its raylet and its workers
    except ProcessLookupError:
        pass


def kill_node(name: str) -> None:
    """Lose a node the hard way (SIGKILL to its raylet and workers): what a crashed machine looks like."""
    state = read_state()
    node = next((n for n in (state or {}).get("nodes", []) if n["name"] == name), None)
    if node is None:
        raise BadInput(f"no node {name!r} in the local cluster")
    if alive(node):
        _signal(node, signal.SIGKILL)


def down(unless=None) -> dict[str, Any]:
    """Stop every node (workers first); returns how many were running. ``unless(state)``: asked
    again once no other command can start or join the cluster (the idle watcher's last check);
    true leaves it up."""
    with _locked(exclusive=True):
        if unless is not None and (state := read_state()) is not None and unless(state):
            return {"stopped_nodes": 0}
        return _down()


def _down() -> dict[str, Any]:
    state = read_state()
    if state is None:
        return {"stopped_nodes": 0}
    watcher = state.get("watcher")
    if watcher and watcher["pid"] != os.getpid() and alive(watcher):  # (not when the watcher is the one stopping)
        _signal(watcher, signal.SIGTERM)
    stop_job_host(state.get("host"))  # (before the nodes: its drivers' jobs end as stopped, not failed)
    running = [node for node in reversed(state["nodes"]) if alive(node)]
    for node in running:
        stop_node(node)
    stop_job_host(state.get("worker_host"))  # (after: each raylet stops its own workers first)
    if state.get("temp_dir"):
        shutil.rmtree(state["temp_dir"], ignore_errors=True)
    _state_file().unlink(missing_ok=True)
    return {"stopped_nodes": len(running)}
