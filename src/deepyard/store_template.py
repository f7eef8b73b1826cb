"""A new sqlite MLflow store, copied from an empty one kept per MLflow version instead of built.

MLflow builds a new store by creating its tables and then running every one of its schema migrations:
~1.4 s of one core on this machine, and 3-8 s beside Ray's start, which the first job in each new
``$DEEPYARD_HOME`` (by default a folder of the working directory's) waited for. The first store
built on a machine is kept, empty, in the user's cache folder; later ones are copies of it, with
the one row that names its home (the Default experiment's artifact folder) set to theirs.

Only a file MLflow itself built is ever kept, and only for the MLflow version that built it. A copy
that cannot be made or fixed (a damaged or foreign file, a cache folder that cannot be read) is
built by MLflow after all: the template saves time, it is never needed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
import time
from importlib import metadata
from pathlib import Path

DEFAULT_EXPERIMENT = "0"  # the one experiment every new store has (MLflow's "Default")


def template_file() -> Path:
    """The empty store kept for the installed MLflow (``$XDG_CACHE_HOME`` moves the cache folder)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("deepyard")) / f"mlflow-{metadata.version('mlflow')}-store.db"


def copy_into(database: Path, artifact_root: str) -> bool:
    """``database`` (a new path) as a copy of the template, its Default experiment's artifacts under
    ``artifact_root``, as MLflow would have made it; False (and nothing left at ``database``) where
    there is no usable template."""
    template = template_file()
    if not template.is_file():
        return False
    try:
        shutil.copyfile(template, database)
        with contextlib.closing(sqlite3.connect(database)) as db, db:
            now_ms = int(time.time() * 1000)
            moved = db.execute("UPDATE experiments SET artifact_location = ?, creation_time = ?, "
                               "last_update_time = ? WHERE experiment_id = ?",
                               (default_location(artifact_root), now_ms, now_ms, int(DEFAULT_EXPERIMENT))).rowcount
        if moved == 1:
            return True
    except (OSError, sqlite3.Error):
        pass
    database.unlink(missing_ok=True)
    return False


def keep(database: Path) -> None:
    """Keep ``database``, a store MLflow has just built and nothing has written to, as the template
    (written under another name and renamed into place: a reader never sees half a file)."""
    template = template_file()
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=template.parent, prefix=f".{template.name}.", delete=False) as file:
            partial = Path(file.name)
        try:
            shutil.copyfile(database, partial)
            os.replace(partial, template)
        finally:
            partial.unlink(missing_ok=True)
    except OSError:
        pass  # (a cache folder that cannot be written: every new store is built, as before)


def default_location(artifact_root: str) -> str:
    """Where MLflow puts the Default experiment's artifacts, under a store's artifact root."""
    from mlflow.utils.uri import append_to_uri_path

    return append_to_uri_path(artifact_root, DEFAULT_EXPERIMENT)
