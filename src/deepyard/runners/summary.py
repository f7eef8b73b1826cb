"""What every runner takes and returns, whatever its kind: the CLI prints it without asking which."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.console import Console


@dataclass(frozen=True)
class RunOptions:
    address: str | None = None  # a Ray cluster; None: $RAY_ADDRESS, else a local one
    ray_logs: bool = False  # stream the workers' logs to the terminal
    resume: bool = False  # go on with the last interrupted run (kinds that can)
    console: Console | None = None  # live progress and notes (stderr); None: quiet
    json_output: bool = False  # the CLI prints the summary as JSON too (a runner may print its own lines)


@dataclass
class RunSummary:
    """A finished run: its ids and test metrics, the registered version, and what the kind adds
    (``details``: flat JSON values, e.g. best_epoch; ``notes``: lines the CLI prints after it)."""

    run_id: str | None
    experiment: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """One flat object (the last stdout line of ``--json``): ids, metrics, then the details."""
        return {"run_id": self.run_id, "experiment": self.experiment, "metrics": self.metrics, **self.details,
                "timings": self.timings}

    def lines(self) -> list[str]:
        """What the CLI prints when the job is done."""
        shown = []
        if self.metrics:
            shown.append(", ".join(f"{k}={v:.4f}" for k, v in self.metrics.items()))
        if self.run_id:
            shown.append(f"run {self.run_id} in experiment {self.experiment!r}")
        shown += self.notes
        if version := self.details.get("model_version"):
            shown.append(f"registered {self.details['model_name']} version {version}")
        if promotion := self.details.get("promotion"):
            verdict = "moved to" if promotion["moved"] else "not moved to"
            shown.append(f"alias {promotion['alias']!r} {verdict} version {promotion['version']}: "
                         f"{promotion['reason']}")
        return shown
