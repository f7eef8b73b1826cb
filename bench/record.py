"""Where a bench result came from: each bench script ends with ``record.save(name, result)``.

``save`` adds a ``"recorded"`` object (git commit, UTC date, machine, CPUs, Python, torch and Ray
versions), prints the JSON to stdout and writes it to ``bench/results/<name>.json``: the latest
result of each bench and variant. Run as ``.venv/bin/python bench/x.py``, bench/ is on sys.path, so
``import record`` works; bench/ is not a package.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench/results"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):  # no git here (a copied tree on a GPU box)
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(module: str) -> str | None:
    try:  # a bench may run where Ray is absent (bench/gpu_step.py needs torch only)
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - not installed, or broken here: the version is not known
        return None


def provenance() -> dict:
    commit = _git("rev-parse", "--short", "HEAD")
    # bench/results itself is left out: earlier benches of the same `make bench` have just written there
    status = _git("status", "--porcelain", "--", ".", ":(exclude)bench/results") if commit else None
    return {
        "commit": commit, "dirty": bool(status) if commit else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "torch": _version("torch"), "ray": _version("ray"),
    }


def fresh_home(label: str) -> str:
    """A new, empty deepyard home (MLflow store, checkpoints) for this bench's process, quiet MLflow."""
    import tempfile

    home = tempfile.mkdtemp(prefix=f"deepyard-{label}-bench-")
    os.environ["DEEPYARD_HOME"] = home
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home}/mlflow.db"
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    return home


def variant(base: str, *parts: object) -> str:
    """A result name: ``base`` and each part that is set (``None``, ``False`` and ``""`` are left out), in
    file-name-safe text. ``variant("serve_latency", "batch16", False) == "serve_latency_batch16"``."""
    names = [re.sub(r"[^A-Za-z0-9.+-]+", "-", str(part)).strip("-") for part in parts if part]
    return "_".join([base, *names])


def save(name: str, result: dict) -> dict:
    """Add ``"recorded"`` to the result, print it (indent 2) and write it to bench/results/<name>.json."""
    result = {**result, "recorded": provenance()}
    text = json.dumps(result, indent=2)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(text + "\n")
    return result


def free_port() -> int:
    """A TCP port nothing on 127.0.0.1 listens on now (for a Serve instance the bench starts)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
