"""Live progress in the terminal while a job runs: rank 0 logs each epoch to MLflow, and this
thread reads the run back once a second, so the display needs no extra actor or channel."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.live import Live
from rich.table import Table

from deepyard import tracking

SHOWN = {"train_loss": "train loss", "val_loss": "val loss", "val_accuracy": "val acc", "val_rmse": "val rmse",
         "val_mae": "val mae", "lr": "lr", "samples_per_s": "samples/s"}


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
def watch(run_id: str, epochs: int, console: Console) -> Iterator[None]:
    stop = threading.Event()
    started = time.monotonic()

    def poll(live: Live) -> None:
        first_epoch_at = None
        while not stop.wait(1.0):
            try:
                metrics = tracking.latest_metrics(run_id)
            except Exception:  # a busy sqlite file: try again next second
                continue
            elapsed = time.monotonic() - started
            if metrics.get("epoch") and first_epoch_at is None:
                first_epoch_at = elapsed
            live.update(_table(metrics, epochs, elapsed, first_epoch_at))

    with Live(_table({}, epochs, 0.0, None), console=console, refresh_per_second=2, transient=False) as live:
        thread = threading.Thread(target=poll, args=(live,), daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=2)
            try:
                live.update(_table(tracking.latest_metrics(run_id), epochs, time.monotonic() - started, None))
            except Exception:
                pass
    console.line()
