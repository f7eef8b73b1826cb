"""Every MLflow call lives here.

One run per job. The driver creates it (params = the resolved spec, flattened; the spec YAML as an
artifact), per-epoch metrics go into it while training runs (rank 0 writes them, or the driver from
a one-worker job's reports: ``runners/edges.py``), and the driver closes it: plots, the model with
its preprocessing, a registered version, and the final status.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import time
import traceback
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from deepyard import drivers, settings, stops
from deepyard.errors import BadInput, DeepyardError, JobFailed

MODEL_ARTIFACT = "model"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else sqlite under ``$DEEPYARD_HOME``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{settings.home() / 'mlflow.db'}"


def client(uri: str | None = None) -> "_StopsWait":
    from mlflow import MlflowClient

    return _StopsWait(MlflowClient(tracking_uri=_ready(uri or tracking_uri())))


class _StopsWait:
    """An MlflowClient whose every call a stop waits for (``stops.writing``): cut short, a call
    could leave the sqlite store locked, and then the run could not be closed."""

    def __init__(self, mlflow_client) -> None:
        self._client = mlflow_client

    def __getattr__(self, name: str):
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            with stops.writing():
                return attribute(*args, **kwargs)
        return call


@functools.cache
def _ready(uri: str) -> str:
    """``uri``, once its store exists and is up to date. MLflow creates and migrates a sqlite store
    on first use with no lock of its own: jobs started together on a new home raced each other's
    migrations and could leave the database half-built for good. The first use per process holds a
    file lock beside the database while both stores (tracking and registry) are opened."""
    if not uri.startswith("sqlite:///"):
        return uri
    from filelock import FileLock
    from mlflow import MlflowClient

    database = _sqlite_file(uri)
    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{database}.lock"):
        for leftover in database.parent.glob(f".{database.name}.building-*"):  # (a builder that was killed)
            leftover.unlink(missing_ok=True)
        if not database.exists():
            _build_store(uri, database)
        opened = MlflowClient(tracking_uri=uri)
        opened.search_experiments(max_results=1)
        opened.search_registered_models(max_results=1)
    return uri


def _sqlite_file(uri: str) -> Path:
    """The database file of a ``sqlite:///`` URI, absolute (a relative one is MLflow's own example),
    without the URI's query (``?timeout=30``)."""
    from sqlalchemy.engine import make_url

    return Path(make_url(uri).database).absolute()


def _build_store(uri: str, database: Path) -> None:
    """A new sqlite store, built under another name and linked into place once complete: a command
    killed while MLflow created its tables (~1 s) left a half-built database that every later
    command failed on ("table ... already exists"). (Under ``_ready``'s lock: one builder at a time.)"""
    import socket

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from sqlalchemy.engine import make_url

    building = database.with_name(f".{database.name}.building-{socket.gethostname()}-{os.getpid()}")
    try:
        # (the default experiment's artifacts beside the store, as every experiment of deepyard's)
        SqlAlchemyStore(make_url(uri).set(database=str(building)).render_as_string(hide_password=False),
                        (database.parent / "artifacts").as_uri()).engine.dispose()
        try:
            os.link(building, database)  # (all at once, and never over a store that exists)
        except FileExistsError:  # made meanwhile by a program that takes no lock (`mlflow ui`): theirs stands
            pass
        except OSError:  # a file system without hard links (FAT, some FUSE mounts): moved, under the lock
            os.rename(building, database)
    finally:
        building.unlink(missing_ok=True)


def _experiment_id(mlflow_client, name: str) -> str:
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        raise BadInput(f"MLflow experiment {name!r} was deleted; restore it (mlflow experiments restore "
                       f"--experiment-id {experiment.experiment_id}) or set tracking.experiment to another name")
    if experiment is not None:
        return experiment.experiment_id
    location = None
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        # A sqlite store keeps artifacts beside it, not in ./mlruns of whatever directory we ran from.
        location = (_sqlite_file(uri).parent / "artifacts" / name).as_uri()
    try:
        return mlflow_client.create_experiment(name, artifact_location=location)
    except Exception:  # another job created it first
        if (experiment := mlflow_client.get_experiment_by_name(name)) is None:
            raise
        return experiment.experiment_id


def start_run(experiment: str, run_name: str, params: dict[str, str], spec_yaml: str, *, kind: str,
              tags: dict[str, str] | None = None) -> str:
    """A new run: ``deepyard.kind`` tags what made it (a job kind, or "trial")."""
    from mlflow.entities import Param

    mlflow_client = client()
    run = mlflow_client.create_run(_experiment_id(mlflow_client, experiment), run_name=run_name,
                                   tags={"deepyard.kind": kind, **(tags or {})})
    run_id = run.info.run_id
    try:
        items = [Param(key, value[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):  # log_batch takes at most 100 params per call
            mlflow_client.log_batch(run_id, params=items[start:start + 100])
        mlflow_client.log_text(run_id, spec_yaml, "spec.yaml")
    except BaseException:
        mlflow_client.set_terminated(run_id, "FAILED")
        raise
    return run_id


RETRY_WAIT_S = 0.2  # the first wait before a write is tried again; each next one twice as long


def log_metrics(run_id: str, metrics: dict[str, float], step: int, uri: str | None = None, *,
                attempts: int = 1) -> None:
    """One batched write per epoch: ~50x faster on sqlite than a call per value. ``attempts`` > 1:
    tried again after a short wait (a sqlite file busy with another job's writes)."""
    _write_batch(client(uri), run_id, metrics, step, attempts)


def _write_batch(mlflow_client, run_id: str, metrics: dict[str, float], step: int, attempts: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for attempt in range(attempts):
        try:
            return mlflow_client.log_batch(run_id, metrics=batch)
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(RETRY_WAIT_S * 2**attempt)


class BackgroundLogger:
    """``log(metrics, step)`` returns at once; a thread batches the writes. ``close()`` flushes.

    Used by the rank-0 worker: importing MLflow and the first write cost ~1.5 s, which would
    otherwise stall the first epoch, and every later write would stall the loop too.
    """

    def __init__(self, run_id: str, uri: str):
        self._queue: queue.Queue = queue.Queue()
        self._errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._drain, args=(run_id, uri), daemon=True)
        self._thread.start()

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        self._queue.put((dict(metrics), step))

    def _drain(self, run_id: str, uri: str) -> None:
        write = None
        try:
            mlflow_client = client(uri)

            def write(metrics: dict[str, float], step: int) -> None:
                _write_batch(mlflow_client, run_id, metrics, step, attempts=3)  # a busy sqlite file: again
        except Exception as error:  # no MLflow here: keep training, say so at close
            self._errors.append(error)
        while True:  # task_done for every item, whatever happens: flush() must never hang
            item = self._queue.get()
            try:
                if item is None:
                    return
                if write is not None:
                    write(*item)
            except Exception as error:
                self._errors.append(error)
            finally:
                self._queue.task_done()

    def flush(self) -> None:
        """Block until everything logged so far is written (before a checkpoint: a crash after it
        must not lose the metrics of the epochs it covers)."""
        self._queue.join()

    def close(self) -> int:
        """Flush and stop; returns how many writes failed (they are warned about, not fatal:
        the model and its checkpoints matter more than a missing metric line)."""
        self._queue.put(None)
        self._thread.join()
        if self._errors:
            warnings.warn(f"{len(self._errors)} metric writes to MLflow failed; first: {self._errors[0]!r}")
        return len(self._errors)


def preload() -> None:
    """Import what logging a model needs (seconds of imports), while the driver waits for training;
    and warm the two things MLflow works out once per process when it logs a model, ~0.6 s of the
    job's end on a laptop: which installed package provides which module (to check the model's
    pip requirements against), and the git commit of the program (a tag of the logged model). A
    driver forked by the job host has all but the commit already (``warm``: the same list)."""
    import deepyard.plots  # noqa: F401  (matplotlib)
    from deepyard import warm

    warm.import_each(warm.MODEL_LOGGING)
    warm.map_installed_packages()
    try:  # (MLflow's internals: a version without them only loses the head start)
        from mlflow.tracking.context.registry import resolve_tags

        resolve_tags()
    except (ImportError, AttributeError):
        pass


def latest_metrics(run_id: str) -> dict[str, float]:
    return dict(client().get_run(run_id).data.metrics)


def metric_history(run_id: str, key: str, uri: str | None = None) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client(uri).get_metric_history(run_id, key)]


def last_step(run_id: str, key: str, uri: str | None = None) -> int:
    """The highest step ``key`` was logged at (0 if never): how far a resumed job had logged."""
    return max((step for step, _ in metric_history(run_id, key, uri)), default=0)


def log_figure(run_id: str, figure, artifact_file: str, uri: str | None = None) -> None:
    import matplotlib.pyplot as plt

    try:
        client(uri).log_figure(run_id, figure, artifact_file)
    finally:
        plt.close(figure)  # pyplot keeps every figure alive otherwise


def log_text(run_id: str, text: str, artifact_file: str, uri: str | None = None) -> None:
    client(uri).log_text(run_id, text, artifact_file)


def log_dict(run_id: str, data: dict, artifact_file: str) -> None:
    client().log_dict(run_id, data, artifact_file)


def log_artifact(run_id: str, path: str, artifact_path: str | None = None) -> None:
    client().log_artifact(run_id, path, artifact_path)


def log_artifacts(run_id: str, folder: str, artifact_path: str | None = None) -> None:
    client().log_artifacts(run_id, folder, artifact_path)


def log_outputs(run_id: str, artifacts: dict[str, Any], uri: str | None = None, *, strict: bool = True) -> None:
    """Artifact path -> text or matplotlib figure, as a task returns them. Not ``strict`` (samples
    logged while training): a failed write is printed, never raised: it must not stop training."""
    for path, item in artifacts.items():
        try:
            if isinstance(item, str):
                client(uri).log_text(run_id, item, path)
            else:
                log_figure(run_id, item, path, uri)
        except Exception as error:
            if strict:
                raise
            print(f"could not log {path}: {error}")


def run_status(run_id: str) -> str:
    return client().get_run(run_id).info.status


def get_run(run_id: str):
    return client().get_run(run_id)


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    mlflow_client = client()
    for key, value in tags.items():
        mlflow_client.set_tag(run_id, key, value)


def finish_run(run_id: str, status: str, error: str | None = None) -> None:
    """``status``: FINISHED, FAILED or KILLED. A failed run keeps its error as a tag and an artifact."""
    mlflow_client = client()
    if error:
        mlflow_client.set_tag(run_id, "deepyard.error", error[:5000])
        mlflow_client.log_text(run_id, error, "error.txt")
    mlflow_client.set_terminated(run_id, status)


class JobRun:
    """The MLflow run of one job while it runs: its id (opened in the background: waiting for it
    is deferred to the first use) and the job's timings, logged as ``timing_<name>_s`` at the end."""

    def __init__(self, started: float):
        self._opening: Future | None = None
        self.timings: dict[str, float] = {}
        self._started = started
        self.opened_after: float | None = None  # seconds from the start until the run was open

    @property
    def id(self) -> str:
        return self._opening.result()  # an error opening the run surfaces here

    @property
    def opening(self) -> Future:
        """The run id, once the run is open: for work that need not wait for it."""
        return self._opening

    def lap(self, name: str) -> float:
        """Record the seconds since the previous lap as ``<name>_s`` (laps and marks do not mix)."""
        seconds = self.elapsed() - sum(self.timings.values())
        self.timings[f"{name}_s"] = seconds
        return seconds

    def mark(self, name: str) -> float:
        """Record the seconds since the job started as ``<name>_s``."""
        self.timings[f"{name}_s"] = self.elapsed()
        return self.timings[f"{name}_s"]

    def elapsed(self) -> float:
        return time.perf_counter() - self._started


@contextmanager
def job_run(spec, *, tags: dict[str, str] | None = None, reopen: str | None = None, failure: str = "the job failed",
            failure_hint: Callable[[], str] = lambda: "", killed_note: str = "interrupted (Ctrl-C or SIGTERM)",
            on_stop: Callable[[str], None] | None = None) -> Iterator[JobRun]:
    """The lifecycle of a job's run, the same for every kind: open it (``reopen``: go on with that
    one) in the background, so that it overlaps Ray's start-up; when the block ends, FINISHED (with
    the timings), KILLED on Ctrl-C or SIGTERM (``killed_note`` says how to go on), or FAILED with the
    traceback. ``on_stop(run_id)`` runs first on a kill or failure (e.g. closing a sweep's trials).
    A failure that is not a DeepyardError becomes ``JobFailed("<failure>: <error>; the MLflow run
    ... is marked FAILED<hint>")``: users see what failed and where the run is, not a traceback."""
    from deepyard.spec import flatten, to_yaml

    started = time.perf_counter()

    def open_run() -> str:
        close_orphans(spec.experiment)
        driver = {drivers.TAG: drivers.this_process()}
        if reopen:
            reopen_run(reopen)
            set_tags(reopen, driver)
            delete_tag(reopen, "deepyard.error")  # why it stopped then is history (error.txt keeps it)
            run_id = reopen
        else:
            run_id = start_run(spec.experiment, spec.name, flatten(spec), to_yaml(spec), kind=spec.kind,
                               tags={**(tags or {}), **driver})
        run.opened_after = time.perf_counter() - started
        return run_id

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-open") as pool:
        run = JobRun(started)
        run._opening = pool.submit(open_run)
        try:
            yield run
            run.timings.setdefault("total_s", run.elapsed())
            log_metrics(run.id, {f"timing_{name}": value for name, value in run.timings.items()}, 0)
            finish_run(run.id, "FINISHED")
        except KeyboardInterrupt:
            with stops.writing():  # (one more stop waits until the run is closed)
                _stop(run.id, on_stop)
                finish_run(run.id, "KILLED", killed_note)
            raise
        except BaseException as error:  # the run must never be left RUNNING
            run_id = run.id  # (if the run could not even be opened, that error surfaces here)
            with stops.writing():
                _stop(run_id, on_stop)
                finish_run(run_id, "FAILED", "".join(traceback.format_exception(error)))
            if isinstance(error, DeepyardError):
                raise
            raise JobFailed(f"{failure}: {error}; the MLflow run {run_id} is marked FAILED{failure_hint()}") from error


def _stop(run_id: str, on_stop: Callable[[str], None] | None) -> None:
    if on_stop is not None:
        try:
            on_stop(run_id)
        except Exception as error:  # closing what it can must not hide why the job stopped
            warnings.warn(f"could not close everything of run {run_id}: {error!r}")


@contextmanager
def finishing(run_id: str) -> Iterator[None]:
    """A sweep trial's (or a compress stage's) run: FINISHED when the block ends, KILLED on Ctrl-C or
    SIGTERM, FAILED with the traceback if it raises (a scheduler's stop kills a trial's actor
    outright: the sweep's driver closes those runs)."""
    try:
        yield
    except KeyboardInterrupt:
        finish_run(run_id, "KILLED", "interrupted (Ctrl-C or SIGTERM)")
        raise
    except BaseException as error:
        finish_run(run_id, "FAILED", "".join(traceback.format_exception(error)))
        raise
    finish_run(run_id, "FINISHED")


@contextmanager
def _active(run_id: str) -> Iterator[None]:
    import mlflow

    mlflow.set_tracking_uri(_ready(tracking_uri()))
    with mlflow.start_run(run_id=run_id):
        yield


def log_model(run_id: str, module, input_example, *, registered_name: str | None,
              metadata: dict[str, Any], version_tags: dict[str, str], exportable: bool = True,
              artifact: str = MODEL_ARTIFACT) -> dict[str, Any]:
    """Log the serving module (preprocessing included) and register it as a new version.
    ``artifact``: the model's folder in the run (a second model of the same run needs its own).
    ``exportable=False``: a module ``torch.export`` cannot trace (int8 packed weights), passed as
    TorchScript, which MLflow's "pickle" format saves with ``torch.jit.save``."""
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    import deepyard

    module = module.eval()
    with torch.inference_mode():
        output = module(torch.as_tensor(input_example)).numpy()
    if not exportable:  # MLflow warns of pickles; a TorchScript module is saved by torch.jit.save, not pickled
        if not isinstance(module, torch.jit.ScriptModule):
            raise TypeError(f"exportable=False takes a TorchScript module, not {type(module).__name__}")
        logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    # A stop waits for the model to be logged and registered: a registration cut short is worse
    # than a stop a few seconds late.
    with stops.writing(), _active(run_id), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's TypedStorage notice, from MLflow's pickling
        info = mlflow.pytorch.log_model(
            module,
            name=artifact,
            signature=infer_signature(input_example, output),
            input_example=input_example,
            # Explicit requirements skip MLflow's slow inference, and the package code travels with
            # the model so that it loads wherever torch and mlflow are installed.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
            code_paths=[str(Path(deepyard.__file__).parent)],
            metadata=metadata,
            registered_model_name=registered_name,
            **({} if exportable else {"serialization_format": "pickle"}),
            # MLflow loads the model it just saved and predicts the input example, only to log a
            # warning if that fails: ~0.3 s of every job's finish. The output above is the check
            # that the module runs; serving loads the model for real. (A keyword MLflow's
            # transformers flavor passes the same way. MLflow hands it on to torch.save for a pickled
            # module: here the "pickle" format only ever saves TorchScript, with torch.jit.save.)
            validate_serving_input=False,
        )
        result = {"model_uri": info.model_uri, "model_name": registered_name, "model_version": None}
        if registered_name:  # (in the same block: a stop never leaves a version without its tags)
            version = str(info.registered_model_version)
            mlflow_client = client()
            for key, value in version_tags.items():
                mlflow_client.set_model_version_tag(registered_name, version, key, value)
            result.update(model_version=version, registered_model_uri=f"models:/{registered_name}/{version}")
    return result


def reopen_run(run_id: str) -> None:
    client().update_run(run_id, status="RUNNING")


def close_orphans(experiment: str) -> list[str]:
    """Close the experiment's RUNNING runs whose driver process is gone (``drivers``), and their
    RUNNING child runs, as KILLED with the reason. Returns their ids."""
    mlflow_client = client()
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        return []
    running = mlflow_client.search_runs([found.experiment_id], "attributes.status = 'RUNNING'", max_results=1000)
    orphans = [run for run in running if drivers.is_gone(run.data.tags.get(drivers.TAG, ""))]
    for run in orphans:
        reason = (f"its driver ({drivers.describe(run.data.tags[drivers.TAG])}) stopped without closing the run "
                  "(killed, or the machine went down); continue with `deepyard run SPEC --resume`")
        for child in [r for r in running if r.data.tags.get("mlflow.parentRunId") == run.info.run_id]:
            finish_run(child.info.run_id, "KILLED", f"its job's driver stopped: {reason}")
        finish_run(run.info.run_id, "KILLED", reason)
    return [run.info.run_id for run in orphans]


def latest_run(experiment: str, run_name: str | None, tags: dict[str, str], uri: str | None = None):
    """The newest run in the experiment with these tags (and named ``run_name``, unless None), or None."""
    mlflow_client = client(uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        return None
    named = [f"attributes.run_name = '{run_name}'"] if run_name is not None else []
    query = " and ".join([*named, *(f"tags.`{k}` = '{v}'" for k, v in tags.items())])
    runs = mlflow_client.search_runs([found.experiment_id], query, order_by=["attributes.start_time DESC"],
                                     max_results=1)
    return runs[0] if runs else None


def child_runs(parent_run_id: str) -> list:
    mlflow_client = client()
    experiment_id = mlflow_client.get_run(parent_run_id).info.experiment_id
    return mlflow_client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                     max_results=10000)


def delete_tag(run_id: str, key: str) -> None:
    """Remove a tag, if the run has it."""
    if key in client().get_run(run_id).data.tags:
        client().delete_tag(run_id, key)


def find_trial_run(parent_run_id: str, trial_id: str, status: str | None = None):
    """The newest child run of ``trial_id`` under this sweep (only one in ``status``, if given)."""
    mlflow_client = client()
    experiment_id = mlflow_client.get_run(parent_run_id).info.experiment_id
    query = f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.deepyard.trial_id = '{trial_id}'"
    query += f" and attributes.status = '{status}'" if status else ""
    found = mlflow_client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"],
                                      max_results=1)
    return found[0] if found else None


def finished_trial_run(parent_run_id: str, trial_id: str):
    """The FINISHED child run of ``trial_id`` under this sweep, if there is one."""
    return find_trial_run(parent_run_id, trial_id, "FINISHED")


def promote(name: str, version: str, alias: str, *, only_if_better: bool, metric: str, mode: str) -> dict[str, Any]:
    """Point ``alias`` at ``version``, unless ``only_if_better`` and the holder scores at least as well
    on the same test ``metric`` (a version tag). Says which happened and why."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client()
    new_score = float(mlflow_client.get_model_version(name, version).tags[f"metric.{metric}"])
    try:
        holder = mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException:
        holder = None
    decision = {"alias": alias, "version": version, "metric": metric, "new": new_score}
    if holder is not None and str(holder.version) != str(version):
        old = holder.tags.get(f"metric.{metric}")
        decision.update(holder=str(holder.version), old=float(old) if old is not None else None)
        if only_if_better and old is not None:
            better = new_score > float(old) if mode == "max" else new_score < float(old)
            if not better:
                reason = (f"version {holder.version} keeps {alias!r}: its {metric} {float(old):.4g} is as good as "
                          f"or better than version {version}'s {new_score:.4g}")
                return {**decision, "moved": False, "reason": reason}
            reason = f"version {version}'s {metric} {new_score:.4g} beats version {holder.version}'s {float(old):.4g}"
        else:
            reason = (f"{alias!r} moved from version {holder.version} (not compared: only_if_better is off "
                      f"or it has no {metric})")
    else:
        reason = f"no version held {alias!r} yet"
    mlflow_client.set_registered_model_alias(name, alias, version)
    return {**decision, "moved": True, "reason": reason}


def registered_models() -> list[dict[str, Any]]:
    """Every registered model with its versions, aliases and test metrics (newest version first)."""
    mlflow_client = client()
    models = []
    for model in mlflow_client.search_registered_models():
        aliases_by_version: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases_by_version.setdefault(str(version), []).append(alias)
        quoted = model.name.replace("'", "\\'")
        versions = sorted(mlflow_client.search_model_versions(f"name='{quoted}'"),
                          key=lambda v: int(v.version), reverse=True)
        models.append({
            "name": model.name,
            "versions": [{
                "version": str(v.version),
                "aliases": aliases_by_version.get(str(v.version), []),
                "run_id": v.run_id,
                "status": v.status,
                "metrics": {k.removeprefix("metric."): val for k, val in (v.tags or {}).items()
                            if k.startswith("metric.")},
            } for v in versions],
        })
    return models


def model_version(name: str, *, alias: str | None = None, version: str | None = None,
                  uri: str | None = None) -> dict[str, Any]:
    """The registered version that ``name@alias`` (or ``name:version``) points at now:
    version, run id and test metrics. A missing model, alias or version is a BadInput that lists
    what exists."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(uri)
    try:
        mlflow_client.get_registered_model(name)
    except MlflowException:
        from deepyard.registry import unknown_name_message

        known = [m.name for m in mlflow_client.search_registered_models()]
        raise BadInput(unknown_name_message("registered model", name, known)
                       + "; train one with `deepyard run jobs/...` (register.enabled)") from None
    try:
        found = (mlflow_client.get_model_version_by_alias(name, alias) if alias
                 else mlflow_client.get_model_version(name, version))
    except MlflowException:
        model = mlflow_client.get_registered_model(name)
        aliases = ", ".join(f"@{a} -> {v}" for a, v in (model.aliases or {}).items()) or "none"
        wanted = f"no alias @{alias}" if alias else f"no version {version}"
        raise BadInput(f"model {name!r} has {wanted} (aliases: {aliases}); promote one with "
                       f"`deepyard models promote {name} VERSION --alias {alias or 'champion'}`") from None
    return {"name": name, "version": str(found.version), "alias": alias, "run_id": found.run_id,
            "metrics": {k.removeprefix("metric."): float(v) for k, v in (found.tags or {}).items()
                        if k.startswith("metric.")}}


def latest_version(name: str) -> str:
    """The newest registered version of ``name`` (a BadInput listing the models if there is none)."""
    from deepyard.registry import unknown_name_message

    mlflow_client = client()
    versions = [int(v.version) for v in mlflow_client.search_model_versions(f"name = '{name}'")]
    if not versions:
        known = [m.name for m in mlflow_client.search_registered_models()]
        raise BadInput(unknown_name_message("registered model", name, known)
                       + "; train one with `deepyard run jobs/...` (register.enabled)")
    return str(max(versions))


def load_model(name: str, version: str, uri: str | None = None):
    """(the serving module on CPU in eval mode, its metadata: task, input shape, class names...).

    MLflow 3 logs it as a ``torch.export`` program (``model.pt2``), so loading unpickles nothing."""
    import mlflow
    import mlflow.pytorch

    mlflow.set_tracking_uri(_ready(uri or tracking_uri()))
    model_uri = f"models:/{name}/{version}"
    metadata = mlflow.models.get_model_info(model_uri).metadata or {}
    module = mlflow.pytorch.load_model(model_uri, map_location="cpu")
    try:
        module.eval()
    except NotImplementedError:  # MLflow 3 saves torch.export programs (no pickle): already in eval mode
        pass
    return module, metadata


def load_exported(name: str, version: str, uri: str | None = None):
    """The version's ``torch.export`` program, unflattened into its module tree (the layers by the
    names they had in training: what per-layer attributions need), or None for a version logged as
    TorchScript (int8: no gradients to explain with)."""
    import mlflow
    import torch

    mlflow.set_tracking_uri(_ready(uri or tracking_uri()))
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}"))
    found = sorted(local.rglob("*.pt2"))
    if not found:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (unflatten's notices about the graph's signature)
        return torch.export.unflatten(torch.export.load(str(found[0])))


def model_metadata(name: str, version: str, uri: str | None = None) -> dict[str, Any]:
    """What ``log_model`` stored with the version: task, input shape, class names, vocabulary..."""
    import mlflow

    mlflow.set_tracking_uri(_ready(uri or tracking_uri()))
    return mlflow.models.get_model_info(f"models:/{name}/{version}").metadata or {}


def input_example(name: str, version: str):
    """The version's logged input example (a few raw test inputs), as a numpy array."""
    import mlflow
    from mlflow.models import Model

    mlflow.set_tracking_uri(_ready(tracking_uri()))
    local = mlflow.artifacts.download_artifacts(f"models:/{name}/{version}")
    return Model.load(local).load_input_example(local)


def download(run_id: str, artifact_path: str, uri: str | None = None) -> str | None:
    """A run's artifact as a local file; None if the run has no such artifact (any other failure to
    fetch it, a store that cannot be reached, raises)."""
    import mlflow

    folder = os.path.dirname(artifact_path) or None
    if artifact_path not in {entry.path for entry in client(uri).list_artifacts(run_id, folder)}:
        return None
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in a job's output
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                               tracking_uri=uri or tracking_uri())


def set_version_tags(name: str, version: str, tags: dict[str, str]) -> None:
    mlflow_client = client()
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(name, version, key, value)


def set_alias(name: str, alias: str, version: str) -> None:
    """Point ``alias`` at ``version`` unconditionally (``deepyard models promote``)."""
    model_version(name, version=version)  # a clear error if either is missing
    client().set_registered_model_alias(name, alias, version)
