"""The job host: a process beside the local cluster (`deepyard cluster up`) that has imported what a
job's driver needs (torch, Ray Tune, MLflow: ~3.7 s of CPU on 2 cores) once, and forks a driver
for each `deepyard run` that joins the cluster.

A `deepyard run` hands the host its arguments, working folder, environment and standard streams
(the file descriptors themselves, over a Unix socket) and waits; the forked driver runs the command
as the process would have, writing to the same terminal; the command exits with the driver's code.
Signals the command gets (Ctrl-C, SIGTERM, SIGHUP, SIGUSR2) are passed on to the driver, Ctrl-Z
stops it with the command (and continuing the command continues it); a command
killed outright takes its driver with it. The host serves only commands whose Python, module path,
installed packages and import-time environment (``job_client.import_env``) are its own, and starts
itself again when its installed packages change, or a source file it loaded from outside them
(deepyard's own, installed editable) changes: an edit is picked up by the next run. Anything else,
or no host, and the command runs in its own process, as before.

    python -c "from deepyard.job_host import serve; serve(SOCKET)"   (started by ``local_cluster.up``)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import threading
import time

from deepyard import job_client, warm
from deepyard.job_client import FORWARDED, host_command, identity, import_env_of, short_path

PRELOAD = ("torch", "ray", "ray.tune", "ray.train", "ray.train.torch", "ray.data", "mlflow", "ray.rllib",
           "gymnasium", "pandas", "pyarrow", "pydantic", "typer", "rich", "yaml",
           # What a driver went on to import, measured (~1.5 s of CPU in each job's driver on 2 cores):
           # MLflow's sqlite stores and their schema check (alembic), logging a model, Ray's dashboard
           # client (aiohttp), GIFs. (Not matplotlib: where it cannot write its config folder it makes
           # a temporary one and removes it at exit, which every driver would then do to the others; a
           # train driver imports it while training.)
           "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store",
           "alembic.command", "alembic.migration", "alembic.script", "alembic.autogenerate", *warm.MODEL_LOGGING,
           "aiohttp", "PIL.GifImagePlugin",
           # Ray's serializers for pydantic's v1 models, imported by a driver's first ray.put (~0.6 s)
           "pydantic.v1",
           # deepyard's own (~0.3 s; not the command line's: its consoles read the terminal as they
           # are made). A host whose copy of them is out of date starts again: ``_changed_source``.
           *(f"deepyard.runners.{kind}" for kind in ("train", "rl", "sweep", "compress", "deploy", "robustness")),
           "deepyard.spec", "deepyard.tracking", "deepyard.cluster", "deepyard.progress")
# A Ray worker of the local cluster (``ray_worker``): what a training function imports besides Ray,
# and the libraries Ray itself imports, ~2.7 s of CPU in each job's fresh worker process on 2 cores
# (torch._dynamo included: torch's optimizers import it when the first is built). Not Ray: loading
# its core library freezes what its config read from the environment, a worker's job id included.
WORKER_PRELOAD = ("torch", "torch._dynamo", "numpy", "pandas", "pyarrow", "attr", "pydantic", "rich", "urllib3",
                  "yaml", "wcwidth", "fsspec", "filelock", "google.protobuf", "grpc", "click", "requests",
                  "jsonschema", "psutil", "uvloop", "lz4", "colorful", "msgpack", "aiohttp",
                  "deepyard.runners.train")  # (the trial's loop: ~0.3 s, and no Ray at import)
NOT_IN_WORKER_HOST = "ray._raylet"
STALE = "the installed packages changed since it started; it starts again"
STALE_CODE = "its preloaded copy of {} is out of date; it starts again"
REQUEST_S = 2.0  # a command sends its request at once; one that has not within this is dropped


def serve(path: str, preload: tuple[str, ...] | None = None, kind: str = "driver", owner: int | None = None) -> None:
    """Import ``preload``, then listen at ``path`` and fork a driver for each command (``kind``
    "worker": a Ray worker for each raylet's start of one), until SIGTERM (the processes forked get
    it too, and are waited for) or the cluster is gone: `deepyard cluster down`, or, for the host of
    a driver's own embedded cluster, the exit of that driver, process ``owner``."""
    preload = preload if preload is not None else WORKER_PRELOAD if kind == "worker" else PRELOAD
    started_ns = time.time_ns()  # (a source edited from now on may be newer than what was imported)
    environment = dict(os.environ)  # (before the imports: torch adds to it, Ray to sys.path)
    own = identity()
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # (as the command sets it: cli/app.py)
    loaded, failed = warm.import_each(preload)
    for name, why in failed.items():  # (a driver that needs it imports it, and fails, as alone)
        print(f"job host: {name} not preloaded ({why})", flush=True)
    if "mlflow.pyfunc" in loaded and (why := warm.map_installed_packages()):
        # (a host whose packages change starts again: ``STALE``)
        print(f"job host: MLflow's package map not built ahead ({why})", flush=True)
    if kind == "worker" and NOT_IN_WORKER_HOST in sys.modules:
        print(f"job host: a preload imported {NOT_IN_WORKER_HOST}; not serving: Ray workers start as Ray starts "
              "them", flush=True)
        return
    if threading.active_count() > 1:  # (a fork copies no thread: whatever locks one held stay held)
        print(f"job host: a preload started threads ({', '.join(t.name for t in threading.enumerate())}); "
              "not serving: commands run in their own processes", flush=True)
        return
    print(f"job host {os.getpid()}: preloaded {', '.join(loaded) or 'nothing'}", flush=True)
    host = Host(path, own, import_env_of(environment, kind), environment, kind, owner)
    host.sources = _editable_sources(started_ns)
    host.loop()


class Host:
    """The listening socket, the drivers running (pid: the command's connection and the driver's
    pidfd) and one selector over them all: one thread, so that a fork copies no other thread's locks."""

    def __init__(self, path: str, own: dict, own_env: dict, environment: dict, kind: str = "driver",
                 owner: int | None = None) -> None:
        import selectors

        self.path, self.own, self.own_env, self.environment, self.kind = path, own, own_env, environment, kind
        self.owner = owner
        self.owner_fd = os.pidfd_open(owner) if owner is not None else -1  # (ProcessLookupError: gone already)
        self.drivers: dict[int, tuple[socket.socket, int]] = {}
        self.asking: dict[int, _Request] = {}  # commands whose requests are still coming in, by socket fd
        self.stopping = self.stale = False
        self.why_stale = "installed packages changed"
        self.sources: dict[str, tuple[int, int, int]] = {}  # (what ``_changed_source`` looks at)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        partial = f"{path}.{os.getpid()}"
        with short_path(partial) as short:
            self.listener.bind(short)
        os.chmod(partial, 0o600)
        self.listener.listen(16)
        os.replace(partial, path)  # (a command finds a host that listens, or none)
        self.inode = os.stat(path).st_ino
        signal.signal(signal.SIGTERM, self._stop)
        self.wakeup_r, self.wakeup_w = os.pipe()
        os.set_blocking(self.wakeup_w, False)
        signal.set_wakeup_fd(self.wakeup_w)
        self.events = selectors.DefaultSelector()
        self.events.register(self.listener, selectors.EVENT_READ, ("accept", 0))
        self.events.register(self.wakeup_r, selectors.EVENT_READ, ("signal", 0))
        if self.owner_fd >= 0:
            self.events.register(self.owner_fd, selectors.EVENT_READ, ("owner", 0))
        print(f"job host {os.getpid()}: serving at {path}", flush=True)

    def _stop(self, *_) -> None:
        self.stopping = True

    def loop(self) -> None:
        try:
            while not (self.stopping or self.stale) or self.drivers:
                if (self.stopping or self.stale) and self.listener.fileno() >= 0:  # (once)
                    self._close_listener()
                    if self.stopping:
                        self._signal_all(signal.SIGTERM)
                        self._signal_all(signal.SIGCONT)  # (a driver stopped by Ctrl-Z handles it too)
                for key, _ in self.events.select(timeout=self._wait_s()):
                    what, pid = key.data
                    try:
                        self._on(what, pid)
                    except Exception as error:  # (one command's trouble is not every other's)
                        print(f"job host: {what} {pid or ''} failed: {error!r}", flush=True)
                        if what == "request":
                            self._drop(pid)
                self._drop_late()
                if not self.stopping and self.owner is None and not _cluster_up(self.path, self.kind):
                    self.stopping = True
        finally:
            self._close_listener()
            for fd in list(self.asking):  # (their commands run alone; their streams stay out of a new host)
                self._drop(fd)
        if self.stale and not self.stopping:
            print(f"job host: {self.why_stale}; starting again", flush=True)
            os.execve(sys.executable, host_command(self.path, self.kind, self.owner), self.environment)

    def _on(self, what: str, pid: int) -> None:
        import selectors

        if what == "signal":
            os.read(self.wakeup_r, 512)
        elif what == "owner":  # (the driver whose cluster this host serves has exited)
            self.events.unregister(self.owner_fd)
            self.stopping = True
        elif what == "accept" and self.listener.fileno() >= 0:
            command, _ = self.listener.accept()
            command.setblocking(False)  # (read as it comes: a slow command holds up no other)
            self.asking[command.fileno()] = _Request(command, time.monotonic() + REQUEST_S)
            self.events.register(command, selectors.EVENT_READ, ("request", command.fileno()))
        elif what == "request" and pid in self.asking:
            self._take(pid)
        elif what == "ended" and pid in self.drivers:
            self._finish(pid)
        elif what == "command" and pid in self.drivers and _gone(self.drivers[pid][0]):
            os.kill(pid, signal.SIGKILL)  # its command was killed: so is its driver
            self.events.unregister(self.drivers[pid][0])

    def _take(self, fd: int) -> None:
        """Read what a command has sent; once its request is whole, start its driver."""
        import selectors

        request = self.asking[fd]
        if not request.read():
            return
        self.events.unregister(request.command)
        del self.asking[fd]
        command = request.command
        command.setblocking(True)
        try:
            started = self._start_driver(command, request)
        except BaseException:
            command.close()
            raise
        if started is None:
            command.close()
            return
        pid, pidfd = started
        self.drivers[pid] = (command, pidfd)
        self.events.register(pidfd, selectors.EVENT_READ, ("ended", pid))
        self.events.register(command, selectors.EVENT_READ, ("command", pid))

    def _start_driver(self, command: socket.socket, asked: "_Request") -> tuple[int, int] | None:
        fds, asked.fds = asked.fds, []
        try:
            uid = struct.unpack("3i", command.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
            request = json.loads(asked.body())
            refused = self._refusal(uid, request, fds)
            if refused:
                _reply(command, {"refused": refused})
                return None
            pid = self._fork(request, fds, command)
            pidfd = os.pidfd_open(pid)
        finally:
            for fd in fds:
                os.close(fd)
        try:
            socket.send_fds(command, [(json.dumps({"pid": pid}) + "\n").encode()], [pidfd])
        except OSError:  # (the command is gone: its driver is killed and reaped once that is seen)
            pass
        print(f"job host: {self.kind} {pid} runs {' '.join(request['argv'][1:])[:200]}", flush=True)
        return pid, pidfd

    def _wait_s(self) -> float:
        """Until the earliest request is due (2 s at most: the cluster's state is looked at between)."""
        due = min((request.deadline for request in self.asking.values()), default=time.monotonic() + 2.0)
        return min(2.0, max(0.0, due - time.monotonic()))

    def _drop_late(self) -> None:
        now = time.monotonic()
        for fd in [fd for fd, request in self.asking.items() if request.deadline <= now]:
            try:
                self._take(fd)  # (what came while the host was busy with others)
            except Exception as error:
                print(f"job host: request {fd} failed: {error!r}", flush=True)
            if fd in self.asking:
                print(f"job host: a command sent no whole request within {REQUEST_S:g} s; dropped", flush=True)
                self._drop(fd)

    def _drop(self, fd: int) -> None:
        if (request := self.asking.pop(fd, None)) is not None:
            self.events.unregister(request.command)
            request.close()

    def _refusal(self, uid: int, request: dict, fds: list[int]) -> str | None:
        if uid != os.getuid():
            return "another user's command"
        if len(fds) != 3:
            return "its standard streams did not come along"
        if self.stale:
            return STALE
        if changed := _changed_source(self.sources):
            self.stale, self.why_stale = True, f"{changed} changed"  # (it starts again once its drivers have ended)
            return STALE_CODE.format(changed)
        if self.stopping:  # (a request that came in whole after `cluster down` began)
            return "its cluster is going down"
        if request.get("kind", "driver") != self.kind:
            return f"this host forks {self.kind}s"
        if request["identity"] != self.own:
            if all(request["identity"][key] == self.own[key] for key in ("python", "path")) and (
                    identity()["packages"] != self.own["packages"]):
                self.stale = True  # (it starts again once its drivers have ended)
                return STALE
            return "the command's Python, module path or installed packages are not the host's"
        if (theirs := import_env_of(request["env"], self.kind)) != self.own_env:
            differ = sorted({key for key, _ in set(theirs.items()) ^ set(self.own_env.items())})
            return f"the command sets {', '.join(differ)} otherwise than the host did when it started"
        return None

    def _fork(self, request: dict, fds: list[int], command: socket.socket) -> int:
        """A signal the command passes on right away finds the driver with the default handlers
        (blocked across the fork: the host's own would swallow it)."""
        sys.stdout.flush()
        sys.stderr.flush()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        pid = os.fork()
        if pid == 0:
            try:  # (whatever happens in it, the child never returns to the host's loop)
                held = [self.listener, command, *(c for c, _ in self.drivers.values()),
                        *(r.command for r in self.asking.values())]
                (_become_worker if self.kind == "worker" else _become_driver)(
                    request, fds, held, [self.wakeup_r, self.wakeup_w, self.events.fileno(),
                                         *([self.owner_fd] if self.owner_fd >= 0 else []),
                                         *(p for _, p in self.drivers.values()),
                                         *(fd for r in self.asking.values() for fd in r.fds)], blocked)
            finally:
                os._exit(1)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return pid

    def _finish(self, pid: int) -> None:
        command, pidfd = self.drivers.pop(pid)
        self.events.unregister(pidfd)
        os.close(pidfd)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        code = 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N
        try:
            self.events.unregister(command)
        except (KeyError, ValueError):
            pass
        _reply(command, {"exit": code})
        command.close()
        print(f"job host: {self.kind} {pid} exited {code}", flush=True)

    def _signal_all(self, signum: int) -> None:
        for _, pidfd in self.drivers.values():
            try:
                signal.pidfd_send_signal(pidfd, signum)
            except ProcessLookupError:
                pass

    def _close_listener(self) -> None:
        if self.listener.fileno() < 0:
            return
        self.events.unregister(self.listener)
        self.listener.close()
        try:  # (only this host's: another may have started since, for another cluster in this home)
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass


class _Request:
    """A command's request as it comes in: a length, then that much JSON, the command's three
    standard streams with its first bytes. Whole within ``REQUEST_S`` of the connection, or dropped."""

    def __init__(self, command: socket.socket, deadline: float) -> None:
        self.command, self.deadline = command, deadline
        self.data, self.fds = b"", []

    def read(self) -> bool:
        """Take what has come; True once the request is whole. (ConnectionError: the command went away.)"""
        try:
            data, fds, _, _ = socket.recv_fds(self.command, 1 << 20, 3)
        except BlockingIOError:
            return False
        self.fds += fds
        if not data:
            raise ConnectionError("the command went away before its request was whole")
        self.data += data
        return len(self.data) >= 4 and len(self.data) >= 4 + self._size()

    def body(self) -> bytes:
        return self.data[4:4 + self._size()]

    def _size(self) -> int:
        return struct.unpack("!I", self.data[:4])[0]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.command.close()


def _take_on(request: dict, fds: list[int], sockets: list[socket.socket], descriptors: list[int]) -> None:
    """In a forked process: let go of the host's sockets and descriptors, take on the requester's
    standard streams, folder and environment, with each signal's handling as a new process has it."""
    for held in sockets:
        held.close()
    for fd in descriptors:
        os.close(fd)
    os.setpgid(0, 0)  # (a signal to the host's group is not one to what it forked)
    signal.set_wakeup_fd(-1)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    if "numpy.random" in sys.modules:  # (seeded once, in the host: every fork would draw the same numbers)
        sys.modules["numpy.random"].seed()
    if (niceness := request.get("niceness")) is not None:  # (what the raylet gave its stand-in: worker_niceness)
        try:
            os.setpriority(os.PRIO_PROCESS, 0, niceness)
        except OSError:  # (below the host's takes a privilege: the host's stays)
            pass
    if (score := request.get("oom_score_adj")) is not None:  # (what the raylet gave its stand-in)
        try:
            with open("/proc/self/oom_score_adj", "w") as adj:
                adj.write(str(score))
        except OSError:  # (a score below the host's takes a privilege: the host's stays)
            pass
    sys.argv = request["argv"]
    sys.stdin = sys.__stdin__ = os.fdopen(0, "r", closefd=False)
    sys.stdout = sys.__stdout__ = os.fdopen(1, "w", buffering=1 if os.isatty(1) else -1, closefd=False)
    sys.stderr = sys.__stderr__ = os.fdopen(2, "w", buffering=1, errors="backslashreplace", closefd=False)


def _become_driver(request: dict, fds: list[int], sockets: list[socket.socket], descriptors: list[int],
                   mask: set) -> None:
    """In the forked process: take on the command's streams, folder and environment, and run it."""
    import __main__

    code = 1
    try:
        for signum in (*FORWARDED, signal.SIGCHLD):
            signal.signal(signum, {signal.SIGINT: signal.default_int_handler, signal.SIGUSR1: signal.SIG_IGN,
                                   signal.SIGUSR2: signal.SIG_IGN}.get(signum, signal.SIG_DFL))
        _take_on(request, fds, sockets, descriptors)
        if level := os.environ.get("MLFLOW_LOGGING_LEVEL"):  # (what importing MLflow does with it)
            import logging

            logging.getLogger("mlflow").setLevel(level.upper())
        sys.path[0] = request["script_folder"]  # (the rest: the command's, as the host's imports left it)
        __main__.__file__ = sys.argv[0]  # (Ray: a script, not an interactive session)
        job_client.IN_DRIVER = True
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        from deepyard.cli import exit_at_once, main

        try:
            main()  # (it ends the process)
        except BaseException:  # what would end a process of its own: its traceback, its exit handlers
            sys.excepthook(*sys.exc_info())
            exit_at_once(130 if isinstance(sys.exc_info()[1], KeyboardInterrupt) else 1)
    except KeyboardInterrupt:  # (Ctrl-C before the command could start: nothing to stop)
        code = 130
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        _flush()
        os._exit(code)


def _become_worker(request: dict, fds: list[int], sockets: list[socket.socket], descriptors: list[int],
                   mask: set) -> None:
    """In the forked process: run Ray's worker script (``request["argv"]``) as ``python`` would."""
    import atexit
    import runpy

    code: object = 1
    try:
        for signum in (*FORWARDED, signal.SIGCHLD):
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        _take_on(request, fds, sockets, descriptors)
        sys.path[0] = os.path.dirname(sys.argv[0])
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        except BaseException:
            sys.excepthook(*sys.exc_info())
        if code is not None and not isinstance(code, int):  # sys.exit("message"): the message, and status 1
            print(code, file=sys.stderr)
            code = 1
        atexit._run_exitfuncs()  # (what the interpreter's exit would run; not its teardown of every module)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        _flush()
        os._exit(code & 0xFF if isinstance(code, int) else 1)


def _editable_sources(since_ns: int) -> dict[str, tuple[int, int, int]]:
    """The source files of the modules loaded that no install put there (deepyard's own, installed
    editable, or a folder on PYTHONPATH), as they are now: what a forked process would run, though
    an edit since would be what a process of its own runs. A file changed after ``since_ns`` (while
    it was imported) counts as changed already."""
    import site
    import sysconfig

    installed = {path for key in ("stdlib", "platstdlib", "purelib", "platlib")
                 if (path := sysconfig.get_paths().get(key))}
    installed |= {*site.getsitepackages(), site.getusersitepackages()}
    installed = tuple(os.path.join(path, "") for path in installed)  # (a folder, not a name's prefix)
    sources = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and path.endswith(".py") and not path.startswith(installed):
            if (stamp := _stamp(path)) is not None:
                sources[path] = stamp if stamp[2] < since_ns else (*stamp[:2], -1)
    return sources


def _changed_source(sources: dict[str, tuple[int, int, int]]) -> str | None:
    """The first of ``sources`` that is no longer as it was, or None (~1 ms for deepyard's ~150)."""
    return next((path for path, was in sources.items() if _stamp(path) != was), None)


def _stamp(path: str) -> tuple[int, int, int] | None:
    """(inode, size, mtime) of a file, None if it is gone."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # (a signal's exception here too: the process exits next)
            pass


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


def _cluster_up(path: str, kind: str = "driver") -> bool:
    """Is the cluster this host serves still up? (Its state file names this process as its host.)"""
    try:
        with open(os.path.join(os.path.dirname(path), "state.json")) as state:
            host = json.load(state).get("worker_host" if kind == "worker" else "host") or {}
    except (OSError, ValueError):
        return False
    return host.get("pid") == os.getpid()
