"""`deepyard run`'s side of the job host (`job_client.run_there`), against a stand-in host in this
process (no Ray, no fork): a signal that comes before the driver is known is not lost, a refused
command keeps the signals it got while it asked, and the exit code is the driver's."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from deepyard import job_client

pytestmark = pytest.mark.skipif(not job_client.SUPPORTED, reason="the job host is Linux only (pidfds)")


@pytest.fixture()
def stand_in_host(tmp_path, monkeypatch):
    """A socket where the home's host listens, and a function that serves one command with
    ``answer(request)`` in a thread: what the real host would do with it."""
    monkeypatch.setenv("DEEPYARD_HOME", str(tmp_path))
    for name in (job_client.ENABLED_ENV, job_client.RAY_JOB_ENV):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "cluster").mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with job_client.short_path(job_client.socket_path(str(tmp_path))) as path:
        listener.bind(path)
    listener.listen(1)
    threads = []

    def serve_one(answer) -> list[dict]:
        requests: list[dict] = []

        def accept() -> None:
            command, _ = listener.accept()
            with command:
                data, fds, _, _ = socket.recv_fds(command, 1 << 20, 3)
                while len(data) < 4 + struct.unpack("!I", data[:4])[0]:
                    data += command.recv(1 << 20)
                for fd in fds:
                    os.close(fd)
                requests.append(json.loads(data[4:]))
                answer(command, requests[-1])

        threads.append(threading.Thread(target=accept, daemon=True))
        threads[-1].start()
        return requests

    serve_one.listener = listener
    yield serve_one
    listener.close()
    for thread in threads:
        thread.join(timeout=10)


def test_a_signal_before_the_driver_is_known_reaches_it_and_its_code_is_the_commands(stand_in_host):
    main = threading.main_thread().ident
    driver = subprocess.Popen(["sleep", "60"])

    def answer(command, _request) -> None:
        signal.pthread_kill(main, signal.SIGUSR1)  # (the command waits for the host's answer: no driver yet)
        pidfd = os.pidfd_open(driver.pid)
        socket.send_fds(command, [(json.dumps({"pid": driver.pid}) + "\n").encode()], [pidfd])
        os.close(pidfd)
        code = driver.wait(timeout=30)
        command.sendall((json.dumps({"exit": 128 - code}) + "\n").encode())

    requests = stand_in_host(answer)
    got: list[int] = []

    def before(signum, _frame) -> None:  # (a safety net: the signal, had it not been passed on, ends no test run)
        got.append(signum)

    previous = signal.signal(signal.SIGUSR1, before)
    try:
        assert job_client.run_there(["deepyard", "run", "job.yaml"]) == 128 + signal.SIGUSR1
        assert signal.getsignal(signal.SIGUSR1) is before  # the command's own handlers are back
    finally:
        driver.kill()
        signal.signal(signal.SIGUSR1, previous)
    assert got == []  # the command's own handler saw nothing: the driver got the signal
    assert driver.wait(timeout=10) == -signal.SIGUSR1  # passed on once the driver was known, not lost
    assert requests[0]["argv"] == ["deepyard", "run", "job.yaml"] and requests[0]["cwd"] == os.getcwd()


def test_a_refused_command_runs_here_with_the_signals_it_got_while_it_asked(stand_in_host, capsys):
    main = threading.main_thread().ident
    got: list[int] = []
    def handler(signum, _frame) -> None:
        got.append(signum)

    previous = signal.signal(signal.SIGUSR1, handler)

    def refuse(command, _request) -> None:
        signal.pthread_kill(main, signal.SIGUSR1)
        command.sendall(b'{"refused": "a reason of the host\'s"}\n')

    stand_in_host(refuse)
    try:
        assert job_client.run_there(["deepyard", "run", "job.yaml"]) is None
        assert got == [signal.SIGUSR1]  # raised again here, where the command now runs: once
        assert signal.getsignal(signal.SIGUSR1) is handler  # (its own handler back)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert "the job host did not take this command (a reason of the host's); it runs here" in capsys.readouterr().err


def test_a_host_that_goes_away_mid_run_stops_its_driver_and_fails_the_command(stand_in_host, capsys):
    driver = subprocess.Popen(["sleep", "60"])

    def vanish(command, _request) -> None:
        pidfd = os.pidfd_open(driver.pid)
        socket.send_fds(command, [(json.dumps({"pid": driver.pid}) + "\n").encode()], [pidfd])
        os.close(pidfd)  # (and the connection closes: no exit code will come)

    stand_in_host(vanish)
    try:
        assert job_client.run_there(["deepyard", "run", "job.yaml"]) == 1
    finally:
        driver.kill()
    assert driver.wait(timeout=10) == -signal.SIGTERM
    assert f"the job host ended while driver {driver.pid} ran; stopping it" in capsys.readouterr().err


def test_no_host_a_disabled_one_or_a_submitted_jobs_driver_runs_here(stand_in_host, monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPYARD_HOME", str(tmp_path / "elsewhere"))  # (no socket there)
    assert job_client.run_there(["deepyard", "run", "job.yaml"]) is None
    monkeypatch.setenv("DEEPYARD_HOME", str(tmp_path))
    for name, value in ((job_client.ENABLED_ENV, "0"), (job_client.RAY_JOB_ENV, "{}")):
        with monkeypatch.context() as env:
            env.setenv(name, value)
            assert job_client.run_there(["deepyard", "run", "job.yaml"]) is None
    stand_in_host.listener.setblocking(False)
    with pytest.raises(BlockingIOError):
        stand_in_host.listener.accept()  # neither asked the host


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]  # R, S, T (stopped), ...


def _until(condition, what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.mark.parametrize("when", ["while it asks", "once it has the driver"])
def test_ctrl_z_stops_the_driver_with_the_command_and_fg_continues_both(stand_in_host, when):
    driver = subprocess.Popen(["sleep", "60"])
    handed = threading.Event()
    asking: list[subprocess.Popen] = []

    def answer(command, _request) -> None:
        if when == "while it asks":  # (the host has forked the driver; the command does not know it yet)
            asking[0].send_signal(signal.SIGTSTP)
            time.sleep(0.3)
        pidfd = os.pidfd_open(driver.pid)
        socket.send_fds(command, [(json.dumps({"pid": driver.pid}) + "\n").encode()], [pidfd])
        os.close(pidfd)
        handed.set()
        command.sendall((json.dumps({"exit": 128 - driver.wait(timeout=60)}) + "\n").encode())

    stand_in_host(answer)
    command = subprocess.Popen([sys.executable, "-c", "import sys\nfrom deepyard import job_client\n"
                                "sys.exit(job_client.run_there(['deepyard', 'run', 'job.yaml']))"],
                               process_group=0)  # (a group of its own, not orphaned: stopping it is possible)
    asking.append(command)
    try:
        assert handed.wait(timeout=30)
        if when == "once it has the driver":
            time.sleep(0.3)
            command.send_signal(signal.SIGTSTP)  # Ctrl-Z
        _until(lambda: _state(command.pid) == "T" and _state(driver.pid) == "T", "both to stop")
        command.send_signal(signal.SIGCONT)  # fg
        _until(lambda: _state(command.pid) != "T" and _state(driver.pid) != "T", "both to go on")
        driver.terminate()
        assert command.wait(timeout=30) == 128 + signal.SIGTERM  # (the driver's code, as ever)
    finally:
        driver.kill()
        command.kill()
