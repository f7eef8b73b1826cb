"""User-facing errors.

They cross Ray process boundaries (a worker raises, the driver reports), so each one pickles:
every constructor argument is kept in ``args``.
"""

from __future__ import annotations

EXIT_JOB_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class DeepyardError(Exception):
    """Base class: a message meant for the user, and the exit code the CLI returns."""

    exit_code = EXIT_JOB_FAILED

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class BadInput(DeepyardError):
    """Input the user can fix: a spec, a CLI flag, a missing file. Exit code 2."""

    exit_code = EXIT_BAD_INPUT


class SpecError(BadInput):
    """Every problem found in one spec, reported together."""

    def __init__(self, source: str, problems: list[str]):
        super().__init__(source, list(problems))

    @property
    def source(self) -> str:
        return self.args[0]

    @property
    def problems(self) -> list[str]:
        return self.args[1]

    def __str__(self) -> str:
        count = len(self.problems)
        head = f"{self.source}: {count} problem{'s' if count != 1 else ''} in the job spec"
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])


class DataError(BadInput):
    """A data set that cannot be loaded: a missing directory, a CSV without the named column."""


class UnknownName(BadInput):
    """A name that no registry holds; the message lists the valid ones and the closest match."""


class JobFailed(DeepyardError):
    """The job started and then failed; its MLflow run is marked FAILED."""
