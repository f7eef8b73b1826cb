"""Live progress in the terminal while a job runs: rank 0 logs each epoch to MLflow, and this
thread reads the run back once a second, so the display needs no extra actor or channel."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.live import Live
from rich.table import Table

from deepyard import tracking

SHOWN = {"train_loss": "train loss", "val_loss": "val loss", "val_accuracy": "val acc", "val_rmse": "val rmse",
         "val_mae": "val mae", "val_bits_per_token": "val bits/token", "train_d_loss": "D loss",
         "train_g_loss": "G loss", "val_confident_share": "confident", "val_min_class_share": "rarest class",
         "lr": "lr", "samples_per_s": "samples/s", "tokens_per_s": "tokens/s"}


def _table(metrics: dict[str, float], epochs: int, elapsed: float, first_epoch_at: float | None) -> Table:
    epoch = int(metrics.get("epoch", 0))
    table = Table(box=None, show_header=True, header_style="bold")
    for column in ("epoch", *(label for key, label in SHOWN.items() if key in metrics), "elapsed", "eta"):
        table.add_column(column, justify="right", no_wrap=True)
    if epoch and first_epoch_at is not None:
        per_epoch = (elapsed - first_epoch_at) / max(epoch - 1, 1) if epoch > 1 else first_epoch_at
        eta = f"{per_epoch * (epochs - epoch):.0f}s"
    else:
        eta = "starting" if not epoch else "-"
    values = [f"{metrics[key]:.4g}" for key in SHOWN if key in metrics]
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


def watch(run_id: str, epochs: int, console: Console):
    """A train job's latest epoch: metrics, elapsed time and ETA; every second."""
    started = time.monotonic()
    first_epoch_at: list[float] = []

    def render() -> Table:
        metrics = tracking.latest_metrics(run_id)
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
                      str(int(run.data.metrics.get("epoch", run.data.metrics.get("iteration", 0)))), f"{current:.4g}" if current is not None else "-")
    return table


def watch_sweep(parent_run_id: str, paths: list[str], metric: str, mode: str, console: Console):
    """The sweep's trials, their values, epoch and current metric, and the best so far; every 2 s."""
    return _live(Table(title="starting trials..."), lambda: _sweep_table(parent_run_id, paths, metric, mode),
                 2.0, console)
