"""A `deepyard run`'s side of the job host (``job_host``): hand the command to the host beside the
local cluster, pass signals on to the driver it forks, exit with the driver's code. Kept to the
standard library: the command imports nothing heavy before it knows where it runs."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
from contextlib import contextmanager
from typing import Iterator

# Read by these libraries when they are imported: a command that sets them differently runs alone.
_IMPORT_ENV = ("RAY_", "TORCH", "PYTORCH", "OMP_", "MKL_", "OPENBLAS", "CUDA", "NCCL", "LD_", "PYTHON",
               "MALLOC", "GRPC_", "ARROW", "MLFLOW_CONFIGURE_LOGGING", "GIT_PYTHON", "NETWORKX", "AIOHTTP",
               # the OpenMP runtime's (on loading torch), the locale and time zone, the temp folder (cached)
               "GOMP_", "KMP_", "LANG", "LC_", "TZ", "TMPDIR")
# Read when a driver connects, or set by torch in its process when unset (inductor's cache). (Not
# RAY_AUTH_MODE: Ray caches it on import; a process that set it since runs alone.)
_NOT_AT_IMPORT = {"RAY_ADDRESS", "TORCHINDUCTOR_CACHE_DIR"}
FORWARDED = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2")
                  if hasattr(signal, name))
HANDSHAKE_S = 20.0  # a host that has not answered by then is not waited for: the command runs here
ENABLED_ENV = "DEEPYARD_JOB_HOST"  # "0": `deepyard cluster up` starts none, and commands run alone
WORKER_HOST_ENV = "DEEPYARD_WORKER_HOST"  # the worker host's socket, in the environment of a local cluster's nodes
RAY_SETUP_WORKER_ENV = "DEEPYARD_RAY_SETUP_WORKER"  # where Ray's own setup_worker.py is (``ray_node``, ``ray_worker``)
SUPPORTED = hasattr(os, "pidfd_open") and hasattr(os, "O_PATH")  # (Linux: pidfds, /proc paths)
IN_DRIVER = False  # set in a forked driver: its command runs there, not in yet another one
# Set by Ray's job supervisor for a submitted job's entrypoint: that driver is the supervisor's child
# (its runtime env, logs and `jobs stop`), never a fork of the host.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
COMMAND_ENV: dict[str, str] | None = None  # the environment a `deepyard` command started with (cli.main)


def command_env() -> dict[str, str]:
    """The environment the `deepyard` command got from its shell, before it set anything of its own
    (Tune's and MLflow's settings, Ray's on import): a host started with it serves that shell's next
    commands. A program that calls deepyard's functions itself has only its own."""
    return dict(os.environ if COMMAND_ENV is None else COMMAND_ENV)


def socket_path(home: str) -> str:
    return os.path.join(home, "cluster", "host.sock")


def host_command(path: str, kind: str = "driver", owner: int | None = None) -> list[str]:
    """How a host (``job_host``) is started by ``local_cluster`` (``owner``: by the driver of an
    embedded cluster, ``embedded_workers``), and starts itself again."""
    return [sys.executable, "-c",
            f"from deepyard.job_host import serve; serve({path!r}, kind={kind!r}, owner={owner!r})"]


def identity(path: list[str] | None = None) -> dict:
    """What the host's imports depend on: the interpreter, the module path (``path``, default past
    its first entry, the script's folder) and when each of its folders last changed (an install or
    removal of a package changes its folder's time)."""
    path = sys.path[1:] if path is None else path
    return {"python": sys.executable, "path": path,
            "packages": {folder: os.stat(folder).st_mtime_ns for folder in path if os.path.isdir(folder)}}


# What a library sets in its own process on import, as good as unset (Ray: client mode off).
_AS_UNSET = {"RAY_CLIENT_MODE": "0"}


def import_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items()
            if k.startswith(_IMPORT_ENV) and k not in _NOT_AT_IMPORT and _AS_UNSET.get(k) != v}


# Ray's own settings: a worker reads them when it imports Ray, after the fork (the worker host has
# not: ``job_host.NOT_IN_WORKER_HOST``). The raylet sets some for each worker (RAY_JOB_ID), and ray.init for
# the node it starts (RAY_AUTH_MODE, RAY_USAGE_STATS_ENABLED).
_READ_AFTER_FORK = "RAY_"


def import_env_of(env: dict[str, str], kind: str) -> dict[str, str]:
    """What of ``env`` a host's imports read (``kind``: "driver" or "worker"): a forked process must have the same."""
    return {key: value for key, value in import_env(env).items()
            if not (kind == "worker" and key.startswith(_READ_AFTER_FORK))}


def run_there(argv: list[str]) -> int | None:
    """Run the command in a driver forked by this home's job host; its exit code, or None where
    there is no host to take it (the command then runs here)."""
    if IN_DRIVER or os.environ.get(ENABLED_ENV) == "0" or RAY_JOB_ENV in os.environ or not SUPPORTED:
        return None
    home = os.path.abspath(os.path.expanduser(os.environ.get("DEEPYARD_HOME", ".deepyard")))
    return hand_over(socket_path(home), {"kind": "driver", "argv": argv, "script_folder": sys.path[0],
                                         "identity": identity()})


def hand_over(path: str, fields: dict) -> int | None:
    """Ask the host listening at ``path`` to fork a process for this one (``fields``: its kind, what
    it is to run and this process's ``identity``; its folder, environment and standard streams go
    along), pass it the signals this process gets, and return its exit code; None where no host took it."""
    pending: list[int] = []  # signals that came before the driver did
    driver: list[int] = []  # its pidfd: a signal never reaches another process that got its pid

    def tell(signum: int) -> None:
        try:
            signal.pidfd_send_signal(driver[0], signum)
        except ProcessLookupError:
            pass

    def forward(signum, _frame) -> None:
        if driver:
            tell(signum)
        else:
            pending.append(signum)

    def suspend(signum, _frame) -> None:
        """Ctrl-Z: the driver stops with the command, and goes on when it does (`fg`, `bg`). (Before
        the driver is known, the stop waits for it: the host may have forked it already.)"""
        if not driver:
            pending.append(signum)
            return
        tell(signal.SIGSTOP)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)  # (this process stops here until it is continued)
        signal.signal(signal.SIGTSTP, suspend)
        tell(signal.SIGCONT)

    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.settimeout(HANDSHAKE_S)
    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED}
    previous[signal.SIGTSTP] = signal.signal(signal.SIGTSTP, suspend)
    try:
        try:
            with short_path(path) as short:
                host.connect(short)
            request = json.dumps({"cwd": os.getcwd(), "env": dict(os.environ), "umask": _umask(),
                                  **fields}).encode()
            _send_all(host, struct.pack("!I", len(request)) + request, [0, 1, 2])
            answer, fds = _receive_line(host)
        except OSError as error:  # no host (no cluster up, or one started without it), one gone or too busy to answer
            if fields["kind"] == "worker" and not isinstance(error, FileNotFoundError):  # (one is up: say why)
                print(f"note: the worker host did not answer ({error!r}); the worker starts as Ray starts it",
                      file=sys.stderr)
            return None
        if "pid" not in answer or len(fds) != 1:
            if answer.get("refused") and fields["kind"] == "worker":
                print(f"note: the worker host did not fork this worker ({answer['refused']}); it starts as Ray "
                      "starts it", file=sys.stderr)
            elif answer.get("refused"):
                print(f"note: the job host did not take this command ({answer['refused']}); it runs here",
                      file=sys.stderr)
            elif fields["kind"] == "worker":
                print(f"note: the worker host answered {answer!r} with {len(fds)} descriptors; the worker starts "
                      "as Ray starts it", file=sys.stderr)
            return None
        driver.append(fds[0])
        host.settimeout(None)
        for signum in pending:
            (suspend if signum == signal.SIGTSTP else forward)(signum, None)
        try:
            ended, _ = _receive_line(host)
        except OSError:
            ended = {}
        if "exit" in ended:
            return ended["exit"]
        print(f"deepyard: the job host ended while {fields['kind']} {answer['pid']} ran; stopping it", file=sys.stderr)
        forward(signal.SIGTERM, None)
        return 1
    finally:
        host.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if not driver:  # (the command runs here after all: what it was sent, it gets now)
            for signum in pending:
                signal.raise_signal(signum)


def _send_all(host: socket.socket, data: bytes, fds: list[int]) -> None:
    sent = socket.send_fds(host, [data], fds)
    if sent < len(data):
        host.sendall(data[sent:])


def _receive_line(host: socket.socket) -> tuple[dict, list[int]]:
    """One JSON line from the host, and the descriptors that came with it."""
    data, fds, _, _ = socket.recv_fds(host, 65536, 1)
    while data and not data.endswith(b"\n"):
        more = host.recv(65536)
        if not more:
            break
        data += more
    return (json.loads(data) if data.strip() else {}), fds


@contextmanager
def short_path(path: str) -> Iterator[str]:
    """``path`` as a socket address: a Unix socket's is at most ~107 bytes, and a home's folder can
    be longer; its folder's descriptor, through /proc, makes any path short."""
    folder = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{folder}/{os.path.basename(path)}"
    finally:
        os.close(folder)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
