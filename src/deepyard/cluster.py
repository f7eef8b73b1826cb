"""Local Ray start/connect: ``--address`` / ``RAY_ADDRESS`` joins a cluster, otherwise a local one starts."""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from deepyard import stops
from deepyard.settings import NODE_ENV, TRAIN_ENV


def serve_env() -> dict[str, str]:
    """Ray Serve's high-throughput mode: HAProxy in front, requests straight to the replicas' own
    HTTP servers, gRPC inside. Seen here on 2 cores (bench/serve_latency.py): p50 at concurrency 1
    from 6.8 ms to 1.5 ms, requests/s at 32 from 266 to ~615 with the niceness and thread settings.
    Serve reads these when its processes start: a local cluster gets them from here, a long-lived
    cluster needs them in its environment.
    HAProxy's files get a folder per DEEPYARD_HOME instead of one /tmp folder shared by everyone."""
    from deepyard.serve import haproxy

    folder = _haproxy_folder()
    os.makedirs(folder, mode=0o700, exist_ok=True)
    _check_private(folder)
    return {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
            # A stopping replica waits this long for an external load balancer to let go of it
            # (30 s by default: every redeploy and undeploy took 31 s); HAProxy here reloads in ms.
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "3",
            # Ray starts its workers at nice 15, so that its control plane stays responsive; when
            # serving, the replicas and HAProxy are the work (Ray's job manager does the same for drivers).
            "RAY_worker_niceness": "0",
            # HAProxy's 4 threads by default; no more than the machine has cores
            "RAY_SERVE_HAPROXY_NBTHREAD": str(max(1, min(4, os.cpu_count() or 1))),
            # A client that goes quiet mid-request is let go after 30 s, not Serve's 3600 s (the
            # replica already answered its unfinished body with a 408: ModelEndpoint._receive_body).
            "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": "30",
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(folder, "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(folder, "admin.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": folder,
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(folder, "server-state"),
            # (Ray's default, /tmp/haproxy-serve, is made by the first user to serve and kept by
            # no one: another user could not serve, and every node left a folder there)
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": os.path.join(folder, "metrics.sock"),
            **_haproxy_ports(),
            # its stats page and metrics where the endpoint listens, not on every interface
            **haproxy.wrapper_env(folder)}


PICKED_PORTS = (20000, 30000)  # where _haproxy_ports looks


def _haproxy_ports() -> dict[str, str]:
    """Ports that nothing holds now for HAProxy's stats page and metrics and for Serve's fallback
    proxy: Ray's fixed 8404, 9101 and 8500 let one deployment per machine start (a second user's,
    or a second DEEPYARD_HOME's, found them taken and never came up). Ports an operator set are kept."""
    import random
    import socket

    names = [name for name in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                               "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT") if not os.environ.get(name)]
    # Below the range the kernel hands to outgoing connections (a port from there could be one of
    # Ray's by the time HAProxy binds it) and below Serve's replica ports (30000-31000).
    low, high = PICKED_PORTS[0], min(PICKED_PORTS[1], _ephemeral_low())
    chosen: list[int] = []
    for port in random.sample(range(low, high), min(200, high - low)):
        with socket.socket() as probe:
            try:
                probe.bind(("", port))  # on every interface, as HAProxy may bind there
            except OSError:
                continue
        chosen.append(port)
        if len(chosen) == len(names):
            break
    return dict(zip(names, map(str, chosen)))  # (none found: Ray's defaults, as before)


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            return int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


# Ray puts HAProxy's sockets in a folder named by the node's id (56 characters) inside ours, and
# HAProxy binds its admin socket through a temporary name ~11 characters longer than the path, where
# a Unix socket's path ends at 107: 29 characters are left for our folder.
HAPROXY_FOLDER_MAX = 107 - 11 - len("/admin.sock") - 1 - 56


def _haproxy_folder() -> str:
    """This home's HAProxy folder in the temp folder, or in /tmp where TMPDIR is too long a path for
    HAProxy's sockets (HAProxy would not start, and Serve would wait for it)."""
    import hashlib
    import tempfile

    from deepyard import settings

    name = "dyhp-" + hashlib.sha1(os.path.abspath(settings.home()).encode()).hexdigest()[:8]
    for base in dict.fromkeys([tempfile.gettempdir(), "/tmp"]):
        if len(folder := os.path.join(base, name)) <= HAPROXY_FOLDER_MAX and os.path.isdir(base):
            return folder
    from deepyard.errors import BadInput

    raise BadInput(f"serving: the temp folder {tempfile.gettempdir()} is too long a path for HAProxy's sockets "
                   f"(at most {HAPROXY_FOLDER_MAX - len(name) - 1} characters) and there is no /tmp; set TMPDIR "
                   "to a shorter folder of your own")


def _check_private(folder: str) -> None:
    """The HAProxy folder's name is predictable, and Serve runs the wrapper written there: a folder
    another user made first (or may write in) would let them swap the program a deploy runs."""
    import stat

    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        from deepyard.errors import BadInput

        raise BadInput(f"{folder} is not a folder of this user's that only it may write in (HAProxy's files and "
                       "the program Serve starts as HAProxy go there); remove it, or set TMPDIR to a folder of "
                       "your own")


# What the driver still owes its last cluster before it exits or connects again: waiting for a local
# one shutting down behind it, or leaving the remote one it stayed connected to.
_departure: Callable[[], None] | None = None


@contextmanager
def connected(address: str | None = None, ray_logs: bool = False,
              local_env: dict[str, str] | None = None, stop_behind: bool = False,
              dashboard: bool = True) -> Iterator[None]:
    """Connect for the duration of a job; a cluster we started is shut down afterwards.

    Worker logs stay in Ray's session directory unless ``ray_logs``: a worker's failure reaches
    the driver as an exception with its traceback anyway. ``local_env`` is set for the processes
    of a local cluster (a running one keeps its own). ``stop_behind``: the driver goes on (logs the
    model) while a local cluster stops (~1.5 s of waiting on its processes); the process waits for
    it before it exits (``wait_stopped``). A remote cluster's driver stays connected until then.
    ``dashboard=False``: a local cluster starts without Ray's dashboard (~1.3 s less on 2 cores),
    nor the dashboard process Ray starts even then, its autoscaler's monitor or, without ``ray_logs``,
    its log monitor (~1.2 s more: ``ray_node.lean``),
    for a job that starts no Ray Train worker group (see ray.init below).
    """
    import ray

    from deepyard import embedded_workers, local_cluster

    wait_stopped()  # the last local cluster is down (or the last remote one left) before another starts
    if ray.is_initialized():  # an embedding program (or a test session) already connected
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address == "local":  # (Ray's word for a new cluster of the driver's own)
        address = None
    local_cluster.authenticate(address)
    check_reachable(address)
    with stops.signals_stop_the_job():
        for key, value in {**TRAIN_ENV, **({**NODE_ENV, **(local_env or {})} if not address else {})}.items():
            os.environ.setdefault(key, value)  # inherited by the raylet of a local cluster
        workers = None if address else embedded_workers.take()

        def shutdown() -> None:
            ray.shutdown()
            if workers is not None:  # (after Ray: the raylet stops its workers first)
                workers.stop()

        try:
            # (with Ray's dashboard, though it costs ~1 s, wherever a job may start a Ray Train worker
            # group: Ray Train's placement-group cleaner asks its state API whether a controller died;
            # without it a stopped trial's CPUs stayed reserved)
            lean = not (address or dashboard)  # (a node of the job's own that wants no dashboard)
            with embedded_workers.starting(workers) as forked, _lean_node(lean, ray_logs):
                ray.init(address=address or "local", runtime_env={"env_vars": _job_env(address)} if address else None,
                         logging_level="WARNING", log_to_driver=ray_logs,
                         **({"include_dashboard": False} if lean else {}), **forked)
        except ConnectionError as error:
            shutdown()
            from deepyard.errors import BadInput

            where = "running on this machine" if address == "auto" else f"at {address}"
            raise BadInput(f"no Ray cluster {where} ({error}); start one with `ray start --head`, "
                           "or pass --address / RAY_ADDRESS") from None
        except SystemExit as exit_:
            if exit_.code != signal.SIGTERM:
                raise
            # ray.init's own SIGTERM handler, while it starts or waits for a cluster: sys.exit(15),
            # which ended the run FAILED with the message "15". A stop, as everywhere else.
            shutdown()
            raise KeyboardInterrupt from None
        except BaseException:
            shutdown()
            raise
        stops.on_signals()  # again: ray.init replaced them
        try:
            yield
        except BaseException:
            shutdown()  # a failed or stopped job: its trials are gone before its runs are closed
            raise
    if stop_behind and not address:
        _stop_behind(shutdown)
    elif stop_behind:
        # A remote cluster's driver records the job's outcome first and leaves the cluster after:
        # CI once saw a submitted job's driver die of SIGSEGV between its last epoch and its summary.
        global _departure
        _departure = ray.shutdown
    else:
        shutdown()


def _lean_node(lean: bool, ray_logs: bool):
    """(A local node for a job that wants no dashboard starts none of the head's processes such a
    job never asks anything of: ``ray_node.lean``.)"""
    from contextlib import nullcontext

    from deepyard import ray_node

    return ray_node.lean(log_monitor=ray_logs) if lean else nullcontext()


def _job_env(address: str) -> dict[str, str]:
    """What the job's workers get on a running cluster. On this machine's (`deepyard cluster up`),
    the driver's environment too, as an embedded cluster's workers inherit it: its credentials for
    s3:// data, MLflow's settings. (Its nodes' own is from when it started.)"""
    from deepyard import local_cluster

    here = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    return {**(here if local_cluster.is_local(address) else {}), **TRAIN_ENV}


def check_reachable(address: str | None, timeout_s: float = 3.0) -> None:
    """A ``host:port`` nobody listens on is bad input at once: ray.init waited ~35 s on it, in
    native code where not even SIGTERM is handled until it gives up."""
    import socket

    if not address or address in ("auto", "local") or "://" in address or ":" not in address:
        return
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError, OverflowError) as error:  # (a port past 65535: OverflowError)
        from deepyard.errors import BadInput

        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        raise BadInput(f"--address / RAY_ADDRESS: no Ray cluster at {address} ({reason}); start one with "
                       "`ray start --head` or `deepyard cluster up`, or pass the head node's address") from None


def _stop_behind(shutdown) -> None:
    global _departure
    stopping = threading.Thread(target=shutdown, name="deepyard-ray-shutdown")
    stopping.start()
    _departure = stopping.join


def wait_stopped() -> None:
    """Wait for a local cluster stopping behind the driver, or leave the remote cluster it stayed
    connected to (``connected(stop_behind=True)``)."""
    global _departure
    departure, _departure = _departure, None
    if departure is not None:
        departure()


def quiet_tune() -> None:
    """What every Tuner in a deepyard driver runs with. Tune turns the first Ctrl-C into a normal end
    of fit(), which would register a model from a half-run job: deepyard's own handling stops the
    job instead (then --resume continues it). Tune's newer console output prints a configuration
    box even at verbose=0; deepyard has its own progress table. Tune snapshots its state at each
    checkpoint of a job that keeps few, and warns about it at every one. Tune's callbacks are the
    ones of ``tune_callbacks``."""
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def tune_callbacks() -> list:
    """What every Tuner of a deepyard driver runs with (``with stops.safe_points(): tuner.fit()``): a stop
    takes effect between two of Tune's steps; the per-trial files Tune's own results read
    (progress.csv, result.json), without Tune's TensorBoard logger: a queue and a thread per trial
    in the driver, for files deepyard never reads (MLflow has every metric)."""
    from ray.tune import Callback
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    class StopsBetweenSteps(Callback):
        def setup(self, **info) -> None:  # (called once Tune has set its signal handlers)
            stops.keep_tune_from_ending_quietly()

        def on_step_end(self, iteration: int, trials: list, **info) -> None:
            stops.safe_point()

    return [CSVLoggerCallback(), JsonLoggerCallback(), StopsBetweenSteps()]
