"""Fault injection for the tests, kept out of the product: installed in every Ray worker process of
the test session (conftest's ``worker_process_setup_hook``), inert until a test writes a plan.

``crash_after_epoch(job, epoch)``: the rank-0 training worker of ``job`` exits hard (``os._exit``,
as a killed process would), once, right after it reported epoch ``epoch`` with its checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _plan_file() -> Path:
    return Path(os.environ["DEEPYARD_HOME"]) / "fault_plan.json"


def crash_after_epoch(job: str, epoch: int) -> None:
    _plan_file().write_text(json.dumps({"job": job, "epoch": epoch}))


def clear() -> None:
    _plan_file().unlink(missing_ok=True)


def install() -> None:
    """Wrap the Ray Train edge [4] of the training loop (``TrainWorker.report``)."""
    from deepyard.runners import edges

    report = edges.TrainWorker.report

    def report_then_maybe_crash(self, metrics, directory):
        report(self, metrics, directory)
        plan_file = _plan_file()
        if self.rank != 0 or directory is None or not plan_file.is_file():
            return
        plan = json.loads(plan_file.read_text())
        experiment = self._train.get_context().get_experiment_name()
        if metrics.get("epoch") == plan["epoch"] and experiment.startswith(f"{plan['job']}-"):
            plan_file.unlink(missing_ok=True)  # once: the restarted worker trains on
            os._exit(1)

    edges.TrainWorker.report = report_then_maybe_crash
