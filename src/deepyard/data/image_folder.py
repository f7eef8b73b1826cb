"""`data: image_folder`: the user's own images, in the layout torchvision's ImageFolder reads
(``root/<class>/*.png|jpg``), streamed to the workers by Ray Data (``data/streaming.py``) rather
than loaded into memory.

Here: listing the files, assigning each to a split by a hash of its path (the same split on any
number of workers, and a file keeps its split when others are added), and checking every
file's header before Ray starts. The pixels are decoded by ``data/images.py``, on Ray Data's workers.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from deepyard.data.registry import DATASETS
from deepyard.data.streaming import StreamPlan
from deepyard.errors import DataError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
def split_of(relative: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """"train", "val" or "test" from a hash of the file's path under the root (and the seed)."""
    digest = hashlib.blake2b(f"{seed}:{relative}".encode(), digest_size=8).digest()
    point = int.from_bytes(digest, "big") / 2.0 ** 64
    return "test" if point < test_fraction else "val" if point < test_fraction + val_fraction else "train"


def _images_under(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.suffix.lower() in EXTENSIONS and path.is_file())


def list_classes(root: Path, where: str) -> dict[str, list[Path]]:
    """class name -> its image files, for ``root/<class>/...``; a DataError for a layout that is not that."""
    if not root.is_dir():
        raise DataError(f"{where}: {root} is not a directory; point it at a folder of class folders "
                        "(root/<class>/*.png)")
    folders = sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))
    if not folders:
        raise DataError(f"{where}: {root} has no class folders; images go in root/<class>/*.png|jpg, one folder "
                        "per class")
    files = {folder.name: _images_under(folder) for folder in folders}
    if empty := [name for name, paths in files.items() if not paths]:
        raise DataError(f"{where}: class folder{'s' if len(empty) > 1 else ''} {', '.join(empty[:5])} in {root} "
                        f"hold{'' if len(empty) > 1 else 's'} no images ({', '.join(EXTENSIONS)}); add images or "
                        "remove the folder")
    return files


def _header(path: Path) -> tuple[tuple[int, int], str] | str:
    """(width, height) and mode from the file's header, or why it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size, image.mode
    except (UnidentifiedImageError, OSError, ValueError) as error:
        return f"{type(error).__name__}: {error}"


def check_headers(paths: list[Path], size: tuple[int, int] | None, where: str) -> tuple[tuple[int, int], str]:
    """Every file's header, read in threads: each must be an image, and without ``size`` all must
    have one size. Returns the (height, width) and mode of the first."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        headers = list(pool.map(_header, paths, chunksize=256))
    for path, header in zip(paths, headers):
        if isinstance(header, str):
            raise DataError(f"{where}: {path} is not a readable image ({header}); remove or replace it")
    sizes = {header[0] for header in headers}
    if size is None and len(sizes) > 1:
        shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:4])
        raise DataError(f"{where}: the images have {len(sizes)} sizes ({shown}...); set data.params.size: "
                        "[height, width] to resize them all")
    (width, height), mode = headers[0]
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
    root = Path(path).expanduser()
    classes = list_classes(root, where)
    names = list(classes)
    labelled = {split: [] for split in ("train", "val", "test")}
    own_test = test_fraction if test_path is None else 0.0
    for label, name in enumerate(names):
        for file in classes[name]:
            split = split_of(file.relative_to(root).as_posix(), split_seed, val_fraction, own_test)
            labelled[split].append((str(file), label))
    if test_path is not None:
        test_root = Path(test_path).expanduser()
        test_classes = list_classes(test_root, "data.params.test_path")
        if unknown := sorted(set(test_classes) - set(names)):
            raise DataError(f"data.params.test_path: {test_root} has classes the training folder lacks: "
                            f"{', '.join(unknown[:5])}; its class folders must be among {', '.join(names)}")
        labelled["test"] = [(str(file), names.index(name)) for name, files in test_classes.items() for file in files]
    all_files = [Path(file) for items in labelled.values() for file, _ in items]
    resize = tuple(size) if size else None
    (height, width), mode = check_headers(all_files, resize, where)
    channels = channels or (1 if mode in ("1", "L", "I", "I;16", "F") else 3)
    return StreamPlan(
        task="classification", class_names=names, in_shape=(channels, *(resize or (height, width))),
        files={split: [file for file, _ in items] for split, items in labelled.items()},
        labels={split: np.array([label for _, label in items], dtype=np.int64) for split, items in labelled.items()},
        decode={"kind": "image", "channels": channels, "size": list(resize) if resize else None},
        pixel_max=255.0, where=str(root))
