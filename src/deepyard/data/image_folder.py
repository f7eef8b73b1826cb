"""`data: image_folder`: the user's own images, in the layout torchvision's ImageFolder reads
(``root/<class>/*.png|jpg``), streamed to the workers by Ray Data (``data/streaming.py``) rather
than loaded into memory.

Here: listing the files, assigning each to a split by a hash of its path (the same split on any
number of workers, and a file keeps its split when others are added), and reading the first
file's header before Ray starts (its size and mode). Ray Data's workers decode the pixels
(``data/images.py``), and the statistics pass checks every file (``streaming.attach``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from deepyard.data.registry import DATASETS
from deepyard.data.streaming import SPLITS, StreamPlan, split_by_point
from deepyard.errors import DataError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def split_of(relative: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """"train", "val" or "test" from a hash of the file's path under the root (and the seed)."""
    digest = hashlib.blake2b(f"{seed}:{relative}".encode(), digest_size=8).digest()
    point = int.from_bytes(digest, "big") / 2.0 ** 64
    return SPLITS[split_by_point(np.array([point]), val_fraction, test_fraction)[0]]


def _walk(root: str, where: str) -> tuple[list[str], list[str]]:
    """Every folder and file under ``root`` (a local folder, or any URI pyarrow reaches: s3://, gs://),
    as paths relative to it."""
    if "://" not in root:
        base = Path(root).expanduser()
        if not base.is_dir():
            raise DataError(f"{where}: {base} is not a directory; point it at a folder of class folders "
                            "(root/<class>/*.png)")
        found = [(path.relative_to(base).as_posix(), path.is_dir()) for path in base.rglob("*")]
    else:
        from pyarrow import fs

        if "?" in root:
            raise DataError(f"{where}: {root}: give the endpoint and options in the environment (AWS_ENDPOINT_URL...), "
                            "not in the URI")
        import pyarrow

        try:
            filesystem, base_path = fs.FileSystem.from_uri(root)
            if filesystem.get_file_info(base_path).type != fs.FileType.Directory:
                raise DataError(f"{where}: {root} is not a folder there; point it at a folder of class folders")
            infos = filesystem.get_file_info(fs.FileSelector(base_path, recursive=True))
        except (OSError, ValueError, pyarrow.ArrowException) as error:  # no bucket or credentials; an unknown scheme
            raise DataError(f"{where}: {root} cannot be listed: {error}") from None
        found = [(info.path[len(base_path.rstrip("/")) + 1:], info.type == fs.FileType.Directory) for info in infos]
    # Hidden entries anywhere (.ipynb_checkpoints/, macOS's ._x.png) are not the user's images.
    found = [(path, is_dir) for path, is_dir in found if not any(part.startswith(".") for part in path.split("/"))]
    folders = sorted(path for path, is_dir in found if is_dir)
    files = sorted(path for path, is_dir in found if not is_dir and Path(path).suffix.lower() in EXTENSIONS)
    return folders, files


def source(root: str, relative: str) -> str:
    """A listed file's local path or URI."""
    return f"{root.rstrip('/')}/{relative}" if "://" in root else str(Path(root).expanduser() / relative)


def list_classes(root: str, where: str) -> dict[str, list[str]]:
    """class name -> its image files (paths relative to ``root``), for ``root/<class>/...``; a
    DataError for a layout that is not that."""
    folders, files = _walk(root, where)
    classes = sorted({path.split("/")[0] for path in folders + [f for f in files if "/" in f]})
    if not classes:
        raise DataError(f"{where}: {root} has no class folders; images go in root/<class>/*.png|jpg, one folder "
                        "per class")
    if len(classes) == 1:
        raise DataError(f"{where}: {root} has one class folder ({classes[0]}); a classifier needs two or more "
                        "(point path at the folder that holds the class folders)")
    listed = {name: [] for name in classes}
    for path in files:
        if "/" in path and path.split("/")[0] in listed:
            listed[path.split("/")[0]].append(path)
    if empty := [name for name, paths in listed.items() if not paths]:
        raise DataError(f"{where}: class folder{'s' if len(empty) > 1 else ''} {', '.join(empty[:5])} in {root} "
                        f"hold{'' if len(empty) > 1 else 's'} no images ({', '.join(EXTENSIONS)}); add images or "
                        "remove the folder")
    return listed


def first_image(source: str, where: str) -> tuple[tuple[int, int], str]:
    """The (height, width) and mode of the folder's first image, from its header. (Every other file
    is checked by the statistics pass, on Ray Data's workers: ``streaming.attach``.)"""
    import io

    from PIL import Image, UnidentifiedImageError

    from deepyard.data.streaming import read_bytes

    try:
        with Image.open(io.BytesIO(read_bytes(source))) as image:
            (width, height), mode = image.size, image.mode
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"{where}: {source} is not a readable image ({type(error).__name__}: {error}); remove or "
                        "replace it") from None
    return (height, width), mode


@DATASETS.register("image_folder")
def image_folder(
    path: str,
    size: Annotated[list[int], Field(min_length=2, max_length=2)] | None = None,  # [height, width]: resize to it
    channels: Literal[1, 3] | None = None,  # 1 grey, 3 RGB; default: as the first image is
    test_path: str | None = None,  # a folder of the same classes held out as the test split
    *,
    split_seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15,
) -> StreamPlan:
    """Images in class folders (``path/<class>/*.png|jpg``), streamed through Ray Data: the data
    may be larger than any worker's memory. Each file's split follows a hash of its path; with
    ``test_path`` the test split is that folder instead."""
    where = "data.params.path"
    classes = list_classes(path, where)
    names = list(classes)
    labelled = {split: [] for split in ("train", "val", "test")}
    own_test = test_fraction if test_path is None else 0.0
    for label, name in enumerate(names):
        for relative in classes[name]:
            labelled[split_of(relative, split_seed, val_fraction, own_test)].append((source(path, relative), label))
    if test_path is not None:
        test_classes = list_classes(test_path, "data.params.test_path")
        if unknown := sorted(set(test_classes) - set(names)):
            raise DataError(f"data.params.test_path: {test_path} has classes the training folder lacks: "
                            f"{', '.join(unknown[:5])}; its class folders must be among {', '.join(names)}")
        labelled["test"] = [(source(test_path, relative), names.index(name))
                            for name, files in test_classes.items() for relative in files]
    resize = tuple(size) if size else None
    (height, width), mode = first_image(source(path, classes[names[0]][0]), where)
    channels = channels or (1 if mode in ("1", "L", "F") or mode.startswith("I") else 3)  # (I;16B, I;16L: grey)
    in_shape = (channels, *(resize or (height, width)))
    # Each split in a seeded random order: Ray Data reads blocks of consecutive files, and blocks of
    # one class each would leave the shuffle buffer too few classes to mix.
    rng = np.random.default_rng(split_seed)
    for split, items in labelled.items():
        labelled[split] = [items[index] for index in rng.permutation(len(items))]
    return StreamPlan(
        task="classification", class_names=names, in_shape=in_shape,
        files={split: [file for file, _ in items] for split, items in labelled.items()},
        labels={split: np.array([label for _, label in items], dtype=np.int64) for split, items in labelled.items()},
        decode={"kind": "image", "channels": channels, "size": list(resize) if resize else None,
                "shape": list(in_shape)},
        pixel_max=255.0, where=path)
