"""What a job's driver imports and works out once per process, done ahead of the moment it needs
them: by the job host, once for every driver it forks (``job_host.serve``), and by a driver of its
own while its job trains (``tracking.preload``). One list, so that the two never drift apart.

No deepyard imports here: the host's copy of this module is every forked driver's (a host whose
deepyard files changed starts again: ``job_host._changed_source``).
"""

from __future__ import annotations

import importlib

# Logging a model: MLflow's flavor and pyfunc, the signature, the export of the serving module
# (torch's compiler stack: ~0.9 s that nothing else in a driver loads), and what MLflow imports as
# it logs (networkx for the exported graph, GitPython for the commit tag).
MODEL_LOGGING = ("mlflow.pytorch", "mlflow.pyfunc", "mlflow.models", "torch._dynamo", "torch.export",
                 "networkx", "git")


def import_each(names: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """Import what can be: (the names imported, why each other one failed). A module that fails
    here fails again, loudly, where the driver needs it."""
    loaded, failed = [], {}
    for name in names:
        try:
            importlib.import_module(name)
            loaded.append(name)
        except Exception as error:
            failed[name] = f"{type(error).__name__}: {error}"
    return loaded, failed


def map_installed_packages() -> str | None:
    """MLflow's map of installed packages to their modules (every logged model's requirements are
    checked against it), built once per process from every package's file list: ~0.4 s on 2 cores.
    None when built, else why not (MLflow's private helper: a release without it only loses the
    head start)."""
    try:
        from mlflow.utils.requirements_utils import _init_packages_to_modules_map

        _init_packages_to_modules_map()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None
