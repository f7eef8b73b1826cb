"""The job host: a process beside the local cluster (`deepyard cluster up`) that has imported what a
job's driver needs (torch, Ray Tune, MLflow: ~3.7 s of CPU on 2 cores) once, and forks a driver
for each `deepyard run` that joins the cluster.

A `deepyard run` hands the host its arguments, working folder, environment and standard streams
(the file descriptors themselves, over a Unix socket) and waits; the forked driver runs the command
as the process would have, writing to the same terminal; the command exits with the driver's code.
Signals the command gets (Ctrl-C, SIGTERM, SIGHUP, SIGUSR2) are passed on to the driver; a command
killed outright takes its driver with it. deepyard's own code is imported fresh in each driver, so
an edit is picked up by the next run; the host serves only commands whose Python, module path,
installed packages and import-time environment (``_IMPORT_ENV``) are its own, and starts itself
again when its installed packages change. Anything else, or no host, and the command runs
in its own process, as before.

    python -c "from deepyard.job_host import serve; serve(SOCKET)"   (started by ``local_cluster.up``)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys

# Read by these libraries when they are imported: a command that sets them differently runs alone.
_IMPORT_ENV = ("RAY_", "TORCH", "PYTORCH", "OMP_", "MKL_", "OPENBLAS", "CUDA", "NCCL", "LD_", "PYTHON",
               "MALLOC", "GRPC_", "ARROW", "TUNE_", "MLFLOW_CONFIGURE_LOGGING")
_NOT_AT_IMPORT = {"RAY_ADDRESS"}  # (read when a driver connects)
PRELOAD = ("torch", "torch._dynamo", "ray", "ray.tune", "ray.train", "ray.train.torch", "ray.data", "mlflow",
           "mlflow.pytorch", "pandas", "pyarrow", "pydantic", "typer", "rich", "yaml")
FORWARDED = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2")
                  if hasattr(signal, name))
ENABLED_ENV = "DEEPYARD_JOB_HOST"  # "0": `deepyard cluster up` starts none, and commands run alone
STALE = "the installed packages changed since it started; it starts again"
IN_DRIVER = False  # set in a forked driver: its command runs there, not in yet another one


def socket_path(home: str) -> str:
    return os.path.join(home, "cluster", "host.sock")


def identity() -> dict:
    """What the host's imports depend on: the interpreter, the module path (past its first entry,
    the script's folder) and when each folder of installed packages last changed."""
    import sysconfig

    folders = sorted({sysconfig.get_paths()[name] for name in ("purelib", "platlib")})
    return {"python": sys.executable, "path": sys.path[1:],
            "packages": {folder: os.stat(folder).st_mtime_ns for folder in folders if os.path.isdir(folder)}}


def import_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(_IMPORT_ENV) and k not in _NOT_AT_IMPORT}


# The command's side ------------------------------------------------------------------------------

def run_there(argv: list[str]) -> int | None:
    """Run the command in a driver forked by this home's job host; its exit code, or None where
    there is no host to take it (the command then runs here)."""
    if IN_DRIVER or os.environ.get(ENABLED_ENV) == "0":
        return None
    home = os.path.abspath(os.path.expanduser(os.environ.get("DEEPYARD_HOME", ".deepyard")))
    pending: list[int] = []  # signals that came before the driver's pid
    driver: list[int] = []

    def forward(signum, _frame) -> None:
        if driver:
            try:
                os.kill(driver[0], signum)
            except ProcessLookupError:
                pass
        else:
            pending.append(signum)

    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        host.connect(socket_path(home))
    except OSError:  # no host (no cluster up, or started without one), or one gone
        host.close()
        return None
    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED}
    try:
        request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "umask": _umask(),
                              "identity": identity()}).encode()
        socket.send_fds(host, [struct.pack("!I", len(request)) + request], [0, 1, 2])
        reader = host.makefile("r")
        answer = json.loads(reader.readline() or "{}")
        if "pid" not in answer:
            if answer.get("refused"):
                print(f"note: the job host did not take this command ({answer['refused']}); it runs here",
                      file=sys.stderr)
            return None
        driver.append(answer["pid"])
        for signum in pending:
            forward(signum, None)
        ended = json.loads(reader.readline() or "{}")
        if "exit" in ended:
            return ended["exit"]
        print(f"deepyard: the job host ended while driver {driver[0]} ran; stopping it", file=sys.stderr)
        forward(signal.SIGTERM, None)
        return 1
    finally:
        host.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# The host's side ---------------------------------------------------------------------------------

def serve(path: str, preload: tuple[str, ...] = PRELOAD) -> None:
    """Import ``preload``, then listen at ``path`` and fork a driver for each command, until SIGTERM
    (the drivers get it too, and are waited for) or the cluster is gone."""
    import importlib
    import selectors

    # (before the imports: Ray adds to sys.path, torch to the environment)
    own, environment = identity(), dict(os.environ)
    own_env = import_env(environment)
    for name in preload:
        importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    partial = f"{path}.{os.getpid()}"
    listener.bind(partial)
    os.chmod(partial, 0o600)
    listener.listen(16)
    os.replace(partial, path)  # (a command finds a host that listens, or none)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    wakeup_r, wakeup_w = os.pipe()
    os.set_blocking(wakeup_w, False)
    signal.set_wakeup_fd(wakeup_w)
    events = selectors.DefaultSelector()
    events.register(listener, selectors.EVENT_READ, "accept")
    events.register(wakeup_r, selectors.EVENT_READ, "signal")
    drivers: dict[int, tuple[socket.socket, int]] = {}  # pid: (its command's connection, its pidfd)
    print(f"job host {os.getpid()}: serving at {path} (preloaded {', '.join(preload)})", flush=True)
    try:
        while not stopping or drivers:
            if stopping and listener.fileno() >= 0:  # (once)
                events.unregister(listener)
                listener.close()
                _remove(path)
                _signal_all(drivers, signal.SIGTERM)
            for key, _ in events.select(timeout=2.0):
                if key.data == "accept" and not stopping:
                    command, _ = listener.accept()
                    started = _start_driver(command, own, own_env, listener, drivers)
                    if started is None:
                        command.close()
                    elif started == "stale":
                        command.close()
                        _start_again(path, listener, environment)
                    else:
                        pid, pidfd = started
                        drivers[pid] = (command, pidfd)
                        events.register(pidfd, selectors.EVENT_READ, ("ended", pid))
                        events.register(command, selectors.EVENT_READ, ("command", pid))
                elif key.data == "signal":
                    os.read(wakeup_r, 512)
                elif key.data[0] == "ended":
                    _finish(key.data[1], drivers, events)
                elif key.data[0] == "command" and _gone(drivers[key.data[1]][0]):
                    os.kill(key.data[1], signal.SIGKILL)  # its command was killed: so is its driver
                    events.unregister(drivers[key.data[1]][0])
            if not stopping and not _cluster_up(path):
                stopping.append(True)
    finally:
        if listener.fileno() >= 0:
            listener.close()
            _remove(path)


def _start_driver(command: socket.socket, own: dict, own_env: dict, listener: socket.socket, drivers: dict):
    command.settimeout(10.0)
    try:
        uid = struct.unpack("3i", command.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        data, fds, _, _ = socket.recv_fds(command, 1 << 20, 3)
        size = struct.unpack("!I", data[:4])[0]
        data = data[4:]
        while len(data) < size:
            more = command.recv(size - len(data))
            if not more:
                raise ConnectionError("the command went away")
            data += more
        request = json.loads(data)
    except (OSError, ValueError, struct.error) as error:
        print(f"job host: a request could not be read ({error})", flush=True)
        return None
    refused = None
    if uid != os.getuid():
        refused = "another user's command"
    elif len(fds) != 3:
        refused = "its standard streams did not come along"
    elif request["identity"] != own:
        same_python = all(request["identity"][key] == own[key] for key in ("python", "path"))
        if same_python and identity()["packages"] != own["packages"]:
            refused = STALE
        else:
            refused = "the command's Python, module path or installed packages are not the host's"
    elif (theirs := import_env(request["env"])) != own_env:
        differ = sorted({key for key, _ in set(theirs.items()) ^ set(own_env.items())})
        refused = f"the command sets {', '.join(differ)} otherwise than the host did when it started"
    if refused:
        _reply(command, {"refused": refused})
        for fd in fds:
            os.close(fd)
        return "stale" if refused == STALE else None
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _become_driver(request, fds, [listener, command, *(c for c, _ in drivers.values())])
    for fd in fds:
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    _reply(command, {"pid": pid})
    command.settimeout(None)
    print(f"job host: driver {pid} runs {' '.join(request['argv'][1:])}", flush=True)
    return pid, pidfd


def _become_driver(request: dict, fds: list[int], host_sockets: list[socket.socket]) -> None:
    """In the forked process: take on the command's streams, folder and environment, and run it."""
    try:
        for held in host_sockets:
            held.close()
        os.setpgid(0, 0)  # (a signal to the host's group is not one to its drivers)
        signal.set_wakeup_fd(-1)
        for signum in (*FORWARDED, signal.SIGCHLD):
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.umask(request["umask"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = request["argv"]
        sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # (the rest: the command's, as imports left it)
        sys.stdin = sys.__stdin__ = os.fdopen(0, "r", closefd=False)
        sys.stdout = sys.__stdout__ = os.fdopen(1, "w", buffering=1 if os.isatty(1) else -1, closefd=False)
        sys.stderr = sys.__stderr__ = os.fdopen(2, "w", buffering=1, errors="backslashreplace", closefd=False)
        global IN_DRIVER
        IN_DRIVER = True
        from deepyard.cli import main

        main()  # (it ends the process)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(1)


def _finish(pid: int, drivers: dict, events) -> None:
    command, pidfd = drivers.pop(pid)
    events.unregister(pidfd)
    os.close(pidfd)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    code = 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N
    try:
        events.unregister(command)
    except (KeyError, ValueError):
        pass
    _reply(command, {"exit": code})
    command.close()
    print(f"job host: driver {pid} exited {code}", flush=True)


def _gone(command: socket.socket) -> bool:
    """Has the command closed its end (it ended without its driver's exit, i.e. it was killed)?
    (It sends nothing after its request: anything else is read and dropped.)"""
    try:
        return command.recv(4096, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _reply(command: socket.socket, message: dict) -> None:
    try:
        command.sendall((json.dumps(message) + "\n").encode())
    except OSError:  # (the command is gone; its driver is ended when that is seen)
        pass


def _signal_all(drivers: dict, signum: int) -> None:
    for pid in drivers:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _cluster_up(path: str) -> bool:
    """Is the cluster this host serves still up? (Its state file names this process as its host.)"""
    try:
        with open(os.path.join(os.path.dirname(path), "state.json")) as state:
            host = json.load(state).get("host") or {}
    except (OSError, ValueError):
        return False
    return host.get("pid") == os.getpid()


def _start_again(path: str, listener: socket.socket, environment: dict[str, str]) -> None:
    """Installed packages changed under the host: the same process (its pid is in the cluster's
    state) imports them afresh."""
    listener.close()
    _remove(path)
    print("job host: installed packages changed; starting again", flush=True)
    os.execve(sys.executable, [sys.executable, "-c", f"from deepyard.job_host import serve; serve({path!r})"],
              environment)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
