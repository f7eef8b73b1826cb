"""Live progress in the terminal while a job runs: each epoch reaches MLflow (from rank 0, or from
the driver for a one-worker job), and this thread reads the run back once a second, so the display
needs no extra actor or channel."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

from rich.console import Console
from rich.live import Live
from rich.table import Table

from deepyard import tracking

# What every train job logs, after the task's own columns.
COMMON = ("lr", "samples_per_s", "tokens_per_s")


def columns() -> list[str]:
    """The metrics a table shows, where a run has them: each task's ``shown``, then the common ones."""
    from deepyard.tasks import progress_columns

    return [*progress_columns(), *COMMON]


def _label(key: str) -> str:
    return key.replace("_per_s", "/s").replace("_", " ")


def _table(metrics: dict[str, float], epochs: int, elapsed: float, first_epoch_at: float | None) -> Table:
    epoch = int(metrics.get("epoch", 0))
    table = Table(box=None, show_header=True, header_style="bold")
    shown = [key for key in columns() if key in metrics]
    for column in ("epoch", *map(_label, shown), "elapsed", "eta"):
        table.add_column(column, justify="right", no_wrap=True)
    if epoch and first_epoch_at is not None:
        per_epoch = (elapsed - first_epoch_at) / max(epoch - 1, 1) if epoch > 1 else first_epoch_at
        eta = f"{per_epoch * (epochs - epoch):.0f}s"
    else:
        eta = "starting" if not epoch else "-"
    values = [f"{metrics[key]:.4g}" for key in shown]
    table.add_row(f"{epoch}/{epochs}", *values, f"{elapsed:.0f}s", eta)
    return table


@contextmanager
def _live(first: Table, render: Callable[[], Table], interval_s: float, console: Console) -> Iterator[None]:
    """Show ``first``, then ``render()`` every ``interval_s`` from a thread, until the block ends
    (and once more at the end). A render that fails (a busy sqlite file) is retried next time."""
    stop = threading.Event()

    def refresh(live: Live) -> None:
        try:
            live.update(render())
        except Exception:
            pass

    def poll(live: Live) -> None:
        while not stop.wait(interval_s):
            refresh(live)

    with Live(first, console=console, refresh_per_second=2) as live:
        thread = threading.Thread(target=poll, args=(live,), daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=3)
            refresh(live)
    console.line()


def watch(run_id: Callable[[], str], epochs: int, console: Console | None):
    """A train job's latest epoch: metrics, elapsed time and ETA; every second (None: quiet).
    ``run_id()`` answers the run's id, waiting for it while the run still opens."""
    if console is None:
        return nullcontext()
    started = time.monotonic()
    first_epoch_at: list[float] = []

    def render() -> Table:
        metrics = tracking.latest_metrics(run_id())
        elapsed = time.monotonic() - started
        if metrics.get("epoch") and not first_epoch_at:
            first_epoch_at.append(elapsed)
        return _table(metrics, epochs, elapsed, first_epoch_at[0] if first_epoch_at else None)

    return _live(_table({}, epochs, 0.0, None), render, 1.0, console)


def _sweep_table(parent_run_id: str, paths: list[str], metric: str, mode: str) -> Table:
    import json

    runs = tracking.child_runs(parent_run_id)
    pick = max if mode == "max" else min
    scores = [r.data.metrics[metric] for r in runs if metric in r.data.metrics]
    best = f"{pick(scores):.4g}" if scores else "-"
    table = Table(title=f"{len(runs)} trials, best {metric} so far: {best}", box=None, header_style="bold")
    for column in ("trial", "status", *(p.rsplit(".", 1)[-1] for p in paths), "epoch", metric):
        table.add_column(column, justify="right", no_wrap=True)
    for run in sorted(runs, key=lambda r: r.info.start_time):
        config = json.loads(run.data.tags.get("deepyard.trial_config", "{}"))
        values = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in (config.get(p) for p in paths)]
        current = run.data.metrics.get(metric)
        trial = run.data.tags.get("deepyard.trial_id", "?").rsplit("_", 1)[-1]  # "5acb9_00003" -> "00003"
        table.add_row(trial, run.info.status.lower(), *values,
                      str(int(run.data.metrics.get("epoch", run.data.metrics.get("iteration", 0)))),
                      f"{current:.4g}" if current is not None else "-")
    return table


def watch_sweep(parent_run_id: str, paths: list[str], metric: str, mode: str, console: Console):
    """The sweep's trials, their values, epoch and current metric, and the best so far; every 2 s."""
    return _live(Table(title="starting trials..."), lambda: _sweep_table(parent_run_id, paths, metric, mode),
                 2.0, console)
