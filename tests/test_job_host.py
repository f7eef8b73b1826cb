"""The job host (`job_host.py`): `deepyard cluster up` starts it beside the cluster, and each
`deepyard run` that joins the cluster runs in a driver it forks, with the command's streams, folder,
environment and exit code; Ctrl-C reaches the driver, killing the command kills it, and a command
the host cannot serve as it would run alone runs alone."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ended
from test_train_job import TINY_MLP
from deepyard import tracking

DEEPYARD = [sys.executable, "-m", "deepyard"]
pytestmark = pytest.mark.slow  # (commands and hosts of their own: out of the unit-test loop, make test-fast)


# Without Ray: a host that preloads nothing, standing in its cluster's state ----------------------

@pytest.fixture()
def bare_host(tmp_path):
    """A host of a home of the test's own (no cluster: its state file names the host only), with a
    folder of its own on the module path (``extra``: what an install changes), preloading nothing
    that imports."""
    (tmp_path / "extra").mkdir()
    # (a module that will not import: the host serves all the same, without it)
    yield from _bare_host(tmp_path, ("deepyard_no_such_module",))


def _bare_host(tmp_path, preload: tuple[str, ...]):
    (tmp_path / "cluster").mkdir()
    path = str(tmp_path / "cluster" / "host.sock")
    env = {**os.environ, "DEEPYARD_HOME": str(tmp_path),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "extra"), os.environ.get("PYTHONPATH")]))}
    serve = f"from deepyard.job_host import serve; serve({path!r}, preload={preload!r})"
    host = subprocess.Popen([sys.executable, "-c", serve],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    (tmp_path / "cluster" / "state.json").write_text(json.dumps({"host": {"pid": host.pid}}))
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        assert time.monotonic() < deadline and host.poll() is None, "the host did not listen"
        time.sleep(0.05)
    yield env, host
    host.terminate()
    host.wait(timeout=10)


def test_a_command_runs_in_a_forked_driver_with_its_own_streams_folder_and_exit_code(bare_host, tmp_path):
    env, host = bare_host
    bad = tmp_path / "elsewhere"
    bad.mkdir()
    (bad / "broken.yaml").write_text("kind: train\nname: [\n")
    done = subprocess.run([*DEEPYARD, "run", "broken.yaml"], cwd=bad, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, done.stderr  # bad input, found relative to the command's folder
    assert "broken.yaml" in done.stderr and "note:" not in done.stderr
    usage = subprocess.run([*DEEPYARD, "run", "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and "--resume" in usage.stdout  # the command's stdout, not the host's
    host.terminate()
    log = host.communicate(timeout=10)[0]
    assert len(re.findall(r"driver (\d+) runs run", log)) == 2, log
    assert "exited 2" in log and "exited 0" in log
    assert "deepyard_no_such_module not preloaded (ModuleNotFoundError" in log


def test_a_command_slow_to_send_its_request_holds_up_no_other_and_is_dropped(bare_host, tmp_path):
    """A command that trickles its request (stopped mid-send, or hostile) is read as it comes: another
    command is served meanwhile, and the slow one is dropped once its 2 s are up. (Read as one
    blocking request, the trickle held the host until the other command gave up and ran alone.)"""
    import socket
    import struct
    import threading

    from deepyard.job_client import HANDSHAKE_S, short_path

    env, host = bare_host
    dropped: list[bool] = []

    def trickle() -> None:  # a length, then a byte each half second: never whole, never quiet for 2 s
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with short_path(str(tmp_path / "cluster" / "host.sock")) as path:
                slow.connect(path)
            slow.sendall(struct.pack("!I", 1000))
            deadline = time.monotonic() + HANDSHAKE_S + 5
            while time.monotonic() < deadline:
                time.sleep(0.5)
                slow.sendall(b" ")
        except OSError:  # (the host closed its end)
            dropped.append(True)
        finally:
            slow.close()

    # One trickler a second for 5 s: whenever the other command asks, one is being read.
    senders = [threading.Timer(delay, trickle) for delay in range(5)]
    for sender in senders:
        sender.daemon = True
        sender.start()
    served = subprocess.run([*DEEPYARD, "run", "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert served.returncode == 0 and "--resume" in served.stdout and "note:" not in served.stderr
    for sender in senders:
        sender.join(timeout=HANDSHAKE_S + 15)
    assert len(dropped) == len(senders)
    host.terminate()
    log = host.communicate(timeout=10)[0]
    assert log.count("runs run") == 1, log  # the other command was driven from the host, not run alone
    assert "sent no whole request within 2 s; dropped" in log, log


def test_a_command_that_imports_otherwise_or_a_submitted_jobs_driver_runs_alone(bare_host):
    env, host = bare_host
    done = subprocess.run([*DEEPYARD, "run", "--help"], env={**env, "OMP_NUM_THREADS": "7"}, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "--resume" in done.stdout
    assert "the job host did not take this command (the command sets OMP_NUM_THREADS" in done.stderr
    off = subprocess.run([*DEEPYARD, "run", "--help"], env={**env, "DEEPYARD_JOB_HOST": "0"}, capture_output=True,
                         text=True, timeout=60)
    assert off.returncode == 0 and "note:" not in off.stderr
    # A submitted job's entrypoint (Ray's job supervisor sets this) stays the supervisor's child, silently.
    submitted = subprocess.run([*DEEPYARD, "run", "--help"], env={**env, "RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"},
                               capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0 and "note:" not in submitted.stderr
    host.terminate()
    assert "runs run" not in host.communicate(timeout=10)[0]


def test_installed_packages_that_changed_start_the_host_again(bare_host, tmp_path):
    env, host = bare_host
    (tmp_path / "extra" / "new_package").mkdir()  # (an install into a folder of the module path)
    refused = subprocess.run([*DEEPYARD, "run", "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 0 and "--resume" in refused.stdout
    assert "installed packages changed since it started; it starts again" in refused.stderr
    socket_path = tmp_path / "cluster" / "host.sock"
    deadline = time.monotonic() + 30
    while not socket_path.exists():
        assert time.monotonic() < deadline and host.poll() is None, "the host did not come back"
        time.sleep(0.05)
    served = subprocess.run([*DEEPYARD, "run", "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert served.returncode == 0 and "note:" not in served.stderr
    host.terminate()
    log = host.communicate(timeout=10)[0]
    assert "starting again" in log and log.count("runs run") == 1, log  # the same process, serving again


def test_a_host_whose_preloaded_source_changed_starts_again(tmp_path):
    """What the host preloaded from outside the installed packages (deepyard's own code, installed
    editable) is what its drivers would run: once a file of it changes, the next command runs
    alone, as it would with the edit, and the host starts again, with the edit, and serves."""
    (tmp_path / "extra" / "__pycache__").mkdir(parents=True)  # (its compiling makes no new folder on the path)
    module = tmp_path / "extra" / "edited_module.py"
    module.write_text("VALUE = 'before'\n")
    os.utime(module, ns=(time.time_ns() - 10**9,) * 2)  # (older than the host: ``_editable_sources``)
    host = _bare_host(tmp_path, ("edited_module",))
    env, process = next(host)

    def command():
        return subprocess.run([*DEEPYARD, "run", "--help"], env=env, capture_output=True, text=True, timeout=60)

    try:
        assert "note:" not in (served := command()).stderr, served.stderr
        module.write_text("VALUE = 'after'\n")
        alone = command()
        assert alone.returncode == 0 and "--resume" in alone.stdout
        assert f"its preloaded copy of {module} is out of date; it starts again" in alone.stderr, alone.stderr
        socket_path = tmp_path / "cluster" / "host.sock"
        deadline = time.monotonic() + 30
        while not socket_path.exists():
            assert time.monotonic() < deadline and process.poll() is None, "the host did not come back"
            time.sleep(0.05)
        assert "note:" not in (again := command()).stderr, again.stderr
    finally:
        next(host, None)
    log = process.communicate(timeout=10)[0]
    assert f"{module} changed; starting again" in log and log.count("runs run") == 2, log  # the same process


def test_a_host_whose_preload_started_a_thread_does_not_serve(tmp_path):
    """A fork copies no thread but every lock a thread holds: such a host would fork drivers that hang."""
    (tmp_path / "threaded_on_import.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n")
    path = tmp_path / "host.sock"
    done = subprocess.run([sys.executable, "-c", f"from deepyard.job_host import serve; "
                           f"serve({str(path)!r}, preload=('threaded_on_import',))"],
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                              str(tmp_path), os.environ.get("PYTHONPATH")]))},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "a preload started threads" in done.stdout, done.stdout + done.stderr
    assert not path.exists()


def test_a_host_whose_cluster_is_gone_leaves(bare_host, tmp_path):
    _, host = bare_host
    (tmp_path / "cluster" / "state.json").unlink()
    assert host.wait(timeout=10) == 0
    assert not (tmp_path / "cluster" / "host.sock").exists()


# With `deepyard cluster up`: a real cluster, real jobs ----------------------------------------------

@pytest.fixture(scope="module")
def hosted(tmp_path_factory):
    home = tmp_path_factory.mktemp("hosted")
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")},
           "DEEPYARD_HOME": str(home)}
    subprocess.run([*DEEPYARD, "cluster", "up", "--workers", "0", "--cpus-per-node", "2"], env=env, check=True,
                   capture_output=True, timeout=180)
    yield home, env
    subprocess.run([*DEEPYARD, "cluster", "down"], env=env, capture_output=True, timeout=120)


def drivers_started(home: Path) -> list[int]:
    return [int(pid) for pid in re.findall(r"driver (\d+) runs run", (home / "cluster" / "host.log").read_text())]


def store(home: Path):
    """The hosted home's MLflow store, opened as a job opens it (under its lock: a job may be creating
    it this moment, and two first uses of a sqlite store at once race MLflow's schema creation)."""
    return tracking.client(f"sqlite:///{home}/mlflow.db")


def trained(home: Path, name: str):
    """The run of job ``name`` once it has logged an epoch."""
    client = store(home)
    deadline = time.monotonic() + 120
    while True:
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  f"attributes.run_name LIKE '{name}%'")
        if run := next((r for r in runs if client.get_metric_history(r.info.run_id, "train_loss")), None):
            return run
        assert time.monotonic() < deadline, f"job {name} never trained"
        time.sleep(0.5)


def run_status(home: Path, run_id: str) -> str:
    return store(home).get_run(run_id).info.status


@pytest.mark.slow
def test_a_job_on_the_cluster_is_driven_from_the_host_and_ends_as_it_would_alone(hosted, tmp_path):
    home, env = hosted
    status = json.loads(subprocess.run([*DEEPYARD, "cluster", "status", "--json"], env=env, capture_output=True,
                                       text=True, timeout=60, check=True).stdout.strip().splitlines()[-1])
    assert status["job_host"]["alive"] and status["job_host"]["listening"]
    (tmp_path / "hosted.yaml").write_text(TINY_MLP.format(name="hosted", epochs=2) + "register: {enabled: false}\n")
    before = drivers_started(home)
    done = subprocess.run([*DEEPYARD, "run", "hosted.yaml", "--json"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on the local cluster at" in done.stderr and "done hosted" in done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["metrics"]["test_accuracy"] > 0.3
    assert run_status(home, summary["run_id"]) == "FINISHED"
    assert len(drivers_started(home)) == len(before) + 1


@pytest.mark.slow
def test_ctrl_c_reaches_the_forked_driver_and_its_run_ends_killed(hosted, tmp_path):
    home, env = hosted
    command, _ = start_long_job(home, env, tmp_path, "hosted_long", stderr=subprocess.PIPE, text=True)
    run = trained(home, "hosted_long")
    trial = busy_forked_workers(home)
    assert trial, f"the trial's Ray worker was not forked by the worker host: {fallback_notes(home)}"
    command.send_signal(signal.SIGINT)
    stderr = ended(command, 90)
    assert command.returncode == 130, stderr[-3000:]
    assert "interrupted" in stderr
    assert run_status(home, run.info.run_id) == "KILLED"
    deadline = time.monotonic() + 30
    while not all(gone(worker.pid) for worker in trial):  # (the job's end ends its workers)
        assert time.monotonic() < deadline, "the stopped job's forked workers stayed"
        time.sleep(0.2)


def fallback_notes(home: Path) -> list[str]:
    """What the cluster's workers' logs say of the worker host (why one started Ray's way)."""
    temp = json.loads((home / "cluster" / "state.json").read_text())["temp_dir"]
    return [line for log in Path(temp).glob("*/session_latest/logs/worker-*.err")
            for line in log.read_text(errors="replace").splitlines() if "worker host" in line]


def busy_forked_workers(home: Path) -> list:
    """The Ray workers the worker host forked that run a task or actor (Ray titles them `ray::NAME`)."""
    import psutil

    host = json.loads((home / "cluster" / "state.json").read_text())["worker_host"]
    return [child for child in psutil.Process(host["pid"]).children()
            if (title := " ".join(child.cmdline())).startswith("ray::") and "IDLE" not in title]


def start_long_job(home: Path, env: dict, folder: Path, name: str, **popen) -> tuple[subprocess.Popen, int]:
    """A 400-epoch job on the hosted cluster: its command, and its driver's pid once the host forked it."""
    (folder / f"{name}.yaml").write_text(TINY_MLP.format(name=name, epochs=400) + "register: {enabled: false}\n")
    before = len(drivers_started(home))
    command = subprocess.Popen([*DEEPYARD, "run", f"{name}.yaml"], cwd=folder, env=env, **popen)
    deadline = time.monotonic() + 60
    while len(drivers_started(home)) == before:
        assert time.monotonic() < deadline, "the host never started the command's driver"
        time.sleep(0.2)
    return command, drivers_started(home)[-1]


def gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
@pytest.mark.long
def test_a_killed_command_takes_its_driver_along_and_the_host_serves_the_next(hosted, tmp_path):
    home, env = hosted
    command, driver = start_long_job(home, env, tmp_path, "hosted_killed", stderr=subprocess.DEVNULL)
    trained(home, "hosted_killed")
    assert not gone(driver)
    command.kill()
    command.wait(timeout=10)
    deadline = time.monotonic() + 10
    while not gone(driver):
        assert time.monotonic() < deadline, "the driver outlived its killed command"
        time.sleep(0.1)
    before = len(drivers_started(home))
    served = subprocess.run([*DEEPYARD, "run", "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert served.returncode == 0 and len(drivers_started(home)) == before + 1


@pytest.mark.slow
@pytest.mark.long
def test_a_forked_workers_stand_in_killed_takes_the_worker_along_and_the_job_goes_on(hosted, tmp_path):
    """The raylet's own child is the stand-in (`ray_worker`): killed outright (as a raylet that dies
    takes its children), its worker goes too, and Ray Train recovers the trial as from a dead worker."""
    import psutil

    home, env = hosted
    (tmp_path / "recovers.yaml").write_text(TINY_MLP.format(name="recovers", epochs=150)
                                            + "register: {enabled: false}\nfailure: {max_failures: 2}\n")
    command = subprocess.Popen([*DEEPYARD, "run", "recovers.yaml", "--json"], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    trained(home, "recovers")
    trial = busy_forked_workers(home)
    assert trial, f"the trial's Ray worker was not forked by the worker host: {fallback_notes(home)}"
    stand_ins = [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [])[1:2] == [RAY_WORKER]]
    assert stand_ins
    for stand_in in stand_ins:
        stand_in.kill()
    deadline = time.monotonic() + 10
    while not all(gone(worker.pid) for worker in trial):
        assert time.monotonic() < deadline, "a forked worker outlived its killed stand-in"
        time.sleep(0.1)
    stdout, stderr = command.communicate(timeout=300)
    assert command.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert run_status(home, summary["run_id"]) == "FINISHED"


@pytest.mark.slow
@pytest.mark.long
def test_cluster_down_stops_the_hosts_drivers_as_a_stop_would_and_then_the_host(hosted, tmp_path):
    """(The module's last test: its cluster is down after it.)"""
    home, env = hosted
    state = json.loads((home / "cluster" / "state.json").read_text())
    host, worker_host = state["host"], state["worker_host"]
    command, driver = start_long_job(home, env, tmp_path, "hosted_down", stderr=subprocess.PIPE, text=True)
    run = trained(home, "hosted_down")
    down = subprocess.run([*DEEPYARD, "cluster", "down"], env=env, capture_output=True, text=True, timeout=180)
    assert down.returncode == 0, down.stderr
    stderr = ended(command, 60)
    assert command.returncode == 130 and "interrupted" in stderr, stderr[-3000:]
    assert run_status(home, run.info.run_id) == "KILLED"
    assert gone(driver) and gone(host["pid"]) and not (home / "cluster" / "host.sock").exists()
    assert gone(worker_host["pid"]) and not (home / "cluster" / "workers.sock").exists()


# The worker host: Ray workers of the local cluster forked from it (`ray_worker`), here without Ray ---

RAY_WORKER = str(Path(__file__).resolve().parents[1] / "src" / "deepyard" / "ray_worker.py")


@pytest.fixture()
def bare_worker_host(tmp_path):
    """A worker host of a home of the test's own, preloading nothing, and stand-ins for Ray's worker
    script (it prints what it was given and exits 3) and Ray's setup_worker.py (exits 5)."""
    (tmp_path / "cluster").mkdir()
    path = str(tmp_path / "cluster" / "workers.sock")
    (tmp_path / "default_worker.py").write_text(
        "import os, sys, time, numpy.random\nprint('worker', os.getpid(), os.getcwd(), os.environ.get('PROBE'), "
        "sys.argv[1:], sys.path[0], numpy.random.randint(1 << 30), flush=True)\n"
        "time.sleep(60) if '--wait' in sys.argv else sys.exit(3)\n")
    (tmp_path / "setup_worker.py").write_text(
        "import os, sys\nprint('ray starts it', os.environ['PROBE'], sys.argv[1:])\nsys.exit(5)\n")
    host = subprocess.Popen([sys.executable, "-c", f"from deepyard.job_host import serve; "
                             f"serve({path!r}, preload=('numpy.random',), kind='worker')"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    (tmp_path / "cluster" / "state.json").write_text(json.dumps({"worker_host": {"pid": host.pid}}))
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        assert time.monotonic() < deadline and host.poll() is None, "the worker host did not listen"
        time.sleep(0.05)
    env = {**os.environ, "DEEPYARD_WORKER_HOST": path, "DEEPYARD_RAY_SETUP_WORKER": str(tmp_path / "setup_worker.py"),
           "PROBE": "shell"}
    yield env, host
    host.terminate()
    host.wait(timeout=10)


def worker_command(tmp_path: Path, context: dict, *args: str) -> list[str]:
    """What a raylet runs to start a Python worker, with runtime env ``context``."""
    return [sys.executable, RAY_WORKER, str(tmp_path / "default_worker.py"), "--worker-id=abc", *args,
            f"--serialized-runtime-env-context={json.dumps(context)}", "--language=PYTHON"]


def start_worker(tmp_path: Path, env: dict, context: dict) -> subprocess.CompletedProcess:
    return subprocess.run(worker_command(tmp_path, context), cwd=tmp_path / "cluster", env=env, capture_output=True,
                          text=True, timeout=60)


def test_a_ray_worker_is_forked_by_the_worker_host_with_its_runtime_envs_variables(bare_worker_host, tmp_path):
    env, host = bare_worker_host
    started = start_worker(tmp_path, env, {"env_vars": {"PROBE": "job:${PROBE}"}, "command_prefix": []})
    assert started.returncode == 3, started.stdout + started.stderr  # the worker's exit code
    pid = int(started.stdout.split()[1])
    assert started.stdout.split()[2:-1] == [str(tmp_path / "cluster"), "job:shell", "['--worker-id=abc']",
                                            str(tmp_path)], started.stdout
    # Ray's own settings are read when the worker imports Ray, after the fork: they may differ
    again = start_worker(tmp_path, env, {"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
    assert again.returncode == 3, again.stdout + again.stderr
    assert again.stdout.split()[-1] != started.stdout.split()[-1]  # numpy's random state: each worker's own
    # SIGTERM to the stand-in (as the raylet sends a worker it stops) reaches the worker, which it ends
    # (at the niceness the raylet gave its stand-in: Ray's worker_niceness)
    waiting = subprocess.Popen(worker_command(tmp_path, {"env_vars": {}}, "--wait"), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.nice(7))
    waiter = int(waiting.stdout.readline().split()[1])
    assert os.getpriority(os.PRIO_PROCESS, waiter) == os.getpriority(os.PRIO_PROCESS, 0) + 7
    waiting.terminate()
    assert waiting.wait(timeout=30) == -signal.SIGTERM
    assert gone(waiter)
    host.terminate()
    log = host.communicate(timeout=10)[0]
    assert f"worker {pid} runs --worker-id=abc" in log and f"worker {pid} exited 3" in log, log
    assert f"worker {waiter} exited {128 + signal.SIGTERM}" in log, log


def test_a_worker_the_host_cannot_fork_as_ray_would_start_it_starts_as_ray_starts_it(bare_worker_host, tmp_path):
    env, host = bare_worker_host
    # a working_dir (Ray runs a command before the worker), or a variable read on import set otherwise
    prefixed = start_worker(tmp_path, env, {"env_vars": {"PROBE": "job"}, "command_prefix": ["cd", "/tmp", "&&"]})
    assert prefixed.returncode == 5, prefixed.stdout + prefixed.stderr
    assert prefixed.stdout.startswith("ray starts it shell ")  # (the environment as the raylet gave it)
    threads = start_worker(tmp_path, env, {"env_vars": {"OMP_NUM_THREADS": "7"}})
    assert threads.returncode == 5 and "ray starts it" in threads.stdout
    assert "the worker host did not fork this worker (the command sets OMP_NUM_THREADS" in threads.stderr
    alone = start_worker(tmp_path, {k: v for k, v in env.items() if k != "DEEPYARD_WORKER_HOST"}, {"env_vars": {}})
    assert alone.returncode == 5 and "PROBE" not in alone.stderr
    host.terminate()
    assert "runs" not in host.communicate(timeout=10)[0]


def test_a_worker_host_whose_owner_exits_leaves(tmp_path):
    """An embedded cluster's worker host ends with the driver that started it, however that ends."""
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    path = tmp_path / "workers.sock"
    host = subprocess.Popen([sys.executable, "-c", f"from deepyard.job_host import serve; "
                             f"serve({str(path)!r}, preload=(), kind='worker', owner={owner.pid})"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 30
    while not path.exists():
        assert time.monotonic() < deadline and host.poll() is None, "the worker host did not listen"
        time.sleep(0.05)
    time.sleep(2.5)  # (longer than its loop's wait: it does not leave for want of a cluster's state file)
    assert host.poll() is None
    owner.kill()
    owner.wait()
    assert host.wait(timeout=10) == 0, host.stdout.read()
    assert not path.exists()


def test_a_worker_host_that_loaded_rays_core_does_not_serve(tmp_path):
    """Ray's core library reads its config, a worker's job id among it, from the environment once, when
    it loads: a worker forked from a host that loaded it would have the host's."""
    path = tmp_path / "workers.sock"
    done = subprocess.run([sys.executable, "-c", f"from deepyard.job_host import serve; "
                           f"serve({str(path)!r}, preload=('ray._raylet',), kind='worker')"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "a preload imported ray._raylet; not serving" in done.stdout, done.stdout
    assert not path.exists()
