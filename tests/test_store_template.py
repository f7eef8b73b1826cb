"""A new home's MLflow store, copied from the empty one kept per MLflow version (store_template)."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

from deepyard import store_template, tracking

pytestmark = pytest.mark.slow  # each builds a store, ~1.5 s of a core: make test-fast skips them

# What MLflow writes at the moment it builds a store (and a copy at the moment it is made).
MOMENTS = ("creation_time", "last_update_time")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _store(home: Path) -> Path:
    tracking.client(f"sqlite:///{home / 'mlflow.db'}")  # (the first use of a store builds it)
    return home / "mlflow.db"


def _contents(database: Path) -> dict[str, list]:
    """Every table's schema and rows, the moments and the artifact folder (its home's) left out."""
    with contextlib.closing(sqlite3.connect(database)) as db:
        db.row_factory = sqlite3.Row
        tables = {name: sql for name, sql in db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'")}
        return {name: [sql, sorted(tuple((key, row[key]) for key in row.keys()
                                         if key not in (*MOMENTS, "artifact_location"))
                                   for row in db.execute(f'SELECT * FROM "{name}"'))]
                for name, sql in tables.items()}


def test_a_new_store_copied_from_the_template_is_the_store_mlflow_builds(tmp_path, cache):
    built = _store(tmp_path / "first")  # no template yet: MLflow builds it, and it is kept
    template = store_template.template_file()
    assert template.parent == cache / "deepyard" and template.is_file()
    kept = template.stat().st_mtime_ns

    copied = _store(tmp_path / "second")
    assert template.stat().st_mtime_ns == kept  # a copy, not another build
    assert _contents(copied) == _contents(built)  # the same schema, revision and rows

    client = tracking.client(f"sqlite:///{copied}")
    assert client.get_experiment("0").artifact_location == f"{(tmp_path / 'second/artifacts').as_uri()}/0"
    run = client.create_run(client.create_experiment("after"))  # a working store
    client.log_metric(run.info.run_id, "loss", 0.5)
    assert client.get_metric_history(run.info.run_id, "loss")[0].value == 0.5
    assert not list((tmp_path / "second").glob(".mlflow.db.building-*"))


def test_a_damaged_template_is_replaced_by_a_store_mlflow_builds(tmp_path, cache):
    template = store_template.template_file()
    template.parent.mkdir(parents=True)
    template.write_bytes(b"not a database")

    store = _store(tmp_path / "home")
    client = tracking.client(f"sqlite:///{store}")
    assert client.get_experiment("0").artifact_location == f"{(tmp_path / 'home/artifacts').as_uri()}/0"
    assert store_template.copy_into(tmp_path / "copy.db", "file:///elsewhere")  # the kept store is whole again


def test_an_unwritable_cache_folder_builds_every_store(tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # (a cache "folder" that is a file: nothing can be kept under it)
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    client = tracking.client(f"sqlite:///{_store(tmp_path / 'home')}")
    assert client.get_experiment("0").name == "Default"
    assert not store_template.template_file().exists()
