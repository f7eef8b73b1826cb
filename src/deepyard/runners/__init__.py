"""One runner per job kind. ``RUNNERS`` must list exactly the kinds in ``spec.KINDS`` (a test checks)."""

from deepyard.runners import sweep, train

RUNNERS = {"train": train.run, "sweep": sweep.run}
