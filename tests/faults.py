"""Fault injection for the tests, kept out of the product: installed in every Ray worker process of
the test session (conftest's ``worker_process_setup_hook``), inert until a test writes a plan.

``crash_after_epoch(job, epoch)``: the (rank-0) training process of ``job`` exits hard (``os._exit``,
as a killed process would), once, right after it reported epoch ``epoch`` with its checkpoint.
``slow_epochs(job, seconds)``: every report of ``job`` takes ``seconds`` longer, so that a test can
stop a tiny job mid-way. A driver with a local cluster of its own gets the plan through
``tests/fault_site`` on its PYTHONPATH (a ``sitecustomize`` that every Python process runs).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import sys
import time
from pathlib import Path


def _plan_file() -> Path:
    return Path(os.environ["DEEPYARD_HOME"]) / "fault_plan.json"


def crash_after_epoch(job: str, epoch: int) -> None:
    _plan_file().write_text(json.dumps({"job": job, "epoch": epoch}))


def slow_epochs(job: str, seconds: float) -> None:
    _plan_file().write_text(json.dumps({"job": job, "slow_s": seconds}))


def clear() -> None:
    _plan_file().unlink(missing_ok=True)


def install() -> None:
    """Wrap the edge [4] of the training loop (``TrainWorker.report``, ``TuneTrial.report``) once a worker imports
    it: importing it here would load torch into every Ray worker, trainer or not."""
    module = sys.modules.get(EDGES)
    if module is not None:
        _wrap(module)
    else:
        sys.meta_path.insert(0, _WrapOnImport())


EDGES = "deepyard.runners.edges"


class _WrapOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != EDGES:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_then_wrap(module):
            execute(module)
            _wrap(module)

        spec.loader.exec_module = exec_then_wrap
        return spec


def _wrap(edges) -> None:
    for worker in (edges.TrainWorker, edges.TuneTrial):  # a data-parallel job's rank 0, a one-worker job
        worker.report = _then_maybe_crash(worker.report)


def _then_maybe_crash(report):
    def report_then_maybe_crash(self, metrics, directory):
        report(self, metrics, directory)
        plan_file = _plan_file()
        if self.rank != 0 or directory is None or not plan_file.is_file():
            return
        plan = json.loads(plan_file.read_text())
        if not self.job_name.startswith(f"{plan['job']}-"):
            return
        if "slow_s" in plan:
            time.sleep(plan["slow_s"])
        elif metrics.get("epoch") == plan["epoch"]:
            plan_file.unlink(missing_ok=True)  # once: the restarted worker trains on
            os._exit(1)

    return report_then_maybe_crash
