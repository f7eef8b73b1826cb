"""A streaming worker's view of Ray's object store, let go of as it reads.

Ray's object store is one shared-memory file that every worker maps (plasma). The pages of each
block a worker reads stay in its page tables after the block is released, and a large store hands
out fresh offsets for a long time: a Train worker streaming a 4M-row table mapped 384 MB of store
pages by its epoch's end while its own memory stayed flat, so its RSS grew with the table.
``release`` drops this process's mappings of the store's pages (``madvise(MADV_DONTNEED)`` on its
shared mapping). The store keeps the data, since a shared mapping's pages live in its file; a
block still being read is mapped again on its next access, a minor fault per page. Linux only;
elsewhere, and if the call fails, nothing changes.
"""

from __future__ import annotations

import ctypes
import sys

MADV_DONTNEED = 4  # (Linux's value on every architecture)
_libc = None


def _plasma_mapping(line: str) -> tuple[int, int, str] | None:
    """A line of /proc/self/maps (or a mapping's first line in smaps) that is a shared mapping of a
    plasma file, as (start, end, path): "start-end perms offset dev inode path", where the store's
    own file is /dev/shm/plasmaXXXXXX (deleted) and its fallback files (the store is full)
    plasmaXXXXXX in the spilling folder, on disk."""
    fields = line.split(maxsplit=5)
    if len(fields) < 6 or "-" not in fields[0] or fields[1][3:4] != "s":
        return None
    if not fields[5].rsplit("/", 1)[-1].startswith("plasma"):
        return None
    start, end = fields[0].split("-")
    return int(start, 16), int(end, 16), fields[5]


def store_region() -> tuple[int, int] | None:
    """The object store's own region in this process: its largest plasma mapping in /dev/shm,
    which Ray maps once and keeps for as long as the process is connected. Never a fallback file:
    Ray unmaps each as its object goes, from any thread, and by the time it were advised its range
    could be another allocation's private memory, which MADV_DONTNEED would zero. (A store Ray put
    elsewhere, /dev/shm being too small, is left as it is.)"""
    with open("/proc/self/maps") as maps:
        regions = [(start, end) for line in maps if (found := _plasma_mapping(line))
                   for start, end, path in [found] if path.startswith("/dev/shm/")]
    return max(regions, key=lambda region: region[1] - region[0], default=None)


def mapped_bytes() -> int:
    """How much of the object store this process maps now (the resident pages of those mappings)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024 if inside else 0
            elif line[:1] in "0123456789abcdef":  # a mapping's first line (the others are "Name: ...")
                inside = _plasma_mapping(line) is not None
    return total


def release() -> bool:
    """Drops this process's mappings of the object store's pages (they stay in the store); whether
    it did."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    try:
        region = store_region()
    except OSError:  # no /proc here: nothing changes
        return False
    if region is None:
        return False
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _libc.madvise(region[0], region[1] - region[0], MADV_DONTNEED) == 0
