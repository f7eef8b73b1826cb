"""Where things land on this machine: DEEPYARD_HOME and what lives under it."""

from __future__ import annotations

import os
from pathlib import Path

# What Ray Train's processes should see, on a local cluster and on a real one. Seen on Ray 2.60: the
# Train V2 controller polls its workers every 2 s by default, which adds up to 2 s after the last
# report and throttles checkpointed reports; 0.1 s costs nothing visible.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}

# What a node's raylet should run with: a local cluster gets it from here, a long-lived one needs it
# in its nodes' environment (k8s/raycluster.yaml). Ray frees released objects in batches of 100, or
# once a second; meanwhile a streaming reader maps block after block at fresh offsets of the object
# store, pages its RSS keeps (bench/stream_memory.py, one epoch of 3.6M rows: 225 MB of them, ~120-170
# MB with these; runners/store_pages.py now lets go of them as it reads). Freed sooner, the store
# holds less. A free is one message to the node's object store: ten a second cost nothing visible.
NODE_ENV = {"RAY_free_objects_period_milliseconds": "100", "RAY_free_objects_batch_size": "10"}


def home() -> Path:
    """``$DEEPYARD_HOME``, default ``./.deepyard``: the sqlite store, artifacts and checkpoints."""
    path = Path(os.environ.get("DEEPYARD_HOME", ".deepyard")).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _unwritable("DEEPYARD_HOME", path, error) from None
    return path


def check_writable(spec) -> None:
    """The home and a local checkpoint store (of a spec that has one) take files: checked before Ray
    starts, not minutes later when the first run or checkpoint is written."""
    import tempfile

    places = [("DEEPYARD_HOME", home())]
    if hasattr(spec, "storage_path") and "://" not in (storage := storage_path(spec.storage_path)):
        places.append(("storage_path (or DEEPYARD_STORAGE)", Path(storage)))
    for what, path in places:
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as error:
            raise _unwritable(what, path, error) from None


def _unwritable(what: str, path: Path, error: OSError):
    from deepyard.errors import BadInput

    return BadInput(f"{what}: {path} is not writable ({error.strerror}); set it to a directory you can write")


def storage_path(configured: str | None) -> str:
    """Checkpoint storage: the spec's, else ``$DEEPYARD_STORAGE`` (a cluster's shared store, set on its
    nodes: s3://..., gs://..., or a path every node mounts), else $DEEPYARD_HOME/ray_results."""
    configured = configured or os.environ.get("DEEPYARD_STORAGE")
    if configured:
        return configured if "://" in configured else str(Path(configured).expanduser().resolve())
    return str(home() / "ray_results")
