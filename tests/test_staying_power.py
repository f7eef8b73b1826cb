"""Defects that lost a user's work or let bad data through, each kept fixed (no Ray job)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest


def _deepyard(home, *args: str) -> subprocess.Popen:
    env = {**os.environ, "DEEPYARD_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI")  # the embedded default: sqlite under the home
    return subprocess.Popen([sys.executable, "-m", "deepyard.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_commands_started_together_on_a_new_home_all_create_one_store(tmp_path):
    """Four at once raced MLflow's migrations (`duplicate column name`, a half-migrated database
    that every later command failed on); the first use of the store is now serialised."""
    home = tmp_path / "home"
    together = [_deepyard(home, "models") for _ in range(4)]
    outcomes = [(process.wait(timeout=180), process.stderr.read()) for process in together]
    assert all(code == 0 for code, _ in outcomes), outcomes
    assert not any("Traceback" in stderr for _, stderr in outcomes)
    later = _deepyard(home, "models")
    assert later.wait(timeout=120) == 0, later.stderr.read()


def _table(tmp_path, rows: list[str]) -> str:
    path = tmp_path / "t.csv"
    path.write_text("a,b,y\n" + "\n".join(rows) + "\n")
    return str(path)


@pytest.mark.parametrize("rows, message", [
    ([f"{i},{i % 3},1" for i in range(40)], "the target has a single class ('1'); classification needs at least two"),
    ([f"{i},{'inf' if i == 7 else i % 3},{i % 2}" for i in range(40)],
     "column 'b' (numeric), row 7: inf is not a finite number"),
    (["1,2,0", "3,4,1"], "class '0' has 1 row; each class needs at least 3, one for each of the train, val and test"),
])
def test_data_that_cannot_train_a_model_is_refused_before_ray_starts(cli, write_spec, tmp_path, rows, message):
    spec = write_spec(f"name: t\ndata: {{name: csv, params: {{path: {_table(tmp_path, rows)}, target: y}}}}\n"
                      "model: {name: mlp}\n")
    result = cli("validate", spec, expect=2)
    assert message in result.stderr


def test_a_regression_target_with_inf_is_refused(tmp_path):
    from deepyard.data.splits import RawData, make_splits
    from deepyard.errors import DataError

    y = np.arange(30, dtype=np.float32)
    y[4] = np.inf
    with pytest.raises(DataError, match="the target: 1 row with values that are not finite"):
        make_splits(RawData(np.ones((30, 2), np.float32), y, "regression"), val_fraction=0.2, test_fraction=0.2,
                    seed=0)


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_every_stop_signal_ends_a_job_as_ctrl_c_does(stop):
    """KeyboardInterrupt is what marks the run KILLED and exits 130 (tests/test_train_job.py runs it
    end to end with SIGINT); a scheduler's SIGTERM and a closed terminal's SIGHUP must raise it too."""
    import signal

    from deepyard import stops

    previous = stops.on_signals()
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), getattr(signal, stop))
            signal.sigtimedwait([], 0.1)  # (the handler runs between bytecodes: give it one)
    finally:
        stops.restore(previous)


def test_a_stop_waits_for_the_mlflow_write_it_comes_during():
    """A write to the sqlite store that a stop cut short kept it locked while the stop was handled:
    closing the run failed after 20 s ("database is locked"), and a stopped job's driver was killed by
    Ray with its run still RUNNING. Stops now wait for the write, then end the job as before."""
    import random
    import signal
    import threading

    from deepyard import stops, tracking

    run_id = tracking.start_run("stopped_mid_write", "t", {}, "", kind="train")
    previous = stops.on_signals()
    try:
        with pytest.raises(KeyboardInterrupt):  # a stop inside the block takes effect at its end
            with stops.writing():
                os.kill(os.getpid(), signal.SIGTERM)
                signal.sigtimedwait([], 0.1)  # (where the handler would have raised)
                tracking.log_metrics(run_id, {"written": 1.0}, 0)
        for stop in range(20):  # stops at random moments of a stream of writes (one in 3 locked the store)
            threading.Timer(random.uniform(0, 0.03), os.kill, (os.getpid(), signal.SIGTERM)).start()
            try:
                for step in range(1, 10_000):
                    tracking.log_metrics(run_id, {"loss": 1.0 / step, "accuracy": 0.5}, step)
                pytest.fail("the stop never came")
            except KeyboardInterrupt:  # written while the stop is handled, as job_run closes the run
                tracking.log_metrics(run_id, {"stops": stop + 1}, stop)
        tracking.finish_run(run_id, "KILLED", "stopped")
    finally:
        stops.restore(previous)
    run = tracking.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.metrics["written"] == 1.0
    assert len(tracking.metric_history(run_id, "stops")) == 20


def test_stops_during_a_write_are_held_until_it_ends_and_a_third_one_is_not():
    """A second Ctrl-C while a stopped run is being closed waits for the closing (job_run holds it
    in one block); a third during one write interrupts at once: the user insists."""
    import signal

    from deepyard import stops

    def stop() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        signal.sigtimedwait([], 0.05)  # (the handler runs between bytecodes: give it one)

    previous = stops.on_signals()
    try:
        reached = []
        with pytest.raises(KeyboardInterrupt):
            with stops.writing():
                stop()
                with stops.writing():  # (nested: held until the outer block ends)
                    stop()
                reached.append("after both")
        assert reached == ["after both"]
        with pytest.raises(KeyboardInterrupt):
            with stops.writing():
                stop()
                stop()
                stop()  # the third raises here, inside the block
                reached.append("never")
        assert reached == ["after both"]
        with stops.writing():  # and nothing stale is left for the next write
            reached.append("clean")
        assert reached == ["after both", "clean"]
    finally:
        stops.restore(previous)


def test_a_stop_during_a_tune_step_or_rl_iteration_waits_for_the_next_safe_point_and_a_second_one_does_not():
    """KeyboardInterrupt raised anywhere in Tune's loop could leave a lock of Tune's held (CI: a
    stopped sweep's driver hung at exit on its TensorBoard logger's queue lock). Once Tune's loop has
    ended a step, a stop waits for the end of the next one; a second one does not wait."""
    import signal

    from deepyard import stops

    def stop() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        signal.sigtimedwait([], 0.05)  # (the handler runs between bytecodes: give it one)

    previous = stops.on_signals()
    reached = []
    try:
        with pytest.raises(KeyboardInterrupt) as raised:  # before Tune's first step ends: at once, as ever
            with stops.safe_points():
                stop()
                reached.append("never")
        assert not isinstance(raised.value, stops.StoppedSafely)
        with pytest.raises(stops.StoppedSafely):  # (what RL saves its algorithm on: it is whole)
            with stops.safe_points():
                stops.safe_point()
                stop()
                with stops.writing():  # (a write of the step: still held at its end, until the step's)
                    reached.append("the step goes on")
                reached.append("to its end")
                stops.safe_point()
                reached.append("never")
        assert reached == ["the step goes on", "to its end"]
        with pytest.raises(KeyboardInterrupt) as raised:
            with stops.safe_points():
                stops.safe_point()
                stop()
                stop()  # the user insists: wherever the work is
                reached.append("never")
        assert not isinstance(raised.value, stops.StoppedSafely)
        with pytest.raises(stops.StoppedSafely):  # a stop as the loop's last step ended: when fit returns
            with stops.safe_points():
                stops.safe_point()
                stop()
                reached.append("fit returns")
        with stops.safe_points():  # and nothing stale is left for the next run
            stop_free = True
        assert stop_free and reached[-1] == "fit returns"
        stops.safe_point()  # outside a block (an RL trial's loop in a process of its own): nothing held
        with pytest.raises(KeyboardInterrupt):
            stop()
        assert "never" not in reached
    finally:
        stops.restore(previous)


def test_an_unwritable_home_or_store_is_refused_before_ray_starts(cli, write_spec, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    spec = write_spec("name: t\ndata: {name: wine}\nmodel: {name: mlp}\n")
    monkeypatch.setenv("DEEPYARD_STORAGE", str(blocker / "store"))
    result = cli("run", spec, expect=2)
    assert f"{blocker / 'store'} is not writable (Not a directory)" in result.stderr
    monkeypatch.setenv("DEEPYARD_HOME", str(blocker / "home"))
    result = cli("run", spec, expect=2)
    assert "DEEPYARD_HOME" in result.stderr and "is not writable" in result.stderr


def test_a_file_that_is_not_a_table_is_not_echoed(cli, write_spec, tmp_path):
    secret = tmp_path / "token.txt"
    secret.write_text("password=hunter2\n")
    spec = write_spec(f"name: t\ndata: {{name: csv, params: {{path: {secret}, target: y}}}}\nmodel: {{name: mlp}}\n")
    result = cli("validate", spec, expect=2)
    assert "one column only" in result.stderr and "hunter2" not in result.stderr


def test_a_directory_as_predict_input_says_so(cli, tmp_path):
    result = cli("predict", "some-model", "--input", str(tmp_path), expect=2)
    assert "a directory; give one JSON file or PNG image" in result.stderr


def test_artifacts_of_a_sqlite_store_named_by_uri_land_beside_it(deepyard_home):
    """With MLFLOW_TRACKING_URI set to a sqlite file (as here), they landed in ./mlruns of the
    working directory."""
    from deepyard import tracking

    experiment_id = tracking._experiment_id(tracking.client(), "where_artifacts_land")
    location = tracking.client().get_experiment(experiment_id).artifact_location
    assert location == (deepyard_home / "artifacts" / "where_artifacts_land").as_uri()


@pytest.mark.slow
def test_a_driver_leaves_a_remote_cluster_only_after_its_outcome_is_recorded(ray_cluster):
    """A job on a remote cluster logs and registers its model before its driver disconnects
    (``cluster.wait_stopped``, at exit): a crash in the disconnect cannot take the outcome with it."""
    import ray

    address = ray.get_runtime_context().gcs_address
    script = ("import ray\nfrom deepyard import cluster\n"
              f"with cluster.connected({address!r}, stop_behind=True):\n"
              "    assert ray.is_initialized()\n"
              "print('after the job:', ray.is_initialized())\n"
              "cluster.wait_stopped()\n"
              "print('at exit:', ray.is_initialized())\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "after the job: True" in done.stdout and "at exit: False" in done.stdout


def test_checkpoints_a_dead_worker_was_staging_are_removed_and_live_ones_kept(tmp_path):
    """A worker killed while reporting left its staged checkpoint in the temp folder for good (109
    of them in /tmp after a day of tests); the next one staged on the machine removes those that no
    live process holds."""
    from deepyard.runners import checkpoints

    name = checkpoints.STAGING_PREFIX
    orphan, held, foreign = tmp_path / f"{name}4242-abc", tmp_path / f"{name}4243-def", tmp_path / f"{name}x-y"
    for folder in (orphan, held, foreign):
        folder.mkdir()
        (folder / checkpoints.STATE_FILE).write_bytes(b"state")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys; d = os.open(sys.argv[1], os.O_RDONLY); "
                               "fcntl.flock(d, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()", str(held)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"  # a live process's, whatever its pid says
        assert checkpoints.sweep_orphans(str(tmp_path)) == [str(orphan)]
        assert not orphan.exists() and held.exists() and foreign.exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert checkpoints.sweep_orphans(str(tmp_path)) == [str(held)]  # its process has gone

    with checkpoints.staged({"epoch": 1}) as staged:  # the name and the lock that make this work
        assert os.path.basename(staged).startswith(f"{name}{os.getpid()}-")
        assert staged not in checkpoints.sweep_orphans(os.path.dirname(staged)) and os.path.exists(staged)
        assert checkpoints.load(staged) == {"epoch": 1}
    assert not os.path.exists(staged)


def test_sigusr1_prints_stacks_in_a_tune_run_instead_of_ending_it_as_finished():
    """Ray Tune takes SIGUSR1 for each run and ends it as if it had finished (a half-run sweep would be
    promoted); from the run's setup on, a deepyard driver prints its stacks on it and goes on."""
    script = """
import os, signal, time
from deepyard import stops
signal.signal(signal.SIGUSR1, lambda *_: print("tune's run ended", flush=True))  # as Tune sets it
stops.keep_tune_from_ending_quietly()  # (the setup of the callback every deepyard Tuner runs with)
os.kill(os.getpid(), signal.SIGUSR1)
time.sleep(0.2)
print("went on", flush=True)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "went on", done.stdout + done.stderr
    assert "most recent call first" in done.stderr  # the stacks


@pytest.mark.slow
@pytest.mark.parametrize("killed_after_s", [0.05, 0.3, 0.6])
def test_a_command_killed_while_a_new_store_is_built_leaves_none_and_the_next_one_builds_it(tmp_path,
                                                                                          killed_after_s):
    """A store half-built by a killed command (MLflow creates its tables one by one, ~1 s) failed
    every later command ("table ... already exists"); it is now built aside and linked into place."""
    from deepyard import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    builder = subprocess.Popen([sys.executable, "-c", f"from deepyard import tracking\ntracking.client({uri!r})"])
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".mlflow.db.building-*")):  # (the build has begun)
        assert builder.poll() is None and time.monotonic() < deadline, "the store was never built"
        time.sleep(0.01)
    time.sleep(killed_after_s)
    builder.send_signal(signal.SIGKILL)
    assert builder.wait(timeout=30) == -signal.SIGKILL
    if (tmp_path / "mlflow.db").exists():
        pytest.skip(f"the store was whole within {killed_after_s} s: nothing was cut short")
    client = tracking.client(uri)  # (the next command: under the same lock, it builds the store)
    experiment = client.create_experiment("after")
    assert client.get_experiment(experiment).name == "after"
    assert not list(tmp_path.glob(".mlflow.db.building-*"))  # the killed builder's part is gone
